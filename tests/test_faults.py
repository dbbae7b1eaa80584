"""The fault suite: whatever happens to the flow, nothing we started outlives it.

Each test ends by asserting no leftover scheduler job, Ray process or temp dir.
Faults tried here (with test_slurm_e2e's rejected/unstartable/stuck jobs and
test_local_e2e's failing user job) are counted in the README."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import PYTHON, REPO, assert_nothing_left, live_jobs, ray_processes
from tests.test_slurm_e2e import slurm_args

pytestmark = pytest.mark.timeout(300)


class BackgroundFlow:
    """`python -m flows.ray_cluster` as a process we can signal."""

    def __init__(self, args: list[str], tmp: Path, api: str, wrap=None):
        self.info_file = tmp / "info.json"
        self.log = tmp / "flow.log"
        command = [PYTHON, "-m", "flows.ray_cluster", "--info-file", str(self.info_file), *args]
        self.process = subprocess.Popen(
            wrap(command) if wrap else command, cwd=REPO, env={**os.environ, "PREFECT_API_URL": api},
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while not self.info_file.exists():
            assert self.process.poll() is None, f"flow ended early:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"not ready:\n{self.output[-4000:]}"
            time.sleep(0.2)
        time.sleep(0.1)
        return json.loads(self.info_file.read_text())

    def wait(self, timeout: float = 120) -> int:
        return self.process.wait(timeout)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def cluster_processes(cluster_id: str) -> list[str]:
    return ray_processes(f"/{cluster_id}-")


def wait_for(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} not within {timeout}s"
        time.sleep(0.2)
    return time.monotonic() - start


def keep_alive_args(bed, work, *extra):
    return slurm_args(bed, work, "--keep-alive", "--cluster-idle-timeout", "30", *extra)


def test_sigterm_tears_down(tmp_path, prefect_api, bed):
    work = tmp_path / "work"
    flow = BackgroundFlow(keep_alive_args(bed, work, "--slurm.nodes", "2"), tmp_path, prefect_api, bed.login_argv)
    try:
        info = flow.wait_ready()
        flow.process.send_signal(signal.SIGTERM)
        assert flow.wait(60) == 143, flow.output[-3000:]
        assert "torn down" in flow.output
        assert live_jobs(bed) == []
        assert_nothing_left(work, cluster_id=info["cluster_id"])
    finally:
        flow.kill()


def test_sigkill_fires_the_dead_man_switch(tmp_path, prefect_api, bed):
    """The flow dies without a word: the cluster notices the silence and ends itself."""
    work = tmp_path / "work"
    flow = BackgroundFlow(
        keep_alive_args(bed, work, "--slurm.nodes", "2", "--heartbeat-timeout", "10"), tmp_path, prefect_api,
        bed.login_argv,
    )
    try:
        info = flow.wait_ready()
        assert live_jobs(bed) != []
        flow.process.kill()
        flow.wait(10)
        # bound: heartbeat timeout + one heartbeat interval + the supervisor's stop
        took = wait_for(lambda: live_jobs(bed) == [] and not cluster_processes(info["cluster_id"]), 40, "self-teardown")
        print(f"dead-man switch: cluster gone {took:.1f}s after SIGKILL")
        assert_nothing_left(work, cluster_id=info["cluster_id"])
    finally:
        flow.kill()


def test_worker_node_killed_mid_run_is_reported_and_cluster_stopped(tmp_path, prefect_api, bed):
    work = tmp_path / "work"
    flow = BackgroundFlow(
        keep_alive_args(bed, work, "--slurm.nodes", "3", "--node-failure", "stop"), tmp_path, prefect_api,
        bed.login_argv,
    )
    try:
        info = flow.wait_ready()
        worker = next(n["node"] for n in info["nodes"] if not n["head"])
        victims = [line.split()[0] for line in cluster_processes(info["cluster_id"])
                   if f"/{info['cluster_id']}-{worker_name(bed, worker)}" in line and "raylet" in line]
        assert victims, cluster_processes(info["cluster_id"])
        os.kill(int(victims[0]), signal.SIGKILL)
        assert flow.wait(90) == 1, flow.output[-3000:]
        assert "Ray node(s) lost" in flow.output and "node_failure=stop" in flow.output
        assert live_jobs(bed) == []
        assert_nothing_left(work, cluster_id=info["cluster_id"])
    finally:
        flow.kill()


def worker_name(bed, node: str) -> str:
    """Ray names a node by its IP; the temp dir by its host name."""
    return next((name for name, ip in bed.node_ips.items() if ip == node), node)


def test_login_sshd_restarted_mid_run(tmp_path, prefect_api, bed):
    """Over SSH: the login node's sshd restarts while the user job runs; the flow goes on."""
    work = tmp_path / "work"
    script = tmp_path / "slow.py"
    script.write_text("import time, ray\nray.init()\ntime.sleep(12)\nprint('SLOW_JOB_DONE')\n")
    flow = BackgroundFlow(
        slurm_args(bed, work, "--host", f"root@{bed.login_ip}", "--python", sys.executable, "--slurm.nodes", "2",
                   "--heartbeat-timeout", "10", "--user-script", str(script)),
        tmp_path, prefect_api, bed.login_argv,
    )
    try:
        info = flow.wait_ready()
        bed.restart_sshd(bed.login_host)
        assert flow.wait(120) == 0, flow.output[-4000:]
        assert "SLOW_JOB_DONE" in flow.output
        assert live_jobs(bed) == []
        assert_nothing_left(work, cluster_id=info["cluster_id"])
    finally:
        flow.kill()


def test_second_cluster_on_the_same_host_survives_the_first_ones_teardown(tmp_path, prefect_api):
    """Two clusters of one user on one host: tearing one down never touches the other."""
    work_a, work_b = tmp_path / "a", tmp_path / "b"
    (tmp_path / "a-run").mkdir()
    (tmp_path / "b-run").mkdir()
    small = ["--ray-memory-gb", "0.5", "--object-store-memory-gb", "0.25"]
    keeper = BackgroundFlow(["--keep-alive", "--work-dir", str(work_a), *small], tmp_path / "a-run", prefect_api)
    try:
        info_a = keeper.wait_ready()
        before = cluster_processes(info_a["cluster_id"])
        assert before
        other = subprocess.run(
            [PYTHON, "-m", "flows.ray_cluster", "--work-dir", str(work_b), *small,
             "--info-file", str(tmp_path / "b-run/info.json"), "--user-script", str(REPO / "examples/hello_ray.py")],
            cwd=REPO, env={**os.environ, "PREFECT_API_URL": prefect_api}, capture_output=True, text=True, timeout=200,
        )
        assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
        info_b = json.loads((tmp_path / "b-run/info.json").read_text())
        assert cluster_processes(info_b["cluster_id"]) == []
        # A is untouched: same processes, and its head still answers.
        assert {l.split()[0] for l in cluster_processes(info_a["cluster_id"])} >= {l.split()[0] for l in before if "raylet" in l or "gcs_server" in l}
        assert Path(f"/tmp/{info_a['cluster_id']}-head").is_dir()
        keeper.process.send_signal(signal.SIGINT)  # Ctrl-C
        assert keeper.wait(60) == 130, keeper.output[-3000:]
        assert "torn down" in keeper.output
        assert_nothing_left(work_a, cluster_id=info_a["cluster_id"])
        assert_nothing_left(work_b, cluster_id=info_b["cluster_id"])
    finally:
        keeper.kill()
