"""The lifecycle every scheduler shares (after dask-jobqueue's JobQueueCluster).

The base renders the job script (the scheduler's directives, the cluster env, its
worker launcher scripts/launch_workers_*.sh, the common body scripts/cluster_main.sh),
submits it (retrying transient errors, never twice), reads its state and cancels it.
Each scheduler, one module each, states only what is its own: options, directives,
launcher, submit/state/cancel commands and the parsing of their output.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import shlex
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

from tasks.failures import FailureReason
from tasks.logs import get_run_logger

if TYPE_CHECKING:
    from tasks.settings import RayClusterSettings
    from tasks.transport import Transport


class JobPhase(str, Enum):
    pending = "pending"
    running = "running"
    ended = "ended"


@dataclass
class JobState:
    phase: JobPhase
    detail: str = ""  # scheduler's own words: PENDING (Resources), job_state = R, ...
    hopeless: bool = False  # pending for a reason that will never clear (node limit, bad account)

    def __str__(self) -> str:
        return f"{self.phase.value}{f' ({self.detail})' if self.detail else ''}"


# The job scripts in a cluster dir: the cluster's, and the one every worker job submits.
JOB_SCRIPT = "bin/job.sh"
WORKER_JOB_SCRIPT = "bin/worker_job.sh"


class SchedulerRejected(RuntimeError):
    """The scheduler refused the job (bad partition, too many nodes, ...)."""

    reason = FailureReason.scheduler_refused


# A scheduler's answers that say "not now" rather than "no": the submission is tried again.
TRANSIENT_SUBMIT_ERROR = re.compile(
    r"Socket timed out|temporarily unavailable|Unable to contact slurm controller|Connection (reset|refused|timed out)"
    r"|Transport endpoint is not connected|try again later|cannot connect to (PBS )?server|pbs_iff.*timed out",
    re.I,
)


class Scheduler(ABC):
    name: ClassVar[str]
    directive_prefix: ClassVar[str] = ""
    # What this scheduler's job ids look like: anything else (a crafted state file,
    # a log line) is never passed to its cancel or state commands.
    job_id_re: ClassVar[re.Pattern]

    def __init__(self, settings: RayClusterSettings):
        self.settings = settings
        self.exclude_nodes = []

    # --- what each scheduler states
    def directives(self, cluster_id: str, cluster_dir: str) -> list[str]:
        return []

    # scripts/launch_workers_*.sh: defines ar_launch_workers, how this scheduler starts every
    # other node at once (sourced by the job script)
    launch_script: ClassVar[str]

    def worker_directives(self, cluster_id: str, cluster_dir: str) -> list[str]:
        """The directives of one worker job (scale options): one node, its own partition,
        walltime and GPUs, named as the cluster so every tool of the site sees it as one of its jobs."""
        raise NotImplementedError(f"{self.name}: no worker jobs (they are scheduler jobs of their own)")

    def submit_command(self, cluster_dir: str, script: str = JOB_SCRIPT, after: str = "",
                       walltime: int | None = None) -> str:
        """The command line that submits <cluster_dir>/<script>, from the cluster dir:
        anything the scheduler drops in the submit dir is removed with it. after: a job id
        this job waits for (dependency_option), for a successor allocation. walltime:
        seconds, over the script's own (walltime_option), for a worker job that cannot
        outlive its cluster's allocation."""
        words = [self.submit_program, *self.submit_flags, *self.waiting_for(after), *self.walltime_words(walltime),
                 script]
        return f"cd {shlex.quote(cluster_dir)} && {shlex.join(words)}"

    def walltime_option(self, seconds: int) -> list[str]:
        """The submit command's words that set the job's walltime, over its script's directive."""
        raise NotImplementedError(f"{self.name}: no walltime")

    def walltime_words(self, seconds: int | None) -> list[str]:
        return [] if seconds is None else self.walltime_option(max(1, int(seconds)))

    def dependency_option(self, job_id: str) -> list[str]:
        """The submit command's words that hold the job until job_id has ended, however it
        ended (afterany): a successor allocation queues while the one before it runs."""
        raise NotImplementedError(f"{self.name}: no job dependencies (no queue to wait in)")

    def waiting_for(self, job_id: str) -> list[str]:
        """The dependency option's words for job_id ([] without one); only for a job id of this
        scheduler's own form, as it goes into a command line."""
        if not job_id:
            return []
        if not self.job_id_re.fullmatch(job_id):
            raise ValueError(f"{job_id[:60]!r} is not a {self.name} job id")
        return self.dependency_option(job_id)

    def job_id_in(self, stdout: str) -> str:
        """Where the submit command's answer has the job id: all of it, unless a scheduler says otherwise."""
        return stdout.strip()

    def parse_job_id(self, stdout: str) -> str:
        """The job id in the submit command's answer (SchedulerRejected if there is none)."""
        job_id = self.job_id_in(stdout)
        if not self.job_id_re.match(job_id):
            raise SchedulerRejected(f"{self.submit_program} printed no job id: {stdout.strip()[:200]!r}")
        return job_id

    def find_job_command(self, job_name: str) -> str:
        """A command printing the ids of this user's jobs named job_name; exit 3 when the
        scheduler cannot be asked (then a failed submission is never tried again)."""
        raise NotImplementedError

    # Nodes a retry must not get (the ones that failed the attempt before), where the scheduler can exclude.
    exclude_nodes: list[str]
    can_exclude_nodes: ClassVar[bool] = False
    # Seconds before the first resubmission; doubled each time, with jitter.
    submit_backoff: ClassVar[float] = 1.0
    submit_attempts: ClassVar[int] = 4
    submit_program: ClassVar[str] = ""
    submit_flags: ClassVar[tuple[str, ...]] = ()

    async def submit(self, target: Transport, cluster_dir: str, script: str = JOB_SCRIPT,
                     known: frozenset[str] = frozenset(), after: str = "", walltime: int | None = None) -> str:
        """Submit, retrying with backoff on errors that pass (a busy controller, a timeout),
        never twice: before each new try the job is looked up by its name, the cluster id,
        since a timed-out answer can come after the scheduler took the job. known: the
        cluster's jobs already submitted (a worker job's lookup must not find them).
        after: a job id the new job waits for (a successor allocation). walltime: seconds,
        over the script's own (a worker job capped at its cluster's end)."""
        job_name = cluster_dir.rstrip("/").rsplit("/", 1)[-1]
        delay = self.submit_backoff
        for attempt in range(1, self.submit_attempts + 1):
            result = await target.run(self.submit_command(cluster_dir, script, after, walltime), check=False)
            if result.returncode == 0:
                return self.parse_job_id(result.stdout)
            said = (result.stderr or result.stdout).strip()
            if not TRANSIENT_SUBMIT_ERROR.search(said) or attempt == self.submit_attempts:
                raise SchedulerRejected(f"{self.submit_program} refused the job: {said[-1000:]}")
            get_run_logger().warning("submission %d of %d failed (%s); looking the job up, then again in ~%.0fs",
                                     attempt, self.submit_attempts, said[-300:], delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay *= 2
            found = await target.query(self.find_job_command(job_name))
            if found.returncode == 3:
                raise SchedulerRejected(f"{self.submit_program} failed ({said[-500:]}) and this scheduler "
                                        "cannot be asked whether it took the job: not submitting again")
            ids = [line.strip() for line in found.stdout.splitlines()
                   if self.job_id_re.match(line.strip()) and line.strip() not in known]
            if found.returncode == 0 and ids:
                get_run_logger().info("the scheduler had taken the job after all: %s", ids[0])
                return ids[0]
        raise AssertionError("unreachable")

    async def allocated_nodes(self, target: Transport, job_id: str) -> list[str]:
        """The scheduler's names of the job's nodes, head first ([] where unknown)."""
        return []

    @abstractmethod
    async def state(self, target: Transport, job_id: str) -> JobState: ...

    @abstractmethod
    async def cancel(self, target: Transport, job_id: str, cluster_dir: str = "") -> None:
        """End the job. cluster_dir: the cluster's dir on the target, for a scheduler whose job
        id is a process group of the host (it signals only a group of that cluster's)."""

    def wake_command(self, job_id: str) -> str:
        """A command that sends WINCH ("look at the cluster dir now") to the running job's
        supervisors, or "" where this scheduler cannot signal a job: the nodes then see a stop
        at their next glance (AR_LOOK_EVERY in scripts/ray_lib.sh)."""
        return ""

    async def wake(self, target: Transport, job_id: str, cluster_dir: str = "") -> bool:
        """Tell a running job to look at its cluster dir now; whether the scheduler took it.
        Only for a running job: a queued one has nobody to look, and is cancelled."""
        command = self.wake_command(job_id) if self.job_id_re.match(job_id) else ""
        if not command:
            return False
        return (await target.query(command)).returncode == 0

    @property
    def walltime_seconds(self) -> int | None:
        return None

    @property
    def worker_walltime_seconds(self) -> int | None:
        """A worker job's own walltime (scale.worker_walltime, else the cluster's), seconds."""
        return None

    # --- shared lifecycle
    def render(self, cluster_id: str, cluster_dir: str, body: str = "cluster_main.sh") -> str:
        """The cluster's job script: the head on the first node, one worker on every other
        (body check_main.sh: `check --on-nodes`, every node checked, no Ray started)."""
        return self._script(self.directives(cluster_id, cluster_dir), f"cluster {cluster_id}", cluster_dir, [
            f'. "$AR_CLUSTER_DIR/bin/{self.launch_script}"',
            f'. "$AR_CLUSTER_DIR/bin/{body}"',
        ])

    def worker_sizes(self) -> tuple[int | None, int | None]:
        """A worker job's CPUs and GPUs: the scale options', else the cluster's per node (None: unset)."""
        scale, s = self.settings.scale, self.settings
        return (scale.worker_cpus if scale.worker_cpus is not None else s.num_cpus_per_node,
                scale.worker_gpus if scale.worker_gpus is not None else s.num_gpus_per_node)

    def render_worker(self, cluster_id: str, cluster_dir: str) -> str:
        """A worker job's script: one more Ray worker that joins the running head."""
        s = self.settings
        sizes = [f"export AR_NUM_{name}={value}" for name, value, own in zip(
            ("CPUS", "GPUS"), self.worker_sizes(), (s.num_cpus_per_node, s.num_gpus_per_node), strict=True)
            if value is not None and value != own]
        return self._script(self.worker_directives(cluster_id, cluster_dir), f"worker job of cluster {cluster_id}",
                            cluster_dir, [*sizes, '. "$AR_CLUSTER_DIR/bin/worker_main.sh"'])

    def _script(self, directives: list[str], what: str, cluster_dir: str, body: list[str]) -> str:
        lines = ["#!/usr/bin/env bash", *(f"{self.directive_prefix} {d}" for d in directives)]
        lines += [
            f"# activate-ray {what} ({self.name})",
            "set -euo pipefail",
            f"export AR_CLUSTER_DIR={shlex.quote(cluster_dir)}",
            '. "$AR_CLUSTER_DIR/cluster.env"',
        ]
        if self.settings.setup_commands:
            # the user's setup_commands, before Ray starts (workers run them too: ray_worker.sh)
            lines.append('. "$AR_CLUSTER_DIR/bin/site_setup.sh" "$AR_CLUSTER_DIR/setup_commands.sh" "$AR_CLUSTER_DIR/status"')
        return "\n".join(lines + body) + "\n"


def mem_mb(settings: RayClusterSettings) -> int | None:
    """Memory to ask the scheduler for, only when the user sized Ray's heap: heap + object
    store (if set) + 512 MB for Ray itself. None: ask for nothing (the site's default)."""
    if settings.ray_memory_gb is None:
        return None
    return math.ceil((settings.ray_memory_gb + (settings.object_store_memory_gb or 0)) * 1024) + 512


