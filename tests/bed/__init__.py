"""Real multi-host HPC test bed (network namespaces + Slurm + PBS wrappers + sshd)."""

from __future__ import annotations

import os

from .testbed import BedError, TestBed

__all__ = ["BedError", "TestBed", "skip_or_fail", "bed_required"]


def bed_required() -> bool:
    """True when ACTIVATE_RAY_REQUIRE_BED=1: a missing bed is a failure, not a skip."""
    return os.environ.get("ACTIVATE_RAY_REQUIRE_BED", "") == "1"


def skip_or_fail(reason: str | None) -> None:
    """pytest.skip(reason), or pytest.fail(reason) under ACTIVATE_RAY_REQUIRE_BED=1.

    Does nothing when reason is None or empty, so
    ``skip_or_fail(bed.requirements_missing())`` reads naturally.
    """
    if not reason:
        return
    import pytest

    if bed_required():
        pytest.fail(f"ACTIVATE_RAY_REQUIRE_BED=1 but the test bed cannot run: {reason}", pytrace=False)
    pytest.skip(reason)
