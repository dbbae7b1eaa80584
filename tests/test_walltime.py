"""The walltime, on the bed's Slurm and OpenPBS as the unprivileged user, with the issue's
numbers: a 3-minute walltime and a 60 s margin. The allocation's end is read from the
scheduler once the job runs and given to the driver (ACTIVATE_RAY_DEADLINE); walltime_margin
before it the driver gets SIGTERM (Ray's job stop) and writes its checkpoint
(examples/checkpoint_on_sigterm.py), the cluster is torn down by the flow before the
scheduler's own kill, and the run ends "walltime reached" (exit code 3).

With continue_after_walltime 1 the second allocation (queued with the first, afterany) runs
the same job with ACTIVATE_RAY_ATTEMPT=2 on a fresh cluster: it resumes from the checkpoint
and finishes, the run ends 0. A keep-alive cluster with a 2-minute walltime ends at the
walltime as a job does.

Each run mostly waits for its walltime, so a test runs its runs at once: Slurm's and
OpenPBS's side by side, as two users' jobs share a site (same nodes, same user's home). A
failure names each run that failed, with its own log."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from flows.cli import EXIT_WALLTIME
from tasks.schedulers.pbs import pbs_seconds
from tests.helpers import CLUSTER_ID_RE, REPO, SMALL, BackgroundFlow, assert_nothing_left, prefect_get

pytestmark = [pytest.mark.bed, pytest.mark.timeout(600)]

MARGIN = 60
WALLTIME = {"slurm": "3", "pbs": "00:03:00"}
KEEP_ALIVE_WALLTIME = {"slurm": "2", "pbs": "00:02:00"}
CHECKPOINT_DIR = "ckpt"  # in each run's own dir (examples/checkpoint_on_sigterm.py's argument)


def _unix(bed, when: str) -> int:
    """A scheduler's local time (scontrol's EndTime, qstat's stime) as Unix seconds, read on
    the login host (its zone is the scheduler's)."""
    shown = bed.run_login(["date", "-d", when, "+%s"], timeout=30)
    assert shown.returncode == 0, shown.stderr
    return int(shown.stdout.strip())


@dataclass
class Run:
    """One run of the flow in its own dir of the test's work dir, on one scheduler."""

    bed: object
    scheduler: str
    dir: Path
    flow: BackgroundFlow
    api: str
    openpbs: object = None

    @classmethod
    def start(cls, bed, work: Path, api: str, scheduler: str, name: str, args: list[str], openpbs=None) -> Run:
        path = work / name
        path.mkdir()
        os.chown(path, bed.user.uid, bed.user.gid)  # the flow runs as the bed's user
        env = openpbs.env() if scheduler == "pbs" else None
        flow = BackgroundFlow(bed, ["--scheduler", scheduler, "--work-dir", str(path / "w"),
                                    "--walltime-margin", str(MARGIN), "--readiness-timeout", "120", *SMALL, *args],
                              path, api, env=env)
        return cls(bed, scheduler, path, flow, api, openpbs)

    @property
    def checkpoint(self) -> Path:
        return self.dir / CHECKPOINT_DIR

    def scheduler_end(self, job_id: str) -> int:
        """The running job's end as its scheduler has it (Slurm's EndTime, PBS's start + walltime)."""
        if self.scheduler == "slurm":
            fields = self.bed.job_fields(job_id)
            assert fields.get("JobState") == "RUNNING", fields
            return _unix(self.bed, fields["EndTime"])
        job = self.openpbs.job(job_id)
        assert job.get("job_state") == "R", job
        return _unix(self.bed, job["stime"]) + pbs_seconds(job["Resource_List"]["walltime"])

    def assert_ended_by_our_hand(self, job_id: str) -> None:
        """The job ended before its scheduler killed it at the walltime."""
        if self.scheduler == "slurm":
            self.bed.wait_job(job_id, timeout=60)
            fields = self.bed.job_fields(job_id)
            # the cluster dir and its status are gone with the teardown: Slurm's record and the run's log say why
            assert fields.get("JobState") in (None, "COMPLETED"), (
                job_id, fields.get("JobState"), fields.get("ExitCode"), fields.get("Reason"), self.flow.output[-4000:])
        else:
            final = self.openpbs.wait_job_finished(job_id, timeout=60)
            assert final.get("Exit_status") != -29, final  # not PBS's walltime kill

    def assert_nothing_left(self, cluster_id: str) -> None:
        assert_nothing_left(self.bed, cluster_id, self.dir / "w")

    def assert_logs_collected(self, cluster_id: str) -> None:
        """The teardown kept the logs of the head node and of the job script."""
        logs = self.dir / "w" / "logs" / cluster_id
        kept = sorted(path.name for path in logs.iterdir()) if logs.is_dir() else []
        assert {"head", "job"} <= set(kept), (logs, kept)

    def artifact(self, key: str) -> str:
        """The markdown of the run's Prefect artifact of that key."""
        found = prefect_get(f"{self.api}/artifacts/filter", data={
            "artifacts": {"flow_run_id": {"any_": [self.flow.run_id]}, "key": {"any_": [key]}}})
        assert len(found) == 1, (key, found)
        return found[0]["data"]

    def assert_ended_walltime_reached(self) -> None:
        """Prefect says it too: the run Failed with "walltime reached", its failure artifact
        names that reason (the exit code, 3, is the command line's)."""
        state = self.flow.run_state(self.api)
        assert state["type"] == "FAILED" and "walltime reached" in (state.get("message") or ""), state
        assert "walltime reached" in self.artifact("ray-cluster-failure")


def _job_args(run_dir: Path, steps: list[str]) -> list[str]:
    return ["--user-script", str(REPO / "examples" / "checkpoint_on_sigterm.py"),
            "--script-args", json.dumps([str(run_dir / CHECKPOINT_DIR), *steps])]


def _start_job(bed, work, api, scheduler: str, name: str, steps: list[str], extra: tuple[str, ...] = (),
               openpbs=None) -> Run:
    return Run.start(bed, work, api, scheduler, name,
                     [f"--{scheduler}.walltime", WALLTIME[scheduler], *extra, *_job_args(work / name, steps)],
                     openpbs)


def _all_of(checks: dict[str, Callable[[], None]]) -> None:
    """Each check in its own thread, all at once; fails with every check that failed."""
    with ThreadPoolExecutor(len(checks)) as pool:
        futures = {name: pool.submit(check) for name, check in checks.items()}
    failed = []
    for name, future in futures.items():
        error = future.exception()
        if error is not None:
            failed.append(f"--- {name} ---\n" + "".join(traceback.format_exception(error)))
    assert not failed, "\n".join(failed)


def _stop_all(runs: list[Run]) -> None:
    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(lambda run: run.flow.stop(), runs))


def _wait_for_the_walltime_end(run: Run) -> tuple[dict, int, float]:
    """Ready, with the scheduler's end as the deadline; then ended "walltime reached" (exit 3)
    before that end. Returns the connection info, the scheduler's end and when the run ended."""
    flow = run.flow
    info = flow.wait_ready(timeout=240)
    scheduler_end = run.scheduler_end(info["job_id"])
    assert abs(info["deadline"] - scheduler_end) <= 5, (info["deadline"], scheduler_end)
    rc = flow.wait(timeout=scheduler_end - time.time() + 60)
    ended = time.time()
    assert rc == EXIT_WALLTIME, flow.output[-5000:]
    assert "walltime reached" in flow.output, flow.output[-3000:]
    assert ended < scheduler_end, f"the flow ended {ended - scheduler_end:.1f}s after the scheduler's end"
    return info, scheduler_end, ended


def _ended_well(run: Run, info: dict) -> None:
    """Prefect's state and artifact say walltime reached, the logs were kept, nothing is left
    and the scheduler's job ended by our hand."""
    run.assert_ended_walltime_reached()
    run.assert_logs_collected(info["cluster_id"])
    run.assert_nothing_left(info["cluster_id"])
    run.assert_ended_by_our_hand(info["job_id"])


def _check_the_walltime_end(run: Run) -> None:
    """A job at its walltime: the deadline is the scheduler's, SIGTERM came the margin before
    it, the checkpoint was written, the run ended "walltime reached" before the scheduler's
    kill and left nothing."""
    info, scheduler_end, _ = _wait_for_the_walltime_end(run)
    output = run.flow.output
    assert f"ACTIVATE_RAY_DEADLINE={info['deadline']}" in output, output[-3000:]
    assert "CHECKPOINT_WRITTEN" in output, output[-5000:]
    state = json.loads((run.checkpoint / "state.json").read_text())
    assert state["step"] > 0 and state["deadline"] == info["deadline"], state
    before_end = scheduler_end - state["sigterm_at"]
    assert abs(before_end - MARGIN) <= 10, f"SIGTERM {before_end:.1f}s before the end, margin {MARGIN}s"
    _ended_well(run, info)


def _check_the_keep_alive_end(run: Run) -> None:
    """A keep-alive cluster (no script): torn down the margin before the scheduler's end, the
    run "walltime reached" (exit 3), before the scheduler's own kill."""
    info, scheduler_end, ended = _wait_for_the_walltime_end(run)
    assert "the cluster kept alive is torn down" in run.flow.output, run.flow.output[-3000:]
    assert scheduler_end - ended < MARGIN + 5, f"ended {scheduler_end - ended:.0f}s before the end, margin {MARGIN}s"
    _ended_well(run, info)


def test_at_the_walltime_jobs_get_sigterm_and_clusters_end_walltime_reached_on_slurm_and_openpbs(
        pbs_work, prefect_api, bed, openpbs):
    """Four runs at once: a checkpointing job with a 3-minute walltime on Slurm and on
    OpenPBS, a keep-alive cluster with a 2-minute walltime on each."""
    work = pbs_work
    steps = ["--steps", "100000"]
    runs = {
        "slurm job": _start_job(bed, work, prefect_api, "slurm", "slurm-job", steps),
        "openpbs job": _start_job(bed, work, prefect_api, "pbs", "pbs-job", steps, openpbs=openpbs),
        **{f"{label} keep-alive": Run.start(bed, work, prefect_api, scheduler, f"{scheduler}-keep",
                                            [f"--{scheduler}.walltime", KEEP_ALIVE_WALLTIME[scheduler], "--keep-alive"],
                                            openpbs)
           for scheduler, label in (("slurm", "slurm"), ("pbs", "openpbs"))},
    }
    checks = {"keep-alive": _check_the_keep_alive_end, "job": _check_the_walltime_end}
    try:
        _all_of({name: partial(checks[name.split()[-1]], run) for name, run in runs.items()})
    finally:
        _stop_all(list(runs.values()))


# 140 s of steps of 0.5 s: more than the first allocation can do (at most 110 s: 3 minutes
# less the margin, less its start; about 105 s on the bed), the rest well within the second's
# 120 s before its own margin.
STEPS = 280
CHAIN_STEPS = ["--steps", str(STEPS), "--step-seconds", "0.5"]


def _check_the_chain(run: Run, queued_early: bool = True) -> None:
    """The first allocation ended at its walltime with a checkpoint; the second, queued since
    the start with afterany on the first (queued_early), or submitted at the first's walltime
    when the scheduler refused it early, ran the job again as attempt 2 from that checkpoint
    to its end, on a fresh cluster; both jobs ended by our hand."""
    flow = run.flow
    first = flow.wait_ready(timeout=240)
    successors = _jobs_after(run, first["job_id"])
    if queued_early:
        assert len(successors) == 1, successors
    else:
        assert successors == [] and "allocation 2 not queued (" in flow.output, (successors, flow.output[-4000:])
    rc = flow.wait(timeout=first["deadline"] - time.time() + 300)
    output = flow.output
    assert rc == 0, output[-6000:]
    going_on = "reached its walltime: going on in allocation 2" + ("" if queued_early else ", submitted now")
    assert going_on in output, output[-5000:]
    written = re.search(r"CHECKPOINT_WRITTEN step=(\d+)", output)
    assert written and 0 < int(written.group(1)) < STEPS, output[-5000:]
    resumed = re.search(r"CHECKPOINT_EXAMPLE ACTIVATE_RAY_ATTEMPT=2 ACTIVATE_RAY_DEADLINE=(\d+) .*resuming_at_step=(\d+)",
                        output)
    assert resumed and resumed.group(2) == written.group(1), output[-5000:]
    assert f"CHECKPOINT_EXAMPLE_DONE steps={STEPS}" in output and "ACTIVATE_RAY_ATTEMPT=2" in output, output[-5000:]
    second = json.loads(flow.info_file.read_text())
    assert second["allocation"] == 2 and second["allocations"] == 2, second
    assert second["cluster_id"] != first["cluster_id"] and second["job_id"] != first["job_id"], (first, second)
    if queued_early:
        assert second["job_id"].split(".")[0] == successors[0].split(".")[0], (second, successors)
    assert int(resumed.group(1)) == second["deadline"] > first["deadline"], (resumed.group(1), first, second)
    assert json.loads((run.checkpoint / "state.json").read_text())["step"] == STEPS
    ran = {first["cluster_id"], second["cluster_id"]}
    clusters = set(CLUSTER_ID_RE.findall(output))  # and the one refused early, made and removed
    assert ran <= clusters and len(clusters) == (2 if queued_early else 3), clusters
    # the run's report of each allocation
    report = run.artifact("ray-cluster-allocations")
    assert "Allocations: 2 of at most 2" in report, report
    assert f"| 1 | `{first['cluster_id']}` | {first['job_id']} | walltime reached |" in report, report
    assert f"| 2 | `{second['cluster_id']}` | {second['job_id']} | finished |" in report, report
    for cluster_id in ran:
        run.assert_logs_collected(cluster_id)
    for cluster_id in clusters:
        run.assert_nothing_left(cluster_id)
    for job_id in (first["job_id"], second["job_id"]):
        run.assert_ended_by_our_hand(job_id)


def _jobs_after(run: Run, first_job: str) -> list[str]:
    """The live jobs that wait for the first job (afterany): its queued successors. By their
    dependency, not by who owns them: the test's other runs queue jobs of the same user."""
    if run.scheduler == "slurm":
        return [job for job in (line.split()[0] for line in run.bed.live_jobs())
                if f"afterany:{first_job}" in run.bed.job_fields(job).get("Dependency", "")]
    number = first_job.split(".")[0]  # qstat may name the server otherwise than qsub did
    return [job for job in (line.split()[0] for line in run.openpbs.live_jobs())
            if f"afterany:{number}." in str(run.openpbs.job(job).get("depend", ""))]


def test_continue_after_walltime_resumes_in_the_second_allocation_on_slurm_and_openpbs(
        pbs_work, prefect_api, bed, openpbs):
    """Chains of two allocations at once: on Slurm and on OpenPBS with the successor queued
    from the start, and on an OpenPBS queue with a site's limit of one job per user, which
    refuses the early successor: it is submitted at the first one's walltime instead."""
    work = pbs_work
    extra = ("--continue-after-walltime", "1")
    with openpbs.per_user_limit(openpbs.WIDE_QUEUE, jobs=1) as limited:
        runs = {"slurm": _start_job(bed, work, prefect_api, "slurm", "slurm-chain", CHAIN_STEPS, extra),
                "openpbs": _start_job(bed, work, prefect_api, "pbs", "pbs-chain", CHAIN_STEPS, extra, openpbs),
                "openpbs, one job per user": _start_job(bed, work, prefect_api, "pbs", "pbs-limited", CHAIN_STEPS,
                                                        (*extra, "--pbs.queue", limited), openpbs)}
        try:
            _all_of({name: partial(_check_the_chain, run, queued_early="one job" not in name)
                     for name, run in runs.items()})
        finally:
            _stop_all(list(runs.values()))


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
