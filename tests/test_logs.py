"""What a failure leaves the user, for real: every node's Ray logs and the job's output
survive teardown in <work_dir>/logs/<cluster id>/; the error names the node that failed
and shows the end of its log; `python -m flows.ray_cluster logs` prints them; old
clusters' logs are pruned."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import (
    CLUSTER_STARTED_RE,
    REPO,
    SMALL,
    BackgroundFlow,
    KeepKilling,
    assert_nothing_left,
    batch_args,
    run_flow,
    wait_for,
)


def node_logs(logs: Path) -> dict[str, list[str]]:
    return {node.name: sorted(f.name for f in node.iterdir()) for node in sorted(logs.iterdir())}


@pytest.mark.bed
@pytest.mark.timeout(400)
def test_a_node_that_never_joins_is_named_with_its_log_and_every_nodes_logs_stay(work, prefect_api, bed):
    with KeepKilling(bed, "node2") as killer:
        run = run_flow(bed, batch_args(work / "w", "--slurm.nodes", "3", "--retries", "0", readiness=40),
                       work=work, api=prefect_api, timeout=360)
    assert killer.kills >= 1, "the fault never happened: " + run.output[-4000:]
    assert run.returncode == 1, run.output[-4000:]
    (cluster,) = set(CLUSTER_STARTED_RE.findall(run.output))
    logs = work / "w" / "logs" / cluster
    assert f"failed node(s): node2; logs of every node: {logs}" in run.output, run.output[-4000:]
    assert re.search(r"--- node2: last lines of (raylet\.out|ray-node2\.log) ", run.output), run.output[-4000:]
    found = node_logs(logs)
    assert {"head", "node2", "node3", "job"} <= found.keys(), found
    assert "gcs_server.out.gz" in found["head"] and "raylet.out.gz" in found["node3"], found
    assert "raylet.out.gz" in found["node2"] or "ray-node2.log.gz" in found["node2"], found
    assert any(name.startswith("job-") and name.endswith(".out.gz") for name in found["job"]), found
    assert (logs / "node3" / "HOST").read_text().strip() == "node3"
    assert oct((logs).stat().st_mode & 0o777) == oct(0o700)  # the user's alone: logs can hold data
    assert f"logs of cluster {cluster}" in run.output and f"logs {cluster}" in run.output
    assert_nothing_left(bed, cluster, work / "w")


@pytest.mark.bed
@pytest.mark.timeout(300)
def test_a_failing_jobs_driver_log_stays_and_the_logs_command_prints_it(work, prefect_api, bed):
    script = work / "boom.py"
    script.write_text("import ray\nray.init()\nprint('DRIVER_SAID_THIS_BEFORE_FAILING')\nraise SystemExit(3)\n")
    run = run_flow(bed, ["--user-script", script, "--work-dir", work / "w", *SMALL], work=work, api=prefect_api)
    assert run.returncode == 1, run.output[-4000:]
    (cluster,) = set(CLUSTER_STARTED_RE.findall(run.output))
    found = node_logs(work / "w" / "logs" / cluster)
    assert any(name.startswith("job-driver-") for name in found["head"]), found
    shown = bed.run_login([bed.user_python, "-m", "flows.ray_cluster", "logs", cluster, "--work-dir", str(work / "w"),
                           "--node", "head", "--tail", "50"], user=bed.user, cwd=bed.repo, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert re.search(r"^===== head on login: job-driver-\S+\.log$", shown.stdout, re.M), shown.stdout[-3000:]
    assert "DRIVER_SAID_THIS_BEFORE_FAILING" in shown.stdout
    assert "===== node" not in shown.stdout  # --node head: that node's only
    missing = bed.run_login([bed.user_python, "-m", "flows.ray_cluster", "logs", cluster, "--work-dir",
                             str(work / "w"), "--node", "nosuchnode"], user=bed.user, cwd=bed.repo, timeout=120)
    assert missing.returncode == 3 and "no logs of nosuchnode" in missing.stderr
    assert_nothing_left(bed, cluster, work / "w")


@pytest.mark.bed
@pytest.mark.timeout(300)
def test_no_keep_logs_keeps_nothing(work, prefect_api, bed):
    run = run_flow(bed, ["--user-script", REPO / "examples/hello_ray.py", "--work-dir", work / "w", "--no-keep-logs",
                         *SMALL], work=work, api=prefect_api)
    assert run.returncode == 0, run.output[-4000:]
    assert not (work / "w" / "logs").exists() or list((work / "w" / "logs").iterdir()) == []
    assert "logs of cluster" not in run.output and run.info["logs_dir"] == ""
    assert_nothing_left(bed, run.cluster_id, work / "w")


def make_logs(root: Path, ages_days: list[float]) -> list[str]:
    names = []
    for index, age in enumerate(ages_days):
        name = f"ar-{index:032x}"
        (root / name / "head").mkdir(parents=True)
        stamp = time.time() - age * 86400
        os.utime(root / name, (stamp, stamp))
        names.append(name)
    return names


def prune(root: Path, keep: int, days: float) -> None:
    subprocess.run(["bash", str(REPO / "scripts/prune_logs.sh"), str(root), str(keep), str(days)], check=True, timeout=30)


def test_retention_keeps_the_newest_clusters_and_none_too_old(tmp_path):
    names = make_logs(tmp_path, [0.1, 0.2, 0.3, 0.4, 8.0, 30.0])
    (tmp_path / "not-ours").mkdir()
    (tmp_path / "ar-short").mkdir()
    prune(tmp_path, keep=3, days=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[:3], "not-ours", "ar-short"])


def test_retention_by_age_alone(tmp_path):
    names = make_logs(tmp_path, [1, 2, 8, 9])
    prune(tmp_path, keep=20, days=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == names[:2]


def test_retention_of_a_work_dir_without_logs_is_nothing(tmp_path):
    prune(tmp_path / "nope", keep=1, days=1)
    assert not (tmp_path / "nope").exists()


@pytest.mark.bed
@pytest.mark.timeout(300)
def test_on_failure_keep_leaves_the_failed_cluster_up_for_that_long_then_nothing(work, prefect_api, bed):
    script = work / "boom.py"
    script.write_text("raise SystemExit(3)\n")
    flow = BackgroundFlow(bed, ["--user-script", script, "--work-dir", work / "w", "--on-failure", "keep=0.25", *SMALL],
                          work, prefect_api)
    try:
        info = flow.wait_ready()
        wait_for(lambda: "keeping the failed cluster" in flow.output, 120, "the failed cluster kept up")
        assert "user job failed: keeping the failed cluster" in flow.output
        kept_at = time.monotonic()
        # still up and answering: its Ray processes run, its job API answers with the token
        assert bed.cluster_processes(info["cluster_id"]), "the failed cluster was torn down at once"
        token = Path(info["token_file"]).read_text().strip()
        answered = bed.run_login([bed.user_python, "-c", ASK_JOB_API, str(info["dashboard_port_on_head"]), token],
                                 user=bed.user, timeout=30)
        assert answered.stdout.strip() == "200", answered.stdout + answered.stderr
        assert flow.wait(120) == 1, flow.output[-3000:]
        assert time.monotonic() - kept_at >= 5  # kept about 15 s, not torn down at the failure
        assert "ray-cluster failed (user job failed)" in flow.output
    finally:
        flow.stop()
    assert_nothing_left(bed, info["cluster_id"], work / "w")


ASK_JOB_API = """
import sys, urllib.request
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/api/jobs/", headers={"Authorization": f"Bearer {sys.argv[2]}"})
print(urllib.request.urlopen(request, timeout=10).status)
"""
