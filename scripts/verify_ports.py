"""Wait until this node's Ray listens on each of its ports, and make sure nobody else does.

Every port of a cluster is on `ray start`'s command line, which any user of the host sees
before Ray binds it: another user who listens there first gets whatever the flow, a
worker or a client then sends, the Ray token included. So nothing may connect to a port
before this check passed, on the host that owns the port: every socket LISTENing on it
(any address, /proc/net/tcp and tcp6) must be one of this node's own processes' (an fd of
a process of this user in the node's process group, or, for a container runtime that runs
them elsewhere, whose command line names the node's temp dir), and at least one must be.

usage: verify_ports.py --pgid PGID [--marker TEXT] [--wait SECONDS] [--stop-file PATH]
                       NAME=PORT... [--watch NAME=PORT[-PORT]...]
  NAME=PORT   a port this node's Ray must listen on (it is waited for)
  --watch     ports that Ray may or may not open (metrics, the workers' range): only
              nobody else may listen there
Exits 0 once every port is this node's; 1 with one line saying which port failed and why
(the port, and that another user or another process holds it: never who), when Ray ended,
the stop file appeared or the wait ran out.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

LISTEN = "0A"


def listeners() -> dict[int, list[tuple[str, int, int]]]:
    """port -> [(address, uid, inode)] of every listening TCP socket in this network namespace."""
    found: dict[int, list[tuple[str, int, int]]] = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(table) as handle:
                lines = handle.read().splitlines()[1:]
        except OSError:
            continue  # no IPv6 on this host
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != LISTEN:
                continue
            address, port = fields[1].split(":")
            found.setdefault(int(port, 16), []).append((_address(address, family), int(fields[7]), int(fields[9])))
    return found


def _address(hex_address: str, family: int) -> str:
    # the kernel prints each 32-bit word in host byte order
    raw = b"".join(int(hex_address[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_address), 8))
    text = socket.inet_ntop(family, raw)
    return text if family == socket.AF_INET else f"[{text}]"


def own_sockets(pgid: int, marker: str) -> tuple[set[int], bool]:
    """Inodes of the sockets this node's processes hold, and whether the group still has a process."""
    uid, inodes, alive = os.getuid(), set(), False
    # a container's processes (podman's conmon runs them, outside the node's group) carry the
    # cluster's id in their environment (AR_CONTAINER_ENV, ray_lib.sh)
    cluster = os.environ.get("AR_CLUSTER_ID", "")
    cluster_env = f"AR_CLUSTER_ID={cluster}".encode() if cluster else None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                stat = handle.read()
            # comm may hold spaces and parentheses: the fields after the last ")"
            group = int(stat.rsplit(")", 1)[1].split()[2])
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            if group != pgid:
                if not marker:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    named = marker.encode() in handle.read()
                if not named and cluster_env is not None:
                    with open(f"/proc/{pid}/environ", "rb") as handle:
                        named = cluster_env in handle.read().split(b"\0")
                if not named:
                    continue
            else:
                alive = True
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
        except (OSError, ValueError, IndexError):
            continue  # a process that ended meanwhile
    return inodes, alive


def parse_ports(specs: list[str]) -> dict[str, range]:
    ports = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        low, _, high = value.partition("-")
        ports[name] = range(int(low), int(high or low) + 1)
    return ports


# Who holds a port, when it is this user's own process (a previous start's, still ending)
SAME_USER = "another process of this user (not this cluster's node)"


def strangers(ports: dict[str, range], table, ours: set[int]) -> list[str]:
    """What another process listens on among these ports: one line each, no owner named."""
    uid, found = os.getuid(), []
    for name, span in ports.items():
        for port in span:
            for address, owner, inode in table.get(port, []):
                if inode in ours:
                    continue
                who = "another user" if owner != uid else SAME_USER
                found.append(f"port {port} ({name}) is held by {who}: it listens on {address}:{port}")
    return found


# The exit status when Ray's own processes ended before they listened: a start that failed
# (ar_run_node starts a worker again), not a stranger on a port.
RAY_ENDED = 3


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pgid", type=int, required=True)
    parser.add_argument("--marker", default="")
    parser.add_argument("--wait", type=float, default=180)
    parser.add_argument("--stop-file", default="")
    parser.add_argument("required", nargs="*")
    parser.add_argument("--watch", nargs="*", default=[])
    # A container node (podman, apptainer): its processes run outside the node's group and
    # their fds may not be readable from the host; a listener of this same user is then the
    # node's. Another user's listener is still never taken for it.
    parser.add_argument("--same-user-is-ours", action="store_true")
    args = parser.parse_args(argv)
    required, watched = parse_ports(args.required), parse_ports(args.watch)
    host = socket.gethostname().split(".")[0]
    deadline = time.monotonic() + args.wait
    suspect: set[str] = set()
    while True:
        # the table first, then the fds: a socket of ours listed in the table is still in an fd
        # when the fds are read (Ray never closes a listener it keeps), so it is never taken for a stranger's
        table = listeners()
        ours, alive = own_sockets(args.pgid, args.marker)
        if args.same_user_is_ours:
            ours |= {inode for rows in table.values() for _, owner, inode in rows if owner == os.getuid()}
        found = strangers({**required, **watched}, table, ours)
        # said once seen twice in a row: not a process that was just ending or starting
        if any(line in suspect for line in found) or (found and not alive):
            print(f"{host}: {found[0]}; this node stops and nothing is sent there", flush=True)
            # only this user's own processes (a previous start's, still ending): a start that
            # failed, which a worker makes again on fresh ports; another user's: never again
            return RAY_ENDED if all(SAME_USER in line for line in found) else 1
        suspect = set(found)
        missing = [f"{port[0]} ({name})" for name, port in required.items()
                   if not any(inode in ours for _, _, inode in table.get(port[0], []))]
        if not found and not missing:
            return 0
        if not alive:
            print(f"{host}: Ray ended before it listened on port {', '.join(missing)}", flush=True)
            return RAY_ENDED
        if args.stop_file and os.path.exists(args.stop_file):
            print(f"{host}: stopped while waiting for Ray's ports", flush=True)
            return 1
        if time.monotonic() > deadline:
            print(f"{host}: Ray did not listen on port {', '.join(missing)} within {args.wait:g}s", flush=True)
            return 1
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
