"""The walltime, on the bed's Slurm and OpenPBS as the unprivileged user: the allocation's end
is read from the scheduler once the job runs and given to the driver (ACTIVATE_RAY_DEADLINE);
walltime_margin before it the driver gets SIGTERM (Ray's job stop) and writes its checkpoint
(examples/checkpoint_on_sigterm.py), the cluster is torn down by the flow before the
scheduler's own kill, and the run ends "walltime reached" (exit code 3).

A 2-minute walltime and a 45 s margin (not 3 minutes and 60 s): each test waits for the
walltime, so this keeps the bed lock for about 2 minutes a test instead of 3."""

from __future__ import annotations

import json
import time

import pytest

from flows.cli import EXIT_WALLTIME
from tests.helpers import REPO, SMALL, BackgroundFlow, assert_nothing_left

pytestmark = [pytest.mark.bed, pytest.mark.timeout(420)]

MARGIN = 45


def _unix(bed, when: str) -> int:
    """A scheduler's local time (scontrol's EndTime, qstat's stime) as Unix seconds, read on
    the login host (its zone is the scheduler's)."""
    shown = bed.run_login(["date", "-d", when, "+%s"], timeout=30)
    assert shown.returncode == 0, shown.stderr
    return int(shown.stdout.strip())


def _flow(bed, work, api, scheduler: str, walltime: str, env=None) -> BackgroundFlow:
    checkpoints = work / "ckpt"
    args = ["--scheduler", scheduler, "--work-dir", str(work / "w"), f"--{scheduler}.walltime", walltime,
            "--walltime-margin", str(MARGIN), "--readiness-timeout", "120", *SMALL,
            "--user-script", str(REPO / "examples" / "checkpoint_on_sigterm.py"),
            "--script-args", json.dumps([str(checkpoints), "--steps", "100000"])]
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
        flow.kill()


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
        flow.kill()
