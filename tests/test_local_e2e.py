"""Local mode, for real: Ray on this machine, the user's job, nothing left behind."""

from pathlib import Path

import pytest

from tests.conftest import REPO, assert_nothing_left, run_flow

pytestmark = pytest.mark.timeout(300)


def test_local_cluster_runs_hello_ray_and_leaves_nothing(tmp_path, prefect_api):
    work = tmp_path / "work"
    run = run_flow(
        ["--user-script", str(REPO / "examples/hello_ray.py"), "--direct-workers", "1", "--work-dir", str(work)],
        tmp=tmp_path, api=prefect_api,
    )
    assert run.returncode == 0, run.output[-4000:]
    assert "HELLO_RAY_OK" in run.output
    assert "2 node(s), 2 CPUs" in run.output
    assert run.info["scheduler"] == "none" and len(run.info["nodes"]) == 2
    assert run.info["dashboard_url"].startswith("http://127.0.0.1:")
    assert "ssh -N -L 8265:127.0.0.1:" in run.info["tunnel_command"]
    assert_nothing_left(work, cluster_id=run.info["cluster_id"])


def test_failing_user_script_fails_the_flow_and_leaves_nothing(tmp_path, prefect_api):
    script = tmp_path / "boom.py"
    script.write_text("import ray\nray.init()\nprint('ABOUT_TO_FAIL')\nraise SystemExit(3)\n")
    work = tmp_path / "work"
    run = run_flow(["--user-script", str(script), "--work-dir", str(work)], tmp=tmp_path, api=prefect_api)
    assert run.returncode == 1, run.output[-4000:]
    assert "ABOUT_TO_FAIL" in run.output
    assert "FAILED" in run.output
    assert_nothing_left(work, cluster_id=run.info["cluster_id"])
