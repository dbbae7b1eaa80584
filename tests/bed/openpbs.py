"""A real OpenPBS on the site bed, beside its Slurm, as a site runs it.

Server, scheduler, comm and PBS's own datastore on the login host, one MoM per node,
job history on, submitted to as the bed's unprivileged user. Built from the unmodified
OpenPBS source of the kit that ``openpbs_kit.sh`` finds (``install_system_deps.sh``
builds it into /opt/pbs) and started with the kit's ``up.sh``/``down.sh``.

Slurm's Torque wrappers (``/usr/bin/qsub``...) stay on the bed as a second PBS flavour:
a test chooses OpenPBS by running the product with ``env()`` (OpenPBS's bin dir first on
PATH and its ``PBS_CONF_FILE``), the wrappers by leaving PATH as it is.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import subprocess
import time

PBS_EXEC = pathlib.Path("/opt/pbs")
KIT_FINDER = pathlib.Path(__file__).resolve().parent / "openpbs_kit.sh"
# The source the bed's OpenPBS is built from (the kit's SOURCE.txt): what docs/pbs-slurm.md's claims were tested on
OPENPBS_VERSION = "OpenPBS 23.06.06 (commit cd7ab5e)"


def openpbs_kit() -> pathlib.Path | None:
    found = subprocess.run(["bash", str(KIT_FINDER)], capture_output=True, text=True)
    return pathlib.Path(found.stdout.strip()) if found.returncode == 0 else None


def openpbs_missing() -> str | None:
    """None when OpenPBS can run on the bed here, else why not."""
    if openpbs_kit() is None:
        return "no OpenPBS kit (../shared/openpbs): set ACTIVATE_RAY_OPENPBS_KIT"
    if not (PBS_EXEC / "sbin" / "pbs_server.bin").exists():
        return "OpenPBS is not built (bash tests/bed/install_system_deps.sh builds it into /opt/pbs)"
    return None


class OpenPBS:
    """OpenPBS up on a TestBed (its hosts' namespaces, its user)."""

    def __init__(self, bed):
        self.bed = bed
        self.kit = openpbs_kit()
        self.state = bed.root / "openpbs"
        self.up_seconds: float | None = None

    def up(self) -> OpenPBS:
        t0 = time.monotonic()
        hosts = [f"{h}={self.bed.hosts[h].pid1}" for h in [self.bed.login_host, *self.bed.wide_node_names]]
        log = self.bed.log_dir / "openpbs-up.log"
        with open(log, "ab") as out:
            done = subprocess.run(["bash", str(self.kit / "up.sh"), str(self.state), *hosts], stdout=out,
                                  stderr=subprocess.STDOUT, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"OpenPBS did not come up (exit {done.returncode}):\n"
                               + log.read_text(errors="replace")[-3000:])
        self._make_wide_queue()
        self.up_seconds = time.monotonic() - t0
        return self

    # The nodes beyond the everyday ones belong to queue "wide" (a PBS node associated with
    # a queue runs only that queue's jobs), so the default queue's jobs land on node_names
    # only, as the tests of 3 nodes expect; wide() lends those to "wide" too for a while.
    WIDE_QUEUE = "wide"

    def _make_wide_queue(self) -> None:
        extra = [n for n in self.bed.wide_node_names if n not in self.bed.node_names]
        if not extra:
            return
        for command in (f"create queue {self.WIDE_QUEUE} queue_type = Execution",
                        f"set queue {self.WIDE_QUEUE} enabled = True", f"set queue {self.WIDE_QUEUE} started = True",
                        *(f"set node {n} queue = {self.WIDE_QUEUE}" for n in extra)):
            done = self.qmgr(command)
            if done.returncode != 0:
                raise RuntimeError(f"qmgr -c {command!r}: {done.stdout}{done.stderr}")

    @contextlib.contextmanager
    def wide(self):
        """Every node in queue "wide" while inside (no default-queue job can start then)."""
        try:
            for n in self.bed.node_names:
                self.qmgr(f"set node {n} queue = {self.WIDE_QUEUE}")
            yield self.WIDE_QUEUE
        finally:
            for n in self.bed.node_names:
                self.qmgr(f"unset node {n} queue")

    @contextlib.contextmanager
    def per_user_limit(self, queue: str, jobs: int):
        """A site's limit while inside: at most `jobs` jobs of each user in the queue, queued or
        running (max_queued); qsub refuses one more."""
        done = self.qmgr(f"set queue {queue} max_queued = [u:PBS_GENERIC={jobs}]")
        if done.returncode != 0:
            raise RuntimeError(f"qmgr max_queued: {done.stdout}{done.stderr}")
        try:
            yield queue
        finally:
            self.qmgr(f"unset queue {queue} max_queued")

    def down(self) -> None:
        if not (self.state / "bed.env").exists():
            return
        with open(self.bed.log_dir / "openpbs-down.log", "ab") as out:
            subprocess.run(["bash", str(self.kit / "down.sh"), str(self.state), "--purge"], stdout=out,
                           stderr=subprocess.STDOUT, timeout=120)

    @property
    def conf(self) -> str:
        return str(self.state / "pbs.conf")

    def env(self) -> dict:
        """The environment that makes a bed user's commands reach OpenPBS (not the wrappers)."""
        return {"PBS_CONF_FILE": self.conf,
                "PATH": f"{PBS_EXEC}/bin:{self.bed.user_venv}/bin:/usr/local/bin:/usr/bin:/bin"}

    def run(self, argv: list[str], *, user=None, **kw) -> subprocess.CompletedProcess:
        """A PBS command on the login host (as root unless a user is given)."""
        cmd = [str(PBS_EXEC / "bin" / argv[0]), *argv[1:]]
        return self.bed.run_login(cmd, user=user, env={"PBS_CONF_FILE": self.conf}, **kw)

    def qmgr(self, command: str) -> subprocess.CompletedProcess:
        return self.run(["qmgr", "-c", command], timeout=30)

    def job(self, job_id: str) -> dict:
        """`qstat -f -F json -x` of one job (history included), {} when unknown."""
        shown = self.run(["qstat", "-f", "-F", "json", "-x", job_id], timeout=30)
        if shown.returncode != 0 or not shown.stdout.strip():
            return {}
        try:
            jobs = json.loads(shown.stdout).get("Jobs", {})
        except ValueError:  # OpenPBS can print invalid JSON (an all-digit env value): the text then
            jobs = {}
        return jobs.get(job_id) or next(iter(jobs.values()), {})

    def wait_job_finished(self, job_id: str, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("job_state") in ("F", None) or time.monotonic() > deadline:
                return job
            time.sleep(0.5)

    def live_jobs(self) -> list[str]:
        """'id state name owner' of every job not finished (all users)."""
        shown = self.run(["qstat", "-f", "-F", "json"], timeout=30)
        if shown.returncode != 0 or not shown.stdout.strip():
            return []
        try:
            jobs = json.loads(shown.stdout).get("Jobs", {})
        except ValueError:
            return ["(qstat -F json unreadable)"]
        return [f"{jid} {j.get('job_state')} {j.get('Job_Name')} {j.get('Job_Owner')}"
                for jid, j in jobs.items() if j.get("job_state") not in ("F", "X")]

    def wait_nodes_free(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.run(["pbsnodes", "-a", "-F", "json"], timeout=30)
            try:
                nodes = json.loads(shown.stdout).get("nodes", {})
            except ValueError:
                nodes = {}
            states = {name: node.get("state") for name, node in nodes.items()}
            if states and all(s == "free" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"OpenPBS nodes not free after {timeout:g}s: {states}; jobs: {self.live_jobs()}")
            time.sleep(0.5)
