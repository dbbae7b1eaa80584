"""What every benchmark of bench/ shares: the scratch space and the cluster size, timing and
/proc helpers, the flow run with its clocks (FlowRun, run_flow, LineClock, MemorySampler),
the ports and ALIVE poll of the baselines, the flow on the bed, and the leftover check."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tasks.settings import node_tmp_name
from tests.bed.testbed import is_ray_process
from tests.procs import alive, all_pids, cmdline

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
VENV_BIN = Path(PY).parent
RAY = str(VENV_BIN / "ray")
BENCH = REPO / ".bench"  # git-ignored scratch space
MARK = "arbench"  # in every temp dir of a baseline: how their processes are found
GIB = 1024**3
MEMORY_GB, OBJECT_STORE_GB = 0.5, 0.25  # small: every "node" shares this machine
RAY_RESOURCES = (
    f"--num-cpus 1 --num-gpus 0 --memory {int(MEMORY_GB * GIB)} "
    f"--object-store-memory {int(OBJECT_STORE_GB * GIB)} --disable-usage-stats"
)
FLOW_SIZE = ["--ray-memory-gb", str(MEMORY_GB), "--object-store-memory-gb", str(OBJECT_STORE_GB)]

HOLD_S = 60  # how long the queued-job row keeps the nodes busy (bench.slurm; named in the report)


# ----------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def wait_until(condition, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll until condition() is true; returns time.time() when it was."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)


def _cmdline(pid: int) -> str:
    return cmdline(pid) or ""


_pids = all_pids


def marker_pids(marker: str) -> list[int]:
    """Live processes whose command line contains marker (not this one)."""
    me = os.getpid()
    found = []
    for pid in _pids():
        if pid != me and marker in _cmdline(pid):
            fields = _stat(pid)
            if fields and fields[0] not in ("Z", "X"):
                found.append(pid)
    return found


def kill_marker(marker: str) -> int:
    """SIGKILL every process of this marker and their process groups: Ray's dashboard agent
    renames itself (`ray::DashboardAgent`, no temp dir in its command line) and, its head
    gone, spins at 100% CPU until killed, taking a core from the next run."""
    pids = marker_pids(marker)
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())
    kill_pids(groups, os.killpg)
    return kill_pids(pids)


def kill_pids(ids, kill=os.kill) -> int:
    """SIGKILL each of ids (pids; process groups with kill=os.killpg), gone ones skipped."""
    for one in ids:
        try:
            kill(one, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(ids)


def ray_processes() -> set[int]:
    """Every live Ray process of this machine, renamed ones (`ray::...`) included: the
    bed's own test of what a Ray process is."""
    return {pid for pid in _pids() if alive(pid) and is_ray_process(pid)}


def _status_kb(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat fields after the command name: [state, ppid, ...]; [] when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        fields = _stat(pid)
        if fields:
            children.setdefault(int(fields[1]), []).append(pid)
    return children


def kill_if_same(pid: int, start: str) -> None:
    """SIGKILL pid only if it is still the process that started at `start` (no reused pid)."""
    fields = _stat(pid)
    if fields and fields[19] == start and fields[0] not in ("Z", "X"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class MemorySampler:
    """Peak memory of a process (VmHWM) and of it with its children (sum of VmRSS),
    sampled every `every` seconds while it runs."""

    def __init__(self, pid: int, every: float = 0.25):
        self.pid, self.every = pid, every
        self.hwm_kb = 0
        self.tree_kb = 0
        self.descendants: dict[int, str] = {}  # pid -> start time (clock ticks after boot)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self) -> None:
        hwm = _status_kb(self.pid, "VmHWM")
        if not hwm:
            return
        self.hwm_kb = max(self.hwm_kb, hwm)
        children, tree, todo = _children_map(), [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        for pid in tree[1:]:
            fields = _stat(pid)
            if fields:
                self.descendants.setdefault(pid, fields[19])
        self.tree_kb = max(self.tree_kb, sum(_status_kb(p, "VmRSS") for p in tree))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


GCS_REGISTER = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*Registering new node\. node_id=(\w+)", re.M)


def gcs_registrations(head_tmp: str) -> list[float]:
    """Epoch times at which the head's GCS registered each node (a node is ALIVE from then
    on), from <head temp dir>/session_*/logs/gcs_server.out: when Ray itself was ready."""
    first: dict[str, float] = {}  # node id -> first registration (session_latest is a link: seen twice)
    for path in Path(head_tmp).glob("session_*/logs/gcs_server.out"):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for m in GCS_REGISTER.finditer(text):
            at = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000
            first[m[3]] = min(at, first.get(m[3], at))
    return sorted(first.values())


def _cpu_ticks() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def wait_quiet(max_wait: float = 8.0, threshold: float = 0.25, window: float = 0.5) -> float:
    """Start a run only once the machine is mostly idle (other sessions share it): wait
    until under `threshold` of all CPUs were busy for `window` s, at most max_wait s.
    Returns the busy fraction seen last."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0, total0 = _cpu_ticks()
        time.sleep(window)
        busy1, total1 = _cpu_ticks()
        busy = (busy1 - busy0) / max(1, total1 - total0)
        if busy < threshold or time.monotonic() > deadline:
            return busy


LOG_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \|")


class LineClock:
    """Reads a process's output line by line; each line gets the time Prefect stamped on
    it (HH:MM:SS.mmm, turned into epoch seconds with the arrival time's date), or its
    arrival time when it has none."""

    def __init__(self, stream, sink: Path):
        self.lines: list[tuple[float, str]] = []
        self._stream, self._sink = stream, sink
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self._sink, "w") as sink:
            for raw in self._stream:
                arrived = time.time()
                line = raw.decode(errors="replace").rstrip("\n")
                sink.write(line + "\n")
                sink.flush()
                stamp = arrived
                if m := LOG_TIME.match(line):
                    of_day = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) + int(m[4]) / 1000
                    local = dt.datetime.fromtimestamp(arrived)
                    now_of_day = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
                    stamp = arrived - ((now_of_day - of_day) % 86400)
                self.lines.append((stamp, line))

    def join(self, timeout: float = 10) -> None:
        self._thread.join(timeout)

    def first(self, pattern: str, last: bool = False) -> float | None:
        found = [t for t, line in self.lines if re.search(pattern, line)]
        return (found[-1] if last else found[0]) if found else None

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


# Phases of a flow run, each ending at the first log line that matches.
PHASE_MARKS = [
    ("python start, imports, API", r"\| prefect\.engine - |Beginning flow run"),
    ("flow engine", r"Beginning flow run"),
    ("environment (setup_ray.sh)", r"Ray \S+ on .*\((reused|created)\)"),
    ("upload + submit", r"submitted to "),
    ("job running", r": running"),
    ("head.env written", r"head is "),
    ("dashboard answers", r"\d+ of \d+ nodes alive"),
]


# ------------------------------------------------------------- flow runs


def local_node_dirs(cluster_id: str) -> list[Path]:
    """Ray's temp dirs of a cluster's nodes on this host (ar_make_node_tmp: <tmp>/<name>XXXXXX/r);
    only the head's has a gcs_server.out."""
    return [d / "r" for d in Path("/tmp").glob(f"{node_tmp_name(cluster_id)}*")]


@dataclass
class FlowRun:
    mode: str
    nodes: int
    t0: float
    ok: bool = False
    error: str = ""
    cluster_id: str = ""
    begin_s: float | None = None  # "Beginning flow run" after process start
    ready_s: float | None = None  # connection-info JSON after process start
    teardown_s: float | None = None  # SIGTERM to no job and no Ray process
    exit_s: float | None = None  # SIGTERM to the flow process's exit
    returncode: int | None = None
    ray_ready_s: float | None = None  # the last node registered in the head's GCS, after process start
    detect_lag_s: float | None = None  # connection-info JSON after that registration
    busy_before: float | None = None  # share of the CPUs busy just before the run (other sessions)
    hwm_mb: float = 0
    tree_mb: float = 0
    phases: dict = field(default_factory=dict)
    marks: dict = field(default_factory=dict)  # first log line of each phase, after process start

    @property
    def ready_from_begin_s(self) -> float | None:
        if self.ready_s is None or self.begin_s is None:
            return None
        return self.ready_s - self.begin_s


def run_flow(mode: str, nodes: int, args: list[str], *, run_dir: Path, env: dict, wrap=None,
             job_gone=None, ready_timeout: float = 240, python: str = PY, info_dir: Path | None = None,
             entered=None, head_dirs=None) -> FlowRun:
    """Start the flow with --keep-alive, wait for its connection-info JSON, SIGTERM it and
    time the teardown until no Ray process of the cluster (and, given job_gone, no job).
    On the bed: wrap puts the command in the login host's namespaces as the bed's user,
    entered(pid) is the flow process behind nsenter, head_dirs(cluster_id) the head's
    temp dirs as seen from here."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    info = (info_dir or run_dir) / "info.json"
    info.unlink(missing_ok=True)
    busy = wait_quiet()
    command = [python, "-m", "flows.ray_cluster", "--keep-alive", "--info-file", str(info), *FLOW_SIZE, *args]
    full_env = {**env, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    process = subprocess.Popen(
        wrap(command) if wrap else command, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    flow_pid = entered(process.pid) if entered else process.pid  # nsenter forwards no signal
    memory = MemorySampler(flow_pid)
    clock = LineClock(process.stdout, run_dir / "flow.log")
    run = FlowRun(mode, nodes, t0, busy_before=busy)

    def cluster_id() -> str:
        for _, line in clock.lines:
            if m := re.search(r"cluster (ar-[0-9a-f]{32}) on ", line):
                return m[1]
        return ""

    try:
        wait_until(lambda: info.exists() or process.poll() is not None, ready_timeout, f"{mode} flow ready", 0.02)
        if not info.exists():
            raise RuntimeError(f"flow ended early (rc {process.returncode})")
        ready_at = info.stat().st_mtime
        run.ready_s = ready_at - t0
        connection = json.loads(info.read_text())
        run.cluster_id = connection["cluster_id"]
        registered = sorted(t for d in (head_dirs or local_node_dirs)(run.cluster_id)
                            for t in gcs_registrations(str(d)))
        if len(registered) >= nodes:
            run.ray_ready_s = registered[nodes - 1] - t0
            run.detect_lag_s = ready_at - registered[nodes - 1]
        time.sleep(0.3)  # let the flow log its last ready lines
        begin = clock.first(r"Beginning flow run")
        run.begin_s = begin - t0 if begin else None
        # phases in the order they happened (the environment is built while the job is queued)
        marks = {name: at for name, pattern in PHASE_MARKS if (at := clock.first(pattern)) is not None}
        run.marks = {name: at - t0 for name, at in marks.items()}
        previous = t0
        for name, at in sorted(marks.items(), key=lambda kv: kv[1]):
            if at < previous:
                continue
            run.phases[name] = at - previous
            previous = at
        all_alive = clock.first(rf"{nodes} of {nodes} nodes alive")
        if all_alive and all_alive >= previous:
            run.phases["nodes joining"] = all_alive - previous
            previous = all_alive
        run.phases["connection info"] = ready_at - previous
        # teardown: SIGTERM, as a batch system or a Prefect worker would send
        sigterm = time.time()
        os.kill(flow_pid, signal.SIGTERM)
        marker = f"/{node_tmp_name(run.cluster_id)}"

        def gone() -> bool:
            if process.poll() is not None and run.exit_s is None:
                run.exit_s = time.time() - sigterm
            return not marker_pids(marker) and (job_gone is None or job_gone(connection))

        run.teardown_s = wait_until(gone, 90, f"{mode} teardown", 0.1) - sigterm
        process.wait(60)
        if run.exit_s is None:
            run.exit_s = time.time() - sigterm
        run.returncode = process.returncode
        run.ok = True
    except Exception as exc:  # recorded; the benchmark goes on after cleaning up
        run.error = f"{type(exc).__name__}: {exc}"
        log(f"{mode} flow run failed: {run.error}\n{clock.text()[-3000:]}")
        if process.poll() is None:
            try:
                os.kill(flow_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        run.cluster_id = run.cluster_id or cluster_id()
        if run.cluster_id:
            kill_marker(f"/{node_tmp_name(run.cluster_id)}")
    finally:
        memory.sample()
        memory.stop()
        clock.join()
        for pid, start in memory.descendants.items():  # e.g. a temporary Prefect server: nothing may outlive the run
            kill_if_same(pid, start)
    run.hwm_mb = memory.hwm_kb / 1024
    run.tree_mb = memory.tree_kb / 1024
    return run



def run_flow_on_bed(bed, server_url: str, home: Path, mode: str, nodes: int, args: list[str], live_jobs,
                    scheduler_env: dict | None = None, ready_timeout: float = 240) -> FlowRun:
    """The flow as the bed's user on the login host, from the bed's copy of the checkout,
    with the site's SSH defaults (the user's key), as tests/helpers.run_flow runs it: its
    info file in home (the bed user's), its teardown done once live_jobs() lists no job."""
    from tests.helpers import flow_env

    env = flow_env(server_url, scheduler_env, bed.repo)
    return run_flow(
        mode, nodes, args, run_dir=BENCH / f"run-{mode}", env=env, python=bed.user_python,
        wrap=lambda argv: bed.login_argv(argv, user=bed.user, env=env, cwd=bed.repo),
        info_dir=home, entered=bed.entered_pid, head_dirs=lambda cluster_id: bed_node_dirs(bed, cluster_id),
        job_gone=lambda _: not live_jobs(), ready_timeout=ready_timeout)


def bed_node_dirs(bed, cluster_id: str) -> list[Path]:
    """Ray's temp dirs of a cluster's nodes on the bed's nodes, as seen from here."""
    return [d / "r" for n in bed.wide_node_names for d in bed.node_tmp(n).glob(f"{node_tmp_name(cluster_id)}*")]


# ------------------------------------------------------------ local floor


def flow_like_ports(gcs: int, dashboard: int, client: int, others: list[int], worker_base: int) -> list[str]:
    """The port flags scripts/ray_lib.sh gives every node (ar_run_node), so that a baseline
    starts Ray exactly as the flow's nodes do."""
    names = ["node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port"]
    flags = [f"--{name}={port}" for name, port in zip(names, others, strict=False)]
    flags += [f"--min-worker-port={worker_base}", f"--max-worker-port={worker_base + 49}"]
    if gcs:
        flags += [f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}"]
    return flags



def alive_count(port: int, token: str, host: str = "127.0.0.1") -> int:
    request = urllib.request.Request(
        f"http://{host}:{port}/api/v0/nodes?limit=10000", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            rows = json.load(response)["data"]["result"]["result"]
    except (OSError, ValueError, KeyError, TypeError):
        return -1
    return sum(1 for row in rows if row.get("state") == "ALIVE")


def record_failure(result: dict, exc: Exception, what: str) -> None:
    """A run that failed: its error in its results (the benchmark goes on) and in the log."""
    result["error"] = f"{type(exc).__name__}: {exc}"
    log(f"{what} failed: {result['error']}")


def job_marks(marks: Path, t0: float) -> dict[str, float]:
    """The '<epoch> <name>' lines a baseline job and its poller append to marks (start,
    ready, alive): seconds after t0 of the first line of each name."""
    stamps: dict[str, float] = {}
    for line in marks.read_text().splitlines():
        at, name = line.split()
        stamps.setdefault(name, float(at) - t0)
    return stamps


def poll_alive_main(argv: list[str]) -> int:
    """--poll-alive N DASHBOARD_PORT TOKEN_FILE MARKS_FILE: runs inside a baseline job on
    the head node; appends '<epoch> alive' to MARKS_FILE once N nodes are ALIVE."""
    expected, port, token_file, marks = int(argv[0]), int(argv[1]), argv[2], argv[3]
    token = Path(token_file).read_text().strip()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if alive_count(port, token) >= expected:
            with open(marks, "a") as f:
                f.write(f"{time.time():.6f} alive\n")
            return 0
        time.sleep(0.1)
    return 1



# ------------------------------------------------------------ leftovers


def leftovers(results: dict) -> list[str]:
    """Anything this benchmark started that still exists."""
    found = []
    ids = {r.get("cluster_id") for key in ("local_flow", "local_ephemeral", "slurm", "slurm_queued", "job_flow",
                                            "job_ephemeral", "job_default") for r in results.get(key, [])}
    for marker in [f"/tmp/{MARK}-", *(f"/{i}-" for i in ids if i)]:
        found += [f"process {pid}: {_cmdline(pid)[:120]}" for pid in marker_pids(marker)]
    found += [f"Ray process {pid}: {_cmdline(pid)[:120]}"
              for pid in sorted(ray_processes() - set(results.get("ray_before", [])))]
    found += [f"temp dir {p}" for p in Path("/tmp").glob(f"{MARK}-*")]
    found += [f"temp dir {p}" for i in ids if i for p in Path("/tmp").glob(f"{i}-*")]
    found += [f"dir {p}" for p in BENCH.glob("cold-*")]
    for work in ("local-work",):
        clusters = BENCH / work / "clusters"
        if clusters.exists() and any(clusters.iterdir()):
            found.append(f"cluster dirs in {clusters}")
    if results.get("slurm_jobs_left_before_down"):
        found.append(f"Slurm jobs still queued when the bed went down: {results['slurm_jobs_left_before_down']}")
    if results.get("bed") and not results["bed"].get("down"):
        found.append("the bed is still up")
    if (Path.home() / ".ray" / "auth_token").exists():
        found.append("~/.ray/auth_token")
    return found

