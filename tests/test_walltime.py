"""The walltime, on the bed's Slurm and OpenPBS as the unprivileged user: the allocation's end
is read from the scheduler once the job runs and given to the driver (ACTIVATE_RAY_DEADLINE);
walltime_margin before it the driver gets SIGTERM (Ray's job stop) and writes its checkpoint
(examples/checkpoint_on_sigterm.py), the cluster is torn down by the flow before the
scheduler's own kill, and the run ends "walltime reached" (exit code 3).

With continue_after_walltime 1 the second allocation (queued with the first, afterany) runs
the same job with ACTIVATE_RAY_ATTEMPT=2 on a fresh cluster: it resumes from the checkpoint
and finishes, the run ends 0. A keep-alive cluster ends at the walltime as a job does.

A 2-minute walltime and a 45 s margin (not 3 minutes and 60 s): each test waits for the
walltime, so this keeps the bed lock for about 2 minutes a test instead of 3 (4 to 5 for a
test that goes on in a second allocation)."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from flows.cli import EXIT_WALLTIME
from tests.helpers import CLUSTER_ID_RE, REPO, SMALL, BackgroundFlow, assert_nothing_left

pytestmark = [pytest.mark.bed, pytest.mark.timeout(420)]

MARGIN = 45


def _unix(bed, when: str) -> int:
    """A scheduler's local time (scontrol's EndTime, qstat's stime) as Unix seconds, read on
    the login host (its zone is the scheduler's)."""
    shown = bed.run_login(["date", "-d", when, "+%s"], timeout=30)
    assert shown.returncode == 0, shown.stderr
    return int(shown.stdout.strip())


def _flow(bed, work, api, scheduler: str, walltime: str, env=None, steps: list[str] = ("--steps", "100000"),
          extra: tuple[str, ...] = ()) -> BackgroundFlow:
    checkpoints = work / "ckpt"
    args = ["--scheduler", scheduler, "--work-dir", str(work / "w"), f"--{scheduler}.walltime", walltime,
            "--walltime-margin", str(MARGIN), "--readiness-timeout", "120", *SMALL, *extra,
            "--user-script", str(REPO / "examples" / "checkpoint_on_sigterm.py"),
            "--script-args", json.dumps([str(checkpoints), *steps])]
    return BackgroundFlow(bed, args, work, api, env=env)


def _check_the_walltime_end(bed, work, flow: BackgroundFlow, info: dict, scheduler_end: int) -> float:
    """What both schedulers must show; returns when the flow ended (Unix seconds)."""
    assert abs(info["deadline"] - scheduler_end) <= 5, (info["deadline"], scheduler_end)
    rc = flow.wait(timeout=scheduler_end - time.time() + 60)
    ended = time.time()
    output = flow.output
    assert rc == EXIT_WALLTIME, output[-5000:]
    assert "walltime reached" in output, output[-3000:]
    assert f"ACTIVATE_RAY_DEADLINE={info['deadline']}" in output, output[-3000:]
    assert "CHECKPOINT_WRITTEN" in output, output[-5000:]
    state = json.loads((work / "ckpt" / "state.json").read_text())
    assert state["step"] > 0 and state["deadline"] == info["deadline"], state
    before_end = scheduler_end - state["sigterm_at"]
    assert abs(before_end - MARGIN) <= 10, f"SIGTERM {before_end:.1f}s before the end, margin {MARGIN}s"
    assert ended < scheduler_end, f"the flow ended {ended - scheduler_end:.1f}s after the scheduler's end"
    assert_nothing_left(bed, flow.cluster_id, work / "w")
    return ended


def test_slurm_walltime_stops_the_job_with_a_checkpoint_and_ends_walltime_reached(work, prefect_api, bed):
    flow = _flow(bed, work, prefect_api, "slurm", "2")
    try:
        info = flow.wait_ready(timeout=180)
        job_id = info["job_id"]
        fields = bed.job_fields(job_id)
        assert fields.get("JobState") == "RUNNING", fields
        scheduler_end = _unix(bed, fields["EndTime"])
        _check_the_walltime_end(bed, work, flow, info, scheduler_end)
        bed.wait_job(job_id, timeout=60)
        final = bed.job_fields(job_id)
        assert final.get("JobState") in (None, "COMPLETED"), final  # ended by our hand, not TIMEOUT
    finally:
        flow.stop()


def test_openpbs_walltime_stops_the_job_with_a_checkpoint_and_ends_walltime_reached(pbs_work, prefect_api, bed,
                                                                                      openpbs):
    work = pbs_work
    flow = _flow(bed, work, prefect_api, "pbs", "00:02:00", env=openpbs.env())
    try:
        info = flow.wait_ready(timeout=180)
        job_id = info["job_id"]
        job = openpbs.job(job_id)
        walltime = job["Resource_List"]["walltime"]
        seconds = sum(int(v) * 60**i for i, v in enumerate(reversed(walltime.split(":"))))
        scheduler_end = _unix(bed, job["stime"]) + seconds
        _check_the_walltime_end(bed, work, flow, info, scheduler_end)
        final = openpbs.wait_job_finished(job_id, timeout=60)
        assert final.get("Exit_status") != -29, final  # not PBS's walltime kill
    finally:
        flow.stop()


# 80 s of steps of 0.5 s: more than the first allocation can do (at most 75 s: 2 minutes less
# the margin, less its start; 120 to 130 steps on the bed), the rest well within the second's.
CHAIN_STEPS = ["--steps", "160", "--step-seconds", "0.5"]


def _chain_flow(bed, work, api, scheduler: str, walltime: str, env=None) -> BackgroundFlow:
    return _flow(bed, work, api, scheduler, walltime, env, CHAIN_STEPS, ("--continue-after-walltime", "1"))


def _check_the_second_allocation_finishes(bed, work, flow: BackgroundFlow, first: dict) -> dict:
    """The first allocation ended at its walltime with a checkpoint; the second, queued since
    the start, ran the job again as attempt 2 from that checkpoint to its end. Returns the
    second's connection info."""
    rc = flow.wait(timeout=first["deadline"] - time.time() + 240)
    output = flow.output
    assert rc == 0, output[-6000:]
    assert "reached its walltime: going on in allocation 2" in output, output[-5000:]
    written = re.search(r"CHECKPOINT_WRITTEN step=(\d+)", output)
    assert written and 0 < int(written.group(1)) < 160, output[-5000:]
    resumed = re.search(r"CHECKPOINT_EXAMPLE ACTIVATE_RAY_ATTEMPT=2 ACTIVATE_RAY_DEADLINE=(\d+) .*resuming_at_step=(\d+)",
                        output)
    assert resumed and resumed.group(2) == written.group(1), output[-5000:]
    assert "CHECKPOINT_EXAMPLE_DONE steps=160" in output and "ACTIVATE_RAY_ATTEMPT=2" in output, output[-5000:]
    second = json.loads(flow.info_file.read_text())
    assert second["allocation"] == 2 and second["allocations"] == 2, second
    assert second["cluster_id"] != first["cluster_id"] and second["job_id"] != first["job_id"], (first, second)
    assert int(resumed.group(1)) == second["deadline"] > first["deadline"], (resumed.group(1), first, second)
    assert json.loads((work / "ckpt" / "state.json").read_text())["step"] == 160
    clusters = set(CLUSTER_ID_RE.findall(output))
    assert clusters == {first["cluster_id"], second["cluster_id"]}, clusters
    for cluster_id in clusters:
        assert_nothing_left(bed, cluster_id, work / "w")
    return second


@pytest.mark.timeout(600)
def test_slurm_continue_after_walltime_resumes_in_the_second_allocation(work, prefect_api, bed):
    flow = _chain_flow(bed, work, prefect_api, "slurm", "2")
    try:
        first = flow.wait_ready(timeout=180)
        # the successor is queued from the start, waiting for the first job
        queued = [line for line in bed.live_jobs() if line.split()[0] != first["job_id"]]
        assert len(queued) == 1 and " PENDING " in f" {queued[0]} ", bed.live_jobs()
        successor = queued[0].split()[0]
        assert f"afterany:{first['job_id']}" in bed.job_fields(successor).get("Dependency", ""), bed.job_fields(successor)
        second = _check_the_second_allocation_finishes(bed, work, flow, first)
        assert second["job_id"] == successor
        for job_id in (first["job_id"], successor):
            bed.wait_job(job_id, timeout=60)
            fields = bed.job_fields(job_id)
            # the cluster dir and its status are gone with the teardown: Slurm's record and the run's log say why
            assert fields.get("JobState") in (None, "COMPLETED"), (
                job_id, fields.get("ExitCode"), fields.get("Reason"), flow.output[-4000:])
    finally:
        flow.stop()


@pytest.mark.timeout(600)
def test_openpbs_continue_after_walltime_resumes_in_the_second_allocation(pbs_work, prefect_api, bed, openpbs):
    work = pbs_work
    flow = _chain_flow(bed, work, prefect_api, "pbs", "00:02:00", env=openpbs.env())
    try:
        first = flow.wait_ready(timeout=180)
        number = first["job_id"].split(".")[0]  # qstat may name the server otherwise than qsub did
        held = [line for line in openpbs.live_jobs() if line.split()[0].split(".")[0] != number]
        assert len(held) == 1, openpbs.live_jobs()
        successor = held[0].split()[0]
        assert f"afterany:{number}." in str(openpbs.job(successor).get("depend", "")), openpbs.job(successor)
        second = _check_the_second_allocation_finishes(bed, work, flow, first)
        assert second["job_id"].split(".")[0] == successor.split(".")[0]
        for job_id in (first["job_id"], second["job_id"]):
            final = openpbs.wait_job_finished(job_id, timeout=60)
            assert final.get("Exit_status") != -29, final  # not PBS's walltime kill
    finally:
        flow.stop()


def test_slurm_keep_alive_cluster_ends_walltime_reached(work, prefect_api, bed):
    """A keep-alive cluster (no script) with a 2-minute walltime: torn down walltime_margin
    before the end, the run 'walltime reached' (exit 3), before Slurm's own kill."""
    flow = BackgroundFlow(bed, ["--scheduler", "slurm", "--work-dir", str(work / "w"), "--slurm.walltime", "2",
                                "--walltime-margin", str(MARGIN), "--readiness-timeout", "120", "--keep-alive", *SMALL],
                          work, prefect_api)
    try:
        info = flow.wait_ready(timeout=180)
        job_id = info["job_id"]
        scheduler_end = _unix(bed, bed.job_fields(job_id)["EndTime"])
        assert abs(info["deadline"] - scheduler_end) <= 5, (info["deadline"], scheduler_end)
        rc = flow.wait(timeout=scheduler_end - time.time() + 60)
        ended = time.time()
        assert rc == EXIT_WALLTIME, flow.output[-5000:]
        assert "walltime reached" in flow.output and "the cluster kept alive is torn down" in flow.output, flow.output[-3000:]
        assert ended < scheduler_end, f"the flow ended {ended - scheduler_end:.1f}s after the scheduler's end"
        assert scheduler_end - ended < MARGIN + 5, f"ended {scheduler_end - ended:.0f}s before the end, margin {MARGIN}s"
        bed.wait_job(job_id, timeout=60)
        assert bed.job_fields(job_id).get("JobState") in (None, "COMPLETED"), bed.job_fields(job_id)
        assert_nothing_left(bed, info["cluster_id"], work / "w")
    finally:
        flow.stop()


def test_ctrl_c_cancels_the_queued_successor_allocations_too(work, prefect_api, bed):
    """continue_after_walltime 2 queues two successors beside the running job; Ctrl-C cancels
    all three (the last queued first) and leaves nothing."""
    flow = BackgroundFlow(bed, ["--scheduler", "slurm", "--work-dir", str(work / "w"), "--slurm.walltime", "10",
                                "--continue-after-walltime", "2", "--readiness-timeout", "120", "--keep-alive",
                                *SMALL], work, prefect_api)
    try:
        info = flow.wait_ready(timeout=180)
        jobs = {line.split()[0]: line.split()[1] for line in bed.live_jobs()}
        assert len(jobs) == 3 and list(jobs.values()).count("PENDING") == 2, jobs
        flow.send_signal(signal.SIGINT)
        assert flow.wait(timeout=60) == 130, flow.output[-3000:]
        assert "cancelling the successor allocation(s) still queued: 2 (job" in flow.output, flow.output[-3000:]
        for job_id in jobs:
            bed.wait_job(job_id, timeout=60)
        assert bed.live_jobs() == [], bed.live_jobs()
        assert_nothing_left(bed, info["cluster_id"], work / "w")
    finally:
        flow.stop()
