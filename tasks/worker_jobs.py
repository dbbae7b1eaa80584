"""A cluster's worker jobs as its cluster dir records them (tasks/scaling.py grows and
shrinks the cluster with them; the teardown ends them all).

Every worker job of a cluster is recorded in its cluster dir (worker_jobs/<job id>), by
whoever submitted it, so the teardown, the crash hooks and `scale --remove` find them all.
A worker job's Ray node is named wjob-<job id>@<host> (scripts/worker_main.sh). Removing
one asks its node to stop itself first (nodes/wjob-<job id>.remove), then cancels the job
if it is still there.
"""

from __future__ import annotations

import asyncio
import shlex
import time

from tasks.logs import get_run_logger
from tasks.schedulers import WORKER_JOB_SCRIPT, JobPhase, JobState, Scheduler
from tasks.transport import Transport

WORKER_JOBS_DIR = "worker_jobs"
WORKER_NODE_PREFIX = "wjob-"
# How long a removed worker's node gets to stop itself before its job is cancelled.
REMOVE_GRACE_SECONDS = 20


def worker_node_name(job_id: str) -> str:
    """The name of a worker job's entry in the cluster's nodes/ dir (ar_run_node's NAME)."""
    return f"{WORKER_NODE_PREFIX}{job_id.split('.')[0]}"


def is_worker_job_node(ray_node_name: str) -> bool:
    return ray_node_name.startswith(WORKER_NODE_PREFIX)


def job_of_worker_node(ray_node_name: str) -> str:
    """wjob-123@node2 -> 123 (the job id as the node knows it: without a PBS server suffix)."""
    return ray_node_name[len(WORKER_NODE_PREFIX):].split("@", 1)[0]


async def job_states(target: Transport, scheduler: Scheduler, job_ids: list[str]) -> dict[str, JobState]:
    """Each job's state, asked at once, in the order given."""
    states = await asyncio.gather(*(scheduler.state(target, job_id) for job_id in job_ids))
    return dict(zip(job_ids, states, strict=True))


async def recorded_worker_jobs(target: Transport, scheduler: Scheduler, cluster_dir: str) -> list[str]:
    """The cluster's worker jobs, oldest first; only ids of the scheduler's own form."""
    listing = await target.run(f"ls -1tr {shlex.quote(cluster_dir + '/' + WORKER_JOBS_DIR)} 2>/dev/null", check=False)
    return [name for name in listing.stdout.split() if scheduler.job_id_re.fullmatch(name)]


def worker_walltime(scheduler: Scheduler, ends_at: int, now: float) -> int | None:
    """A worker job's walltime when its cluster's allocation ends sooner than the job's own
    walltime would: the time left (None: its own). Such a job never outlives the cluster, and
    a shorter job starts sooner where the scheduler backfills."""
    own = scheduler.worker_walltime_seconds
    left = int(ends_at - now)
    return left if ends_at and (own is None or left < own) else None


async def submit_worker_jobs(target: Transport, scheduler: Scheduler, cluster_dir: str, count: int,
                             head_job: str = "", ends_at: int = 0) -> list[str]:
    """Submit `count` worker jobs, one after the other (a retried submission looks its job up
    by name: the ones before must be known by then); each recorded as it is taken. ends_at:
    the cluster's allocation's end (Unix seconds, 0: unknown), which no worker job outlives."""
    jobs_dir = f"{cluster_dir}/{WORKER_JOBS_DIR}"
    await target.run(f"mkdir -p {shlex.quote(jobs_dir)}")
    known = {head_job, *await recorded_worker_jobs(target, scheduler, cluster_dir)} - {""}
    submitted = []
    for _ in range(count):
        walltime = worker_walltime(scheduler, ends_at, time.time())
        job_id = await scheduler.submit(target, cluster_dir, WORKER_JOB_SCRIPT, known=frozenset(known),
                                        walltime=walltime)
        await target.run(f"touch {shlex.quote(jobs_dir + '/' + job_id)}")
        known.add(job_id)
        submitted.append(job_id)
    if submitted:
        capped = f" (walltime {walltime}s: the allocation's end)" if walltime is not None else ""
        get_run_logger().info("worker job(s) submitted to %s: %s%s", scheduler.name, ", ".join(submitted), capped)
    return submitted


async def live_worker_jobs(target: Transport, scheduler: Scheduler, cluster_dir: str) -> dict[str, JobState]:
    """The recorded worker jobs still queued or running, oldest first, with their states; one
    that ended by itself (its walltime) is no longer the cluster's and is forgotten."""
    recorded = await recorded_worker_jobs(target, scheduler, cluster_dir)
    states = await job_states(target, scheduler, recorded)
    for job_id in [j for j, state in states.items() if state.phase is JobPhase.ended]:
        await _forget(target, cluster_dir, job_id)
        states.pop(job_id)
    return states


async def _forget(target: Transport, cluster_dir: str, job_id: str) -> None:
    paths = [f"{cluster_dir}/{WORKER_JOBS_DIR}/{job_id}", f"{cluster_dir}/nodes/{worker_node_name(job_id)}.remove"]
    await target.run("rm -f -- " + shlex.join(paths), check=False)


async def end_worker_jobs(target: Transport, scheduler: Scheduler, cluster_dir: str, job_ids: list[str],
                          grace: float = REMOVE_GRACE_SECONDS) -> None:
    """End these worker jobs: a queued one is cancelled at once; a running one's node is asked
    to stop itself (it copies its logs, removes its temp dir), then its job is cancelled if
    it is still there after `grace`."""
    states = await job_states(target, scheduler, job_ids)
    running = [j for j, s in states.items() if s.phase is JobPhase.running]
    for job_id in [j for j, s in states.items() if s.phase is JobPhase.pending]:
        await scheduler.cancel(target, job_id)
    if running:
        marks = [f"{cluster_dir}/nodes/{worker_node_name(j)}.remove" for j in running]
        await target.run(f"[ ! -d {shlex.quote(cluster_dir + '/nodes')} ] || touch -- {shlex.join(marks)}", check=False)
        # told to look now where the scheduler can; elsewhere the node sees its removal file
        # at its next glance (12 s at most), well within the grace
        for job_id in running:
            await scheduler.wake(target, job_id, cluster_dir)
        deadline = time.monotonic() + grace
        while running and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            running = [j for j, s in (await job_states(target, scheduler, running)).items()
                       if s.phase is not JobPhase.ended]
        for job_id in running:
            get_run_logger().warning("worker job %s still there %.0fs after its node was asked to stop: cancelling it",
                                     job_id, grace)
            await scheduler.cancel(target, job_id)
    for job_id in job_ids:
        await _forget(target, cluster_dir, job_id)


async def remove_worker_jobs(target: Transport, scheduler: Scheduler, cluster_dir: str, count: int) -> list[str]:
    """Remove `count` worker jobs: queued ones first (they give nothing yet), then the newest."""
    live = list((await live_worker_jobs(target, scheduler, cluster_dir)).items())
    chosen = ([j for j, s in reversed(live) if s.phase is JobPhase.pending]
              + [j for j, s in reversed(live) if s.phase is JobPhase.running])[:count]
    if chosen:
        get_run_logger().info("removing worker job(s) %s", ", ".join(chosen))
        await end_worker_jobs(target, scheduler, cluster_dir, chosen)
    return chosen


async def worker_job_ids_left(target: Transport, scheduler: Scheduler, cluster_dir: str, known: list[str]) -> list[str]:
    """For teardown: every worker job the cluster dir records, and the ones the flow saved."""
    recorded = await recorded_worker_jobs(target, scheduler, cluster_dir)
    return list(dict.fromkeys([*known, *recorded]))
