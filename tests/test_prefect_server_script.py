"""`make server` (scripts/prefect_server.sh) without the bed: the real script, the real
Prefect profile code, and a stand-in for `prefect server start` (a tiny HTTP server that
answers /api/health only with the secret it got from its environment). Every python and
prefect command the script runs is recorded, so the secret on any command line shows;
the test bed's tests/test_prefect_server.py runs the real server as a site's user."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.cluster import SCRIPTS_DIR
from tests.scheduler_helpers import BASH

STAND_IN_SERVER = '''
import base64, http.server, os, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
expected = "Basic " + base64.b64encode(os.environ["PREFECT_SERVER_API_AUTH_STRING"].encode()).decode()

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/api/health" and self.headers.get("Authorization") == expected
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


@pytest.fixture
def fake_prefect(tmp_path) -> dict:
    """A bin dir of `prefect` and `python` wrappers that record their command lines, and the env to run the script in."""
    bin_dir, argv_log = tmp_path / "bin", tmp_path / "argv.log"
    bin_dir.mkdir()
    (tmp_path / "server.py").write_text(STAND_IN_SERVER)
    for name, runs in (("python", f'"{sys.executable}"'), ("prefect", f'"{sys.executable}" "{tmp_path}/server.py"')):
        wrapper = bin_dir / name
        wrapper.write_text(f'#!{BASH}\nprintf "%s\\n" "$0 $*" >>"{argv_log}"\nexec {runs} "$@"\n')
        wrapper.chmod(0o755)
    return {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_BIN": str(bin_dir / "prefect"), "AR_SERVER_DIR": str(tmp_path / "state"),
            "ARGV_LOG": str(argv_log)}


def server(env: dict, action: str, umask: str = "022") -> subprocess.CompletedProcess:
    """The script as a user whose umask is `umask` runs it."""
    return subprocess.run([BASH, "-c", f'umask {umask} && exec "$0" "$1" "$2"', BASH,
                           str(SCRIPTS_DIR / "prefect_server.sh"), action],
                          env=env, capture_output=True, text=True, timeout=180, check=False)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_secret_is_on_no_command_line_and_every_file_is_private_from_the_start(fake_prefect, tmp_path):
    env = fake_prefect
    profiles = tmp_path / "prefect-home" / "profiles.toml"
    profiles.parent.mkdir()
    profiles.write_text('active = "default"\n\n[profiles.default]\n')
    profiles.chmod(0o644)  # made by an earlier `prefect profile ...` with a common umask
    old_inode = profiles.stat().st_ino
    pid = None
    try:
        # umask 000: nothing the script makes may rely on the user's umask to be private
        started = server(env, "start", umask="000")
        assert started.returncode == 0, started.stdout + started.stderr
        state = tmp_path / "state"
        secret = (state / "auth").read_text().strip()
        pid = int((state / "pid").read_text())
        assert secret.startswith("activate-ray:") and secret in profiles.read_text()
        # the profile holding it: a new file, 0600 from its first byte (never the old 0644 one written in place)
        assert mode(profiles) == 0o600 and profiles.stat().st_ino != old_inode
        assert mode(state) == 0o700
        assert {p.name: mode(p) for p in state.iterdir()} == dict.fromkeys(["auth", "url", "pid", "server.log"], 0o600)
        # every command the script ran, and the server's own command line now
        command_lines = Path(env["ARGV_LOG"]).read_text()
        assert "server start --host 127.0.0.1 --port" in command_lines
        assert secret not in command_lines and secret.split(":")[1] not in command_lines
        assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert "already running" in server(env, "start").stdout
    finally:
        stopped = server(env, "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "PREFECT_API_URL" not in profiles.read_text() and mode(profiles) == 0o600
    deadline = time.monotonic() + 10
    while pid is not None and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid is None or not Path(f"/proc/{pid}/cmdline").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.mark.parametrize("recorded", ["1", "0", "-1", "abc", "unrelated"])
def test_stop_signals_no_process_but_the_recorded_server(fake_prefect, tmp_path, recorded):
    """A pid file that reads 1 (or anything not this user's server on its port) is never signalled."""
    env = fake_prefect
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    unrelated = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        (state / "pid").write_text(f"{unrelated.pid if recorded == 'unrelated' else recorded}\n")
        (state / "url").write_text("http://127.0.0.1:4999/api\n")
        # `kill` recorded, never run: a failed check must not reach a real process (may be root here)
        (tmp_path / "guard.sh").write_text(f'kill() {{ printf "%s\\n" "$*" >>"{tmp_path}/kills.log"; return 1; }}\n')
        done = subprocess.run([BASH, "-c", '. "$0" && . "$1" stop', str(tmp_path / "guard.sh"),
                               str(SCRIPTS_DIR / "prefect_server.sh")],
                              env=env, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert not (tmp_path / "kills.log").exists()
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait(10)
