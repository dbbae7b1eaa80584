"""scripts/verify_ports.py and ar_free_ports without a bed, for real on this machine: a
port is a node's own only when every listener on it is one of the node's process group's;
a listener of anyone else is said, naming the port and nothing of its owner. The bed test
(tests/test_port_squatting.py) tries it as a second user against a starting cluster."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import REPO

VERIFY = REPO / "scripts" / "verify_ports.py"
LISTEN = textwrap.dedent(
    """
    import socket, sys, time
    held = []
    for spec in sys.argv[1:]:
        host, port = spec.rsplit(":", 1)
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.bind((host, int(port)))
        s.listen()
        held.append(s)
    print("listening", flush=True)
    time.sleep(120)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Listener:
    """A process group of its own listening on the given addresses: a node, or a stranger."""

    def __init__(self, *addresses: str):
        self.process = subprocess.Popen([sys.executable, "-c", LISTEN, *addresses], stdout=subprocess.PIPE,
                                        text=True, start_new_session=True)
        assert self.process.stdout.readline().strip() == "listening"

    @property
    def pgid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def verify(pgid: int, *args: str, wait: float = 3) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, VERIFY, "--pgid", str(pgid), "--wait", str(wait), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def node():
    port = free_port()
    listener = Listener(f"0.0.0.0:{port}")
    yield listener, port
    listener.stop()


def test_the_nodes_own_listener_passes(node):
    listener, port = node
    result = verify(listener.pgid, f"gcs={port}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_listener_of_another_process_on_a_watched_port_fails_naming_the_port(node):
    listener, port = node
    other = free_port()
    stranger = Listener(f"127.0.0.1:{other}")
    try:
        started = time.monotonic()
        result = verify(listener.pgid, f"gcs={port}", "--watch", f"dashboard={other}", wait=30)
    finally:
        stranger.stop()
    # 3: only this user's own process (a previous start's, ending): a worker starts again on
    # fresh ports; another user's is 1, never again (test_another_users_listener_is_said_as_such)
    assert result.returncode == 3
    # at once (a second look to be sure), not at the end of the wait
    assert time.monotonic() - started < 10
    said = result.stdout.strip()
    assert f"port {other} (dashboard) is held by another process of this user" in said
    assert f"127.0.0.1:{other}" in said
    assert str(stranger.process.pid) not in said  # never who


def test_a_stranger_on_loopback_beside_the_nodes_own_listener_fails_it(node):
    """Ray listening on the node's address does not make the port safe: a client that
    connects to 127.0.0.1 (the flow's tunnel) would reach the stranger."""
    listener, _ = node
    port = free_port()
    ours = Listener(f"127.0.0.2:{port}")
    stranger = Listener(f"127.0.0.1:{port}")
    try:
        result = verify(ours.pgid, f"dashboard={port}")
    finally:
        stranger.stop()
        ours.stop()
    assert result.returncode == 3  # this user's own process (above)
    assert f"port {port} (dashboard) is held by" in result.stdout


def test_a_port_never_listened_on_is_said_at_the_end_of_the_wait(node):
    listener, port = node
    missing = free_port()
    result = verify(listener.pgid, f"gcs={port}", f"ray_client={missing}", wait=1)
    assert result.returncode == 1
    assert f"did not listen on port {missing} (ray_client) within 1s" in result.stdout


def test_a_node_that_ended_is_said_at_once():
    """Exit 3, not 1: a start that failed (a worker starts Ray again), not a stranger on a port."""
    listener = Listener(f"0.0.0.0:{free_port()}")
    listener.stop()
    result = verify(listener.pgid, f"gcs={free_port()}", wait=30)
    assert result.returncode == 3 and "Ray ended before it listened on port" in result.stdout


@pytest.mark.skipif(os.getuid() != 0, reason="another user's listener needs root to make")
def test_another_users_listener_is_said_as_such(node):
    listener, port = node
    other = free_port()
    code = f"import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{other})); s.listen(); print('ok',flush=True); time.sleep(60)"
    stranger = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                                 "-c", code], stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert stranger.stdout.readline().strip() == "ok"
        result = verify(listener.pgid, f"gcs={port}", "--watch", f"ray_client={other}")
    finally:
        stranger.kill()
        stranger.wait()
    assert result.returncode == 1
    assert f"port {other} (ray_client) is held by another user: it listens on 127.0.0.1:{other}" in result.stdout
    assert "nobody" not in result.stdout and "65534" not in result.stdout


def test_free_ports_are_random_not_the_next_free_ones(tmp_path):
    """Two nodes' ports share no pattern: nobody guesses the next cluster's from one they saw."""
    script = f'AR_PYTHON={sys.executable} AR_DASHBOARD_PORT=0; . {REPO}/scripts/ray_lib.sh; ar_free_ports; ar_free_ports'
    lines = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    first, second = ([int(p) for p in line.split()] for line in lines)
    assert len(first) == len(second) == 13
    singles = first[:9] + first[11:] + second[:9] + second[11:]
    assert len(set(singles)) == len(singles)
    # not a run of neighbours, as the kernel's next free ports can be
    steps = [b - a for a, b in itertools.pairwise(sorted(singles))]
    assert sum(step <= 2 for step in steps) <= 3, sorted(singles)
    assert all(30000 <= p < 61000 for p in singles)
