"""Why a run failed, as a short fixed set (after KubeRay's job failure reasons): in the
flow's error, its log and the `ray-cluster-failure` artifact, so that a user (or an
automation) can tell at a glance what to fix."""

from __future__ import annotations

import asyncio
from enum import Enum

from pydantic import ValidationError


class FailureReason(str, Enum):
    invalid_input = "invalid input"  # refused before anything started
    scheduler_refused = "scheduler refused"  # sbatch/qsub said no
    never_startable = "never startable"  # pending for a reason that never clears
    start_failed = "start failed"  # the head or the job ended while the cluster started
    readiness_timeout = "readiness timeout"  # not every node up in time (the missing ones named)
    node_lost = "node lost"  # a node of the ready cluster died
    user_job_failed = "user job failed"  # the Ray job ended FAILED or STOPPED
    walltime_reached = "walltime reached"  # the allocation's end came (less walltime_margin): job stopped, cluster torn down
    cancelled = "cancelled"  # Ctrl-C, SIGTERM, cancel from the UI
    error = "error"  # anything else: the message says what


def reason_of(exc: BaseException) -> FailureReason:
    """The reason an exception stands for: its own `reason` where it has one."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, FailureReason):
        return reason
    if isinstance(exc, ValidationError):
        return FailureReason.invalid_input
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        return FailureReason.cancelled
    return FailureReason.error


class WalltimeReached(RuntimeError):
    """The allocation's end (less walltime_margin) came: the job was stopped, the cluster torn down."""

    reason = FailureReason.walltime_reached


class InvalidInput(ValueError):
    """An input that no run can use, found where only the run can see it (the server it runs against)."""

    reason = FailureReason.invalid_input
