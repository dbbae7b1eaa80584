"""How commands reach the target: a local subprocess, or asyncssh.

Everything above this module is the same code for both. Commands are shell
strings that callers build with `shlex.join`/`shlex.quote`; both transports
run them with `bash -c`, so the remote login shell (csh, fish...) never parses
them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
from abc import ABC, abstractmethod
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

log = logging.getLogger("activate_ray.transport")

# Faults worth another try: the network or sshd blinked. Anything else (auth
# failure, unknown host key, bad input) is permanent and raised at once.
TRANSIENT_ERRORS = (ConnectionRefusedError, ConnectionResetError, asyncssh.ConnectionLost, TimeoutError, OSError)
PERMANENT_ERRORS = (asyncssh.PermissionDenied, asyncssh.HostKeyNotVerifiable, asyncssh.KeyImportError)


class CommandError(RuntimeError):
    def __init__(self, command: str, result: "CommandResult"):
        self.result = result
        detail = (result.stderr or result.stdout).strip()[-2000:]
        super().__init__(f"command failed with exit code {result.returncode}: {command[:300]}\n{detail}")


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class SshParams:
    """Everything asyncssh needs to reach a host; the key itself never leaves memory."""

    host: str
    port: int | None = None
    username: str | None = None
    private_key: str | None = None  # key text (from a Secret block)
    key_file: str | None = None
    known_hosts: str | None = None  # a file
    known_hosts_text: str | None = None  # known_hosts lines (from a block)
    accept_new_host_key: bool = False

    def __repr__(self) -> str:  # never show the key
        return f"SshParams(host={self.host!r}, port={self.port!r}, username={self.username!r})"

    @classmethod
    def parse(cls, target: str, **kw) -> "SshParams":
        user, _, rest = target.rpartition("@")
        host, _, port = rest.partition(":")
        return cls(host=host, port=int(port) if port else None, username=user or None, **kw)

    def connect_options(self) -> dict:
        options: dict = {"connect_timeout": 15, "keepalive_interval": 15}
        if self.port:
            options["port"] = self.port
        if self.username:
            options["username"] = self.username
        keys = []
        if self.private_key:
            keys.append(asyncssh.import_private_key(self.private_key))
        if self.key_file:
            keys.append(asyncssh.read_private_key(os.path.expanduser(self.key_file)))
        if keys:
            options["client_keys"] = keys
        if self.accept_new_host_key:
            log.warning("SSH host key verification is OFF for %s (accept_new_host_key)", self.host)
            options["known_hosts"] = None
        elif self.known_hosts_text:
            options["known_hosts"] = asyncssh.import_known_hosts(self.known_hosts_text)
        elif self.known_hosts:
            options["known_hosts"] = os.path.expanduser(self.known_hosts)
        return options


async def connect_ssh(params: SshParams, tunnel=None, attempts: int = 5) -> asyncssh.SSHClientConnection:
    """Connect with short exponential backoff on transient faults, none on permanent ones."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return await asyncssh.connect(params.host, tunnel=tunnel, **params.connect_options())
        except PERMANENT_ERRORS:
            raise
        except TRANSIENT_ERRORS as exc:
            if attempt == attempts:
                raise ConnectionError(f"cannot reach {params.host} over SSH after {attempts} tries: {exc}") from exc
            log.warning("SSH to %s failed (%s), retrying in %.1fs", params.host, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
    raise AssertionError("unreachable")


class Transport(ABC):
    """Runs commands and moves files on one host."""

    label: str

    @abstractmethod
    async def run(self, command: str, *, check: bool = True, timeout: float | None = 120) -> CommandResult: ...

    @abstractmethod
    async def write_text(self, path: str, text: str, mode: int = 0o644) -> None: ...

    @abstractmethod
    async def put_file(self, local: Path, path: str, mode: int = 0o644) -> None: ...

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
            except (asyncio.TimeoutError, ConnectionError, asyncssh.Error) as exc:
                if attempt == attempts or isinstance(exc, PERMANENT_ERRORS):
                    raise
                log.warning("%r failed (%s); retrying in %.1fs", command[:80], type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def read_text(self, path: str) -> str | None:
        result = await self.run(f"cat {shlex.quote(path)} 2>/dev/null", check=False)
        return result.stdout if result.returncode == 0 else None

    async def home(self) -> str:
        return (await self.run('printf %s "$HOME"')).stdout

    async def __aenter__(self) -> "Transport":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class LocalTransport(Transport):
    """This machine. Reaching a *different* node's loopback still needs SSH."""

    def __init__(self, node_ssh: SshParams | None = None):
        self.label = "localhost"
        self.node_ssh = node_ssh  # credentials for compute nodes (head on another node)
        self._stack = AsyncExitStack()

    async def run(self, command: str, *, check: bool = True, timeout: float | None = 120) -> CommandResult:
        process = await asyncio.create_subprocess_exec(
            "bash", "-c", command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            _kill_group(process.pid)
            await process.wait()
            raise
        result = CommandResult(process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and result.returncode != 0:
            raise CommandError(command, result)
        return result

    async def write_text(self, path: str, text: str, mode: int = 0o644) -> None:
        target = Path(os.path.expanduser(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(target, mode)

    async def put_file(self, local: Path, path: str, mode: int = 0o644) -> None:
        target = Path(os.path.expanduser(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)
        os.chmod(target, mode)

    async def forward_to(self, host: str, port: int) -> int:
        if host in ("127.0.0.1", "localhost") or await _is_local_address(host):
            return port
        if self.node_ssh is None:
            raise RuntimeError(f"the head runs on {host}: give ssh_key_file/known_hosts to reach it")
        conn = await self._stack.enter_async_context(
            await connect_ssh(SshParams(**{**self.node_ssh.__dict__, "host": host}))
        )
        listener = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", port)
        return listener.get_port()

    async def close(self) -> None:
        await self._stack.aclose()


class SshTransport(Transport):
    def __init__(self, params: SshParams):
        self.params = params
        self.label = params.host
        self.conn: asyncssh.SSHClientConnection | None = None
        self._stack = AsyncExitStack()

    async def connect(self) -> "SshTransport":
        self.conn = await self._stack.enter_async_context(await connect_ssh(self.params))
        return self

    async def _connection(self) -> asyncssh.SSHClientConnection:
        # Reconnect when sshd went away under us (restart on the login node).
        if self.conn is None or self.conn.is_closed():
            await self._stack.aclose()
            self._stack = AsyncExitStack()
            await self.connect()
        return self.conn

    async def run(self, command: str, *, check: bool = True, timeout: float | None = 120) -> CommandResult:
        for attempt in (1, 2):
            try:
                conn = await self._connection()
                completed = await asyncio.wait_for(conn.run("bash -c " + shlex.quote(command), check=False), timeout)
                break
            except (asyncssh.ConnectionLost, ConnectionResetError, BrokenPipeError, asyncssh.ChannelOpenError):
                if attempt == 2:
                    raise
                self.conn = None
        result = CommandResult(
            completed.exit_status if completed.exit_status is not None else 255,
            str(completed.stdout or ""), str(completed.stderr or ""),
        )
        if check and result.returncode != 0:
            raise CommandError(command, result)
        return result

    async def write_text(self, path: str, text: str, mode: int = 0o644) -> None:
        path = await self._absolute(path)
        await self.run(f"mkdir -p {shlex.quote(os.path.dirname(path))}")
        async with (await self._connection()).start_sftp_client() as sftp:
            async with sftp.open(path, "w", asyncssh.SFTPAttrs(permissions=mode)) as handle:
                await handle.write(text)
            await sftp.chmod(path, mode)

    async def put_file(self, local: Path, path: str, mode: int = 0o644) -> None:
        path = await self._absolute(path)
        await self.run(f"mkdir -p {shlex.quote(os.path.dirname(path))}")
        async with (await self._connection()).start_sftp_client() as sftp:
            await sftp.put(str(local), path)
            await sftp.chmod(path, mode)

    async def _absolute(self, path: str) -> str:
        if path.startswith("~/"):
            return (await self.home()) + path[1:]
        return path

    async def forward_to(self, host: str, port: int) -> int:
        conn = await self._connection()
        if host not in ("127.0.0.1", "localhost", self.params.host):
            # The head is a compute node: hop through the login node to its sshd,
            # because the dashboard listens on the head's loopback only.
            conn = await self._stack.enter_async_context(
                await connect_ssh(SshParams(**{**self.params.__dict__, "host": host, "port": None}), tunnel=conn)
            )
        listener = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", port)
        return listener.get_port()

    async def close(self) -> None:
        await self._stack.aclose()
        self.conn = None


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        pass


async def _is_local_address(host: str) -> bool:
    import socket

    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for address in addresses:
                probe.bind((address, 0))
                return True
    except OSError:
        return False
    return False
