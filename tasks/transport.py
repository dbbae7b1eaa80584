"""How commands reach the target: the Transport interface.

Everything above this module is the same code for both transports (this machine's in
tasks.local_transport, SSH's in tasks.ssh_transport, imported only when a target or a node
is reached over SSH: asyncssh costs about half a second to import). Commands are shell strings that callers
build with `shlex.join`/`shlex.quote`; both transports run them with `bash -c`, so the
remote login shell (csh, fish...) never parses them.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.ssh_transport import SshParams

log = logging.getLogger("activate_ray.transport")


class CommandError(RuntimeError):
    def __init__(self, command: str, result: CommandResult):
        self.result = result
        detail = (result.stderr or result.stdout).strip()[-2000:]
        super().__init__(f"command failed with exit code {result.returncode}: {command[:300]}\n{detail}")


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class Transport(ABC):
    """Runs commands and moves files on one host."""

    label: str
    params: SshParams | None = None  # how it is reached over SSH; None: this machine
    # what query() tries again (a scheduler command that hangs, a connection that drops)
    # and what it never does (the transport's own permanent faults)
    transient_errors: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError)
    permanent_errors: tuple[type[BaseException], ...] = ()

    @abstractmethod
    async def run(self, command: str, *, check: bool = True, timeout: float | None = 120) -> CommandResult: ...

    @abstractmethod
    async def write_text(self, path: str, text: str, mode: int = 0o600) -> None: ...

    @abstractmethod
    async def put_file(self, local: Path, path: str, mode: int = 0o600) -> None: ...

    @abstractmethod
    async def forward_to(self, host: str, port: int) -> int:
        """A local port that reaches host:port as seen from the target's side
        (for the head's 127.0.0.1, host is the head node)."""

    @abstractmethod
    async def close(self) -> None: ...

    async def query(self, command: str, attempts: int = 3, timeout: float = 30) -> CommandResult:
        """run() for read-only or idempotent commands (squeue, qstat, scancel): a
        scheduler command that hangs or a connection that drops is tried again."""
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                return await self.run(command, check=False, timeout=timeout)
            except self.transient_errors as exc:
                if attempt == attempts or isinstance(exc, self.permanent_errors):
                    raise
                log.warning("%r failed (%s); retrying in %.1fs", command[:80], type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def run_logged(self, command: str, *, timeout: float) -> CommandResult:
        """run() for a long command whose output belongs in the run log (building the
        environment); stdout and stderr together. Here: the output once it ends."""
        return await self.run(command, timeout=timeout)

    async def read_text(self, path: str) -> str | None:
        result = await self.run(f"cat {shlex.quote(path)} 2>/dev/null", check=False)
        return result.stdout if result.returncode == 0 else None

    async def home(self) -> str:
        return (await self.run('printf %s "$HOME"')).stdout

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
