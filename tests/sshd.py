"""A real OpenSSH server on 127.0.0.1 with a throwaway host key, client key and config."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackSshd:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ar-sshd-"))
        self.port = free_port()
        self.key = self.root / "id_ed25519"
        self.known_hosts = self.root / "known_hosts"
        self.process: subprocess.Popen | None = None

    @staticmethod
    def missing() -> str | None:
        if not Path("/usr/sbin/sshd").exists() or not shutil.which("ssh-keygen"):
            return "openssh-server is not installed (apt-get install openssh-server)"
        import os

        if os.geteuid() != 0:
            return "a loopback sshd logging in as this user needs root here"
        return None

    def start(self) -> "LoopbackSshd":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        host_key = self.root / "host_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        authorized = self.root / "authorized_keys"
        shutil.copy(self.key.with_suffix(".pub"), authorized)
        host_pub = (self.root / "host_ed25519.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        config = self.root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"Port {self.port}",
                    f"HostKey {host_key}",
                    f"AuthorizedKeysFile {authorized}",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "UsePAM no",
                    "StrictModes no",
                    "PidFile none",
                    "AllowTcpForwarding yes",
                    "Subsystem sftp internal-sftp",
                    "MaxSessions 50",
                    "MaxStartups 50:30:100",
                    "",
                ]
            )
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "sshd.log", "w"),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not start: {(self.root / 'sshd.log').read_text()}")

    @property
    def target(self) -> str:
        return f"root@127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.root, ignore_errors=True)
