"""One Scheduler shape, one module per scheduler (after dask-jobqueue): base.py holds the
shared lifecycle; direct.py, slurm.py and pbs.py each state what is their own. Adding a
scheduler is one module here, its launcher script in scripts/, one test module."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.schedulers.base import (
    JOB_SCRIPT,
    TRANSIENT_SUBMIT_ERROR,
    WORKER_JOB_SCRIPT,
    JobPhase,
    JobState,
    Scheduler,
    SchedulerRejected,
    mem_mb,
)
from tasks.schedulers.direct import DirectScheduler
from tasks.schedulers.pbs import (
    PBS_JOB_ID_RE,
    PbsOptions,
    PbsScheduler,
    parse_qstat_json,
    parse_qstat_text,
    pbs_seconds,
    pbs_select_chunks,
)
from tasks.schedulers.slurm import SlurmOptions, SlurmScheduler, parse_scontrol, parse_squeue, slurm_seconds

if TYPE_CHECKING:
    from tasks.settings import RayClusterSettings

# The scheduler kinds of the settings (SchedulerKind values) -> their class.
SCHEDULERS: dict[str, type[Scheduler]] = {cls.name: cls for cls in (DirectScheduler, SlurmScheduler, PbsScheduler)}


def scheduler_for(settings: RayClusterSettings) -> Scheduler:
    return SCHEDULERS[settings.scheduler.value](settings)


__all__ = [
    "JOB_SCRIPT", "PBS_JOB_ID_RE", "WORKER_JOB_SCRIPT", "SCHEDULERS", "TRANSIENT_SUBMIT_ERROR", "DirectScheduler", "JobPhase", "JobState", "PbsOptions",
    "PbsScheduler", "Scheduler", "SchedulerRejected", "SlurmOptions", "SlurmScheduler", "mem_mb", "parse_qstat_json",
    "parse_qstat_text", "parse_scontrol", "parse_squeue", "pbs_seconds", "pbs_select_chunks", "scheduler_for",
    "slurm_seconds",
]
