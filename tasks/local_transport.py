"""This machine as a Transport (tasks/transport.py): commands run by bash in a session of
their own, files written with their final mode, the head's port reached directly, or over
SSH when the head runs on another node (tasks.ssh_transport, imported only then)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

from tasks.transport import CommandError, CommandResult, Transport

# Secrets this process may hold in its environment (flows/ray_tasks.py puts the cluster's
# token there while its driver talks to the cluster) that no command run from here inherits:
# a batch submission keeps its environment with the job (sbatch's default --export=ALL,
# qsub -V), where the scheduler shows it to its admins and tools. The jobs read the token
# from the cluster's private token file (RAY_AUTH_TOKEN_PATH in cluster.env) instead.
SECRET_ENVIRONMENT = ("RAY_AUTH_TOKEN",)


def command_environment() -> dict[str, str]:
    """This process's environment less its secrets: what every command run here gets."""
    return {name: value for name, value in os.environ.items() if name not in SECRET_ENVIRONMENT}


def _write_private(target: Path, data: bytes, mode: int) -> None:
    """Write into a new file beside target, 0600 from its creation (mkstemp, whatever the
    umask) and given `mode` before the first byte, then renamed over target: an existing
    file with a wider mode, or one that a reader opened before, never sees the new data."""
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, mode)
            handle.write(data)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


class LocalTransport(Transport):
    """This machine. Reaching a *different* node's loopback still needs SSH."""

    def __init__(self, node_ssh: dict | None = None):
        self.label = "localhost"
        # SshParams options (key file, known_hosts...) for compute nodes (head on another node)
        self.node_ssh = node_ssh
        self._stack = AsyncExitStack()

    async def run(self, command: str, *, check: bool = True, timeout: float | None = 120) -> CommandResult:
        process = await asyncio.create_subprocess_exec(
            "bash", "-c", command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True, env=command_environment(),
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except (TimeoutError, asyncio.CancelledError):
            _kill_group(process.pid)
            await process.wait()
            raise
        result = CommandResult(process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and result.returncode != 0:
            raise CommandError(command, result)
        return result

    async def run_logged(self, command: str, *, timeout: float) -> CommandResult:
        """Each line into the run log as it comes, through prefect-shell (its shell in a
        session of its own, the whole group stopped on a timeout or a cancel)."""
        from prefect_shell import ShellOperation

        # prefect-shell gives its shell this process's whole environment: the secrets are
        # unset in that shell, before anything it starts could inherit them
        unset = f"unset {' '.join(SECRET_ENVIRONMENT)}\n"
        async with ShellOperation(commands=[unset + command], log_prefix=None) as operation:
            process = await operation.atrigger(stdin=asyncio.subprocess.DEVNULL)
            try:
                await asyncio.wait_for(process.await_for_completion(), timeout)
            except RuntimeError:  # prefect-shell's "failed with return code": the output says why
                if process.return_code is None:  # not that: the shell never ended
                    raise
            output = "\n".join(await process.afetch_result())
        result = CommandResult(process.return_code or 0, output, output)
        if result.returncode != 0:
            raise CommandError(command, result)
        return result

    async def write_text(self, path: str, text: str, mode: int = 0o600) -> None:
        target = Path(os.path.expanduser(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_private(target, text.encode(), mode)

    async def put_file(self, local: Path, path: str, mode: int = 0o600) -> None:
        target = Path(os.path.expanduser(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_private(target, local.read_bytes(), mode)

    async def forward_to(self, host: str, port: int) -> int:
        if host in ("127.0.0.1", "localhost") or await _is_local_address(host):
            return port
        if self.node_ssh is None:
            raise RuntimeError(f"the head runs on {host}: give ssh_key_file/known_hosts to reach it")
        from tasks.ssh_transport import SshParams, connect_ssh

        conn = await self._stack.enter_async_context(await connect_ssh(SshParams(host=host, **self.node_ssh)))
        listener = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", port)
        return listener.get_port()

    async def close(self) -> None:
        await self._stack.aclose()


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
