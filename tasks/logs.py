"""The logger every task and helper writes to."""

from __future__ import annotations

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger as _get_run_logger


def get_run_logger():
    """The run logger inside a flow or task; a plain logger in hooks and scripts."""
    try:
        return _get_run_logger()
    except MissingContextError:
        return logging.getLogger("activate_ray")
