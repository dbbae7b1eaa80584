"""SSH to the target and between nodes, with asyncssh: host keys checked as OpenSSH
checks them, transient faults retried, permanent ones raised at once."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import shlex
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import asyncssh.config

from tasks.transport import CommandError, CommandResult, Transport

log = logging.getLogger("activate_ray.transport")

# Faults worth another try: the network or sshd blinked. Anything else (auth
# failure, unknown host key, bad input) is permanent and raised at once.
TRANSIENT_ERRORS = (ConnectionRefusedError, ConnectionResetError, asyncssh.ConnectionLost, TimeoutError, OSError)
PERMANENT_ERRORS = (asyncssh.PermissionDenied, asyncssh.HostKeyNotVerifiable, asyncssh.KeyImportError)

# Where host keys come from, as for OpenSSH's `ssh host` (module constants, so
# tests point them at temp files). The ssh_config files may name others.
USER_SSH_CONFIG = "~/.ssh/config"
SYSTEM_SSH_CONFIG = "/etc/ssh/ssh_config"  # its Include'd ssh_config.d/*.conf too
USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
# Keys that accept_new_host_key trusted on first use (never ~/.ssh, which is the user's).
ACCEPTED_KNOWN_HOSTS = "~/.activate-ray/known_hosts"


class HostKeyChanged(asyncssh.HostKeyNotVerifiable):
    """The host offers a key other than the one on record for it (permanent: never retried)."""


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
    def parse(cls, target: str, **kw) -> SshParams:
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
        # asyncssh reads ~/.ssh/config by itself (Hostname, User, HostKeyAlias...);
        # name it here so that it is the same file the known_hosts lookup reads.
        user_config = os.path.expanduser(USER_SSH_CONFIG)
        options["config"] = [user_config] if os.access(user_config, os.R_OK) else []
        check = HostKeyCheck(self.known_hosts_sources(), self.accept_new_host_key)
        options["known_hosts"] = check.known_hosts  # never None: checking is always on
        options["client_factory"] = check
        return options

    def known_hosts_sources(self) -> list[tuple[str, str]]:
        """(where, text) of every known_hosts source for this host, as OpenSSH picks them:
        the user files (UserKnownHostsFile, else ~/.ssh/known_hosts{,2}), replaced by an
        explicit known_hosts file or block text, plus the global files (GlobalKnownHostsFile,
        else /etc/ssh/ssh_known_hosts{,2}), plus the keys accept_new_host_key recorded.
        Missing or unreadable files are skipped."""
        user_files, global_files = ssh_config_known_hosts(self.host, self.port)
        explicit = bool(self.known_hosts or self.known_hosts_text)
        files: list[str] = []
        if self.known_hosts:
            files.append(self.known_hosts)
        elif not explicit:
            files += USER_KNOWN_HOSTS if user_files is None else user_files
        if not explicit or self.accept_new_host_key:
            files.append(ACCEPTED_KNOWN_HOSTS)  # read like a user file
        files += GLOBAL_KNOWN_HOSTS if global_files is None else global_files
        sources: list[tuple[str, str]] = []
        if self.known_hosts_text:
            sources.append(("the known_hosts of the SSH connection block", self.known_hosts_text))
        seen: set[str] = set()
        for name in files:
            path = os.path.expanduser(name)
            if path in seen:
                continue
            seen.add(path)
            try:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    sources.append((path, handle.read()))
            except FileNotFoundError:
                if name == self.known_hosts:
                    log.warning("known_hosts file %s does not exist", path)
            except OSError as exc:
                log.warning("cannot read known_hosts file %s: %s", path, exc)
        return sources


class _KnownHostsConfig(asyncssh.config.SSHClientConfig):
    """ssh_config as OpenSSH reads it for the known_hosts options: first value wins
    (user file before system file), %-tokens expanded, and a relative Include in the
    system file taken from the system file's directory (OpenSSH does; asyncssh would
    look in ~/.ssh)."""

    _percent_expand = asyncssh.config.SSHClientConfig._percent_expand | {"UserKnownHostsFile", "GlobalKnownHostsFile"}

    def parse(self, path: Path) -> None:
        system_config = Path(os.path.expanduser(SYSTEM_SSH_CONFIG))
        if Path(path) == system_config:
            self._default_path = system_config.parent  # asyncssh's base for relative Includes
        super().parse(path)


def ssh_config_known_hosts(host: str, port: int | None = None) -> tuple[list[str] | None, list[str] | None]:
    """UserKnownHostsFile and GlobalKnownHostsFile set for host in ~/.ssh/config or
    /etc/ssh/ssh_config (None: not set there; []: set to none)."""
    import getpass

    user_config = Path(os.path.expanduser(USER_SSH_CONFIG))
    system_config = Path(os.path.expanduser(SYSTEM_SSH_CONFIG))
    paths = [path for path in (user_config, system_config) if os.access(path, os.R_OK) and path.is_file()]
    if not paths or not host:
        return None, None
    try:
        config = _KnownHostsConfig.load(None, paths, False, False, False, getpass.getuser(), (), host, port or ())
    except Exception as exc:  # a config asyncssh cannot parse must not stop the flow
        log.warning("cannot read ssh_config %s (%s); using the default known_hosts files",
                    " and ".join(map(str, paths)), exc)
        return None, None

    def files(option: str) -> list[str] | None:
        value = config.get(option)
        return None if value is None else [os.path.expanduser(name) for name in value]

    return files("UserKnownHostsFile"), files("GlobalKnownHostsFile")


def _load_known_hosts(sources: list[tuple[str, str]]) -> asyncssh.SSHKnownHosts:
    known = asyncssh.SSHKnownHosts()
    for where, text in sources:
        try:
            known.load(text)
        except ValueError:  # a bad line: skip it, like OpenSSH, keep the rest
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    known.load(line)
                except ValueError as exc:
                    log.warning("%s line %d ignored: %s", where, number, exc)
    return known


class HostKeyCheck:
    """One connection attempt's host key policy; asyncssh calls it as client_factory.

    Trusted keys come from the known_hosts sources, matched by asyncssh (hashed
    names, [host]:port, @revoked, @cert-authority). A key asyncssh does not trust
    reaches validate(): a host with other keys on record is refused (changed key);
    an unknown one is refused too, unless accept_new is set (OpenSSH's
    StrictHostKeyChecking=accept-new): then its key is recorded and trusted.
    The refusal is kept here for connect_ssh to raise, so the detail (local file
    names) is not sent to the server in the disconnect message."""

    def __init__(self, sources: list[tuple[str, str]], accept_new: bool = False):
        self.sources = sources
        self.accept_new = accept_new
        self.known_hosts = _load_known_hosts(sources)
        self.refusal: asyncssh.HostKeyNotVerifiable | None = None

    def __call__(self) -> asyncssh.SSHClient:
        return _HostKeyClient(self)

    def validate(self, host: str, addr: str, port: int | None, key: asyncssh.SSHKey) -> bool:
        port = port if port and port != 22 else None
        name = f"[{host}]:{port}" if port else host
        offered = f"{key.get_algorithm()} {key.get_fingerprint()}"
        on_record = self.known_hosts.match(host, addr, port)[0]
        if on_record:
            where = self._lines_holding(host, addr, port, on_record)
            self.refusal = HostKeyChanged(
                f"host key for {name} changed (it now offers {offered}, the key on record is at "
                f"{', '.join(where)}; the connection may be intercepted): refusing; "
                f"remove the old key from {where[0]} if the change is expected"
            )
            return False
        if not self.accept_new:
            read = ", ".join(where for where, _ in self.sources) or "none exists"
            self.refusal = asyncssh.HostKeyNotVerifiable(
                f"Host key is not trusted for host {name}: its key ({offered}) is in no known_hosts "
                f"file read ({read}); add it to one, or set accept_new_host_key to trust it on first use"
            )
            return False
        self._record(name, key, offered)
        return True

    def _lines_holding(self, host: str, addr: str, port: int | None, keys) -> list[str]:
        keys = set(keys)
        where = []
        for source, text in self.sources:
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                try:
                    line_keys = asyncssh.import_known_hosts(line).match(host, addr, port)[0]
                except ValueError:
                    continue
                if keys.intersection(line_keys):
                    where.append(f"{source}:{number}")
        return where or ["a known_hosts file"]

    def _record(self, name: str, key: asyncssh.SSHKey, offered: str) -> None:
        path = Path(os.path.expanduser(ACCEPTED_KNOWN_HOSTS))
        line = name + " " + " ".join(key.export_public_key("openssh").decode().split()[:2]) + "\n"
        try:
            if not path.parent.is_dir():
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(path.parent, 0o700)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                os.fchmod(fd, 0o600)
                handle.write(line)
        except OSError as exc:  # like ssh: trust it for this connection anyway
            log.warning("accept_new_host_key: new host key for %s (%s) trusted but not recorded in %s: %s",
                        name, offered, path, exc)
            return
        log.warning("accept_new_host_key: new host key for %s (%s) recorded in %s", name, offered, path)


class _HostKeyClient(asyncssh.SSHClient):
    def __init__(self, check: HostKeyCheck):
        super().__init__()
        self._check = check

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        return self._check.validate(host, addr, port, key)


async def connect_ssh(params: SshParams, tunnel=None, attempts: int = 5) -> asyncssh.SSHClientConnection:
    """Connect with short exponential backoff on transient faults, none on permanent ones."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        options: dict = {}
        try:
            options = params.connect_options()  # known_hosts files read again on every attempt
            return await asyncssh.connect(params.host, tunnel=tunnel, **options)
        except asyncssh.HostKeyNotVerifiable:
            check = options.get("client_factory")
            if isinstance(check, HostKeyCheck) and check.refusal is not None:
                raise check.refusal from None  # the detailed reason, kept on our side
            raise
        except PERMANENT_ERRORS:
            raise
        except TRANSIENT_ERRORS as exc:
            if attempt == attempts:
                raise ConnectionError(f"cannot reach {params.host} over SSH after {attempts} tries: {exc}") from exc
            log.warning("SSH to %s failed (%s), retrying in %.1fs", params.host, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
    raise AssertionError("unreachable")


class SshTransport(Transport):
    transient_errors = (TimeoutError, ConnectionError, asyncssh.Error)
    permanent_errors = PERMANENT_ERRORS

    def __init__(self, params: SshParams):
        self.params = params
        self.label = params.host
        self.conn: asyncssh.SSHClientConnection | None = None
        self._stack = AsyncExitStack()

    async def connect(self) -> SshTransport:
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

    async def write_text(self, path: str, text: str, mode: int = 0o600) -> None:
        await self._write_private(path, text.encode(), mode)

    async def put_file(self, local: Path, path: str, mode: int = 0o600) -> None:
        await self._write_private(path, local.read_bytes(), mode)

    async def _write_private(self, path: str, data: bytes, mode: int) -> None:
        """Into a new file beside path (exclusive create, `mode` from its creation and set
        again before the first byte, whatever the server's umask), renamed over path: an
        existing file with a wider mode never holds the new data, nor is made private after."""
        path = await self._absolute(path)
        directory, name = os.path.split(path)
        await self.run(f"(umask 077 && mkdir -p {shlex.quote(directory)})")
        temp = f"{directory}/.{name}.{secrets.token_hex(6)}.tmp"
        async with (await self._connection()).start_sftp_client() as sftp:
            try:
                async with sftp.open(temp, "xb", asyncssh.SFTPAttrs(permissions=mode & 0o600)) as handle:
                    await handle.chmod(mode)
                    await handle.write(data)
                await sftp.posix_rename(temp, path)
            except BaseException:
                with contextlib.suppress(Exception):
                    await sftp.remove(temp)
                raise

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


