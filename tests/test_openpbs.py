"""PBS on a real OpenPBS (server, scheduler and comm on the login host, a MoM per node,
job history on): the bed's unprivileged user runs the flow on the login node with
OpenPBS's commands first on PATH; workers start as tasks of the job (pbs_tmrsh); job ids
are OpenPBS's own (`12.login`). Slurm's Torque wrappers are the other PBS flavour
(tests/test_batch_e2e.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time

import pytest

from tasks.schedulers.pbs import pbs_seconds
from tasks.settings import node_tmp_name
from tests.helpers import (
    BIG_TASK,
    SPREAD,
    BackgroundFlow,
    assert_nothing_left,
    batch_args,
    clusters_submitted,
    flow_env,
    never_runs,
    run_flow,
    wait_for,
)

pytestmark = [pytest.mark.bed, pytest.mark.timeout(400)]

OPENPBS_JOB_ID = re.compile(r"^\d+\.login$")
SUBMITTED_RE = re.compile(r"submitted to pbs: job (\S+)")


def spread_script(work) -> str:
    script = work / "spread.py"
    script.write_text(SPREAD)
    return str(script)



def pbs_run(bed, openpbs, work, api, *extra, readiness: int = 120, timeout: int = 300):
    return run_flow(bed, batch_args(work / "w", *extra, scheduler="pbs", readiness=readiness), work=work, api=api,
                    env=openpbs.env(), timeout=timeout)


def submitted_job(output: str) -> str:
    match = SUBMITTED_RE.search(output)
    assert match, output[-3000:]
    return match.group(1)


def test_three_chunks_scatter_over_three_hosts_with_openpbs_job_ids(pbs_work, prefect_api, bed, openpbs):
    """select=3:ncpus=1 with place=scatter: one Ray node per chunk on each host; the job id
    is OpenPBS's own (N.login) everywhere; the job ends by our hand with exit code 0."""
    work = pbs_work
    run = pbs_run(bed, openpbs, work, prefect_api, "--pbs.select", "3:ncpus=1", "--user-script", spread_script(work))
    assert run.returncode == 0, run.output[-5000:]
    assert "HOSTS=node1,node2,node3" in run.output
    info = run.info
    job_id = info["job_id"]
    assert OPENPBS_JOB_ID.match(job_id), info
    assert submitted_job(run.output) == job_id
    assert f"torn down (job {job_id}" in run.output, run.output[-2000:]
    assert info["head_node"] == "node1" and len(info["nodes"]) == 3
    assert_nothing_left(bed, run.cluster_id, work / "w")
    job = openpbs.wait_job_finished(job_id)
    assert job.get("job_state") == "F" and job.get("Exit_status") == 0, job
    assert job["exec_host"].count("+") == 2, job
    # pbs_tmrsh, never pbsdsh -u (OpenPBS's pbsdsh has no -u)
    assert "invalid option" not in run.output


def test_a_sites_select_with_several_chunk_kinds_and_mpiprocs_and_a_site_resource(pbs_work, prefect_api, bed, openpbs):
    """A site's own select (`1:ncpus=2:mpiprocs=2+2:ncpus=1`: PBS_NODEFILE names the head twice)
    and a site resource in extra_directives (ALCF's -l filesystems=): one Ray node per host,
    the resource reaches the job."""
    work = pbs_work
    assert openpbs.qmgr("create resource filesystems type=string").returncode in (0, 1)  # 1: exists already
    run = pbs_run(bed, openpbs, work, prefect_api, "--pbs.select", "1:ncpus=2:mpiprocs=2+2:ncpus=1",
                  "--pbs.extra-directives", "#PBS -l filesystems=home:eagle", "--user-script", spread_script(work))
    assert run.returncode == 0, run.output[-5000:]
    assert "HOSTS=node1,node2,node3" in run.output
    assert len(run.info["nodes"]) == 3
    # no second Ray node on the head's host, not even one that joined after the ready check
    assert sorted(path.name for path in (work / "w" / "logs" / run.cluster_id).iterdir()) == [
        "head", "job", "node2", "node3"]
    job = openpbs.wait_job_finished(run.info["job_id"])
    assert job["Resource_List"]["filesystems"] == "home:eagle", job.get("Resource_List")
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_an_unknown_site_resource_gets_qsubs_own_error_and_nothing_is_left(pbs_work, prefect_api, bed, openpbs):
    work = pbs_work
    run = pbs_run(bed, openpbs, work, prefect_api, "--pbs.extra-directives", "#PBS -l nosuchresource=1",
                  "--user-script", never_runs(work))
    assert run.returncode == 1, run.output[-3000:]
    assert "qsub refused the job" in run.output and "Unknown resource" in run.output, run.output[-3000:]
    assert "NEVER_RUNS" not in run.output
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_a_job_that_can_never_run_is_said_in_pbs_words_at_once(pbs_work, prefect_api, bed, openpbs):
    """More CPUs per chunk than any node has: OpenPBS's scheduler comments 'Can Never Run';
    the flow says so at once (no readiness timeout), the job is deleted, nothing left."""
    work = pbs_work
    started = time.monotonic()
    run = pbs_run(bed, openpbs, work, prefect_api, "--pbs.select", "1:ncpus=64", "--user-script", never_runs(work))
    assert run.returncode == 1, run.output[-3000:]
    assert "can never start as asked" in run.output and "Insufficient amount of resource: ncpus" in run.output, \
        run.output[-3000:]
    assert "not ready after" not in run.output
    assert time.monotonic() - started < 90
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_a_held_job_waits_in_pbs_words_and_the_queue_timeout_ends_it(pbs_work, prefect_api, bed, openpbs):
    work = pbs_work
    run = pbs_run(bed, openpbs, work, prefect_api, "--pbs.extra-directives", "#PBS -h", "--retries", "0",
                  "--user-script", never_runs(work), readiness=8)
    assert run.returncode == 1, run.output[-3000:]
    assert "job_state = H" in run.output and "not ready after 8s" in run.output, run.output[-3000:]
    job = openpbs.wait_job_finished(submitted_job(run.output))
    assert job.get("job_state") == "F", job
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_a_launcher_that_fails_fails_the_run_at_once_in_its_own_words(pbs_work, prefect_api, bed, openpbs):
    """OpenPBS's own pbs_tmrsh refuses (the job's task cookie unset in setup_commands, so its
    tm_init fails): the run fails at once with pbs_tmrsh's words and the node named, not at
    the readiness timeout, and is not retried; nothing left."""
    work = pbs_work
    started = time.monotonic()
    run = pbs_run(bed, openpbs, work, prefect_api, "--pbs.select", "2:ncpus=1",
                  "--setup-commands", "unset PBS_JOBCOOKIE", "--user-script", never_runs(work))
    assert run.returncode == 1, run.output[-3000:]
    assert "launcher: pbs_tmrsh node2 exited 255 before the worker on node2 began: pbs_tmrsh: tm_init: " \
        in run.output, run.output[-3000:]
    assert "not ready after" not in run.output and "NEVER_RUNS" not in run.output
    assert len(clusters_submitted(run.output)) == 1, "a launcher failure is not retried"
    assert time.monotonic() - started < 90
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_a_head_that_cannot_start_fails_and_pbs_records_its_exit_code(pbs_work, prefect_api, bed, openpbs):
    """The head's temp dir cannot be made: the job script exits 1, which OpenPBS keeps as
    Exit_status 1, and the run's failure says how the job ended in words."""
    work = pbs_work
    run = pbs_run(bed, openpbs, work, prefect_api, "--node-tmp", "/root", "--retries", "0",
                  "--user-script", never_runs(work), readiness=60)
    assert run.returncode == 1, run.output[-3000:]
    job = openpbs.wait_job_finished(submitted_job(run.output))
    assert job.get("job_state") == "F" and job.get("Exit_status") == 1, job
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_a_job_killed_while_starting_is_said_in_pbs_words(pbs_work, prefect_api, bed, openpbs):
    """The job's own shell is SIGKILLed as the job starts (setup_commands, inside the job only):
    OpenPBS records the MoM shell's Exit_status 137, and the run's failure says it in words."""
    work = pbs_work
    kill_in_job = '[ -z "${PBS_JOBID:-}" ] || kill -9 $$'
    run = pbs_run(bed, openpbs, work, prefect_api, "--setup-commands", kill_in_job, "--retries", "0",
                  "--user-script", never_runs(work), readiness=60)
    assert run.returncode == 1, run.output[-3000:]
    job = openpbs.wait_job_finished(submitted_job(run.output))
    assert job.get("job_state") == "F" and job.get("Exit_status") == 137, job
    assert "exit code 137 (128 + SIGKILL: the job script was killed)" in run.output, run.output[-3000:]
    assert_nothing_left(bed, run.cluster_id, work / "w")


def supervisors(bed) -> list[int]:
    """The user's shells on the compute nodes: the job script and each node's supervising loop
    (their environment names no cluster: it was exported after they started)."""
    return [pid for host, pid, _, cmd in bed.processes(user=bed.user)
            if host in bed.node_names and cmd.split(" ", 1)[0].lstrip("-").endswith("bash")]


def ray_processes_of(bed, cluster_id: str) -> list[str]:
    from tests.bed.testbed import is_ray_process

    return [line for line in bed.cluster_processes(cluster_id) if is_ray_process(int(line.split()[1]))]


# In the job only: PBS's bin dir off PATH but for pbs_attach, so the launcher falls back to
# ssh from the head with pbs_attach (as on a site without pbs_tmrsh or pbsdsh)
SSH_ONLY = """if [ -n "${PBS_JOBID:-}" ]; then
    mkdir -p "$HOME/pbs-attach-only"
    ln -sf /opt/pbs/bin/pbs_attach "$HOME/pbs-attach-only/pbs_attach"
    PATH="$HOME/pbs-attach-only:$(printf %s "$PATH" | tr ':' '\\n' | grep -v '^/opt/pbs/bin$' | paste -sd:)"
    export PATH
fi
"""


@pytest.mark.parametrize("launcher", ["pbs_tmrsh", "ssh+pbs_attach"])
def test_ray_ends_with_the_job_when_every_supervisor_was_sigkilled(pbs_work, prefect_api, bed, openpbs, launcher):
    """The flow is SIGKILLed, then every shell of the cluster (job script, each node's
    supervisor: no trap runs), then the job is deleted: OpenPBS's MoMs end the job's
    sessions (and the sessions pbs_attach attached), and Ray was in them (a process group
    of its own, not a session: `setsid` would escape), so no Ray process is left on any host."""
    work = pbs_work
    extra = ["--setup-commands", SSH_ONLY] if launcher == "ssh+pbs_attach" else []
    flow = BackgroundFlow(bed, batch_args(work / "w", "--pbs.select", "3:ncpus=1", "--keep-alive",
                                          "--heartbeat-timeout", "600", *extra, scheduler="pbs"),
                          work, prefect_api, env=openpbs.env())
    try:
        info = flow.wait_ready()
        logs = work / "w" / "clusters" / info["cluster_id"] / "logs"
        launched = sorted(path.name for path in logs.glob("workers-*.log"))
        assert launched == ["workers-node2.log", "workers-node3.log"], launched
        assert all("activate-ray: worker began on" in (logs / name).read_text() for name in launched)
        # which launcher ran: ssh leaves the user's sshd session process on each worker node
        # (node1, the head, has the flow's own tunnel's)
        over_ssh = {host for host, _, _, cmd in bed.processes(user=bed.user)
                    if cmd.startswith("sshd: ") and host in ("node2", "node3")}
        assert over_ssh == ({"node2", "node3"} if launcher == "ssh+pbs_attach" else set()), over_ssh
        cluster_id, job_id = info["cluster_id"], info["job_id"]
        assert len(ray_processes_of(bed, cluster_id)) > 3
        flow.kill()
        shells = supervisors(bed)
        assert len(shells) >= 3, bed.processes(user=bed.user)
        for pid in shells:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deleted = openpbs.run(["qdel", job_id], user=bed.user)
        assert deleted.returncode in (0, 1), deleted.stderr  # 1: the job had already ended with its script
        wait_for(lambda: not ray_processes_of(bed, cluster_id), 40, "every Ray process of the cluster gone")
        job = openpbs.wait_job_finished(job_id)
        assert job.get("job_state") == "F", job
    finally:
        flow.stop()
    # what the killed supervisors would have removed (their temp dirs, the cluster dir, the
    # run's state file): the test removes its own fault's remains
    for path in bed.temp_dirs(node_tmp_name(cluster_id) + "*"):
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(work / "w" / "clusters" / cluster_id, ignore_errors=True)
    (bed.user.home / ".activate-ray" / "runs" / f"{cluster_id}.json").unlink(missing_ok=True)
    assert_nothing_left(bed, cluster_id, work / "w")


def pbs_scale(bed, openpbs, prefect_api, cluster_id, work_dir, *change, timeout="120") -> dict:
    """`python -m flows.ray_cluster scale ...` as the bed's user on the login node, on OpenPBS."""
    result = bed.run_login([bed.user_python, "-m", "flows.ray_cluster", "scale", cluster_id, *change,
                            "--work-dir", str(work_dir), "--timeout", timeout],
                           user=bed.user, env=flow_env(prefect_api, openpbs.env(), bed.repo), cwd=bed.repo, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_worker_jobs_added_and_removed_on_a_keep_alive_cluster(pbs_work, prefect_api, bed, openpbs):
    """A 1-chunk keep-alive cluster grows by two OpenPBS worker jobs (ids N.login), shrinks by
    the newest, which ends by itself (Exit_status 0); SIGINT tears down the rest: no job in
    qstat, no process, no temp dir."""
    work = pbs_work
    flow = BackgroundFlow(bed, batch_args(work / "w", "--pbs.select", "1:ncpus=1", "--keep-alive",
                                          "--scale.worker-cpus", "1", scheduler="pbs"),
                          work, prefect_api, env=openpbs.env())
    try:
        info = flow.wait_ready()
        cluster_id = info["cluster_id"]
        added = pbs_scale(bed, openpbs, prefect_api, cluster_id, work / "w", "--add", "2")
        assert len(added["added"]) == 2 and added["nodes_alive"] == 3, added
        assert all(OPENPBS_JOB_ID.match(job) for job in added["added"]), added
        live = [line.split()[0] for line in openpbs.live_jobs() if f" {cluster_id} " in line]
        assert sorted(live) == sorted([info["job_id"], *added["added"]]), live
        removed = pbs_scale(bed, openpbs, prefect_api, cluster_id, work / "w", "--remove", "1")
        assert removed["removed"] == [added["added"][1]] and removed["nodes_alive"] == 2, removed
        job = openpbs.wait_job_finished(removed["removed"][0])
        assert job.get("job_state") == "F" and job.get("Exit_status") == 0, job  # it stopped itself
        flow.send_signal(signal.SIGINT)
        assert flow.wait(120) == 128 + signal.SIGINT, flow.output[-3000:]
        assert f"worker jobs {added['added'][0]})" in flow.output, flow.output[-3000:]
    finally:
        flow.stop()
    assert "Ray node(s) lost" not in flow.output
    assert_nothing_left(bed, cluster_id, work / "w")


def test_adaptive_worker_jobs_follow_the_demand_on_openpbs(pbs_work, prefect_api, bed, openpbs):
    """`--scale.adapt` on OpenPBS: a task wanting 2 CPUs on a 1-CPU cluster makes the flow submit
    one worker job (an OpenPBS id, N.login), the task runs on its node, the idle job is released
    before teardown and nothing is left."""
    script = pbs_work / "big.py"
    script.write_text(BIG_TASK)
    run = pbs_run(bed, openpbs, pbs_work, prefect_api, "--pbs.select", "1:ncpus=1", "--user-script", str(script),
                  "--keep-alive", "--cluster-idle-timeout", "0.2", "--scale.adapt", "min=0,max=2",
                  "--scale.worker-cpus", "2", "--scale.idle-timeout", "3", "--scale.cooldown", "1")
    output = run.output
    assert run.returncode == 0, output[-5000:]
    assert "BIG_ON=node" in output, output[-4000:]
    assert "adapt: unmet demand {'CPU': 2.0}: submitting 1 worker job(s)" in output, output[-4000:]
    worker_jobs = re.findall(r"adapt: worker job (\S+) idle for", output)
    assert worker_jobs and all(OPENPBS_JOB_ID.match(job) for job in worker_jobs), output[-4000:]
    released = output.index("idle for")
    assert "releasing it" in output[released:released + 80]
    assert released < output.index("torn down"), "released while the cluster was still up"
    decisions = [line for line in output.splitlines() if "adapt:" in line]
    assert sum("submitting" in line for line in decisions) == 1, "never more than the demand needs:\n" + "\n".join(decisions)
    assert [job for job in openpbs.live_jobs() if bed.user_name in job] == []
    # the worker job asked PBS for the CPUs its Ray node offers (a site's cgroup holds it to them)
    job = openpbs.wait_job_finished(worker_jobs[0])
    assert job.get("Resource_List", {}).get("ncpus") == 2, job
    # and no more walltime than the cluster's allocation had left (10 minutes less its start)
    capped = re.search(r"worker job\(s\) submitted to pbs: \S+ \(walltime (\d+)s: the allocation's end\)", output)
    assert capped and 480 < int(capped.group(1)) < 600, output[-4000:]
    assert pbs_seconds(job["Resource_List"]["walltime"]) == int(capped.group(1)), job["Resource_List"]
    assert_nothing_left(bed, run.cluster_id, pbs_work / "w")


def test_the_walltime_ends_the_job_and_every_ray_process(pbs_work, prefect_api, bed, openpbs):
    """The flow is SIGKILLed (no teardown, no dead-man switch for 10 minutes); near the job's
    walltime (40 s) the job script stops the cluster itself, 10 s before OpenPBS would kill it
    (its own exit code 1, not Exit_status -29: walltime exceeded), and no Ray process is left
    on any host."""
    work = pbs_work
    sleeper = work / "sleep.py"
    sleeper.write_text("import time\ntime.sleep(600)\n")
    flow = BackgroundFlow(bed, ["--scheduler", "pbs", "--work-dir", str(work / "w"), "--pbs.walltime", "00:00:40",
                                "--walltime-margin", "10",
                                "--readiness-timeout", "120", "--pbs.select", "3:ncpus=1", "--user-script", str(sleeper),
                                "--heartbeat-timeout", "600", "--ray-memory-gb", "0.5", "--object-store-memory-gb",
                                "0.25"], work, prefect_api, env=openpbs.env())
    try:
        info = flow.wait_ready()
        cluster_id, job_id = info["cluster_id"], info["job_id"]
        flow.kill()
        job = openpbs.wait_job_finished(job_id, timeout=120)
        assert job.get("job_state") == "F" and job.get("Exit_status") == 1, job  # stopped by the job script
        status = (work / "w" / "clusters" / cluster_id / "status").read_text()
        assert "STOP_REASON=walltime reached" in status, status
        wait_for(lambda: not ray_processes_of(bed, cluster_id), 20, "every Ray process of the cluster gone")
    finally:
        flow.stop()
    shutil.rmtree(work / "w" / "clusters" / cluster_id, ignore_errors=True)  # the dead flow's to remove
    (bed.user.home / ".activate-ray" / "runs" / f"{cluster_id}.json").unlink(missing_ok=True)
    assert_nothing_left(bed, cluster_id, work / "w")
