"""The default Prefect server: one per user and host, with a secret, reused, ending itself.

A run with no server configured (no PREFECT_API_URL) used Prefect's temporary server:
about 15 s of every run, and on loopback without credentials, where every user of the
host reads the run's parameters and logs and can cancel it. Instead the command line
asks `ensure()` for this user's own server:

- on 127.0.0.1, on a free port, with Prefect's basic auth (`server.api.auth_string`):
  a random secret in a 0600 file in a 0700 dir (~/.activate-ray/prefect-default/<host>),
  given to the server through its environment and to the run through its settings, never
  a command line (`ps` shows every one to every user);
- started on first need in a session of its own, stdin/stdout/stderr not the run's: a
  terminal's Ctrl-C or `timeout`'s SIGTERM to the run's process group does not reach it (it
  records the run's final state after that), and `out=$(python -m flows.ray_cluster ...)`
  returns even after a `kill -9` of the run;
- reused by the runs that follow; its supervisor (`serve`, the session's leader) stops it
  after IDLE_SECONDS without a run. A run holds a shared lock on `inuse` from before it
  looks for the server to its exit (the kernel drops it even on SIGKILL); the supervisor
  stops only while it holds that lock exclusively and the start lock too, so a run never
  gets a server that is stopping, and two runs starting at once start one server.

Before the secret is sent to the port, the port's listening socket must be this user's
(/proc/net/tcp): a neighbour who took the port after the server ended gets nothing.

`make server` (scripts/prefect_server.sh) is the lasting server with a UI, set in the
profile; it shares `own_port_listener` and the private-file rules with this module.

    python -m flows.user_server status|stop      # this user's default server
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.environ import environ_set

IDLE_SECONDS = 3600.0
START_TIMEOUT = 180.0
CHECK_EVERY = 5.0
# Which of this process's own server it holds: the `inuse` lock, open until the process exits.
_held: list[int] = []


def state_dir() -> Path:
    """This user's default server's dir on this host (a home shared by login nodes holds one
    per host: a server on another host's loopback is not ours to reach)."""
    override = os.environ.get("AR_DEFAULT_SERVER_DIR")
    return Path(override) if override else Path.home() / ".activate-ray" / "prefect-default" / socket.gethostname()


def idle_seconds() -> float:
    return float(os.environ.get("AR_SERVER_IDLE_SECONDS") or IDLE_SECONDS)


def private_dir(path: Path) -> Path:
    """The dir and its parents made 0700 from the start; one that exists must be this
    user's and open to no one else (never made private after the fact: refused)."""
    old = os.umask(0o077)
    try:
        path.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)
    st = path.lstat()
    if not path.is_dir() or path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} must be a dir of yours that only you can use (mode 0700)")
    return path


def own_port_listener(port: int, host: str = "127.0.0.1") -> bool:
    """Whether the socket listening on host:port belongs to this user (Linux: /proc/net/tcp
    shows every socket's owner to every user). Not ours, or no listener: False."""
    want = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 7 and fields[1] == want and fields[3] == "0A":  # 0A: LISTEN
            return int(fields[7]) == os.getuid()
    return False


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _port_of(url: str) -> int | None:
    prefix, suffix = "http://127.0.0.1:", "/api"
    middle = url[len(prefix):-len(suffix)] if url.startswith(prefix) and url.endswith(suffix) else ""
    return int(middle) if middle.isdigit() and 0 < int(middle) < 65536 else None


def healthy(url: str, auth: str) -> bool:
    """The server answers with our secret, and the port is ours (checked first: the
    secret goes to no one else's listener)."""
    port = _port_of(url)
    if port is None or not auth or not own_port_listener(port):
        return False
    # not /health, which Prefect answers without credentials ("true"): a server that takes our secret
    request = urllib.request.Request(f"{url}/admin/version", headers={"Authorization": basic(auth)})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except Exception:
        return False


def basic(auth: str) -> str:
    return "Basic " + base64.b64encode(auth.encode()).decode()


def supervisor_pid(state: Path) -> int | None:
    """The recorded supervisor, if it is one: an integer > 1, a process of this user's that
    leads its own group (what `stop` signals) and whose command line serves this dir.
    Anything else is never signalled."""
    text = _read(state / "pid")
    if not text.isdigit() or text.startswith("0") or len(text) > 9 or int(text) <= 1:
        return None
    pid = int(text)
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid() or os.getpgid(pid) != pid:
            return None
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return pid if b"flows.user_server" in argv and b"serve" in argv and os.fsencode(str(state)) in argv else None


def _lock(path: Path, kind: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, kind)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure(say=lambda text: None) -> tuple[str, str]:
    """This user's default server, started if need be: (api url, secret). Held in use by
    this process until it exits."""
    state = private_dir(state_dir())
    if not _held:  # before the look: the supervisor never stops a server a run is about to use
        _held.append(_lock(state / "inuse", fcntl.LOCK_SH))
    start = _lock(state / "start.lock", fcntl.LOCK_EX)
    try:
        url, auth = _read(state / "url"), _read(state / "auth")
        if supervisor_pid(state) and healthy(url, auth):
            say(f"Prefect: your own server {url} (reused)")
            return url, auth
        url, auth = _start(state)
        say(f"Prefect: started your own server {url} (loopback, a secret only you can read; it ends "
            f"after {idle_seconds():.0f} s without runs; `make server` for a lasting one with a UI)")
        return url, auth
    finally:
        os.close(start)


def _start(state: Path) -> tuple[str, str]:
    """A new server (the caller holds the start lock): a fresh secret and port, the supervisor
    in a session of its own, then wait until it answers with the secret."""
    _stop_recorded(state)
    for name in ("url", "pid"):
        with contextlib.suppress(FileNotFoundError):
            (state / name).unlink()
    auth = "activate-ray:" + secrets.token_hex(24)
    _write_private(state / "auth", auth + "\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "PREFECT_SERVER_API_"))}
    # our package importable by the supervisor wherever the run was started from
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
    log = os.open(state / "server.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "flows.user_server", "serve", str(state), str(port), str(idle_seconds())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
            cwd=state, env=env)
    finally:
        os.close(log)
    _write_private(state / "pid", f"{supervisor.pid}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while not healthy(url, auth):
        if supervisor.poll() is not None or time.monotonic() > deadline:
            _stop_recorded(state)
            tail = _read(state / "server.log")[-2000:]
            raise RuntimeError(f"your Prefect server did not start (log {state / 'server.log'}):\n{tail}")
        time.sleep(0.25)
    _write_private(state / "url", url + "\n")
    return url, auth


def _write_private(path: Path, text: str) -> None:
    from tasks.atomic_file import write_text_atomic  # 0600 from its first byte

    write_text_atomic(path, text, 0o600)


def use(url: str, auth: str) -> None:
    """This process's Prefect settings point at the server: the secret is in no environment
    a child (a Ray process, a batch job) inherits; only Prefect's settings hold it."""
    from prefect.context import refresh_global_settings_context

    with environ_set(PREFECT_API_URL=url, PREFECT_API_AUTH_STRING=auth):
        refresh_global_settings_context()


def _stop_recorded(state: Path, grace: float = 20.0) -> bool:
    pid = supervisor_pid(state)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while supervisor_pid(state) == pid and time.monotonic() < deadline:
        time.sleep(0.1)
    if supervisor_pid(state) == pid:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True


def serve(state: Path, port: int, idle: float) -> int:
    """The supervisor: `prefect server start` as its child (same session), the secret from
    the file into the child's environment; stops it after `idle` seconds without a run."""
    os.umask(0o077)  # the server's database and logs: the user's alone
    auth = _read(state / "auth")
    # its own Prefect home (database) in this 0700 dir: a ~/.prefect/prefect.db made 0644 by
    # an earlier temporary server would show every run's logs to anyone who can read it
    env = {**os.environ, "PREFECT_HOME": str(state / "home"), "PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_UI_ENABLED": "false"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port), "--no-ui"], stdin=subprocess.DEVNULL, env=env)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    last_busy = time.monotonic()
    try:
        while not stopping and server.poll() is None:
            time.sleep(CHECK_EVERY if idle > 3 * CHECK_EVERY else 0.5)
            if _busy(state):
                last_busy = time.monotonic()
            elif time.monotonic() - last_busy > idle and _stop_when_idle(state, server):
                return 0
        return 0 if stopping else 1
    finally:
        _end(server)
        if supervisor_pid(state) in (None, os.getpid()):
            for name in ("url", "pid"):
                with contextlib.suppress(FileNotFoundError):
                    (state / name).unlink()


def _busy(state: Path) -> bool:
    """A run holds `inuse` (shared): then this exclusive try fails."""
    try:
        fd = _lock(state / "inuse", fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    os.close(fd)
    return False


def _stop_when_idle(state: Path, server: subprocess.Popen) -> bool:
    """Stop only while no run holds or is taking the server: both locks, never waited for."""
    try:
        start = _lock(state / "start.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    try:
        try:
            inuse = _lock(state / "inuse", fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            for name in ("url", "pid"):  # no run finds it from now on
                with contextlib.suppress(FileNotFoundError):
                    (state / name).unlink()
            _end(server)
            return True
        finally:
            os.close(inuse)
    finally:
        os.close(start)


def _end(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) == 4:
        return serve(Path(argv[1]), int(argv[2]), float(argv[3]))
    state = state_dir()
    if argv == ["status"]:
        url = _read(state / "url")
        running = supervisor_pid(state) is not None and healthy(url, _read(state / "auth"))
        print(f"PREFECT_DEFAULT_SERVER={'running ' + url if running else 'stopped'}")
        return 0
    if argv == ["stop"]:
        stopped = state.is_dir() and _stop_recorded(state)
        print(f"PREFECT_DEFAULT_SERVER={'stopped' if stopped else 'not running'}")
        return 0
    print("usage: python -m flows.user_server status|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
