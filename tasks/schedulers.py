"""One Scheduler shape, three small implementations (after dask-jobqueue).

The base class holds the lifecycle every cluster shares: render the job
script (directives + the cluster env + how workers are launched + the common
body in scripts/cluster_main.sh), submit it, read its state, cancel it. Each
scheduler only states its directives, its parallel worker launch and its
submit/status/cancel commands.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import shlex
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

from tasks.logs import get_run_logger
from tasks.settings import RayClusterSettings, SchedulerKind, pbs_select_chunks

if TYPE_CHECKING:
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

    @abstractmethod
    def submit_command(self, cluster_dir: str) -> str:
        """The command line that submits <cluster_dir>/bin/job.sh."""

    def parse_job_id(self, stdout: str) -> str:
        """The job id in the submit command's answer (SchedulerRejected if there is none)."""
        raise NotImplementedError

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

    async def submit(self, target: Transport, cluster_dir: str) -> str:
        """Submit, retrying with backoff on errors that pass (a busy controller, a timeout),
        never twice: before each new try the job is looked up by its name, the cluster id,
        since a timed-out answer can come after the scheduler took the job."""
        job_name = cluster_dir.rstrip("/").rsplit("/", 1)[-1]
        delay = self.submit_backoff
        for attempt in range(1, self.submit_attempts + 1):
            result = await target.run(self.submit_command(cluster_dir), check=False)
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
            ids = [line.strip() for line in found.stdout.splitlines() if self.job_id_re.match(line.strip())]
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
    async def cancel(self, target: Transport, job_id: str) -> None: ...

    @property
    def walltime_seconds(self) -> int | None:
        return None

    # --- shared lifecycle
    def render(self, cluster_id: str, cluster_dir: str) -> str:
        lines = ["#!/usr/bin/env bash"]
        lines += [f"{self.directive_prefix} {d}" for d in self.directives(cluster_id, cluster_dir)]
        lines += [
            f"# activate-ray cluster {cluster_id} ({self.name})",
            "set -euo pipefail",
            f"export AR_CLUSTER_DIR={shlex.quote(cluster_dir)}",
            '. "$AR_CLUSTER_DIR/cluster.env"',
            f'. "$AR_CLUSTER_DIR/bin/{self.launch_script}"',
            '. "$AR_CLUSTER_DIR/bin/cluster_main.sh"',
        ]
        return "\n".join(lines) + "\n"


class DirectScheduler(Scheduler):
    """No batch system: the whole cluster runs on the host under one supervisor."""

    name = "none"
    launch_script = "launch_workers_direct.sh"
    job_id_re = re.compile(r"^[1-9][0-9]{0,9}$")  # the supervisor's process group on the host


    def submit_command(self, cluster_dir: str) -> str:
        return shlex.join(["bash", f"{cluster_dir}/bin/start_ray_ssh.sh", cluster_dir])

    async def submit(self, target: Transport, cluster_dir: str) -> str:
        out = (await target.run(self.submit_command(cluster_dir))).stdout
        match = re.search(r"^RAY_SUPERVISOR_PID=(\d+)$", out, re.M)
        if not match:
            raise RuntimeError(f"the cluster supervisor did not start: {out[-500:]}")
        return match.group(1)

    async def state(self, target: Transport, job_id: str) -> JobState:
        alive = await target.query(f"kill -0 {int(job_id)}")
        return JobState(JobPhase.running if alive.returncode == 0 else JobPhase.ended)

    async def cancel(self, target: Transport, job_id: str) -> None:
        # The supervisor's trap stops every node; shutdown_ray.sh then sweeps.
        await target.query(f"kill -TERM -- -{int(job_id)} 2>/dev/null || true")


def _mem_mb(settings: RayClusterSettings) -> int | None:
    """Memory to ask the scheduler for, only when the user sized Ray's heap: heap + object
    store (if set) + 512 MB for Ray itself. None: ask for nothing (the site's default)."""
    if settings.ray_memory_gb is None:
        return None
    return math.ceil((settings.ray_memory_gb + (settings.object_store_memory_gb or 0)) * 1024) + 512


def slurm_seconds(walltime: str) -> int:
    """Slurm --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (a bare number is minutes)."""
    days, dash, clock = walltime.partition("-") if "-" in walltime else ("0", "", walltime)
    parts = [int(p) for p in clock.split(":")]
    if dash:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return int(days) * 86400 + hours * 3600 + minutes * 60 + seconds


def pbs_seconds(walltime: str) -> int:
    """PBS walltime: [[HH:]MM:]SS (a bare number is seconds)."""
    return sum(int(value) * 60**index for index, value in enumerate(reversed(walltime.split(":"))))


class SlurmScheduler(Scheduler):
    name = "slurm"
    launch_script = "launch_workers_slurm.sh"
    submit_program = "sbatch"
    can_exclude_nodes = True
    directive_prefix = "#SBATCH"
    job_id_re = re.compile(r"^[0-9]{1,12}$")

    def directives(self, cluster_id: str, cluster_dir: str) -> list[str]:
        s, slurm = self.settings, self.settings.slurm
        lines = [
            f"--job-name={cluster_id}",
            f"--nodes={slurm.nodes}",
            "--ntasks-per-node=1",
            *([f"--cpus-per-task={s.num_cpus_per_node}"] if s.num_cpus_per_node is not None else []),
            *([f"--mem={_mem_mb(s)}M"] if _mem_mb(s) is not None else []),
            f"--time={slurm.walltime}",
            f"--output={cluster_dir}/logs/job-%j.out",
            # Ask for SIGUSR1 to the batch shell 60 s before the limit: Ray is stopped cleanly.
            "--signal=B:USR1@60",
        ]
        if s.num_gpus_per_node:
            lines.append(f"--gpus-per-node={s.num_gpus_per_node}")
        if self.exclude_nodes:
            lines.append(f"--exclude={','.join(self.exclude_nodes)}")
        for option in ("account", "partition", "qos"):
            if value := getattr(slurm, option):
                lines.append(f"--{option}={value}")
        lines += [line.split(" ", 1)[1] for line in slurm.extra_directives.splitlines() if line]
        return lines


    @property
    def walltime_seconds(self) -> int | None:
        return slurm_seconds(self.settings.slurm.walltime)

    def submit_command(self, cluster_dir: str) -> str:
        # From the cluster dir: anything the scheduler drops in the submit dir is removed with it.
        return f"cd {shlex.quote(cluster_dir)} && sbatch --parsable bin/job.sh"

    def parse_job_id(self, stdout: str) -> str:
        job_id = stdout.strip().split(";")[0]
        if not self.job_id_re.match(job_id):
            raise SchedulerRejected(f"sbatch printed no job id: {stdout.strip()[:200]!r}")
        return job_id

    def find_job_command(self, job_name: str) -> str:
        return f'squeue -h -u "$(id -un)" --name={shlex.quote(job_name)} -o %i'

    async def allocated_nodes(self, target: Transport, job_id: str) -> list[str]:
        shown = await target.query(f"scontrol show job {shlex.quote(job_id)} 2>/dev/null")
        fields = dict(re.findall(r"(\w+)=(\S*)", shown.stdout))
        nodelist = fields.get("NodeList", "")
        if shown.returncode != 0 or nodelist in ("", "(null)"):
            return []
        names = await target.query(f"scontrol show hostnames {shlex.quote(nodelist)}")
        hosts = names.stdout.split() if names.returncode == 0 else []
        batch = fields.get("BatchHost", "")
        return sorted(hosts, key=lambda host: host != batch)  # the head (batch host) first

    async def state(self, target: Transport, job_id: str) -> JobState:
        quoted = shlex.quote(job_id)
        result = await target.query(f"squeue -h -j {quoted} -o '%T|%r' 2>/dev/null")
        line = result.stdout.strip()
        if result.returncode == 0 and line:
            return parse_squeue(line)
        shown = await target.query(f"scontrol show job {quoted} 2>/dev/null")
        if shown.returncode == 0:
            return parse_scontrol(shown.stdout)
        # Gone from slurmctld's memory: accounting (where the site has it) knows how it ended.
        accounted = await target.query(f"sacct -n -X -P -j {quoted} -o State,Reason 2>/dev/null")
        if accounted.returncode == 0 and accounted.stdout.strip():
            state, _, reason = accounted.stdout.strip().splitlines()[0].partition("|")
            return _slurm_state(state.split()[0], reason)
        return JobState(JobPhase.ended, "not in queue")

    async def cancel(self, target: Transport, job_id: str) -> None:
        await target.query(f"scancel {shlex.quote(job_id)}")


SLURM_PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


def _slurm_phase(state: str) -> JobPhase:
    if state in SLURM_PENDING:
        return JobPhase.pending
    if state in SLURM_RUNNING:
        return JobPhase.running
    return JobPhase.ended


# Pending reasons that never clear by waiting: the job can not run as asked.
SLURM_HOPELESS = re.compile(
    r"^(PartitionNodeLimit|PartitionTimeLimit|PartitionConfig|BadConstraints|InvalidAccount|InvalidQOS"
    r"|ReqNodeNotAvail, UnavailableNodes|.*MaxNodePerJobLimit|.*MaxCpuPerJobLimit|.*MaxWallDurationPerJobLimit"
    r"|Nodes_required_for_job_are_DOWN.*|DependencyNeverSatisfied)"
)


def _slurm_state(state: str, reason: str) -> JobState:
    reason = "" if reason in ("None", "(null)") else reason
    phase = _slurm_phase(state)
    hopeless = phase is JobPhase.pending and bool(reason) and bool(SLURM_HOPELESS.match(reason))
    return JobState(phase, f"{state}, {reason}" if reason else state, hopeless)


def parse_squeue(line: str) -> JobState:
    state, _, reason = line.partition("|")
    return _slurm_state(state, reason)


def parse_scontrol(text: str) -> JobState:
    fields = dict(re.findall(r"(\w+)=(\S*)", text))
    return _slurm_state(fields.get("JobState", "UNKNOWN"), fields.get("Reason", "None"))


class SchedulerRejected(RuntimeError):
    """The scheduler refused the job (bad partition, too many nodes, ...)."""


# A scheduler's answers that say "not now" rather than "no": the submission is tried again.
TRANSIENT_SUBMIT_ERROR = re.compile(
    r"Socket timed out|temporarily unavailable|Unable to contact slurm controller|Connection (reset|refused|timed out)"
    r"|Transport endpoint is not connected|try again later|cannot connect to (PBS )?server|pbs_iff.*timed out",
    re.I,
)


# 1234, 1234.server, 1234[].server (an array: never ours, but a valid id)
PBS_JOB_ID_RE = re.compile(r"^\d+(\[\d*\])?(\.[A-Za-z0-9_.\-]+)?$")


class PbsScheduler(Scheduler):
    name = "pbs"
    launch_script = "launch_workers_pbs.sh"
    submit_program = "qsub"
    directive_prefix = "#PBS"
    job_id_re = PBS_JOB_ID_RE

    @property
    def chunks(self) -> int:
        """Chunks of the job: with place=scatter one host each, one Ray node each (= settings.nodes)."""
        pbs = self.settings.pbs
        return pbs_select_chunks(pbs.select) if pbs.select else pbs.nodes

    def select(self) -> str:
        s, pbs = self.settings, self.settings.pbs
        if pbs.select:
            return pbs.select
        # only what the user set; a chunk asks for at least one CPU (PBS's own default)
        chunk = f"{self.chunks}:ncpus={s.num_cpus_per_node or 1}"
        if _mem_mb(s) is not None:
            chunk += f":mem={_mem_mb(s)}mb"
        return chunk + (f":ngpus={s.num_gpus_per_node}" if s.num_gpus_per_node else "")

    def directives(self, cluster_id: str, cluster_dir: str) -> list[str]:
        pbs = self.settings.pbs
        lines = [f"-N {cluster_id}"]
        if pbs.account:
            lines.append(f"-A {pbs.account}")
        if pbs.queue:
            lines.append(f"-q {pbs.queue}")
        lines += [
            f"-l walltime={pbs.walltime}",
            f"-l select={self.select()}",
            "-l place=scatter",
            "-j oe",
            f"-o {cluster_dir}/logs/job.out",
        ]
        lines += [line.split(" ", 1)[1] for line in pbs.extra_directives.splitlines() if line]
        return lines


    @property
    def walltime_seconds(self) -> int | None:
        return pbs_seconds(self.settings.pbs.walltime)

    def submit_command(self, cluster_dir: str) -> str:
        return f"cd {shlex.quote(cluster_dir)} && qsub bin/job.sh"

    def parse_job_id(self, stdout: str) -> str:
        job_id = stdout.strip()
        if not self.job_id_re.match(job_id):
            raise SchedulerRejected(f"qsub printed no job id: {job_id[:200]!r}")
        return job_id

    def find_job_command(self, job_name: str) -> str:
        # qselect is OpenPBS/Torque's; where it is missing (some wrappers), nobody can tell
        return f'command -v qselect >/dev/null || exit 3; qselect -u "$(id -un)" -N {shlex.quote(job_name)}'

    async def allocated_nodes(self, target: Transport, job_id: str) -> list[str]:
        shown = await target.query(f"qstat -f {shlex.quote(job_id)} 2>/dev/null")
        match = re.search(r"^\s*exec_host\s*=\s*(\S+)", shown.stdout, re.M)
        hosts = [part.split("/")[0] for part in match.group(1).split("+")] if match else []
        return list(dict.fromkeys(hosts))

    async def state(self, target: Transport, job_id: str) -> JobState:
        quoted = shlex.quote(job_id)
        result = await target.query(f"qstat -f -F json -x {quoted} 2>/dev/null")
        if result.returncode == 0 and result.stdout.lstrip().startswith("{"):
            try:
                return parse_qstat_json(result.stdout, job_id)
            except ValueError:  # OpenPBS can print invalid JSON (unquoted all-digit values)
                pass
        result = await target.query(f"qstat -f {quoted} 2>&1")
        return parse_qstat_text(result.stdout)

    async def cancel(self, target: Transport, job_id: str) -> None:
        await target.query(f"qdel {shlex.quote(job_id)}")


# OpenPBS/Torque job_state letters.
PBS_PHASES = {
    "Q": JobPhase.pending, "H": JobPhase.pending, "W": JobPhase.pending, "T": JobPhase.pending,
    "S": JobPhase.pending, "U": JobPhase.pending, "B": JobPhase.running, "R": JobPhase.running,
    "E": JobPhase.running, "C": JobPhase.ended, "F": JobPhase.ended, "X": JobPhase.ended, "M": JobPhase.ended,
}


def parse_qstat_json(text: str, job_id: str) -> JobState:
    jobs = json.loads(text).get("Jobs", {})
    job = jobs.get(job_id) or next((v for k, v in jobs.items() if k.split(".")[0] == job_id.split(".")[0]), None)
    if job is None:
        return JobState(JobPhase.ended, "unknown job")
    letter = job.get("job_state", "?")
    phase = PBS_PHASES.get(letter, JobPhase.ended)
    detail = f"job_state = {letter}"
    if "comment" in job:
        detail += f", {job['comment']}"
    if "Exit_status" in job:
        detail += f", exit {job['Exit_status']}"
    return JobState(phase, detail)


def parse_qstat_text(text: str) -> JobState:
    match = re.search(r"^\s*job_state\s*=\s*(\w)", text, re.M)
    if not match:
        # "Unknown Job Id" (Torque, OpenPBS without -x) once the job is gone.
        return JobState(JobPhase.ended, "unknown job")
    letter = match.group(1)
    detail = f"job_state = {letter}"
    if comment := re.search(r"^\s*comment\s*=\s*(.+)$", text, re.M):
        detail += f", {comment.group(1).strip()}"
    return JobState(PBS_PHASES.get(letter, JobPhase.ended), detail)


SCHEDULERS: dict[SchedulerKind, type[Scheduler]] = {
    SchedulerKind.none: DirectScheduler,
    SchedulerKind.slurm: SlurmScheduler,
    SchedulerKind.pbs: PbsScheduler,
}


def scheduler_for(settings: RayClusterSettings) -> Scheduler:
    return SCHEDULERS[settings.scheduler](settings)
