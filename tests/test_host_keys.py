"""Host keys checked as OpenSSH does, against a real asyncssh server on 127.0.0.1.

Every path our code reads (ssh_config, user/global known_hosts, the keys that
accept_new_host_key records) points into tmp_path: nothing here reads or writes
the real ~/.ssh or /etc/ssh.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import stat
import time

import asyncssh
import pytest

from tasks import ssh_transport as transport
from tasks.ssh_transport import HostKeyChanged, SshParams, connect_ssh


class Server:
    """An in-process sshd: one host key, one authorized client key, TCP forwarding allowed."""

    def __init__(self, client_key: asyncssh.SSHKey, host_key: asyncssh.SSHKey | None = None, port: int = 0):
        self.client_key = client_key
        self.host_key = host_key or asyncssh.generate_private_key("ssh-ed25519")
        self.port = port
        self.connections = 0
        self._acceptor = None

    async def start(self) -> Server:
        server = self

        class Handler(asyncssh.SSHServer):
            def connection_made(self, conn):
                server.connections += 1

            def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
                return True  # direct-tcpip: lets a client tunnel through us

        authorized = asyncssh.import_authorized_keys(self.client_key.export_public_key().decode())
        self._acceptor = await asyncssh.create_server(
            Handler, "127.0.0.1", self.port, server_host_keys=[self.host_key],
            authorized_client_keys=authorized, reuse_address=True,
        )
        self.port = self._acceptor.get_port()
        return self

    async def stop(self) -> None:
        self._acceptor.close()
        await self._acceptor.wait_closed()

    async def restart_with_new_key(self) -> None:
        await self.stop()
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        await self.start()

    @property
    def name(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def known_line(self, name: str | None = None) -> str:
        return f"{name or self.name} {self.host_key.export_public_key().decode().strip()}\n"


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Our module's default paths, all under tmp_path (none exists until a test writes it)."""

    class Files:
        root = tmp_path
        user_config = tmp_path / "home_ssh" / "config"
        system_config = tmp_path / "etc_ssh" / "ssh_config"
        user = tmp_path / "home_ssh" / "known_hosts"
        user2 = tmp_path / "home_ssh" / "known_hosts2"
        global_ = tmp_path / "etc_ssh" / "ssh_known_hosts"
        global2 = tmp_path / "etc_ssh" / "ssh_known_hosts2"
        accepted = tmp_path / "activate-ray" / "known_hosts"

    for path in (Files.user, Files.global_):
        path.parent.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(transport, "USER_SSH_CONFIG", str(Files.user_config))
    monkeypatch.setattr(transport, "SYSTEM_SSH_CONFIG", str(Files.system_config))
    monkeypatch.setattr(transport, "USER_KNOWN_HOSTS", (str(Files.user), str(Files.user2)))
    monkeypatch.setattr(transport, "GLOBAL_KNOWN_HOSTS", (str(Files.global_), str(Files.global2)))
    monkeypatch.setattr(transport, "ACCEPTED_KNOWN_HOSTS", str(Files.accepted))
    return Files


@pytest.fixture
def client_key():
    return asyncssh.generate_private_key("ssh-ed25519")


def params(server: Server, client_key, **kw) -> SshParams:
    return SshParams(host="127.0.0.1", port=server.port, private_key=client_key.export_private_key().decode(), **kw)


async def check_connects(p: SshParams, tunnel=None) -> None:
    async with await connect_ssh(p, tunnel=tunnel) as conn:  # host key checked and client key accepted
        assert conn.get_server_host_key() is not None


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_key_only_in_global_file_connects(files, client_key):
    async def main():
        server = await Server(client_key).start()
        files.global2.write_text("# site keys\n" + server.known_line())  # the second global file counts too
        await check_connects(params(server, client_key))
        await server.stop()

    run(main())
    assert not files.accepted.exists()


def test_key_only_in_user_file_connects(files, client_key):
    async def main():
        server = await Server(client_key).start()
        files.user.write_text(server.known_line())
        await check_connects(params(server, client_key))
        await server.stop()

    run(main())


def test_hashed_entry_matches(files, client_key):
    async def main():
        server = await Server(client_key).start()
        salt = os.urandom(20)
        digest = hmac.new(salt, server.name.encode(), hashlib.sha1).digest()
        hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
        files.user.write_text(server.known_line(hashed))
        await check_connects(params(server, client_key))
        await server.stop()

    run(main())


def test_unknown_host_refused_without_retry(files, client_key):
    async def main():
        server = await Server(client_key).start()
        files.user.write_text(server.known_line("[127.0.0.1]:1"))  # another port: not this host
        started = time.monotonic()
        with pytest.raises(asyncssh.HostKeyNotVerifiable) as raised:
            await connect_ssh(params(server, client_key))
        assert not isinstance(raised.value, HostKeyChanged)
        assert server.connections == 1  # permanent: no second attempt
        assert time.monotonic() - started < 2
        await server.stop()
        return str(raised.value)

    message = run(main())
    assert "not trusted" in message and "accept_new_host_key" in message and str(files.user) in message
    assert not files.accepted.exists()


def test_explicit_known_hosts_replaces_user_files_global_still_read(files, client_key, tmp_path):
    explicit = tmp_path / "given_known_hosts"

    async def main():
        server = await Server(client_key).start()
        files.user.write_text(server.known_line())
        explicit.write_text("")
        with pytest.raises(asyncssh.HostKeyNotVerifiable):  # the user file is not read any more
            await connect_ssh(params(server, client_key, known_hosts=str(explicit)))
        with pytest.raises(asyncssh.HostKeyNotVerifiable):  # nor with block text
            await connect_ssh(params(server, client_key, known_hosts_text="# nothing\n"))

        explicit.write_text(server.known_line())
        await check_connects(params(server, client_key, known_hosts=str(explicit)))
        await check_connects(params(server, client_key, known_hosts_text=server.known_line()))

        files.user.unlink()
        explicit.write_text("")
        files.global_.write_text(server.known_line())  # the global files still count
        await check_connects(params(server, client_key, known_hosts=str(explicit)))
        await check_connects(params(server, client_key, known_hosts_text="# nothing\n"))
        await server.stop()

    run(main())


def test_known_hosts_files_from_ssh_config(files, client_key):
    """UserKnownHostsFile / GlobalKnownHostsFile from ~/.ssh/config before /etc/ssh/ssh_config
    (and its relative Include), replacing the default files."""
    custom = files.root / "custom"
    custom.mkdir()

    async def main():
        server = await Server(client_key).start()
        files.user_config.write_text(f"Host 127.0.0.1\n    UserKnownHostsFile {custom}/user_%h\n")
        files.system_config.write_text("Include ssh_config.d/*.conf\n")
        (files.system_config.parent / "ssh_config.d").mkdir()
        (files.system_config.parent / "ssh_config.d" / "site.conf").write_text(
            f"Host *\n    UserKnownHostsFile {custom}/ignored\n    GlobalKnownHostsFile {custom}/global\n"
        )
        assert transport.ssh_config_known_hosts("127.0.0.1", server.port) == (
            [f"{custom}/user_127.0.0.1"], [f"{custom}/global"])

        files.user.write_text(server.known_line())  # the default files are replaced by the config's
        files.global_.write_text(server.known_line())
        (custom / "ignored").write_text(server.known_line())  # the user config's value wins
        with pytest.raises(asyncssh.HostKeyNotVerifiable):
            await connect_ssh(params(server, client_key))

        (custom / "user_127.0.0.1").write_text(server.known_line())
        await check_connects(params(server, client_key))
        (custom / "user_127.0.0.1").unlink()
        (custom / "global").write_text(server.known_line())
        await check_connects(params(server, client_key))

        files.user_config.write_text("Host 127.0.0.1\n    GlobalKnownHostsFile none\n    UserKnownHostsFile none\n")
        with pytest.raises(asyncssh.HostKeyNotVerifiable):  # 'none': no such files at all, not the defaults
            await connect_ssh(params(server, client_key))
        await server.stop()

    run(main())


def test_accept_new_records_key_then_refuses_a_changed_one(files, client_key, caplog):
    async def main():
        server = await Server(client_key).start()
        with caplog.at_level(logging.WARNING, logger="activate_ray.transport"):
            await check_connects(params(server, client_key, accept_new_host_key=True))
        fingerprint = server.host_key.get_fingerprint()
        recorded = [r.getMessage() for r in caplog.records if "new host key" in r.getMessage()]
        assert len(recorded) == 1 and server.name in recorded[0] and fingerprint in recorded[0]
        assert "PRIVATE" not in caplog.text

        assert files.accepted.read_text() == server.known_line()
        assert stat.S_IMODE(files.accepted.stat().st_mode) == 0o600
        assert stat.S_IMODE(files.accepted.parent.stat().st_mode) == 0o700

        caplog.clear()
        await check_connects(params(server, client_key))  # read like a user file from now on
        await check_connects(params(server, client_key, accept_new_host_key=True))
        assert files.accepted.read_text() == server.known_line()  # not recorded twice
        assert not any("new host key" in r.getMessage() for r in caplog.records)

        before = files.accepted.read_text()
        await server.restart_with_new_key()  # same port, new key
        for accept_new in (True, False):
            with pytest.raises(HostKeyChanged) as raised:
                await connect_ssh(params(server, client_key, accept_new_host_key=accept_new))
            message = str(raised.value)
            assert f"host key for {server.name} changed" in message and "refusing" in message
            assert f"{files.accepted}:1" in message and "if the change is expected" in message
        assert files.accepted.read_text() == before  # nothing overwritten or added
        await server.stop()

    run(main())


def test_changed_key_in_global_file_names_its_line(files, client_key):
    async def main():
        server = await Server(client_key).start()
        old = server.known_line()
        files.global_.write_text("other.example ssh-ed25519 " + old.split()[2] + "\n" + old)
        await server.restart_with_new_key()
        with pytest.raises(HostKeyChanged, match=rf"{files.global_}:2"):
            await connect_ssh(params(server, client_key, accept_new_host_key=True))
        assert server.connections == 1  # permanent: no retry
        await server.stop()

    run(main())
    assert not files.accepted.exists()


def test_revoked_key_is_not_accepted_as_new(files, client_key):
    async def main():
        server = await Server(client_key).start()
        files.global_.write_text("@revoked * " + server.host_key.export_public_key().decode())
        with pytest.raises(asyncssh.HostKeyNotVerifiable, match="revoked"):
            await connect_ssh(params(server, client_key, accept_new_host_key=True))
        await server.stop()

    run(main())
    assert not files.accepted.exists()


def test_tunnel_hop_checks_the_same_files(files, client_key):
    """Like SshTransport.forward_to: through the login node's connection to a node's sshd."""

    async def main():
        login = await Server(client_key).start()
        node = await Server(client_key).start()
        files.global_.write_text(login.known_line())
        async with await connect_ssh(params(login, client_key)) as hop:
            with pytest.raises(asyncssh.HostKeyNotVerifiable):
                await connect_ssh(params(node, client_key), tunnel=hop)

            files.user.write_text(node.known_line())
            await check_connects(params(node, client_key), tunnel=hop)
            files.user.unlink()

            await check_connects(params(node, client_key, accept_new_host_key=True), tunnel=hop)
            assert files.accepted.read_text() == node.known_line()

            await node.restart_with_new_key()
            with pytest.raises(HostKeyChanged, match="changed"):
                await connect_ssh(params(node, client_key, accept_new_host_key=True), tunnel=hop)
        await node.stop()
        await login.stop()

    run(main())


def test_repr_never_shows_keys(client_key):
    text = client_key.export_private_key().decode()
    p = SshParams(host="h", private_key=text, known_hosts_text="h ssh-ed25519 AAAA")
    assert text not in repr(p) and "PRIVATE" not in repr(p) and "AAAA" not in repr(p)
