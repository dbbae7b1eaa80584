"""A real multi-host HPC test bed on one machine.

``TestBed`` builds, inside network namespaces, a small cluster:

* ``login`` (10.213.0.1) with ``slurmctld`` and an ``sshd``;
* ``node1`` .. ``nodeN`` (10.213.0.11, .12, ...) with one ``slurmd`` and one
  ``sshd`` each;
* munge (started by hand, or reused when one already answers), a Slurm
  ``TaskProlog`` that gives jobs the usual PBS variables (``qsub``/``qstat``/
  ``qdel`` come from Debian's slurm-wlm-torque wrappers);
* a throwaway ed25519 client key and a known_hosts file for all hosts.

All hosts share the machine's filesystem, PID namespace and CPUs; each has its
own network namespace, hostname (UTS namespace) and /etc/hosts (bind mount in a
private mount namespace).  Nothing is routed out of the bed: the bridge lives in
the login namespace, the root namespace has no address on the bed subnet and no
namespace has a default route.

Everything the bed starts lives either in one of its namespaces or carries the
bed's marker (``/<prefix>-bed-``) on its command line, which is how ``down()``
and the stale-run cleanup in ``up()`` find it.  Only one bed can run on a
machine at a time: it owns ``/etc/slurm/slurm.conf`` while it is up.

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and the Debian packages
``slurm-wlm munge slurm-wlm-torque openssh-server iproute2 procps``.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

__all__ = ["TestBed"]

SLURM_CONF = pathlib.Path("/etc/slurm/slurm.conf")
SLURM_CONF_BACKUP = SLURM_CONF.with_name("slurm.conf.activate-ray-testbed-orig")
CONF_HEADER = "# written by activate-ray TestBed"
NODE_SSH_CONFIG = pathlib.Path("/etc/ssh/ssh_config.d/activate-ray-bed.conf")
LOCK_FILE = pathlib.Path("/run/activate-ray-testbed.lock")  # one bed per machine
MUNGE_RUN = pathlib.Path("/run/munge")
NETNS_DIR = pathlib.Path("/run/netns")
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
REAPER = pathlib.Path(__file__).with_name("reaper.py")
# daemons get a clean environment, not the test process's (PREFECT_*, RAY_*, VIRTUAL_ENV ...)
DAEMON_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

# binaries the bed itself needs (generate_pbs_nodefile is optional: the
# TaskProlog falls back to scontrol when it is absent)
REQUIRED_BINARIES = [
    "ip", "nsenter", "unshare", "mount", "hostname", "ss",
    "munged", "munge",
    "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scontrol",
    "scancel",
    "qsub", "qstat", "qdel",
    "sshd", "ssh", "ssh-keygen",
]

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21

_RAY_COMM = {"raylet", "gcs_server"}
_RAY_CMD_RE = re.compile(
    r"(^ray::)"                        # worker processes rename themselves
    r"|(^|/)ray(\s|$)"                 # the `ray` CLI (ray start --block ...)
    r"|/site-packages/ray/"            # dashboard, log_monitor, default_worker ...
    r"|(^|/)(raylet|gcs_server)(\s|$)"
)


class BedError(RuntimeError):
    """The bed could not be brought up."""


def _which_all(names):
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin"
    return [n for n in names if shutil.which(n, path=path) is None]


def _read_cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # state is the field after the ")" that closes comm
    try:
        state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
    except ValueError:
        return False
    return state not in (b"Z", b"X")


def _all_pids():
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _self_and_ancestors() -> set[int]:
    pids = set()
    pid = os.getpid()
    while pid > 0 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _kill_pids(pids, term_wait: float = 3.0, kill_wait: float = 5.0) -> None:
    """SIGTERM, wait a little, then SIGKILL what is left."""
    pids = {p for p in pids if p not in _self_and_ancestors()}
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        pids = {p for p in pids if _alive(p)}
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        delay = 0.02
        while time.monotonic() < deadline:
            pids = {p for p in pids if _alive(p)}
            if not pids:
                return
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)


class TestBed:
    """Multi-host Slurm + PBS-wrapper + ssh cluster in network namespaces."""

    __test__ = False  # not a pytest test class

    def __init__(self, prefix: str = "ar", nodes: int = 3, subnet: str = "10.213.0"):
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError("prefix must be 1-8 lowercase letters/digits, starting with a letter")
        if not 1 <= nodes <= 9:
            raise ValueError("nodes must be between 1 and 9")
        if not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", subnet):
            raise ValueError("subnet is the first three octets, e.g. '10.213.0'")
        self.prefix = prefix
        self.subnet = subnet
        self.login_host = "login"
        self.login_ip = f"{subnet}.1"
        self.node_names = [f"node{i}" for i in range(1, nodes + 1)]
        self.node_ips = {n: f"{subnet}.{10 + i}" for i, n in enumerate(self.node_names, 1)}
        self.hosts = {self.login_host: self.login_ip, **self.node_ips}
        self.netns = {h: f"{prefix}-{h}" for h in self.hosts}
        self.marker = f"/{prefix}-bed-"       # in the temp dir path: on daemons' cmdlines
        self.slurm_conf_backup = SLURM_CONF_BACKUP
        self.conf_header = f"{CONF_HEADER} prefix={prefix}; restored on teardown"
        self.munge_pidfile = MUNGE_RUN / f"{prefix}-bed-munged.pid"

        self.root: pathlib.Path = None  # type: ignore[assignment]
        self.ssh_key: pathlib.Path = None  # type: ignore[assignment]
        self.known_hosts: pathlib.Path = None  # type: ignore[assignment]
        self.hosts_file: pathlib.Path = None  # type: ignore[assignment]
        self.log_dir: pathlib.Path = None  # type: ignore[assignment]
        self.jobcomp_log: pathlib.Path = None  # type: ignore[assignment]
        self.pbs_dir: pathlib.Path = None  # type: ignore[assignment]
        self._procs: list[subprocess.Popen] = []
        self._munged: subprocess.Popen | None = None
        self._up = False
        self._lock_fd: int | None = None
        self.bringup_seconds: float | None = None

    _active: "TestBed | None" = None

    # ------------------------------------------------------------------ api

    @classmethod
    def active(cls) -> "TestBed | None":
        """The bed that is up in this process, if any."""
        return cls._active

    def __enter__(self) -> "TestBed":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def __repr__(self) -> str:
        return f"<TestBed prefix={self.prefix} root={self.root} up={self._up}>"

    def requirements_missing(self) -> str | None:
        """None when the bed can run here, else a clear reason."""
        if os.geteuid() != 0:
            return "the HPC test bed needs root (network namespaces, slurmd, sshd)"
        try:
            caps = int(re.search(r"^CapEff:\s*([0-9a-f]+)", pathlib.Path("/proc/self/status").read_text(), re.M).group(1), 16)
        except (OSError, AttributeError, ValueError):
            caps = 0
        if not (caps >> CAP_SYS_ADMIN) & 1 or not (caps >> CAP_NET_ADMIN) & 1:
            return "the HPC test bed needs CAP_SYS_ADMIN and CAP_NET_ADMIN"
        missing = _which_all(REQUIRED_BINARIES)
        if missing:
            return ("the HPC test bed needs these commands: " + " ".join(missing)
                    + " (apt-get install --no-install-recommends slurm-wlm munge "
                    "slurm-wlm-torque openssh-server iproute2 procps)")
        if not pathlib.Path("/etc/munge/munge.key").exists():
            return "the HPC test bed needs /etc/munge/munge.key (Debian's munge package makes it)"
        if not pathlib.Path(SFTP_SERVER).exists():
            return f"the HPC test bed needs {SFTP_SERVER} (openssh-sftp-server)"
        return None

    def login_argv(self, argv: list[str]) -> list[str]:
        """argv run inside the login namespace with its hostname and /etc/hosts."""
        return self._ns_argv(self.login_host, argv)

    def node_argv(self, node: str, argv: list[str]) -> list[str]:
        if node not in self.node_ips:
            raise KeyError(f"unknown node {node!r}; bed nodes: {self.node_names}")
        return self._ns_argv(node, argv)

    def run_login(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("text", True)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        return subprocess.run(self.login_argv(argv), **kw)

    def run_node(self, node: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("text", True)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        return subprocess.run(self.node_argv(node, argv), **kw)

    def ssh_options(self) -> list[str]:
        """Options for the OpenSSH client: bed key, bed known_hosts, no user config."""
        return [
            "-F", "/dev/null",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5",
            "-i", str(self.ssh_key),
            "-l", "root",
        ]

    def ssh_argv(self, host: str, argv: list[str]) -> list[str]:
        """`ssh ... host -- argv` to run inside a bed namespace (e.g. via login_argv).

        argv is shell-quoted, so the remote side runs exactly argv (ssh itself
        would join the words with spaces and let the remote shell re-split them).
        """
        return ["ssh", *self.ssh_options(), host, "--", shlex.join([str(a) for a in argv])]

    def queue(self) -> list[str]:
        """Job ids squeue knows (all states, including recently ended ones)."""
        cp = self.run_login(["squeue", "-h", "-a", "-t", "all", "-o", "%i"], timeout=30)
        if cp.returncode != 0:
            raise BedError(f"squeue failed ({cp.returncode}): {cp.stderr.strip()}")
        return [line.strip() for line in cp.stdout.splitlines() if line.strip()]

    def job_state(self, jobid: str) -> str | None:
        """Slurm JobState (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...), or
        None once the job is unknown (MinJobAge=30 s after it ended)."""
        cp = self.run_login(["scontrol", "-o", "show", "job", str(jobid)], timeout=30)
        m = re.search(r"\bJobState=(\S+)", cp.stdout)
        return m.group(1) if (cp.returncode == 0 and m) else None

    def wait_job(self, jobid: str, timeout: float = 120) -> str | None:
        """Poll (short backoff) until the job has ended; return its final state.

        Faster than `sbatch --wait`, whose own polling can add up to 10 s.
        """
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            state = self.job_state(jobid)
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED"):
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {jobid} still {state} after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def ray_processes(self) -> list[str]:
        """'pid cmdline' of every raylet/gcs_server/ray process on the machine."""
        me = _self_and_ancestors()
        out = []
        for pid in _all_pids():
            if pid in me or not _alive(pid):
                continue
            try:
                comm = pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            cmd = _read_cmdline(pid)
            if cmd is None:
                continue
            if comm in _RAY_COMM or _RAY_CMD_RE.search(cmd):
                out.append(f"{pid} {cmd}")
        return out

    # --------------------------------------------------------------- up/down

    def up(self) -> "TestBed":
        if self._up:
            return self
        reason = self.requirements_missing()
        if reason:
            raise BedError(reason)
        t0 = time.monotonic()
        self._take_lock()
        try:
            self._cleanup_stale()
            self._make_dirs()
            self._make_ssh_material()
            self._make_network()
            self._start_munge()
            self._write_slurm_conf()
            self._write_node_ssh_config()
            self._start_daemons()
            self._wait_ready()
        except BaseException:
            self.down()
            raise
        self._up = True
        TestBed._active = self
        atexit.register(self._down_at_exit)  # a session that never calls down()
        self.bringup_seconds = time.monotonic() - t0
        return self

    def down(self) -> None:
        """Stop everything the bed started and remove its state.  Idempotent.

        Does nothing unless this object holds the machine's bed lock (it is up,
        or its up() failed half-way), so it never tears down someone else's bed.
        """
        if self._lock_fd is None:
            return
        errors = []
        # every process in a bed namespace: daemons, job steps, ssh sessions, ray
        # (except the subreapers we started: they reap the rest, then exit)
        try:
            reapers = {p.pid for p in self._procs}
            pids = self._pids_in_namespaces(self.netns.values())
            if self.root is not None:
                pids |= self._pids_with_marker(str(self.root))
            _kill_pids(pids - reapers, term_wait=1.0)
        except Exception as e:  # pragma: no cover - best effort
            errors.append(f"killing bed processes: {e}")
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
            except Exception:  # pragma: no cover
                pass
        self._procs.clear()
        try:  # anything that appeared meanwhile (e.g. a step started during teardown)
            _kill_pids(self._pids_in_namespaces(self.netns.values()), term_wait=1.0)
        except Exception as e:  # pragma: no cover
            errors.append(f"killing bed processes: {e}")
        if self._munged is not None:
            try:
                self._munged.terminate()
                self._munged.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._munged.kill()
                self._munged.wait(timeout=5)
            except Exception as e:  # pragma: no cover
                errors.append(f"stopping munged: {e}")
            self._munged = None
            self.munge_pidfile.unlink(missing_ok=True)
        for ns in self.netns.values():
            if (NETNS_DIR / ns).exists():
                cp = subprocess.run(["ip", "netns", "delete", ns], capture_output=True, text=True)
                if cp.returncode != 0:
                    errors.append(f"ip netns delete {ns}: {cp.stderr.strip()}")
        try:
            self._restore_slurm_conf()
            NODE_SSH_CONFIG.unlink(missing_ok=True)
        except Exception as e:  # pragma: no cover
            errors.append(f"restoring {SLURM_CONF}: {e}")
        if self.root is not None and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        # Ray temp dirs of clusters whose processes the kill above ended before their own
        # teardown could run (a test aborted mid-run): the bed's hosts share this /tmp.
        for stale in pathlib.Path(tempfile.gettempdir()).glob("ar-*-*"):
            if re.fullmatch(r"ar-[0-9a-f]{8}-[A-Za-z0-9_.-]+", stale.name) and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        self._up = False
        atexit.unregister(self._down_at_exit)
        if TestBed._active is self:
            TestBed._active = None
        self._release_lock()
        if errors:
            raise BedError("teardown incomplete: " + "; ".join(errors))

    def _down_at_exit(self) -> None:
        try:
            self.down()
        except Exception as e:  # pragma: no cover
            print(f"TestBed: {e}", file=sys.stderr)

    def _cleanup_stale(self) -> None:
        """Remove what a crashed earlier bed with this prefix left behind."""
        stale_ns = []
        try:
            listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        except OSError:
            listing = ""
        pat = re.compile(rf"^{re.escape(self.prefix)}-(login|node\d+)$")
        for line in listing.splitlines():
            name = line.split()[0] if line.split() else ""
            if pat.match(name):
                stale_ns.append(name)
        pids = self._pids_in_namespaces(stale_ns) | self._pids_with_marker(self.marker)
        _kill_pids(pids)
        for ns in stale_ns:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self.munge_pidfile.unlink(missing_ok=True)
        self._restore_slurm_conf()
        NODE_SSH_CONFIG.unlink(missing_ok=True)
        tmp = pathlib.Path(tempfile.gettempdir())
        for d in tmp.glob(f"{self.prefix}-bed-*"):
            if d.is_dir() and d != self.root:
                shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------- internals

    def _take_lock(self) -> None:
        """One bed per machine: it owns /etc/slurm/slurm.conf and the Slurm ports."""
        if self._lock_fd is not None:
            return
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        # Wait a while for another bed (a benchmark, a second session) to finish.
        deadline = time.monotonic() + float(os.environ.get("ACTIVATE_RAY_BED_WAIT", "900"))
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise BedError(f"another test bed is up on this machine ({holder or 'unknown'}); "
                                   "only one can run at a time") from None
                time.sleep(1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} prefix={self.prefix}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.ftruncate(self._lock_fd, 0)
        finally:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _ns_argv(self, host: str, argv: list[str]) -> list[str]:
        if self.hosts_file is None:
            raise BedError("the bed is not up")
        return [
            "nsenter", f"--net={NETNS_DIR / self.netns[host]}",
            "unshare", "--uts", "--mount", "--propagation", "private",
            "sh", "-c", 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"',
            "sh", str(self.hosts_file), host, *[str(a) for a in argv],
        ]

    @staticmethod
    def _ns_inode(name: str) -> int | None:
        try:
            return os.stat(NETNS_DIR / name).st_ino
        except OSError:
            return None

    def _pids_in_namespaces(self, names) -> set[int]:
        wanted = {f"net:[{ino}]" for ino in (self._ns_inode(n) for n in names) if ino}
        if not wanted:
            return set()
        pids = set()
        for pid in _all_pids():
            try:
                if os.readlink(f"/proc/{pid}/ns/net") in wanted:
                    pids.add(pid)
            except OSError:
                pass
        return pids

    @staticmethod
    def _pids_with_marker(marker: str) -> set[int]:
        pids = set()
        for pid in _all_pids():
            cmd = _read_cmdline(pid)
            if cmd and marker in cmd:
                pids.add(pid)
        return pids

    def _make_dirs(self) -> None:
        self.root = pathlib.Path(tempfile.mkdtemp(prefix=f"{self.prefix}-bed-"))
        self.log_dir = self.root / "log"
        self.pbs_dir = self.root / "pbs"
        self.jobcomp_log = self.log_dir / "jobcomp.log"
        for sub in ("log", "pbs", "ssh", "slurm/state", "slurm/spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.hosts_file = self.root / "hosts"
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{ip} {name}" for name, ip in self.hosts.items()]
        self.hosts_file.write_text("\n".join(lines) + "\n")

    def _keygen(self, path: pathlib.Path, comment: str) -> str:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                       check=True, capture_output=True)
        return path.with_suffix(".pub").read_text().strip()

    def _make_ssh_material(self) -> None:
        ssh = self.root / "ssh"
        self.ssh_key = ssh / "id_ed25519"
        pub = self._keygen(self.ssh_key, f"root@{self.prefix}-bed")
        (ssh / "authorized_keys").write_text(pub + "\n")
        os.chmod(ssh / "authorized_keys", 0o600)
        known = []
        for host, ip in self.hosts.items():
            hdir = ssh / host
            hdir.mkdir()
            hostpub = self._keygen(hdir / "ssh_host_ed25519_key", f"root@{host}")
            keytype, key = hostpub.split()[:2]
            known.append(f"{host},{ip} {keytype} {key}")
            (hdir / "sshd_config").write_text(f"""\
# sshd for bed host {host}
ListenAddress {ip}:22
HostKey {hdir / 'ssh_host_ed25519_key'}
PidFile none
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile {ssh / 'authorized_keys'}
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding yes
MaxStartups 200:30:400
MaxSessions 100
Subsystem sftp {SFTP_SERVER}
LogLevel INFO
""")
        self.known_hosts = ssh / "known_hosts"
        self.known_hosts.write_text("\n".join(known) + "\n")

    def _ip(self, *args: str) -> None:
        cp = subprocess.run(["ip", *args], capture_output=True, text=True)
        if cp.returncode != 0:
            raise BedError(f"ip {' '.join(args)}: {cp.stderr.strip()}")

    def _make_network(self) -> None:
        login_ns = self.netns[self.login_host]
        for ns in self.netns.values():
            self._ip("netns", "add", ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", login_ns, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        self._ip("-n", login_ns, "addr", "add", f"{self.login_ip}/24", "dev", "br0")
        self._ip("-n", login_ns, "link", "set", "br0", "up")
        for node, ip in self.node_ips.items():
            ns = self.netns[node]
            port = f"v{node}"
            # both ends are created directly inside the namespaces: the root
            # namespace never sees an interface of the bed
            self._ip("-n", login_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("-n", login_ns, "link", "set", port, "master", "br0")
            self._ip("-n", login_ns, "link", "set", port, "up")
            self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")

    def _munge_works(self) -> bool:
        try:
            cp = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return cp.returncode == 0

    def _start_munge(self) -> None:
        if self._munge_works():
            return  # someone else's munged (e.g. the system's): reuse, never stop it
        MUNGE_RUN.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(MUNGE_RUN, "munge", "munge")
        log = open(self.log_dir / "munged.out", "ab")
        self._munged = subprocess.Popen(
            ["munged", "-F", f"--pid-file={self.munge_pidfile}"],
            user="munge", group="munge", extra_groups=[], env=DAEMON_ENV,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._poll(self._munge_works, 10, "munged did not answer", self.log_dir / "munged.out",
                   proc=self._munged)

    def _slurm_conf_text(self) -> str:
        r = self.root
        nodes = ",".join(self.node_names)
        node_lines = "\n".join(
            f"NodeName={n} NodeAddr={ip} NodeHostname={n} CPUs=2 RealMemory=2000 State=UNKNOWN"
            for n, ip in self.node_ips.items())
        return f"""\
{self.conf_header}
ClusterName={self.prefix}bed
SlurmctldHost={self.login_host}({self.login_ip})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={r}/slurm/state
SlurmdSpoolDir={r}/slurm/spool/%n
SlurmctldPidFile={r}/slurm/slurmctld.pid
SlurmdPidFile={r}/slurm/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# all "nodes" share this machine's cores and cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
TaskProlog={r}/slurm/task_prolog.sh
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# schedule batch jobs at submit time: the defaults (batch_sched_delay=3) add
# about 2 s to each sbatch/qsub job start here
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MpiDefault=none
ReturnToService=2
MinJobAge=30
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp_log}
{node_lines}
PartitionName=debug Nodes={nodes} Default=YES MaxTime=UNLIMITED State=UP
PartitionName=small Nodes={self.node_names[0]} MaxTime=UNLIMITED State=UP
"""

    def _task_prolog_text(self) -> str:
        # stdout lines "export NAME=value" enter the task's environment
        return f"""\
#!/bin/sh
# Slurm TaskProlog of the activate-ray test bed: the PBS job environment that
# sites running the slurm-wlm-torque wrappers provide.
dir={self.pbs_dir}
job=${{SLURM_JOB_ID:-$SLURM_JOBID}}
nodefile="$dir/$job.nodefile"
if [ -n "$PBS_NODEFILE" ] && [ -s "$PBS_NODEFILE" ]; then
    nodefile=$PBS_NODEFILE          # a step inside a PBS job keeps the job's file
elif [ ! -s "$nodefile" ]; then
    export SLURM_NODELIST="${{SLURM_JOB_NODELIST:-$SLURM_NODELIST}}"
    tmp=""
    if [ -z "$AR_BED_NO_GENERATE_PBS_NODEFILE" ] && command -v generate_pbs_nodefile >/dev/null 2>&1; then
        tmp=$(TMPDIR="$dir" generate_pbs_nodefile 2>>"$dir/prolog.err")
    fi
    if [ -z "$tmp" ] || [ ! -s "$tmp" ]; then
        # same as generate_pbs_nodefile: each host once per task on it
        tmp="$dir/$job.nodefile.$$"
        scontrol show hostnames "$SLURM_NODELIST" 2>>"$dir/prolog.err" | awk -v tpn="$SLURM_TASKS_PER_NODE" '
            BEGIN {{ n = split(tpn, a, ","); k = 0
                    for (i = 1; i <= n; i++) {{ c = a[i]; r = 1
                        if (match(c, /\\(x[0-9]+\\)/)) {{ r = substr(c, RSTART + 2, RLENGTH - 3); c = substr(c, 1, RSTART - 1) }}
                        for (j = 0; j < r; j++) cnt[k++] = c }} }}
            {{ m = ((NR - 1) in cnt) ? cnt[NR - 1] : 1; for (i = 0; i < m; i++) print }}' > "$tmp"
    fi
    mv -f "$tmp" "$nodefile"
fi
echo "export PBS_JOBID=$job"
echo "export PBS_JOBNAME=$SLURM_JOB_NAME"
echo "export PBS_O_WORKDIR=$SLURM_SUBMIT_DIR"
echo "export PBS_O_HOST=$SLURM_SUBMIT_HOST"
echo "export PBS_QUEUE=$SLURM_JOB_PARTITION"
echo "export PBS_NUM_NODES=$SLURM_JOB_NUM_NODES"
echo "export PBS_ENVIRONMENT=PBS_BATCH"
echo "export PBS_NODEFILE=$nodefile"
"""

    def _write_node_ssh_config(self) -> None:
        """Passwordless ssh between the bed's hosts, as HPC sites set up for their jobs
        (PBS without pbsdsh starts workers over ssh). Only for the bed's names and subnet."""
        names = " ".join([self.login_host, *self.node_names, f"{self.subnet}.*"])
        NODE_SSH_CONFIG.parent.mkdir(parents=True, exist_ok=True)
        NODE_SSH_CONFIG.write_text(
            f"# {self.marker}: written by the activate-ray test bed, removed at teardown\n"
            f"Host {names}\n"
            f"    User root\n"
            f"    IdentityFile {self.ssh_key}\n"
            f"    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.known_hosts}\n"
            f"    StrictHostKeyChecking yes\n"
            f"    BatchMode yes\n"
        )

    def _write_slurm_conf(self) -> None:
        text = self._slurm_conf_text()
        (self.root / "slurm" / "slurm.conf").write_text(text)
        prolog = self.root / "slurm" / "task_prolog.sh"
        prolog.write_text(self._task_prolog_text())
        prolog.chmod(0o755)
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        if SLURM_CONF.exists() and not self._slurm_conf_is_ours():
            shutil.copy2(SLURM_CONF, self.slurm_conf_backup)
        elif not SLURM_CONF.exists():
            self.slurm_conf_backup.unlink(missing_ok=True)
        tmp = SLURM_CONF.with_name(f".slurm.conf.{self.prefix}-bed-tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, SLURM_CONF)

    def _slurm_conf_is_ours(self) -> bool:
        try:
            return SLURM_CONF.read_text().startswith(CONF_HEADER)
        except OSError:
            return False

    def _restore_slurm_conf(self) -> None:
        """Put back the slurm.conf that was there before the bed (or none)."""
        if self._slurm_conf_is_ours():
            if self.slurm_conf_backup.exists():
                os.replace(self.slurm_conf_backup, SLURM_CONF)
            else:
                SLURM_CONF.unlink(missing_ok=True)

    def _spawn(self, host: str, argv: list[str], logname: str) -> subprocess.Popen:
        """Start a daemon in host's namespaces, under a subreaper (see reaper.py)."""
        log = open(self.log_dir / logname, "ab")
        argv = [sys.executable, "-I", str(REAPER), *argv]
        p = subprocess.Popen(self._ns_argv(host, argv), stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root,
                             env=DAEMON_ENV)
        log.close()
        self._procs.append(p)
        return p

    def restart_sshd(self, host: str) -> None:
        """Restart a host's sshd the way a site does: the listener goes away and comes
        back; established sessions (their own processes) live on."""
        config = str(self.root / "ssh" / host / "sshd_config")
        # OpenSSH retitles its listener "sshd: /usr/sbin/sshd -D -e -f CONFIG [listener] ..."
        # and each session "sshd: root@notty": only the listener goes.
        listeners = [pid for pid in _all_pids()
                     if f"-f {config}" in (_read_cmdline(pid) or "") and "reaper" not in (_read_cmdline(pid) or "")
                     and "@" not in (_read_cmdline(pid) or "")]
        if not listeners:
            raise BedError(f"no sshd listener found for {host}")
        _kill_pids(listeners)
        self._spawn(host, ["/usr/sbin/sshd", "-D", "-e", "-f", config], f"sshd-{host}.out")
        self._poll(self._sshd_listening, 20, f"sshd on {host} did not come back")

    def _start_daemons(self) -> None:
        conf = str(self.root / "slurm" / "slurm.conf")
        pathlib.Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self._spawn(self.login_host, ["slurmctld", "-D", "-f", conf], "slurmctld.out")
        for node in self.node_names:
            self._spawn(node, ["slurmd", "-D", "-N", node, "-f", conf], f"slurmd-{node}.out")
        for host in self.hosts:
            self._spawn(host, ["/usr/sbin/sshd", "-D", "-e", "-f",
                               str(self.root / "ssh" / host / "sshd_config")], f"sshd-{host}.out")

    def _poll(self, check, timeout: float, what: str, log: pathlib.Path | None = None,
              proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if check():
                return
            dead = [p for p in ([proc] if proc else self._procs) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                detail = ""
                if dead:
                    detail += " (exited: " + ", ".join(" ".join(map(str, p.args[-6:])) for p in dead) + ")"
                if log is not None and log.exists():
                    detail += "\n" + log.read_text(errors="replace")[-3000:]
                raise BedError(f"{what}{detail}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _nodes_idle(self) -> bool:
        cp = self.run_login(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=10)
        if cp.returncode != 0:
            return False
        states = dict(line.split()[:2] for line in cp.stdout.splitlines() if len(line.split()) >= 2)
        return all(states.get(n) == "idle" for n in self.node_names)

    def _sshd_listening(self) -> bool:
        for host, ip in self.hosts.items():
            cp = subprocess.run(["nsenter", f"--net={NETNS_DIR / self.netns[host]}",
                                 "ss", "-Hltn", "sport", "=", ":22"], capture_output=True, text=True)
            if f"{ip}:22" not in cp.stdout:
                return False
        return True

    def _wait_ready(self) -> None:
        self._poll(self._sshd_listening, 20, "sshd did not listen on every bed host",
                   self.log_dir / "sshd-login.out")
        self._poll(self._nodes_idle, 30, "Slurm nodes did not become idle",
                   self.log_dir / "slurmctld.log")
