"""Worker jobs on the site bed's real SLURM: a running cluster grows and shrinks by jobs of
its own (`scale --add/--remove`), and follows Ray's pending demand (`scale.adapt`). The
teardown leaves no job, queued or running, and no process."""

import json
import re
import signal

import pytest

from tests.helpers import BIG_TASK, SPREAD, BackgroundFlow, assert_nothing_left, batch_args, flow_env, run_flow

pytestmark = [pytest.mark.bed, pytest.mark.timeout(400)]


def scale(bed, prefect_api, cluster_id, work_dir, *change, timeout="120") -> dict:
    """`python -m flows.ray_cluster scale ...` as the bed's user on the login node."""
    result = bed.run_login([bed.user_python, "-m", "flows.ray_cluster", "scale", cluster_id, *change,
                            "--host", f"{bed.user_name}@{bed.login_ip}", "--work-dir", str(work_dir), "--timeout", timeout],
                           user=bed.user, env=flow_env(prefect_api, repo=bed.repo), cwd=bed.repo, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_add_two_worker_jobs_spread_a_job_remove_one_then_nothing_left(work, prefect_api, bed):
    """A 1-node cluster gets 2 worker jobs of 2 CPUs each (so SLURM puts each on a node of its
    own): 3 Ray nodes, a job spreads over the three hosts. A third waits in the queue (every
    node is full) and is the first removed; then the newest running one: 2 nodes. The
    teardown ends the rest, a queued one included."""
    flow = BackgroundFlow(bed, batch_args(work / "w", "--slurm.nodes", "1", "--keep-alive", "--scale.worker-cpus", "2",
                                          "--host", f"{bed.user_name}@{bed.login_ip}", "--python", bed.user_python), work, prefect_api)
    try:
        info = flow.wait_ready()
        cluster_id = info["cluster_id"]
        assert len(info["nodes"]) == 1
        added = scale(bed, prefect_api, cluster_id, work / "w", "--add", "2")
        assert len(added["added"]) == 2 and added["nodes_alive"] == 3, added
        live = bed.live_jobs(name=cluster_id)  # the worker jobs carry the cluster's name: squeue -n shows them all
        assert len(live) == 3 and {line.split()[0] for line in live} >= set(added["added"]), live
        spread = work / "spread.py"
        spread.write_text(SPREAD)
        submitted = bed.run_login(
            [str(bed.user_venv / "bin" / "ray"), "job", "submit", "--address", info["dashboard_url"], "--",
             "python", str(spread)],
            user=bed.user, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": info["token_file"]},
            cwd=work, timeout=180)
        assert "HOSTS=node1,node2,node3\n" in submitted.stdout, submitted.stdout[-3000:] + submitted.stderr[-2000:]
        # every node is full now: a third worker job waits in the queue, and is the first to go
        queued = scale(bed, prefect_api, cluster_id, work / "w", "--add", "1", timeout="0")["added"][0]
        assert f"{queued} PENDING" in " ".join(bed.live_jobs(name=cluster_id)), bed.live_jobs(name=cluster_id)
        removed = scale(bed, prefect_api, cluster_id, work / "w", "--remove", "1")
        assert removed["removed"] == [queued] and removed["nodes_alive"] == 3, removed
        removed = scale(bed, prefect_api, cluster_id, work / "w", "--remove", "1")
        assert len(removed["removed"]) == 1 and removed["nodes_alive"] == 2, removed
        assert removed["removed"][0] == added["added"][1], "the newest worker job goes first"
        assert bed.job_state(removed["removed"][0]) in ("COMPLETED", None), "a removed worker stops itself: exit 0"
        assert len(bed.live_jobs(name=cluster_id)) == 2
        # the freed node takes one more; the one after it waits in the queue for the teardown,
        # which cancels it with the running ones
        again = scale(bed, prefect_api, cluster_id, work / "w", "--add", "1", timeout="0")["added"][0]
        left_queued = scale(bed, prefect_api, cluster_id, work / "w", "--add", "1", timeout="0")["added"][0]
        assert f"{left_queued} PENDING" in " ".join(bed.live_jobs(name=cluster_id))
        flow.send_signal(signal.SIGINT)
        assert flow.wait(120) == 128 + signal.SIGINT, flow.output[-3000:]
        assert f"worker jobs {added['added'][0]}, {again}, {left_queued})" in flow.output, flow.output[-3000:]
    finally:
        flow.stop()
    assert "Ray node(s) lost" not in flow.output, "a removed worker job is not a lost node"
    assert_nothing_left(bed, cluster_id, work / "w")


def test_adaptive_submits_worker_jobs_for_unmet_demand_and_releases_them_when_idle(work, prefect_api, bed):
    script = work / "big.py"
    script.write_text(BIG_TASK)
    run = run_flow(bed, batch_args(work / "w", "--slurm.nodes", "1", "--user-script", script, "--keep-alive",
                                   "--cluster-idle-timeout", "0.2", "--scale.adapt", "min=0,max=2",
                                   "--scale.worker-cpus", "2", "--scale.idle-timeout", "3", "--scale.cooldown", "1",
                                   "--host", f"{bed.user_name}@{bed.login_ip}", "--python", bed.user_python),
                   work=work, api=prefect_api)
    assert run.returncode == 0, run.output[-5000:]
    output = run.output
    assert "BIG_ON=node" in output, output[-4000:]
    assert "adapt: unmet demand {'CPU': 2.0}: submitting 1 worker job(s)" in output, output[-4000:]
    # no more walltime than the cluster's allocation had left (10 minutes less its start)
    capped = re.search(r"worker job\(s\) submitted to slurm: \S+ \(walltime (\d+)s: the allocation's end\)", output)
    assert capped and 480 < int(capped.group(1)) < 600, output[-4000:]
    released = output.index("idle for")
    assert "releasing it" in output[released:released + 80]
    assert released < output.index("torn down"), "released while the cluster was still up"
    decisions = [line for line in output.splitlines() if "adapt:" in line]
    assert sum("submitting" in line for line in decisions) == 1, "never more than the demand needs:\n" + "\n".join(decisions)
    assert_nothing_left(bed, run.cluster_id, work / "w")

