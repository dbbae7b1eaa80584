"""A second user who listens on a cluster's port before Ray does gets nothing.

Every port of a cluster is on `ray start`'s command line, which every user of the host
sees before Ray binds it. The second user (`arother`) watches the process list as an
attacker would, and the moment a `ray start` of the bed user's appears, listens on the
port given by one of its options, on the address the flow, a worker or Ray's own
dashboard would connect to, and records every byte it receives. The cluster's head
must find that port is not its own before telling anyone where it is: the squatter
receives no byte of the token (no request at all from the flow), and the flow either
fails at once naming the port or retries on fresh ports and succeeds; nothing is left."""

from __future__ import annotations

import json
import re
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, SMALL, assert_nothing_left, batch_args, run_flow

pytestmark = [pytest.mark.bed, pytest.mark.timeout(600)]

# As the second user, on one host: wait for the first `ray start` of the owner that has
# the given option, listen on its port (on the given address: "node" for the node's
# address), then accept and record. One JSON line per event on stdout.
SQUATTER = textwrap.dedent(
    r"""
    import json, os, re, socket, sys, threading, time
    option, where, owner, head_only = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "head"
    pattern = re.compile(re.escape(option).encode() + rb"=(\d+)")

    def say(**event):
        print(json.dumps(event), flush=True)

    def find():
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.stat(f"/proc/{pid}").st_uid != owner:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    argv = handle.read()
            except OSError:
                continue
            if b"\0start\0" in argv and (not head_only or b"\0--head\0" in argv):
                port = pattern.search(argv)
                node = re.search(rb"--node-ip-address=([\d.]+)", argv)
                if port and node:
                    return int(port.group(1)), node.group(1).decode()
        return None

    say(event="watching")
    while not (found := find()):
        time.sleep(0.005)
    port, node_ip = found
    address = node_ip if where == "node" else where
    listener = socket.socket()
    try:
        listener.bind((address, port))
        listener.listen(64)
    except OSError as error:
        say(event="too late", port=port, address=address, error=str(error))
        sys.exit(0)
    say(event="squatted", port=port, address=address)

    def record(connection, peer):
        connection.settimeout(30)
        while True:
            try:
                data = connection.recv(65536)
            except OSError:
                break
            if not data:
                break
            say(event="received", port=port, peer=peer[0], hex=data.hex())
        connection.close()

    while True:
        connection, peer = listener.accept()
        say(event="connection", port=port, peer=peer[0])
        threading.Thread(target=record, args=(connection, peer), daemon=True).start()
    """
)


class Squatter:
    """The SQUATTER as the second user on a host, started before the flow."""

    def __init__(self, bed, host: str, option: str, where: str, name: str):
        self.bed, self.log = bed, bed.log_dir / f"squatter-{name}.log"
        self.log.write_text("")
        self.process = bed.spawn(host, [bed.user_python, "-c", SQUATTER, option, where, str(bed.user.uid), "head"],
                                 self.log.name, user=bed.other)
        deadline = time.monotonic() + 60
        while not self.events():
            assert time.monotonic() < deadline and self.process.poll() is None, self.log.read_text()
            time.sleep(0.1)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def received(self) -> bytes:
        return b"".join(bytes.fromhex(e["hex"]) for e in self.events() if e["event"] == "received")

    def stop(self) -> None:
        self.bed.stop_spawned(self.process)


class TokenWatch(threading.Thread):
    """Keeps every cluster token the flow writes under a work dir: a failed run's cluster
    dir (and its token) is gone by the time the test looks."""

    def __init__(self, work: Path):
        super().__init__(daemon=True)
        self.work, self.tokens, self.done = work, set(), threading.Event()

    def run(self):
        while not self.done.wait(0.1):
            for path in (self.work / "clusters").glob("*/token"):
                try:
                    if token := path.read_text().strip():
                        self.tokens.add(token)
                except OSError:
                    pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(5)


# option on `ray start`, where the squatter listens: where the flow's tunnel, the workers
# or Ray's dashboard connect (the dashboard and Ray Client on loopback as the flow's
# tunnel reaches them, the GCS and the job agent on the node's address)
PORTS = {
    "dashboard": ("--dashboard-port", "127.0.0.1"),
    "gcs": ("--port", "node"),
    "ray_client": ("--ray-client-server-port", "127.0.0.1"),
    "agent_http": ("--dashboard-agent-listen-port", "node"),
}
SAID = re.compile(r"port (\d+) \((\w+)\) is held by another user")


def check(run, squatter: Squatter, tokens: set[str], port_name: str) -> None:
    events = squatter.events()
    squatted = [e for e in events if e["event"] == "squatted"]
    assert squatted, f"the squatter was too late, the test proves nothing: {events}"
    port = squatted[0]["port"]
    received = squatter.received()
    assert tokens, "no token seen: the run never got as far as a cluster"
    for token in tokens:
        assert token.encode() not in received, f"the squatter on port {port} got the token"
    assert b"Bearer" not in received and b"authorization" not in received.lower()
    # the flow itself never connected: its first request carries the token
    assert b"/api/" not in received, received[:500]
    # what happened, for the test's report (-rP): the squat, what reached it, the flow's words
    connections = [e for e in events if e["event"] == "connection"]
    print(f"squatted {port_name} {squatted[0]['address']}:{port}; {len(connections)} connection(s) "
          f"from {sorted({e['peer'] for e in connections})}, {len(received)} byte(s): {received[:120]!r}")
    print("flow said:", next((line for line in run.output.splitlines() if SAID.search(line)), None))
    said = [(int(p), name) for p, name in SAID.findall(run.output)]
    assert (port, port_name) in said, f"the port was not named:\n{run.output[-4000:]}"
    if run.returncode == 0:
        assert "retrying with a fresh cluster" in run.output
    else:
        assert "failed to start" in run.output, run.output[-4000:]


def run_with_a_squatter(bed, host: str, port_name: str, label: str, args: list, work, api):
    """Run the flow while a squatter holds port_name's port on host, then check() what it got.
    Returns the run and when it started (time.monotonic())."""
    option, where = PORTS[port_name]
    squatter = Squatter(bed, host, option, where, label)
    try:
        with TokenWatch(work / "w") as watch:
            started = time.monotonic()
            run = run_flow(bed, args, work=work, api=api)
    finally:
        squatter.stop()
    check(run, squatter, watch.tokens, port_name)
    return run, started


@pytest.mark.parametrize("port_name", list(PORTS))
def test_a_squatted_port_of_a_local_cluster_gets_nothing_and_the_retry_succeeds(work, prefect_api, bed, port_name):
    run, started = run_with_a_squatter(
        bed, "login", port_name, f"local-{port_name}",
        ["--user-script", REPO / "examples/hello_ray.py", "--work-dir", work / "w", "--retries", "1", *SMALL],
        work, prefect_api)
    # the squatter took the first cluster's port only: the second, on fresh ports, works
    assert run.returncode == 0, run.output[-4000:]
    assert "HELLO_RAY_OK" in run.output
    assert time.monotonic() - started < 240
    for cluster_id in set(re.findall(r"cluster (ar-[0-9a-f]{32}) on ", run.output)):
        assert_nothing_left(bed, cluster_id, work / "w")


@pytest.mark.parametrize("port_name", ["dashboard", "gcs", "ray_client"])
def test_a_squatted_port_of_a_slurm_head_fails_the_run_at_once_naming_it(work, prefect_api, bed, port_name):
    run, started = run_with_a_squatter(
        bed, "node1", port_name, f"slurm-{port_name}",
        batch_args(work / "w", "--slurm.nodes", "2", "--retries", "0",
                   "--slurm.extra-directives", "#SBATCH --nodelist=node1,node2",
                   "--user-script", REPO / "examples/hello_ray.py", readiness=180),
        work, prefect_api)
    assert run.returncode == 1, run.output[-4000:]
    # at once: not the readiness timeout (180 s)
    assert time.monotonic() - started < 120, run.output[-4000:]
    assert_nothing_left(bed, run.cluster_id, work / "w")
