"""Write a file so that a reader polling it sees the old file or the whole new one, never part of it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str, mode: int = 0o600) -> Path:
    """Write text to path atomically: a temp file beside it (unique name, `mode`), fsync, os.replace.

    The temp file lives in the same directory, so the rename never crosses a
    file system; a reader (the workflow's connection_info job, a benchmark)
    opening `path` at any moment gets a complete file. Returns the final path.
    """
    final = Path(path).expanduser()
    fd, temp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)  # mkstemp made it 0600; the mode asked for, whatever the umask
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    # The rename itself durable too (best effort: not every file system allows fsync on a directory).
    with contextlib.suppress(OSError):
        directory = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return final
