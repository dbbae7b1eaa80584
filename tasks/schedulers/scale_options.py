"""Worker jobs: the options of the form's "Scaling" group (SLURM and PBS only).

A worker job is one more Ray worker as a scheduler job of its own, of one node, with its
own partition (queue), walltime, CPUs and GPUs: heterogeneous workers beside the
cluster's allocation (a CPU head job, GPU worker jobs). They join the head with the
cluster's token and ports and go when the cluster goes."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.schedulers.options import check_name, name_field, positioned

# "min=0,max=8" (either may be left out: min 0; max is required)
ADAPT_RE = re.compile(r"^(?:min=(\d{1,4}),)?max=(\d{1,4})$|^max=(\d{1,4}),min=(\d{1,4})$", re.ASCII)
MAX_WORKER_JOBS = 1000


@positioned
class ScaleOptions(BaseModel):
    """Extra workers as scheduler jobs of their own: at start, on demand, or adaptive."""

    model_config = ConfigDict(extra="forbid", title="Scaling")

    worker_jobs: int = Field(
        0, ge=0, le=MAX_WORKER_JOBS, title="Worker jobs at start",
        description="Extra workers, each a 1-node job of its own, submitted with the cluster; readiness waits for "
        "them too. Later: python -m flows.ray_cluster scale CLUSTER_ID --add K / --remove K",
    )
    adapt: str = Field(
        "", title="Adaptive", description="min=N,max=M: worker jobs follow Ray's pending demand (tasks and actors "
        "waiting for resources), never more than M, never fewer than N; idle ones are released. Empty: off",
        json_schema_extra={"pattern": "^$|" + ADAPT_RE.pattern},
    )
    idle_timeout: float = Field(
        60, ge=1, le=86400, title="Idle worker job release (s)",
        description="Adaptive: a worker job whose node ran nothing this long is released",
    )
    cooldown: float = Field(
        10, ge=0, le=3600, title="Cool-down (s)", description="Adaptive: at least this long between two scaling decisions",
    )
    worker_partition: str = name_field("Worker partition / queue",
                                       "SLURM --partition or PBS -q of the worker jobs (empty: the cluster's)")
    worker_walltime: str = Field(
        "", title="Worker walltime", description="The worker jobs' walltime, in the scheduler's form (empty: the cluster's)",
    )
    worker_cpus: int | None = Field(
        None, ge=1, le=4096, title="CPUs per worker job", description="Ray --num-cpus of a worker job, and what it asks "
        "the scheduler for (empty: the cluster's CPUs per node)",
    )
    worker_gpus: int | None = Field(
        None, ge=0, le=64, title="GPUs per worker job", description="Ray --num-gpus of a worker job, and what it asks "
        "the scheduler for (empty: the cluster's GPUs per node)",
    )

    @field_validator("worker_partition")
    @classmethod
    def _names(cls, value: str) -> str:
        return check_name(value, "scale.worker_partition")

    @field_validator("adapt")
    @classmethod
    def _adapt(cls, value: str) -> str:
        if not value:
            return value
        match = ADAPT_RE.fullmatch(value.replace(" ", ""))
        if not match:
            raise ValueError(f"scale.adapt {value!r}: use min=N,max=M (for example min=0,max=8), or leave it empty")
        low, high = _bounds(match)
        if not 1 <= high <= MAX_WORKER_JOBS or low > high:
            raise ValueError(f"scale.adapt {value!r}: needs 0 <= min <= max, 1 <= max <= {MAX_WORKER_JOBS}")
        return value.replace(" ", "")

    @property
    def adapt_bounds(self) -> tuple[int, int] | None:
        """(min, max) worker jobs of the adaptive mode; None when it is off."""
        return _bounds(ADAPT_RE.fullmatch(self.adapt)) if self.adapt else None

    @property
    def is_set(self) -> bool:
        return self.model_dump() != ScaleOptions().model_dump()


def _bounds(match: re.Match) -> tuple[int, int]:
    low, high, high2, low2 = match.groups()
    if high2 is not None:
        return int(low2), int(high2)
    return int(low or 0), int(high)
