"""A real multi-host HPC test bed on one machine, built like a site.

``TestBed`` builds a small cluster of hosts:

* ``login`` (10.213.0.1) with ``slurmctld`` and an ``sshd``;
* ``node1`` .. ``nodeN`` (10.213.0.11, .12, ...) with one ``slurmd`` and one
  ``sshd`` each;
* munge (started by hand, or reused when one already answers), a Slurm
  ``TaskProlog`` that gives jobs the usual PBS variables (``qsub``/``qstat``/
  ``qdel`` come from Debian's slurm-wlm-torque wrappers).

What makes it a site and not a lab:

* every host has its own network, UTS, mount and PID namespaces, owned by one
  long-lived *holder* process (``tini`` as the namespace's PID 1, which reaps
  orphans); daemons and commands "on" a host enter the holder's namespaces, so
  slurmd, sshd and everything they start share one PID space per host, and a
  PID recorded on one host means nothing on another;
* every host has a private ``/tmp`` and ``/dev/shm``; ``/home`` is the shared
  filesystem, as at a site;
* the product runs as an unprivileged user (``aruser``) with a home on /home,
  a key pair in ``~/.ssh`` and an ``authorized_keys`` of its own; a second
  unprivileged user (``arother``) exists on every host; root only runs daemons;
* the hosts' keys are published in ``/etc/ssh/ssh_known_hosts`` (a bed copy of
  /etc/ssh bind-mounted on every host), never in a user's known_hosts.

Nothing is routed out of the bed: the bridge lives in the login namespace, the
root namespace has no address on the bed subnet and no namespace has a default
route.  The bed's teardown ends a host by killing its holder (the kernel then
ends everything in that PID namespace), never by a PID read from a file.
Only one bed can run on a machine at a time: it owns ``/etc/slurm/slurm.conf``
while it is up.

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and the Debian packages listed in
``install_system_deps.sh``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import pathlib
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib

from tasks.settings import node_tmp_name
from tests.procs import alive as _alive
from tests.procs import all_pids as _all_pids
from tests.procs import cmdline as _cmdline
from tests.procs import read as _read
from tests.procs import uid as _uid

__all__ = ["TestBed", "BedError"]

SLURM_CONF = pathlib.Path("/etc/slurm/slurm.conf")
SLURM_CONF_BACKUP = SLURM_CONF.with_name("slurm.conf.activate-ray-testbed-orig")
CONF_HEADER = "# written by activate-ray TestBed"
LOCK_FILE = pathlib.Path("/run/activate-ray-testbed.lock")  # one bed per machine
MUNGE_RUN = pathlib.Path("/run/munge")
NETNS_DIR = pathlib.Path("/run/netns")
BED_PARENT = pathlib.Path("/var/tmp")  # not /tmp: every host gets its own /tmp
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
SYSTEM_PYTHON = "/usr/bin/python3.11"  # Debian's: executable by every user (pyenv's under /root is not)
REPO = pathlib.Path(__file__).resolve().parents[2]
# daemons get a clean environment, not the test process's (PREFECT_*, RAY_*, VIRTUAL_ENV ...)
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DAEMON_ENV = {"PATH": BASE_PATH, "LANG": "C.UTF-8"}

REQUIRED_BINARIES = [
    "ip", "nsenter", "unshare", "mount", "hostname", "ss", "setpriv", "tini", "useradd",
    "munged", "munge",
    "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel",
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
LIVE_JOB_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")


class BedError(RuntimeError):
    """The bed could not be brought up."""


# ---------------------------------------------------------------- /proc helpers (tests/procs.py)

def _ns(pid: int, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    text = _read(f"/proc/{pid}/task/{pid}/children") or ""
    return [int(p) for p in text.split()]


def _kill_pids(pids, term_wait: float = 3.0, kill_wait: float = 5.0) -> None:
    """SIGTERM, wait a little, then SIGKILL what is left."""
    pids = {p for p in pids if p != os.getpid()}
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        pids = {p for p in pids if _alive(p)}
        if not pids:
            return
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        _wait_until(lambda pids=pids: not any(_alive(p) for p in pids), wait)


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def _which_all(names):
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin"
    return [n for n in names if shutil.which(n, path=path) is None]


def is_ray_process(pid: int) -> bool:
    comm = (_read(f"/proc/{pid}/comm") or "").strip()
    cmd = _cmdline(pid) or ""
    return comm in _RAY_COMM or bool(_RAY_CMD_RE.search(cmd))


def process_env_has(pid: int, needle: bytes) -> bool:
    env = _read(f"/proc/{pid}/environ", binary=True) or b""
    return needle in env.split(b"\0")


class Host:
    """One host of the bed: its network namespace and its holder process."""

    def __init__(self, name: str, ip: str, netns: str):
        self.name, self.ip, self.netns = name, ip, netns
        self.holder: subprocess.Popen | None = None
        self.pid1: int | None = None  # the holder's namespaces' PID 1 (tini), in the root PID namespace
        self.pid_ns: str | None = None

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ip} pid1={self.pid1}>"


class User:
    def __init__(self, name: str):
        self.name = name
        entry = pwd.getpwnam(name)
        self.uid, self.gid, self.home = entry.pw_uid, entry.pw_gid, pathlib.Path(entry.pw_dir)

    @property
    def ssh_key(self) -> pathlib.Path:
        return self.home / ".ssh" / "id_ed25519"

    def __repr__(self) -> str:
        return f"<User {self.name} uid={self.uid}>"


class TestBed:
    """Multi-host Slurm + PBS-wrapper + ssh site in namespaces."""

    __test__ = False  # not a pytest test class

    def __init__(self, prefix: str = "ar", nodes: int = 3, subnet: str = "10.213.0", wide_nodes: int | None = None):
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError("prefix must be 1-8 lowercase letters/digits, starting with a letter")
        if not 1 <= nodes <= 9:
            raise ValueError("nodes must be between 1 and 9")
        wide_nodes = nodes if wide_nodes is None else wide_nodes
        if not nodes <= wide_nodes <= 32:
            raise ValueError("wide_nodes must be between nodes and 32")
        if not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", subnet):
            raise ValueError("subnet is the first three octets, e.g. '10.213.0'")
        self.prefix = prefix
        self.subnet = subnet
        self.login_host = "login"
        self.login_ip = f"{subnet}.1"
        # node_names: the site's everyday nodes (Slurm's default partition, OpenPBS's default
        # queue); wide_node_names: every node, node_names first (Slurm partition and OpenPBS
        # queue "wide"), for the tests of a big cluster
        self.node_names = [f"node{i}" for i in range(1, nodes + 1)]
        self.wide_node_names = [f"node{i}" for i in range(1, wide_nodes + 1)]
        self.node_ips = {n: f"{subnet}.{10 + i}" for i, n in enumerate(self.wide_node_names, 1)}
        self.ips = {self.login_host: self.login_ip, **self.node_ips}
        # A second network, as a site's InfiniBand or high-speed fabric: interface ib0 on
        # every node but the last (a node without it, as on a site whose fabric does not
        # reach every node), the login node on it too (its bridge). Not in /etc/hosts: a
        # node's hostname resolves to its Ethernet address, as on most sites.
        third = int(subnet.rsplit(".", 1)[1])
        self.fabric_subnet = f"{subnet.rsplit('.', 1)[0]}.{(third + 100) % 256}"
        self.fabric_interface = "ib0"
        self.fabric_ips = {self.login_host: f"{self.fabric_subnet}.1",
                           **{n: f"{self.fabric_subnet}.{10 + i}" for i, n in enumerate(self.node_names[:-1], 1)}}
        self.netns = {h: f"{prefix}-{h}" for h in self.ips}
        self.hosts = {h: Host(h, ip, self.netns[h]) for h, ip in self.ips.items()}
        self.user_name = f"{prefix}user"      # runs the product
        self.other_name = f"{prefix}other"    # another user of the same machines
        self.conf_header = f"{CONF_HEADER} prefix={prefix}; restored on teardown"
        self.munge_pidfile = MUNGE_RUN / f"{prefix}-bed-munged.pid"

        self.root: pathlib.Path = None  # type: ignore[assignment]
        self.log_dir: pathlib.Path = None  # type: ignore[assignment]
        self.jobcomp_log: pathlib.Path = None  # type: ignore[assignment]
        self.pbs_dir: pathlib.Path = None  # type: ignore[assignment]
        self.known_hosts: pathlib.Path = None  # type: ignore[assignment]  # the published file
        self.user: User = None  # type: ignore[assignment]
        self.other: User = None  # type: ignore[assignment]
        self.user_venv: pathlib.Path = None  # type: ignore[assignment]
        self.repo: pathlib.Path = None  # type: ignore[assignment]  # the checkout, readable by the bed's users
        self._daemons: list[subprocess.Popen] = []
        self._munged: subprocess.Popen | None = None
        self._up = False
        self._lock_fd: int | None = None
        self.bringup_seconds: float | None = None
        self.openpbs = None  # tests.bed.openpbs.OpenPBS, while the session's OpenPBS is up

    _active: TestBed | None = None

    # ------------------------------------------------------------------ api

    @classmethod
    def active(cls) -> TestBed | None:
        """The bed that is up in this process, if any."""
        return cls._active

    def __enter__(self) -> TestBed:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def __repr__(self) -> str:
        return f"<TestBed prefix={self.prefix} root={self.root} up={self._up}>"

    @property
    def user_python(self) -> str:
        """The unprivileged user's Python, with the project's dependencies."""
        return str(self.user_venv / "bin" / "python")

    @property
    def ssh_key(self) -> pathlib.Path:
        """The product user's private key (in ~/.ssh, as at a site)."""
        return self.user.ssh_key

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
                    + " (bash tests/bed/install_system_deps.sh)")
        if not pathlib.Path("/etc/munge/munge.key").exists():
            return "the HPC test bed needs /etc/munge/munge.key (Debian's munge package makes it)"
        if not pathlib.Path(SFTP_SERVER).exists():
            return f"the HPC test bed needs {SFTP_SERVER} (openssh-sftp-server)"
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            return f"the HPC test bed needs {SYSTEM_PYTHON} (Debian's python3.11) for its users' venv"
        return None

    # --- running things on a host

    def host_argv(self, host: str, argv: list[str], *, user: User | str | None = None,
                  env: dict | None = None, cwd: str | os.PathLike | None = None) -> list[str]:
        """argv run on a bed host: in its namespaces, as root or as a bed user.

        As a user the environment is a login's (HOME, USER, PATH with the user's
        venv first) plus ``env``; nothing of the test process leaks in."""
        h = self._host(host)
        if h.pid1 is None:
            raise BedError("the bed is not up")
        enter = ["nsenter", "-t", str(h.pid1), "--net", "--uts", "--mount", "--pid", "--"]
        if user is None:
            prefix = ["env", "-i", *(f"{k}={v}" for k, v in {**DAEMON_ENV, **(env or {})}.items())]
            if cwd:
                prefix[1:1] = ["-C", str(cwd)]
            return [*enter, *prefix, *map(str, argv)]
        u = self._user(user)
        login_env = {
            "HOME": str(u.home), "USER": u.name, "LOGNAME": u.name, "SHELL": "/bin/bash",
            "PATH": f"{self.user_venv}/bin:{BASE_PATH}" if self.user_venv else BASE_PATH,
            "LANG": "C.UTF-8", **(env or {}),
        }
        return [*enter, "setpriv", f"--reuid={u.uid}", f"--regid={u.gid}", "--init-groups", "--",
                "env", "-i", *(["-C", str(cwd)] if cwd else []),
                *(f"{k}={v}" for k, v in login_env.items()), *map(str, argv)]

    def run_on(self, host: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """subprocess.run(host_argv(...)); keywords user/env/cwd go to host_argv."""
        spec = {k: kw.pop(k) for k in ("user", "env", "cwd") if k in kw}
        kw.setdefault("text", True)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("timeout", 120)
        return subprocess.run(self.host_argv(host, argv, **spec), **kw)

    def login_argv(self, argv: list[str], **spec) -> list[str]:
        return self.host_argv(self.login_host, argv, **spec)

    def node_argv(self, node: str, argv: list[str], **spec) -> list[str]:
        if node not in self.node_ips:
            raise KeyError(f"unknown node {node!r}; bed nodes: {self.node_names}")
        return self.host_argv(node, argv, **spec)

    def run_login(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return self.run_on(self.login_host, argv, **kw)

    def run_node(self, node: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        if node not in self.node_ips:
            raise KeyError(f"unknown node {node!r}; bed nodes: {self.node_names}")
        return self.run_on(node, argv, **kw)

    def entered_pid(self, nsenter_pid: int, timeout: float = 10) -> int:
        """The real process behind an `nsenter ... --pid` we started (nsenter forks it
        into the host's PID namespace and does not forward signals to it)."""
        found: list[int] = []
        _wait_until(lambda: bool(found.extend(_children(nsenter_pid)) or found), timeout)
        if not found:
            raise BedError(f"nsenter {nsenter_pid} started no process")
        return found[0]

    def host_of(self, pid: int) -> str | None:
        """Which bed host a process (root-namespace PID) lives on."""
        ns = _ns(pid, "pid")
        return next((h.name for h in self.hosts.values() if ns and ns == h.pid_ns), None)

    def pid_in_host(self, pid: int) -> int:
        """A process's PID as seen inside its host's PID namespace."""
        status = _read(f"/proc/{pid}/status") or ""
        match = re.search(r"^NSpid:\s*(.+)$", status, re.M)
        if not match:
            raise BedError(f"no NSpid for {pid}")
        return int(match.group(1).split()[-1])

    def node_tmp(self, host: str) -> pathlib.Path:
        """A host's private /tmp, seen from the root namespace."""
        return self.root / "nodetmp" / self._host(host).name

    def home_dir(self, name: str, user: User | str | None = None) -> pathlib.Path:
        """A fresh directory on the shared filesystem, owned by the user."""
        u = self._user(user or self.user)
        base = u.home / "bed-tests"
        base.mkdir(mode=0o700, exist_ok=True)
        os.chown(base, u.uid, u.gid)
        path = pathlib.Path(tempfile.mkdtemp(prefix=re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40] + "-", dir=base))
        os.chown(path, u.uid, u.gid)
        return path

    # --- ssh

    def ssh_options(self) -> list[str]:
        """OpenSSH client options for the product user on a bed host (site defaults
        otherwise: its key in ~/.ssh, the published host keys)."""
        return ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]

    def ssh_argv(self, host: str, argv: list[str]) -> list[str]:
        """`ssh ... host -- argv`, to run (as the user) on a bed host, e.g. via login_argv.

        argv is shell-quoted, so the remote side runs exactly argv."""
        return ["ssh", *self.ssh_options(), host, "--", shlex.join([str(a) for a in argv])]

    # --- scheduler

    def queue(self) -> list[str]:
        """Job ids squeue knows (all users, all states, including recently ended ones)."""
        cp = self.run_login(["squeue", "-h", "-a", "-t", "all", "-o", "%i"], timeout=30)
        if cp.returncode != 0:
            raise BedError(f"squeue failed ({cp.returncode}): {cp.stderr.strip()}")
        return [line.strip() for line in cp.stdout.splitlines() if line.strip()]

    def live_jobs(self, name: str | None = None) -> list[str]:
        """'id state name user' of jobs still pending, running or completing."""
        argv = ["squeue", "-h", "-a", "-t", ",".join(LIVE_JOB_STATES), "-o", "%i %T %j %u"]
        if name:
            argv += ["-n", name]
        cp = self.run_login(argv, timeout=30)
        if cp.returncode != 0:
            raise BedError(f"squeue failed ({cp.returncode}): {cp.stderr.strip()}")
        return [line.strip() for line in cp.stdout.splitlines() if line.strip()]

    def job_state(self, jobid: str) -> str | None:
        """Slurm JobState (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...), or
        None once the job is unknown (MinJobAge=30 s after it ended)."""
        return self.job_fields(jobid).get("JobState")

    def job_fields(self, jobid: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, JobName, ...), {} when unknown."""
        cp = self.run_login(["scontrol", "-o", "show", "job", str(jobid)], timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", cp.stdout)) if cp.returncode == 0 else {}

    def wait_job(self, jobid: str, timeout: float = 120) -> str | None:
        """Poll (short backoff) until the job has ended; return its final state."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            state = self.job_state(jobid)
            if state not in LIVE_JOB_STATES:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {jobid} still {state} after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    # --- what runs where

    def processes(self, *, user: User | str | None = None) -> list[tuple[str, int, int, str]]:
        """(host, pid, uid, cmdline) of every process on a bed host (holders and daemons included)."""
        wanted_uid = self._user(user).uid if user is not None else None
        by_ns = {h.pid_ns: h.name for h in self.hosts.values() if h.pid_ns}
        out = []
        for pid in _all_pids():
            host = by_ns.get(_ns(pid, "pid"))
            if host is None or not _alive(pid):
                continue
            uid = _uid(pid)
            if wanted_uid is not None and uid != wanted_uid:
                continue
            cmd = _cmdline(pid)
            if cmd is not None:
                out.append((host, pid, uid, cmd))
        return out

    def ray_processes(self) -> list[str]:
        """'host pid cmdline' of every Ray process on any bed host."""
        return [f"{h} {p} {c}" for h, p, _, c in self.processes() if is_ray_process(p)]

    def cluster_processes(self, cluster_id: str) -> list[str]:
        """'host pid cmdline' of every process of one cluster, on any host: Ray and its
        workers inherit AR_CLUSTER_ID from the cluster's env file; a node's temp dir
        names the cluster."""
        needle = f"AR_CLUSTER_ID={cluster_id}".encode()
        return [f"{h} {p} {c}" for h, p, _, c in self.processes()
                if f"/{node_tmp_name(cluster_id)}" in c or process_env_has(p, needle)]

    def temp_dirs(self, pattern: str = "ar-*") -> list[pathlib.Path]:
        """Entries matching pattern in every host's private /tmp."""
        return sorted(p for h in self.hosts for p in self.node_tmp(h).glob(pattern))

    # --------------------------------------------------------------- up/down

    def up(self) -> TestBed:
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
            self._copy_repo()
            self._make_users()
            self._make_ssh_material()
            self._make_network()
            self._start_holders()
            self._start_munge()
            self._write_slurm_conf()
            self._start_daemons()
            self._make_user_venv()
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

        Does nothing unless this object holds the machine's bed lock, so it never
        tears down someone else's bed."""
        if self._lock_fd is None:
            return
        errors = []
        # A host ends with its holder: the kernel kills every process of that PID namespace.
        for h in self.hosts.values():
            if h.pid1 is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(h.pid1, signal.SIGKILL)
        for h in self.hosts.values():
            if h.holder is not None:
                try:
                    h.holder.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    h.holder.kill()
                    errors.append(f"holder of {h.name} did not end")
            h.holder = h.pid1 = h.pid_ns = None
        for p in self._daemons:  # the nsenter parents, now without children
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        self._daemons.clear()
        try:  # anything still in a bed network namespace (e.g. a relay helper)
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
            self._munged = None
            self.munge_pidfile.unlink(missing_ok=True)
        for ns in self.netns.values():
            if (NETNS_DIR / ns).exists():
                cp = subprocess.run(["ip", "netns", "delete", ns], capture_output=True, text=True)
                if cp.returncode != 0:
                    errors.append(f"ip netns delete {ns}: {cp.stderr.strip()}")
        try:
            self._restore_slurm_conf()
        except Exception as e:  # pragma: no cover
            errors.append(f"restoring {SLURM_CONF}: {e}")
        if self.root is not None and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        for u in (self.user, self.other):
            if u is not None:
                self._clean_home(u)
        self._up = False
        atexit.unregister(self._down_at_exit)
        if TestBed._active is self:
            TestBed._active = None
        self._release_lock()
        if errors:
            raise BedError("teardown incomplete: " + "; ".join(errors))

    def leftovers(self, root: pathlib.Path | None) -> list[str]:
        """What of the bed still exists after down(): the bed's own teardown check."""
        left = []
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        left += [f"netns {ns}" for ns in self.netns.values() if ns in netns]
        for pid in _all_pids():
            if pid == os.getpid():
                continue
            comm = (_read(f"/proc/{pid}/comm") or "").strip()
            cmd = _cmdline(pid) or ""
            if (comm in {"slurmctld", "slurmd", "slurmstepd", "tini"} or (root and str(root) in cmd)
                    or "-bed-munged" in cmd or _uid(pid) in {u.uid for u in (self.user, self.other) if u}) \
                    and _alive(pid):
                left.append(f"process {pid} {comm} {cmd}")
        if root is not None and root.exists():
            left.append(f"dir {root}")
        if self._slurm_conf_is_ours():
            left.append(f"{SLURM_CONF} still the bed's")
        return left

    def _down_at_exit(self) -> None:
        try:
            self.down()
        except Exception as e:  # pragma: no cover
            print(f"TestBed: {e}", file=sys.stderr)

    def _cleanup_stale(self) -> None:
        """Remove what a crashed earlier bed with this prefix left behind."""
        try:
            listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        except OSError:
            listing = ""
        pat = re.compile(rf"^{re.escape(self.prefix)}-(login|node\d+)$")
        stale_ns = [line.split()[0] for line in listing.splitlines() if line.split() and pat.match(line.split()[0])]
        _kill_pids(self._pids_in_namespaces(stale_ns), term_wait=0.5)
        for ns in stale_ns:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self.munge_pidfile.unlink(missing_ok=True)
        self._restore_slurm_conf()
        for d in BED_PARENT.glob(f"{self.prefix}-bed-*"):
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------- internals

    def _host(self, host: str) -> Host:
        try:
            return self.hosts[host]
        except KeyError:
            raise KeyError(f"unknown host {host!r}; bed hosts: {list(self.hosts)}") from None

    def _user(self, user: User | str) -> User:
        if isinstance(user, User):
            return user
        for u in (self.user, self.other):
            if u is not None and u.name == user:
                return u
        return User(user)

    def _take_lock(self) -> None:
        """One bed per machine: it owns /etc/slurm/slurm.conf and the Slurm ports."""
        if self._lock_fd is not None:
            return
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
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
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def _ns_inode(name: str) -> int | None:
        try:
            return os.stat(NETNS_DIR / name).st_ino
        except OSError:
            return None

    def _pids_in_namespaces(self, names) -> set[int]:
        wanted = {f"net:[{ino}]" for ino in (self._ns_inode(n) for n in names) if ino}
        return {pid for pid in _all_pids() if wanted and _ns(pid, "net") in wanted}

    def _make_dirs(self) -> None:
        self.root = pathlib.Path(tempfile.mkdtemp(prefix=f"{self.prefix}-bed-", dir=BED_PARENT))
        self.root.chmod(0o755)
        self.log_dir = self.root / "log"
        self.pbs_dir = self.root / "pbs"
        self.jobcomp_log = self.log_dir / "jobcomp.log"
        for sub in ("log", "pbs", "ssh", "slurm/state", "slurm/spool", "nodetmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.pbs_dir.chmod(0o1777)  # the TaskProlog runs as the job's user
        for host in self.hosts:
            tmp = self.root / "nodetmp" / host
            tmp.mkdir()
            tmp.chmod(0o1777)
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{ip} {name}" for name, ip in self.ips.items()]
        (self.root / "hosts").write_text("\n".join(lines) + "\n")

    def _copy_repo(self) -> None:
        """The checkout as the bed's users see it: a copy on a path every user can read
        on every host (CI may clone into a private dir, or into /tmp, which is per host)."""
        self.repo = self.root / "repo"
        shutil.copytree(REPO, self.repo, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".bench", "__pycache__", ".pytest_cache", "*.png"))
        subprocess.run(["chmod", "-R", "a+rX,go-w", str(self.repo)], check=True)

    def in_repo(self, value) -> str:
        """A path under the checkout, as the same path in the bed's copy (others unchanged)."""
        text = str(value)
        return str(self.repo) + text[len(str(REPO)):] if text == str(REPO) or text.startswith(str(REPO) + "/") else text

    def _make_users(self) -> None:
        """Two unprivileged users with homes on the shared /home, unlocked for sshd."""
        for name in (self.user_name, self.other_name):
            try:
                pwd.getpwnam(name)
            except KeyError:
                subprocess.run(["useradd", "-m", "-s", "/bin/bash", "-U", name], check=True, capture_output=True)
            # useradd leaves the account locked ('!'), which sshd refuses even for keys
            subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
        self.user, self.other = User(self.user_name), User(self.other_name)
        for u in (self.user, self.other):
            u.home.chmod(0o700)
            self._clean_home(u)
            ssh = u.home / ".ssh"
            ssh.mkdir(mode=0o700, exist_ok=True)
            for stale in ("known_hosts", "known_hosts.old", "config"):
                (ssh / stale).unlink(missing_ok=True)
            if not u.ssh_key.exists():
                self._keygen(u.ssh_key, f"{u.name}@{self.prefix}-bed")
            # the user's own authorized_keys: nodes trust the user's key, as sites do for jobs
            (ssh / "authorized_keys").write_text(u.ssh_key.with_suffix(".pub").read_text())
            for path in (ssh, *ssh.iterdir()):
                os.chown(path, u.uid, u.gid)
            (ssh / "authorized_keys").chmod(0o600)

    def ensure_subordinate_ids(self, user: User | str, count: int = 65536) -> None:
        """/etc/subuid and /etc/subgid ranges for a bed user (rootless podman's user namespace).
        useradd makes them where /etc/subuid exists; else, or for an older user, they are added here,
        after every range already given."""
        u = self._user(user)
        for kind in ("uid", "gid"):
            path = pathlib.Path(f"/etc/sub{kind}")
            lines = path.read_text().splitlines() if path.exists() else []
            if any(line.split(":")[0] == u.name for line in lines):
                continue
            end = max([100000] + [int(f[1]) + int(f[2]) for f in (line.split(":") for line in lines) if len(f) == 3])
            subprocess.run(["usermod", f"--add-sub{kind}s", f"{end}-{end + count - 1}", u.name],
                           check=True, capture_output=True)

    def _clean_home(self, u: User) -> None:
        """What the product and the tests leave in a home (never the venv cache or keys)."""
        for name in ("bed-tests", ".activate-ray", ".ray", ".prefect"):
            path = u.home / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def _keygen(self, path: pathlib.Path, comment: str) -> str:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                       check=True, capture_output=True)
        return path.with_suffix(".pub").read_text().strip()

    def _make_ssh_material(self) -> None:
        """Host keys and one sshd config per host; the keys published site-wide."""
        ssh = self.root / "ssh"
        known = []
        for host, ip in self.ips.items():
            hdir = ssh / host
            hdir.mkdir()
            hostpub = self._keygen(hdir / "ssh_host_ed25519_key", f"root@{host}")
            keytype, key = hostpub.split()[:2]
            known.append(f"{host},{ip} {keytype} {key}")
            (hdir / "sshd_config").write_text(self._sshd_config(host, ip, hdir / "ssh_host_ed25519_key"))
        # every host's /etc/ssh: the machine's, without its host keys, plus the published keys
        etc_ssh = self.root / "etc-ssh"
        shutil.copytree("/etc/ssh", etc_ssh, symlinks=True,
                        ignore=shutil.ignore_patterns("ssh_host_*", "ssh_known_hosts*", "sshd_config.d"))
        self.known_hosts = etc_ssh / "ssh_known_hosts"
        self.known_hosts.write_text("\n".join(known) + "\n")
        self.known_hosts.chmod(0o644)

    @staticmethod
    def _sshd_config(host: str, ip: str, host_key: pathlib.Path, port: int = 22) -> str:
        return f"""\
# sshd for bed host {host}
ListenAddress {ip}:{port}
HostKey {host_key}
PidFile none
UsePAM no
StrictModes yes
PermitRootLogin no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
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
"""

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
            # both ends are created inside the namespaces: the root namespace never sees one
            self._ip("-n", login_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("-n", login_ns, "link", "set", port, "master", "br0")
            self._ip("-n", login_ns, "link", "set", port, "up")
            self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
        fabric = self.fabric_interface
        self._ip("-n", login_ns, "link", "add", "br1", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        self._ip("-n", login_ns, "addr", "add", f"{self.fabric_ips[self.login_host]}/24", "dev", "br1")
        self._ip("-n", login_ns, "link", "set", "br1", "up")
        for node in self.node_names:
            if node not in self.fabric_ips:
                continue
            ns, port = self.netns[node], f"f{node}"
            self._ip("-n", login_ns, "link", "add", port, "type", "veth", "peer", "name", fabric, "netns", ns)
            self._ip("-n", login_ns, "link", "set", port, "master", "br1")
            self._ip("-n", login_ns, "link", "set", port, "up")
            self._ip("-n", ns, "addr", "add", f"{self.fabric_ips[node]}/24", "dev", fabric)
            self._ip("-n", ns, "link", "set", fabric, "up")

    # The holder's setup, run as the new PID namespace's first process: this host's
    # name, /etc/hosts, /etc/ssh (published host keys), private /tmp and /dev/shm.
    HOLDER_SETUP = (
        'set -e; mount --bind "$1" /etc/hosts; mount --bind "$2" /etc/ssh; mount --bind "$3" /tmp; '
        'mount -t tmpfs -o mode=1777,size=4g tmpfs /dev/shm; hostname "$4"; exec tini -s -- sleep infinity'
    )

    def _start_holders(self) -> None:
        for h in self.hosts.values():
            log = open(self.log_dir / f"holder-{h.name}.out", "ab")  # noqa: SIM115 (the child keeps its own copy)
            h.holder = subprocess.Popen(
                ["nsenter", f"--net={NETNS_DIR / h.netns}", "--",
                 "unshare", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private", "--",
                 "sh", "-c", self.HOLDER_SETUP, "holder",
                 str(self.root / "hosts"), str(self.root / "etc-ssh"), str(self.node_tmp(h.name)), h.name],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=DAEMON_ENV,
            )
            log.close()
        for h in self.hosts.values():
            def ready(h=h) -> bool:
                kids = _children(h.holder.pid)
                if kids and (_read(f"/proc/{kids[0]}/comm") or "").strip() == "tini":
                    h.pid1 = kids[0]
                    return True
                return False
            self._poll(ready, 10, f"holder of {h.name} did not start", self.log_dir / f"holder-{h.name}.out",
                       proc=h.holder)
            h.pid_ns = _ns(h.pid1, "pid")

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
        log = open(self.log_dir / "munged.out", "ab")  # noqa: SIM115 (the child keeps its own copy)
        self._munged = subprocess.Popen(
            ["munged", "-F", f"--pid-file={self.munge_pidfile}"],
            user="munge", group="munge", extra_groups=[], env=DAEMON_ENV,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self._poll(self._munge_works, 10, "munged did not answer", self.log_dir / "munged.out", proc=self._munged)

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
# schedule batch jobs at submit time: the defaults add about 2 s to each job start here
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
PartitionName=wide Nodes={",".join(self.wide_node_names)} MaxTime=UNLIMITED State=UP
"""

    def _task_prolog_text(self) -> str:
        # stdout lines "export NAME=value" enter the task's environment
        return f"""\
#!/bin/sh
# Slurm TaskProlog of the activate-ray test bed: the PBS job environment that
# sites running the slurm-wlm-torque wrappers provide. Runs as the job's user.
dir={self.pbs_dir}
job=${{SLURM_JOB_ID:-$SLURM_JOBID}}
nodefile="$dir/$job.nodefile"
if [ -n "$PBS_NODEFILE" ] && [ -s "$PBS_NODEFILE" ]; then
    nodefile=$PBS_NODEFILE          # a step inside a PBS job keeps the job's file
elif [ ! -s "$nodefile" ]; then
    export SLURM_NODELIST="${{SLURM_JOB_NODELIST:-$SLURM_NODELIST}}"
    tmp=""
    if [ -z "$AR_BED_NO_GENERATE_PBS_NODEFILE" ] && command -v generate_pbs_nodefile >/dev/null 2>&1; then
        tmp=$(TMPDIR="$dir" generate_pbs_nodefile 2>>"$dir/prolog-$job.err")
    fi
    if [ -z "$tmp" ] || [ ! -s "$tmp" ]; then
        # same as generate_pbs_nodefile: each host once per task on it
        tmp="$dir/$job.nodefile.$$"
        scontrol show hostnames "$SLURM_NODELIST" 2>>"$dir/prolog-$job.err" | awk -v tpn="$SLURM_TASKS_PER_NODE" '
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

    def _write_slurm_conf(self) -> None:
        text = self._slurm_conf_text()
        (self.root / "slurm" / "slurm.conf").write_text(text)
        prolog = self.root / "slurm" / "task_prolog.sh"
        prolog.write_text(self._task_prolog_text())
        prolog.chmod(0o755)
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        if SLURM_CONF.exists() and not self._slurm_conf_is_ours():
            shutil.copy2(SLURM_CONF, SLURM_CONF_BACKUP)
        elif not SLURM_CONF.exists():
            SLURM_CONF_BACKUP.unlink(missing_ok=True)
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
            if SLURM_CONF_BACKUP.exists():
                os.replace(SLURM_CONF_BACKUP, SLURM_CONF)
            else:
                SLURM_CONF.unlink(missing_ok=True)

    def spawn(self, host: str, argv: list[str], logname: str, **spec) -> subprocess.Popen:
        """Start a long-running process on a host (a daemon, or a user's background command)."""
        log = open(self.log_dir / logname, "ab")  # noqa: SIM115 (the child keeps its own copy)
        p = subprocess.Popen(self.host_argv(host, argv, **spec), stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._daemons.append(p)
        return p

    def stop_spawned(self, p: subprocess.Popen, timeout: float = 10) -> None:
        """End what spawn() started: the process inside the host, then its nsenter."""
        for child in _children(p.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            for child in _children(p.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            p.wait(timeout)

    def _start_sshd(self, host: str, config: pathlib.Path) -> subprocess.Popen:
        return self.spawn(host, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], f"sshd-{host}.out")

    def _sshd_listeners(self, host: str) -> list[int]:
        # OpenSSH retitles its listener "sshd: /usr/sbin/sshd -D -e -f CONFIG [listener] ..."
        # and each session "sshd: USER@notty": only the listener has "-f" and no "@".
        return [pid for h, pid, uid, cmd in self.processes()
                if h == host and uid == 0 and "sshd" in cmd and " -f " in cmd and "@" not in cmd
                and not cmd.startswith("nsenter")]

    def restart_sshd(self, host: str) -> None:
        """Restart a host's sshd the way a site does: the listener goes away and comes
        back; established sessions (their own processes) live on."""
        listeners = self._sshd_listeners(host)
        if not listeners:
            raise BedError(f"no sshd listener found for {host}")
        _kill_pids(listeners)
        self._start_sshd(host, self.root / "ssh" / host / "sshd_config")
        self._poll(self._sshd_listening, 20, f"sshd on {host} did not come back")

    @contextlib.contextmanager
    def host_key_changed(self, host: str):
        """The host's sshd answers with a new key (reinstalled node, or an impostor)
        while the published key stays the old one; restored afterwards."""
        hdir = self.root / "ssh" / host
        new_key = hdir / "ssh_host_ed25519_key.new"
        new_key.unlink(missing_ok=True)
        new_key.with_suffix(".new.pub").unlink(missing_ok=True)
        self._keygen(new_key, f"impostor@{host}")
        config = hdir / "sshd_config.new"
        config.write_text(self._sshd_config(host, self.ips[host], new_key))
        _kill_pids(self._sshd_listeners(host))
        self._start_sshd(host, config)
        self._poll(self._sshd_listening, 20, f"sshd on {host} (new key) did not listen")
        try:
            yield
        finally:
            _kill_pids(self._sshd_listeners(host))
            self._start_sshd(host, hdir / "sshd_config")
            self._poll(self._sshd_listening, 20, f"sshd on {host} did not come back")

    def _start_daemons(self) -> None:
        conf = str(self.root / "slurm" / "slurm.conf")
        pathlib.Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.spawn(self.login_host, ["slurmctld", "-D", "-f", conf], "slurmctld.out")
        for node in self.wide_node_names:
            self.spawn(node, ["slurmd", "-D", "-N", node, "-f", conf], f"slurmd-{node}.out")
        for host in self.hosts:
            self._start_sshd(host, self.root / "ssh" / host / "sshd_config")

    def _make_user_venv(self) -> None:
        """The users' Python: Debian's python3.11 (executable by everyone) with the
        project's dependencies, built with uv and cached in the user's home by the
        dependency list's hash."""
        project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
        requirements = sorted(project["dependencies"] + project.get("optional-dependencies", {}).get("test", []))
        digest = hashlib.sha256("\n".join([SYSTEM_PYTHON, *requirements]).encode()).hexdigest()[:12]
        cache = self.user.home / ".cache" / "activate-ray-bed"
        venv = cache / f"venv-{digest}"
        if not (venv / ".complete").exists():
            uv = shutil.which("uv", path=os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", ""))
            if not uv:
                raise BedError("the bed builds its users' venv with uv: pip install uv (it is in the test extra)")
            for stale in cache.glob("venv-*"):
                shutil.rmtree(stale, ignore_errors=True)
            cache.mkdir(parents=True, exist_ok=True)
            steps = [[uv, "venv", "-q", "-p", SYSTEM_PYTHON, str(venv)],
                     [uv, "pip", "install", "-q", "-p", str(venv / "bin" / "python"), "--link-mode=copy",
                      *requirements]]
            for step in steps:
                cp = subprocess.run(step, capture_output=True, text=True, timeout=900,
                                    env={**os.environ, "UV_CACHE_DIR": str(BED_PARENT / "activate-ray-bed-uv-cache")})
                if cp.returncode != 0:
                    shutil.rmtree(venv, ignore_errors=True)
                    raise BedError(f"building the users' venv failed: {' '.join(step[:3])}\n{cp.stderr[-3000:]}")
            (venv / ".complete").touch()
        for path in (self.user.home / ".cache", cache):
            os.chown(path, self.user.uid, self.user.gid)
        subprocess.run(["chown", "-R", f"{self.user.uid}:{self.user.gid}", str(venv)], check=True)
        # the second user may run the same interpreter (read and execute only)
        self.user_venv = venv
        for path in (self.user.home, self.user.home / ".cache", cache):
            path.chmod(0o711)

    def _poll(self, check, timeout: float, what: str, log: pathlib.Path | None = None,
              proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if check():
                return
            dead = proc is not None and proc.poll() is not None
            if dead or time.monotonic() > deadline:
                detail = f" (exited {proc.returncode})" if dead else ""
                if log is not None and log.exists():
                    detail += "\n" + log.read_text(errors="replace")[-3000:]
                raise BedError(f"{what}{detail}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def wait_nodes_idle(self, timeout: float = 60) -> None:
        """Every Slurm node idle: what a test starts on is not a node still completing the
        previous test's job. Named with sinfo's view when it does not come."""
        try:
            self._poll(self._nodes_idle, timeout, "Slurm nodes not idle")
        except BedError as exc:
            view = self.run_login(["sinfo", "-h", "-N", "-o", "%N %t %E"], timeout=10).stdout
            jobs = self.run_login(["squeue", "-h", "-o", "%i %u %T %R"], timeout=10).stdout
            raise BedError(f"{exc} after {timeout:g}s:\n{view}{jobs}") from None

    def _nodes_idle(self) -> bool:
        cp = self.run_login(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=10)
        if cp.returncode != 0:
            return False
        states = dict(line.split()[:2] for line in cp.stdout.splitlines() if len(line.split()) >= 2)
        return all(states.get(n) == "idle" for n in self.wide_node_names)

    def _sshd_listening(self) -> bool:
        for host, ip in self.ips.items():
            cp = subprocess.run(["nsenter", f"--net={NETNS_DIR / self.netns[host]}",
                                 "ss", "-Hltn", "sport", "=", ":22"], capture_output=True, text=True)
            if f"{ip}:22" not in cp.stdout:
                return False
        return True

    def _wait_ready(self) -> None:
        self._poll(self._sshd_listening, 20, "sshd did not listen on every bed host",
                   self.log_dir / "sshd-login.out")
        self._poll(self._nodes_idle, 30, "Slurm nodes did not become idle", self.log_dir / "slurmctld.log")
