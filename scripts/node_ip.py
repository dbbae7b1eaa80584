"""This node's IPv4 address on the network Ray should use (network_interface): the
address of an interface given by name (ib0, hsn0), or the first address inside a subnet
(10.20.0.0/16). Prints it; exits 1 with what this node has instead.

usage: node_ip.py INTERFACE|CIDR
"""

import fcntl
import ipaddress
import shutil
import socket
import struct
import subprocess
import sys

SIOCGIFADDR = 0x8915


def addresses() -> list[tuple[str, str]]:
    """(interface, address) for every IPv4 address of this node."""
    if shutil.which("ip"):
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
        # "3: ib0    inet 10.20.0.11/16 brd 10.20.255.255 scope global ib0\ ..."
        return [(f[1].split("@")[0], f[3].split("/")[0]) for f in (line.split() for line in out.splitlines()) if len(f) > 3]
    found = []  # no iproute2: each interface's primary address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            found.append((name, socket.inet_ntoa(packed[20:24])))
    return found


def main(selector: str) -> int:
    have = addresses()
    if "/" in selector:
        subnet = ipaddress.IPv4Network(selector, strict=False)
        chosen = [ip for _, ip in have if ipaddress.IPv4Address(ip) in subnet]
        what = f"no address in {subnet}"
    else:
        chosen = [ip for name, ip in have if name == selector]
        what = f"no IPv4 address on interface {selector}"
    if chosen:
        print(chosen[0])
        return 0
    listing = ", ".join(f"{name} {ip}" for name, ip in have) or "none"
    print(f"{socket.gethostname()}: {what} (this node has: {listing})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
