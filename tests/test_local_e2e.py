"""Local mode, for real: the bed's user runs the flow on the login node, Ray on that
node, the user's job, nothing left behind."""

import re

import pytest

from tests.helpers import REPO, SMALL, assert_nothing_left, run_flow

pytestmark = [pytest.mark.bed, pytest.mark.timeout(300)]


def test_local_cluster_runs_hello_ray_and_leaves_nothing(work, prefect_api, bed):
    run = run_flow(
        bed, ["--user-script", REPO / "examples/hello_ray.py", "--direct-workers", "1", "--work-dir", work / "w", *SMALL],
        work=work, api=prefect_api,
    )
    assert run.returncode == 0, run.output[-4000:]
    assert "HELLO_RAY_OK" in run.output
    assert "2 node(s), 2 CPUs" in run.output
    assert run.info["scheduler"] == "none" and len(run.info["nodes"]) == 2
    assert run.info["dashboard_url"].startswith("http://127.0.0.1:")
    assert "ssh -N -o ExitOnForwardFailure=yes -L 8265:127.0.0.1:" in run.info["tunnel_command"]
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_failing_user_script_fails_the_flow_and_leaves_nothing(work, prefect_api, bed):
    script = work / "boom.py"
    # a burst of lines as it ends: the flow takes the end from the job's status, before Ray's
    # log stream has delivered them, and must still log every line once, in order
    script.write_text("import ray\nray.init()\nprint('ABOUT_TO_FAIL')\n"
                      "print('\\n'.join(f'LINE {i}' for i in range(300)), flush=True)\nraise SystemExit(3)\n")
    run = run_flow(bed, ["--user-script", script, "--work-dir", work / "w", *SMALL], work=work, api=prefect_api)
    assert run.returncode == 1, run.output[-4000:]
    assert "ABOUT_TO_FAIL" in run.output
    assert [int(n) for n in re.findall(r"\[boom\.py\] LINE (\d+)$", run.output, re.M)] == list(range(300))
    assert "FAILED" in run.output
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_failing_environment_step_stops_the_started_supervisor_and_leaves_nothing(work, prefect_api, bed):
    """A local cluster starts while its environment is checked (as a batch job is queued
    while it is built): a setup step that fails ends the flow, and the supervisor already
    waiting for environment.env is stopped with everything it made."""
    run = run_flow(bed, ["--user-script", REPO / "examples/hello_ray.py", "--setup-commands",
                         "echo SETUP_BROKEN >&2; exit 3", "--work-dir", work / "w", *SMALL],
                   work=work, api=prefect_api)
    assert run.returncode == 1, run.output[-4000:]
    assert "SETUP_BROKEN" in run.output
    assert re.search(r"submitted to none: job \d+", run.output), run.output[-4000:]
    assert "HELLO_RAY_OK" not in run.output
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_script_given_as_text_with_arguments_and_a_runtime_env(work, prefect_api, bed):
    """The form's editor: the script's text, its arguments (one word each, even with spaces
    and quotes) and a runtime env whose working_dir and env_vars reach the job's tasks."""
    data = work / "data"
    data.mkdir()
    (data / "input.txt").write_text("from the working dir\n")
    script = (
        "import os, sys, time, ray\n"
        "ray.init()\n"
        "@ray.remote\n"
        "def read():\n"
        "    return open('input.txt').read().strip(), os.environ['GREETING']\n"
        "text, greeting = ray.get(read.remote())\n"
        "print('ARGS=' + repr(sys.argv[1:]))\n"
        "print('TASK=' + text + '|' + greeting)\n"
        "time.sleep(2)  # the task's CPU is given back; what is still taken is the driver's reservation\n"
        "print('RESERVED_BY_THE_DRIVER=' + str(ray.cluster_resources()['CPU'] - ray.available_resources().get('CPU', 0)))\n"
    )
    run = run_flow(
        bed, ["--user-script", script, "--script-args", '["one", "two words", "it\'s $HOME"]',
              "--runtime-env.working-dir", data, "--runtime-env.env-vars", '{"GREETING": "hi there"}',
              "--runtime-env.entrypoint-num-cpus", "1", "--runtime-env.entrypoint-memory-gb", "0.1",
              "--work-dir", work / "w", *SMALL],
        work=work, api=prefect_api,
    )
    assert run.returncode == 0, run.output[-4000:]
    assert "ARGS=['one', 'two words', \"it's $HOME\"]" in run.output
    assert "TASK=from the working dir|hi there" in run.output
    # the driver's own reservation, as Ray's job API recorded it
    assert "RESERVED_BY_THE_DRIVER=1.0" in run.output, run.output[-3000:]
    assert_nothing_left(bed, run.cluster_id, work / "w")
