"""Hold TCP ports on loopback, then become the given command, which keeps them.

Ray's head opens two Prometheus servers (the dashboard's and the autoscaler's) on
every interface, without the token, at ports named by environment variables.
Listening on those ports on 127.0.0.1 first makes Ray's own bind fail (it logs
that and goes on without them), so nothing answers beyond loopback; and the
held ports are this cluster's own, so a second cluster on the host never
collides on Ray's fixed defaults.

usage: python exec_holding_ports.py PORT... -- COMMAND [ARG...]
"""

import os
import socket
import sys

split = sys.argv.index("--")
ports, command = sys.argv[1:split], sys.argv[split + 1 :]
held = []  # referenced until exec: a collected socket would close
for port in ports:
    listener = socket.socket()
    listener.bind(("127.0.0.1", int(port)))
    listener.listen(1)
    # kept across exec by the command's process (ray start --block), which lives as long as the node;
    # Ray's own children do not inherit it (subprocess closes fds)
    listener.set_inheritable(True)
    held.append(listener)
# execvp: in a container image the command is a bare `ray`, found on the image's PATH
os.execvp(command[0], command)
