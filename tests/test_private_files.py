"""Every file that may hold a secret (the Ray token, env files, the run's state file) is
private from its creation, never written and made private after: each writer run with a
umask of 0 over an existing world-readable file, which must be replaced by a new file
(a reader that opened the old one never sees the new data), and must never have held
the data with a wider mode."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import asyncssh
import pytest

from tasks.atomic_file import write_text_atomic
from tasks.local_transport import LocalTransport
from tasks.ssh_transport import SshTransport


@pytest.fixture
def no_umask():
    """umask 0: a writer that relied on the user's umask would make the file 0644 or wider."""
    previous = os.umask(0)
    yield
    os.umask(previous)


@pytest.fixture
def world_readable(tmp_path) -> Path:
    path = tmp_path / "dir" / "token"
    path.parent.mkdir()
    path.write_text("old")
    path.chmod(0o644)
    return path


def watch_renames(monkeypatch) -> list[tuple[int, bytes]]:
    """The mode and content of every file renamed into place, seen just before its rename."""
    seen, real_replace = [], os.replace

    def replace(source, destination, *args, **kwargs):
        seen.append((stat.S_IMODE(os.stat(source).st_mode), Path(source).read_bytes()))
        return real_replace(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return seen


def assert_replaced_privately(path: Path, old_inode: int, text: str, mode: int = 0o600) -> None:
    assert path.read_text() == text
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.stat().st_ino != old_inode, "written in place: the old file's mode held the new data"
    assert [p.name for p in path.parent.iterdir()] == [path.name], "a temp file was left"


def test_local_transport_writes_a_secret_into_a_new_private_file(no_umask, world_readable, monkeypatch):
    old_inode = world_readable.stat().st_ino
    renamed = watch_renames(monkeypatch)
    asyncio.run(LocalTransport().write_text(str(world_readable), "the-token", 0o600))
    assert_replaced_privately(world_readable, old_inode, "the-token")
    assert renamed == [(0o600, b"the-token")]


def test_local_transport_puts_a_script_with_its_mode(no_umask, tmp_path):
    source = tmp_path / "source.sh"
    source.write_text("echo hi\n")
    target = tmp_path / "bin" / "script.sh"
    asyncio.run(LocalTransport().put_file(source, str(target), 0o700))
    assert stat.S_IMODE(target.stat().st_mode) == 0o700 and target.read_text() == "echo hi\n"


def test_the_atomic_writer_makes_a_new_private_file(no_umask, world_readable, monkeypatch):
    old_inode = world_readable.stat().st_ino
    renamed = watch_renames(monkeypatch)
    write_text_atomic(world_readable, "state")
    assert_replaced_privately(world_readable, old_inode, "state")
    assert renamed == [(0o600, b"state")]


def test_ssh_transport_writes_a_secret_into_a_new_private_file(no_umask, world_readable):
    """Over a real SFTP session (an in-process asyncssh server on loopback, on this file system)."""

    async def write() -> None:
        key = asyncssh.generate_private_key("ssh-ed25519")

        class NoAuth(asyncssh.SSHServer):
            def begin_auth(self, username: str) -> bool:
                return False

        server = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[key], sftp_factory=True,
                                       server_factory=NoAuth)
        try:
            port = server.sockets[0].getsockname()[1]
            async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u") as conn:
                transport = SshTransport.__new__(SshTransport)  # its SFTP part only: no login shell here

                async def connection():
                    return conn

                async def run(command: str, **_):
                    subprocess.run(["bash", "-c", command], check=True, timeout=30)

                async def absolute(path: str) -> str:
                    return path

                transport._connection, transport.run, transport._absolute = connection, run, absolute
                await transport.write_text(str(world_readable), "the-token", 0o600)
                await transport.put_file(Path(__file__), str(world_readable.parent / "script.py"), 0o700)
        finally:
            server.close()

    old_inode = world_readable.stat().st_ino
    asyncio.run(write())
    script = world_readable.parent / "script.py"
    assert stat.S_IMODE(script.stat().st_mode) == 0o700
    script.unlink()
    assert_replaced_privately(world_readable, old_inode, "the-token")
