"""The fault suite: whatever happens to the flow, nothing we started outlives it.

Each test ends by asserting that its own cluster left no scheduler job, process or
temp dir on any host of the site bed. Faults tried here (with test_batch_e2e's
rejected/unstartable/stuck jobs and test_local_e2e's failing user job) are counted
in docs/testing.md."""

from __future__ import annotations

import os
import signal

import pytest

from tasks.settings import node_tmp_name
from tests.helpers import REPO, SMALL, BackgroundFlow, assert_nothing_left, batch_args, flow_env, run_flow, wait_for

pytestmark = [pytest.mark.bed, pytest.mark.timeout(300)]


def keep_alive_args(work, *extra):
    return batch_args(work / "w", "--keep-alive", "--cluster-idle-timeout", "30", *extra)


def test_sigterm_tears_down(work, prefect_api, bed):
    flow = BackgroundFlow(bed, keep_alive_args(work, "--slurm.nodes", "2"), work, prefect_api)
    try:
        info = flow.wait_ready()
        flow.send_signal(signal.SIGTERM)
        assert flow.wait(15) == 143, flow.output[-3000:]
        assert "torn down" in flow.output
        # stopped on purpose: Cancelled, not Crashed or Failed, and the message says so
        state = flow.run_state(prefect_api)
        assert state["type"] == "CANCELLED" and "stopped by SIGTERM" in state["message"], state
        assert_nothing_left(bed, info["cluster_id"], work / "w")
    finally:
        flow.stop()


def test_sigkill_fires_the_dead_man_switch(work, prefect_api, bed):
    """The flow dies without a word: every node notices the silence and ends itself,
    and the scheduler records the job as failed. Its worker jobs go too: the running one
    stops itself, and the head cancels the one still queued (2-CPU worker jobs: node3
    takes one, the other waits)."""
    flow = BackgroundFlow(bed, keep_alive_args(work, "--slurm.nodes", "2", "--heartbeat-timeout", "10",
                                               "--scale.worker-cpus", "2"), work, prefect_api)
    try:
        info = flow.wait_ready()
        added = bed.run_login([bed.user_python, "-m", "flows.ray_cluster", "scale", info["cluster_id"], "--add", "2",
                               "--work-dir", str(work / "w"), "--timeout", "0"], user=bed.user,
                              env=flow_env(prefect_api, repo=bed.repo), cwd=bed.repo, timeout=120)
        assert added.returncode == 0, added.stderr[-2000:]
        wait_for(lambda: sorted(line.split()[1] for line in bed.live_jobs(name=info["cluster_id"]))
                 == ["PENDING", "RUNNING", "RUNNING"], 30, "one worker job running, one queued")
        flow.kill()
        # bound: heartbeat timeout + one heartbeat interval + the nodes' stop
        took = wait_for(lambda: bed.live_jobs(name=info["cluster_id"]) == []
                        and not bed.cluster_processes(info["cluster_id"]), 40, "self-teardown")
        print(f"dead-man switch: cluster gone {took:.1f}s after SIGKILL")
        # nobody ran the flow's teardown: its state file stays for the next run's cleanup
        (bed.user.home / ".activate-ray" / "runs" / f"{info['cluster_id']}.json").unlink(missing_ok=True)
        assert_nothing_left(bed, info["cluster_id"], work / "w")
        fields = bed.job_fields(info["job_id"])
        assert fields.get("JobState") == "FAILED", fields
    finally:
        flow.stop()


def test_workflow_cleanup_tears_down_after_the_flow_was_killed(work, prefect_api, bed):
    """workflow.yaml's cleanup, as the user on the login node, from the state file the
    flow wrote: the job is cancelled and nothing is left, long before the dead-man switch."""
    import yaml

    cleanup = yaml.safe_load((REPO / "workflow.yaml").read_text())["jobs"]["ray_cluster"]["cleanup"][0]["run"]
    job_dir = work / "job"
    bed.run_on("login", ["mkdir", str(job_dir)], user=bed.user, check=True)
    state_file = job_dir / "ray-cluster.state"
    flow = BackgroundFlow(bed, keep_alive_args(work, "--slurm.nodes", "2", "--state-file", state_file), work,
                          prefect_api)
    try:
        info = flow.wait_ready()
        state = state_file.read_text()
        assert f"cluster_id={info['cluster_id']}\nscheduler=slurm\njob_id={info['job_id']}\n" == state
        flow.kill()
        # the job's env, as workflow.yaml sets it from the setup step's outputs
        env = {"PW_PARENT_JOB_DIR": str(job_dir), "WF_HOST": "", "WF_WORK_DIR": str(work / "w"),
               "WF_REPO": str(bed.repo), "WF_PYTHON": bed.user_python}
        result = bed.run_on("login", ["bash", "-c", cleanup], user=bed.user, env=env, cwd=job_dir, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"tearing down cluster {info['cluster_id']} (scheduler slurm, job {info['job_id']}" in result.stdout
        wait_for(lambda: bed.live_jobs(name=info["cluster_id"]) == [], 30, "job cancelled")
        # the flow's own hook never ran: its runs state stays for the next run's cleanup
        (bed.user.home / ".activate-ray" / "runs" / f"{info['cluster_id']}.json").unlink(missing_ok=True)
        assert_nothing_left(bed, info["cluster_id"], work / "w")
    finally:
        flow.stop()


def test_worker_node_killed_mid_run_is_reported_and_cluster_stopped(work, prefect_api, bed):
    flow = BackgroundFlow(bed, keep_alive_args(work, "--slurm.nodes", "3", "--node-failure", "stop"),
                          work, prefect_api)
    try:
        info = flow.wait_ready()
        victims = [line.split()[1] for line in bed.cluster_processes(info["cluster_id"])
                   if line.split()[0] != info["head_node"] and "raylet" in line]
        assert victims, bed.cluster_processes(info["cluster_id"])
        os.kill(int(victims[0]), signal.SIGKILL)
        assert flow.wait(90) == 1, flow.output[-3000:]
        assert "Ray node(s) lost" in flow.output and "node_failure=stop" in flow.output
        assert_nothing_left(bed, info["cluster_id"], work / "w")
    finally:
        flow.stop()


def test_login_sshd_restarted_mid_run(work, prefect_api, bed):
    """Over SSH: the login node's sshd restarts while the user job runs; the flow goes on."""
    script = work / "slow.py"
    script.write_text("import time, ray\nray.init()\ntime.sleep(12)\nprint('SLOW_JOB_DONE')\n")
    flow = BackgroundFlow(bed, batch_args(work / "w", "--host", f"{bed.user_name}@{bed.login_ip}", "--python",
                                          bed.user_python, "--slurm.nodes", "2", "--heartbeat-timeout", "10",
                                          "--user-script", script), work, prefect_api)
    try:
        info = flow.wait_ready()
        bed.restart_sshd(bed.login_host)
        assert flow.wait(120) == 0, flow.output[-4000:]
        assert "SLOW_JOB_DONE" in flow.output
        assert_nothing_left(bed, info["cluster_id"], work / "w")
    finally:
        flow.stop()


def test_second_cluster_on_the_same_host_survives_the_first_ones_teardown(work, prefect_api, bed):
    """Two clusters of one user on one host: tearing one down never touches the other;
    Ctrl-C then ends the first within 15 s."""
    for name in ("a", "b"):
        (work / name).mkdir()
        os.chown(work / name, bed.user.uid, bed.user.gid)
    keeper = BackgroundFlow(bed, ["--keep-alive", "--work-dir", work / "a" / "w", *SMALL], work / "a", prefect_api)
    try:
        info_a = keeper.wait_ready()
        before = {line.split()[1] for line in bed.cluster_processes(info_a["cluster_id"])
                  if "raylet" in line or "gcs_server" in line}
        assert before
        other = run_flow(bed, ["--work-dir", work / "b" / "w", *SMALL, "--user-script", REPO / "examples/hello_ray.py"],
                         work=work / "b", api=prefect_api, timeout=200)
        assert other.returncode == 0, other.output[-3000:]
        assert_nothing_left(bed, other.cluster_id, work / "b" / "w")
        # A is untouched: same processes, its temp dir still there.
        assert {line.split()[1] for line in bed.cluster_processes(info_a["cluster_id"])} >= before
        assert bed.temp_dirs(node_tmp_name(info_a['cluster_id']) + "*")
        keeper.send_signal(signal.SIGINT)  # Ctrl-C
        assert keeper.wait(15) == 130, keeper.output[-3000:]
        assert "torn down" in keeper.output
        assert keeper.run_state(prefect_api)["type"] == "CANCELLED"
        assert_nothing_left(bed, info_a["cluster_id"], work / "a" / "w")
    finally:
        keeper.kill()
