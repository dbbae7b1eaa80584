"""`check --on-nodes`: whether this node and the others of the check job reach each other on
a port of the range a cluster's workers use (ar_free_ports: 12000-30000). Each node listens on
one, says where in <dir>/<name>.peer (the shared cluster dir), connects to every other node's,
and stays up until every node said it is done (or the time is up). Prints one row as
node_check.sh does; exits 1 when it fails.

usage: peer_check.py DIR NAME ADDRESS EXPECTED_NODES TIMEOUT
"""

import glob
import os
import random
import socket
import sys
import threading
import time


def row(status: str, found: str, fix: str = "") -> None:
    print(f"AR_CHECK\tnode to node\t{status}\t{found}\t{fix}", flush=True)


def listen(address: str) -> socket.socket:
    for _ in range(200):
        server = socket.socket()
        try:
            server.bind((address, random.randrange(12000, 30000)))
        except OSError:
            server.close()
            continue
        server.listen(16)
        return server
    raise SystemExit("no free port in 12000-30000")


def serve(server: socket.socket) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        conn.close()


def main(directory: str, name: str, address: str, expected: int, timeout: float) -> int:
    host = socket.gethostname().split(".")[0]
    server = listen(address)
    threading.Thread(target=serve, args=(server,), daemon=True).start()
    port = server.getsockname()[1]
    mine = os.path.join(directory, f"{name}.peer")
    with open(mine + ".part", "w") as f:
        f.write(f"{host} {address} {port}\n")
    os.replace(mine + ".part", mine)
    deadline = time.monotonic() + timeout
    reached, failed = {}, {}
    while time.monotonic() < deadline:
        for path in glob.glob(os.path.join(directory, "*.peer")):
            if path == mine:
                continue
            with open(path) as f:
                peer_host, peer_address, peer_port = f.read().split()
            if peer_host in reached:
                continue
            try:
                socket.create_connection((peer_address, int(peer_port)), timeout=2).close()
                reached[peer_host] = f"{peer_address}:{peer_port}"
                failed.pop(peer_host, None)
            except OSError as exc:
                failed[peer_host] = f"{peer_address}:{peer_port} ({exc.strerror or type(exc).__name__})"
        if len(reached) >= expected - 1:
            break
        time.sleep(0.5)
    with open(os.path.join(directory, f"{name}.reached"), "w") as f:
        f.write(" ".join(reached) + "\n")
    # the others may still be trying this node: serve until every node is done, or time is up
    while time.monotonic() < deadline and len(glob.glob(os.path.join(directory, "*.reached"))) < expected:
        time.sleep(0.3)
    server.close()
    fix = "open ports 12000-30000 between the nodes (a firewall), or `--network-interface` the network they share"
    if failed:
        row("fail", f"{host} ({address}) cannot reach " + ", ".join(f"{h} at {w}" for h, w in sorted(failed.items())), fix)
        return 1
    if len(reached) < expected - 1:
        row("warn", f"{host} saw {len(reached) + 1} of {expected} nodes of the check job within {timeout:.0f}s"
            + (f" (reached {', '.join(sorted(reached))})" if reached else ""), "run the check again when the nodes are less busy")
        return 0
    row("pass", f"{host} ({address}) reaches " + ", ".join(f"{h} at {w}" for h, w in sorted(reached.items()))
        if reached else f"{host}: the only node of the check job")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])))
