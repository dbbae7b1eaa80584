"""The files that ship beside the code: scripts/ (what the flow uploads to the target and
runs there) and examples/ (Ray scripts to try the flow with).

Both are package data of `tasks`: in a checkout tasks/scripts and tasks/examples are links
to the top-level dirs, in an installed wheel they are copies. So importlib.resources finds
them the same way in both, and nothing here depends on where the checkout is.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

# A relative user_script under this prefix that is not in the cwd names a shipped example.
EXAMPLES_PREFIX = "examples/"


def _shipped_dir(name: str) -> Path:
    found = files("tasks").joinpath(name)
    # The scripts are uploaded and run by bash: they must be real files, not a zip's members
    # (pip and uv always unpack a wheel; a zipapp of it would not work).
    if not isinstance(found, Path) or not found.is_dir():
        raise RuntimeError(f"activate-ray's {name}/ is not in {found}: reinstall the package (unpacked)")
    return found


SCRIPTS_DIR = _shipped_dir("scripts")
EXAMPLES_DIR = _shipped_dir("examples")


def shipped_example(user_script: str) -> str | None:
    """examples/<name> as the package ships it, for a relative user_script that says
    examples/<name> and is not in the cwd (`--user-script examples/hello_ray.py` from any
    directory); None for anything else, whose file the caller checks as it is."""
    if not user_script.startswith(EXAMPLES_PREFIX) or os.path.lexists(user_script):
        return None
    name = user_script[len(EXAMPLES_PREFIX):]
    candidate = EXAMPLES_DIR / name
    # only a file of the shipped dir itself: examples/../../x never leaves it
    if "/" in name or name in ("", ".", "..") or not candidate.is_file():
        return None
    return str(candidate)
