"""workflow.yaml end to end on the site bed, run by tests/workflow_runner.py the way
ACTIVATE runs it: the "workspace" is the bed's login node as its unprivileged user,
the resource is that login node over SSH (its scheduler off), the setup job checks
the code out of a local git repository and reuses a venv keyed by pyproject.toml
(no network), the flow starts Ray, the dashboard becomes the run's session once it
answers through the flow's tunnel, the user's script runs, and the cleanup step
runs after the flow whatever its result. Nothing may be left behind."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_nothing_left, wait_for

pytestmark = [pytest.mark.bed, pytest.mark.timeout(600)]

# The user's script holds the cluster up until the test has seen the session (and the
# dashboard behind it), so "while the cluster was up" is a fact, not a race.
HOLDING_SCRIPT = textwrap.dedent(
    """
    import os, time
    import ray
    ray.init()
    print("WORKFLOW_SCRIPT_STARTED", flush=True)
    release, deadline = {release!r}, time.time() + 240
    while not os.path.exists(release):
        if time.time() > deadline:
            raise SystemExit("WORKFLOW_SCRIPT never released")
        time.sleep(0.5)
    print("WORKFLOW_SCRIPT_OK " + str(ray.cluster_resources()["CPU"]) + " CPUs")
    """
)
FAILING_SCRIPT = "import ray\nray.init()\nprint('WORKFLOW_SCRIPT_FAILING', flush=True)\nraise SystemExit(3)\n"


@pytest.fixture
def source_repo(bed, work) -> Path:
    """This tree as a git repository the bed user can clone: the setup job's checkout
    (the workflow's source.repo input), committed on branch main."""
    src = work / "src"
    steps = [
        ["cp", "-r", str(bed.repo), str(src)],
        ["git", "-C", str(src), "init", "-q", "-b", "main"],
        ["git", "-C", str(src), "add", "-A"],
        ["git", "-C", str(src), "-c", "user.name=bed", "-c", "user.email=bed@localhost", "commit", "-q", "-m", "snapshot"],
    ]
    for argv in steps:
        bed.run_login(argv, user=bed.user, check=True)
    return src


@pytest.fixture
def seeded_venv(bed):
    """The venv the setup job reuses, where it looks for it ($HOME/.activate-ray/workflow-venvs/
    <pyproject.toml's hash>): the bed user's Python with the project's dependencies, so the
    setup job installs nothing (the bed has no way out)."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    venvs = bed.user.home / ".activate-ray" / "workflow-venvs"
    bed.run_login(["mkdir", "-p", str(venvs)], user=bed.user, check=True)
    bed.run_login(["ln", "-sfn", str(bed.user_venv), str(venvs / key)], user=bed.user, check=True)
    yield venvs / key
    shutil.rmtree(venvs, ignore_errors=True)


class WorkflowRun:
    """tests/workflow_runner.py on workflow.yaml, as the bed user on the login node."""

    def __init__(self, bed, work: Path, api: str, inputs: dict):
        self.run_dir, self.result_file, self.log = work / "run", work / "result.json", work / "runner.log"
        inputs_file = work / "inputs.json"
        inputs_file.write_text(json.dumps(inputs, indent=2))
        argv = [bed.user_python, f"{bed.repo}/tests/workflow_runner.py", f"{bed.repo}/workflow.yaml",
                "--inputs", inputs_file, "--run-dir", self.run_dir, "--result", self.result_file, "--name", "bedrun"]
        env = {"PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(bed.host_argv("login", argv, user=bed.user, env=env, cwd=work),
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def result(self) -> dict:
        return json.loads(self.result_file.read_text()) if self.result_file.exists() else {}

    def wait(self, timeout: float = 400) -> dict:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the run did not end within {timeout} s:\n{self.report()}") from None
        return self.result()

    def report(self) -> str:
        lines = [self.log.read_text()[-3000:]]
        for name, job in self.result().get("jobs", {}).items():
            for step in job["steps"]:
                lines.append(f"--- {name} [{step['kind']}] {step['name']}: {step['status']}\n{step['output'][-3000:]}")
        return "\n".join(lines)


def step_output(result: dict, job: str, kind: str = "steps") -> str:
    return "".join(s["output"] for s in result["jobs"][job]["steps"] if s["kind"] == kind)


def inputs_for(bed, work: Path, source: Path, script: str) -> dict:
    return {
        # a SLURM resource with "submit to the job scheduler" off: Ray on the login node itself
        "resource": {"ip": "login", "schedulerType": "slurm", "id": "bed-login"},
        "scheduler": False,
        "source": {"repo": str(source), "branch": "main"},
        "cluster": {"ray_memory_gb": 0.5, "object_store_memory_gb": 0.25},
        "environment": {"python": bed.user_python, "work_dir": str(work / "w")},
        "user_script": script,
    }


def nothing_of_the_user_left(bed, settle: float = 20) -> None:
    deadline = time.monotonic() + settle
    while (left := bed.processes(user=bed.user)) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert left == [], "processes of the bed user left after the run:\n" + "\n".join(map(str, left))


def test_the_workflow_runs_end_to_end_with_the_dashboard_as_its_session(bed, work, prefect_api, source_repo,
                                                                        seeded_venv):
    release = work / "release"
    run = WorkflowRun(bed, work, prefect_api, inputs_for(bed, work, source_repo, HOLDING_SCRIPT.format(
        release=str(release))))
    try:
        # the session is set while the user's script holds the cluster up
        wait_for(lambda: run.result().get("sessions") or run.process.poll() is not None, 300, "the session")
        result = run.result()
        assert result["sessions"], run.report()
        (session,) = result["sessions"]
        outputs = result["jobs"]["connection_info"]["outputs"]
        port = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", outputs["dashboard_url"]).group(1)
        assert session["with"] == {"name": "bedrun-dashboard", "target": "user-workspace",
                                   "remoteHost": "127.0.0.1", "remotePort": port, "status": "running"}
        assert outputs["dashboard_host"] == "127.0.0.1" and outputs["dashboard_port"] == port
        assert session["probe"]["status"] == 200, session
        assert "Ray" in session["probe"]["body"], session["probe"]
        # the same host:port is the cluster's dashboard: its API, in the workspace, while the cluster is up,
        # refused without the cluster's token and answered with it
        token_file = json.loads((run.run_dir / "ray-cluster.json").read_text())["token_file"]
        ask = ("import sys, urllib.request, urllib.error\n"
               "headers = {'Authorization': 'Bearer ' + open(sys.argv[2]).read().strip()} if sys.argv[2:] else {}\n"
               "request = urllib.request.Request(f'http://127.0.0.1:{sys.argv[1]}/api/version', headers=headers)\n"
               "try:\n    sys.stdout.write(urllib.request.urlopen(request, timeout=10).read().decode())\n"
               "except urllib.error.HTTPError as exc:\n    sys.stdout.write(f'HTTP {exc.code}')\n")
        refused = bed.run_login([bed.user_python, "-c", ask, port], user=bed.user)
        assert refused.stdout == "HTTP 401", refused.stdout + refused.stderr
        version = bed.run_login([bed.user_python, "-c", ask, port, token_file], user=bed.user)
        assert version.returncode == 0, version.stderr
        assert json.loads(version.stdout)["ray_version"] == "2.60.0", version.stdout
        assert result["jobs"]["ray_cluster"]["status"] == "running", "the cluster must still be up"
    finally:
        release.touch()
    result = run.wait()
    assert result["status"] == "success", run.report()
    assert {name: job["status"] for name, job in result["jobs"].items()} == {
        "setup": "success", "ray_cluster": "success", "connection_info": "success", "dashboard_session": "success"}
    # the setup job checked out the given repository and reused the seeded venv (nothing installed)
    setup = result["jobs"]["setup"]["outputs"]
    assert setup == {"python": f"{seeded_venv}/bin/python", "repo": str(run.run_dir / "setup")}
    assert (run.run_dir / "setup" / "workflow.yaml").read_text() == (source_repo / "workflow.yaml").read_text()
    log = step_output(result, "ray_cluster")
    assert "WORKFLOW_SCRIPT_OK" in log, log[-3000:]
    # connection_info published the cluster as the flow's info file has it
    outputs = result["jobs"]["connection_info"]["outputs"]
    info = json.loads((run.run_dir / "ray-cluster.json").read_text())
    assert outputs["cluster_id"] == info["cluster_id"] and re.fullmatch(r"ar-[0-9a-f]{32}", outputs["cluster_id"])
    assert outputs["scheduler"] == "none" and outputs["nodes"] == "1" and outputs["head_node"] == info["head_node"]
    assert outputs["tunnel_command"].startswith("ssh -N ") and outputs["ray_address"] == info["ray_address"]
    # the cleanup ran after the flow, found this run's cluster, and it was already down
    cleanup = step_output(result, "ray_cluster", "cleanup")
    assert f"nothing left of cluster {info['cluster_id']}" in cleanup, cleanup
    assert_nothing_left(bed, info["cluster_id"], work / "w")
    nothing_of_the_user_left(bed)


def test_a_failing_script_fails_the_run_and_the_cleanup_leaves_nothing(bed, work, prefect_api, source_repo,
                                                                       seeded_venv):
    run = WorkflowRun(bed, work, prefect_api, inputs_for(bed, work, source_repo, FAILING_SCRIPT))
    result = run.wait()
    assert result["status"] == "failure", run.report()
    jobs = result["jobs"]
    assert jobs["setup"]["status"] == "success" and jobs["ray_cluster"]["status"] == "failure", run.report()
    assert "WORKFLOW_SCRIPT_FAILING" in step_output(result, "ray_cluster"), run.report()
    # the cleanup ran although the job failed, and found this run's cluster by its state file
    (cleanup,) = [s for s in jobs["ray_cluster"]["steps"] if s["kind"] == "cleanup"]
    assert cleanup["status"] == "success", cleanup
    state = dict(line.split("=", 1) for line in (run.run_dir / "ray-cluster.state").read_text().splitlines())
    # (the flow tore its cluster down itself: the cleanup command finds nothing left of it)
    assert f"nothing left of cluster {state['cluster_id']}" in cleanup["output"], cleanup
    # connection_info either published the cluster before the failure or was cancelled by it;
    # a session, if any, was set on the flow's tunnel
    assert jobs["connection_info"]["status"] in ("success", "cancelled")
    assert all(s["with"]["remoteHost"] == "127.0.0.1" for s in result["sessions"])
    assert_nothing_left(bed, state["cluster_id"], work / "w")
    nothing_of_the_user_left(bed)
