"""/proc, read the same way by the bed, its leftover checks and the benchmark."""

from __future__ import annotations

import os
from collections.abc import Iterator


def read(path: str, binary: bool = False):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if binary else data.decode(errors="replace")


def cmdline(pid: int) -> str | None:
    raw = read(f"/proc/{pid}/cmdline", binary=True)
    return None if raw is None else raw.replace(b"\0", b" ").decode(errors="replace").strip()


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    stat = read(f"/proc/{pid}/stat", binary=True)
    if not stat:
        return False
    try:
        state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
    except ValueError:
        return False
    return state not in (b"Z", b"X")


def all_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
