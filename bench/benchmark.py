"""Benchmarks of activate-ray, for real: `python -m bench` (what `make bench` runs).

Not a timed test. It measures, prints the figures and writes BENCHMARKS.md and
bench_time_to_ready.png at the repository root. Every figure is the median of
--reps runs (default 2; the cold builds: uv twice, pip once; the queued run once).

* local: the flow's time-to-ready (process start, and the flow run's
  "Beginning flow run" line, to the connection-info JSON) against a bare floor
  measured in the same run (`ray start --head --block` with the same
  resources, its own --temp-dir and token auth, polled until the head's
  dashboard lists it ALIVE); the flow under a running Prefect server and with
  no PREFECT_API_URL (Prefect starts a temporary server); the server's own
  start time.
* Slurm on the 3-node bed, at 1, 2 and 3 nodes: the flow against (a) Ray's
  classic fixed-sleep template (slurm-basic.sh: head, `sleep 10`, one
  `srun -w node ray start --block &` + `sleep 5` per worker) and (b) a bare
  parallel start (head, then one srun step for every worker, polled until all
  are ALIVE).
* teardown: SIGTERM of the flow to no Slurm job and no Ray process of it.
* warm environment setup: scripts/setup_ray.sh reusing an interpreter that has
  the right Ray, with a `pip` shim on PATH that records any call.
* peak memory of the controller (the flow process, and with its children).

Also: a cold venv build (uv and pip, from PyPI), a cold first run on a queued SLURM
job, and the main job (a user script) against a bare `ray start` + `ray job submit`.

Options: --reps N, --nodes 1,2,3, --sections local,setup,cold,slurm, --build-s S, --no-write
(print only), --report-only (rewrite the report from the last raw results).
Raw results go to .bench/results.json. Everything it starts is
stopped at the end (Ray, Slurm jobs, bed, Prefect server); a last check says
so. Traffic stays on loopback and in the bed's namespaces.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from tasks.atomic_file import write_text_atomic
from tasks.schedulers import mem_mb
from tasks.settings import RayClusterSettings, node_tmp_name
from tests.bed.testbed import is_ray_process
from tests.helpers import PrefectServer, free_port, prefect_env
from tests.procs import alive, all_pids, cmdline

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
VENV_BIN = Path(PY).parent
RAY = str(VENV_BIN / "ray")
BENCH = REPO / ".bench"  # git-ignored scratch space
MARK = "arbench"  # in every temp dir of a baseline: how their processes are found
GIB = 1024**3
MEMORY_GB, OBJECT_STORE_GB = 0.5, 0.25  # small: every "node" shares this machine
# what the flow asks sbatch for, so the baselines get the same allocation
SLURM_MEM_MB = mem_mb(RayClusterSettings(scheduler="slurm", ray_memory_gb=MEMORY_GB, object_store_memory_gb=OBJECT_STORE_GB))
RAY_RESOURCES = (
    f"--num-cpus 1 --num-gpus 0 --memory {int(MEMORY_GB * GIB)} "
    f"--object-store-memory {int(OBJECT_STORE_GB * GIB)} --disable-usage-stats"
)
FLOW_SIZE = ["--ray-memory-gb", str(MEMORY_GB), "--object-store-memory-gb", str(OBJECT_STORE_GB)]

TARGETS = {
    "local_ratio": 1.15,
    "vs_template": 0.5,  # only where the template's sleeps cover Ray's own start on the bed
    "vs_bare": 1.1,
    "teardown_s": 10.0,
    "setup_s": 1.0,
    "scaling": 1.3,
    "cold_ratio": 0.25,  # cold venv build: uv / pip
    "queued": 1.1,  # cold first run on a queued job / (max(build, queue) + start)
    "main_job": 1.1,
    "main_job_default": 1.15,  # the same, no PREFECT_API_URL, a user's second run (issue 32)  # flow with a user script / bare `ray start --head` + `ray job submit` + stop
}
HOLD_S = 60  # how long the queued-job row keeps the nodes busy
QUEUED_NODES = 2
MAIN_JOB = REPO / "examples" / "hello_ray.py"



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


def local_floor(index: int, flags: str) -> dict:
    """`ray start --head --block` by hand, polled until ALIVE. flags: "flow" = every port
    explicit as the flow's nodes get them, "plain" = Ray's defaults but --port/--dashboard-port."""
    tag = f"{MARK}-floor{index}{flags}-{secrets.token_hex(2)}"
    tmp = Path("/tmp") / f"{tag}-head"
    token_file = BENCH / f"{tag}.token"
    token = secrets.token_hex(32)
    write_text_atomic(token_file, token, 0o600)  # private from its creation, never chmod'ed after
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    command = [RAY, "start", "--head", "--block", f"--temp-dir={tmp}", "--dashboard-host=127.0.0.1",
               *RAY_RESOURCES.split()]
    if flags == "flow":
        command += flow_like_ports(gcs, dashboard, free_port(), [free_port() for _ in range(6)],
                                   20000 + 50 * secrets.randbelow(150))
    else:
        command += [f"--port={gcs}", f"--dashboard-port={dashboard}"]
    busy = wait_quiet()
    t0 = time.time()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    result = {"ok": False, "busy_before": busy}
    try:
        ready = wait_until(lambda: alive_count(dashboard, token) >= 1, 120, "bare ray start --head", 0.05)
        result.update(ok=True, ready_s=ready - t0)
        registered = gcs_registrations(str(tmp))
        if registered:
            result["ray_ready_s"] = registered[0] - t0
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        kill_marker(str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
        token_file.unlink(missing_ok=True)
    return result


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


# ------------------------------------------------------------ local section


def supervisor_gone(connection: dict) -> bool:
    """Local mode's "job" is the cluster's supervisor process (its id is the job id)."""
    fields = _stat(int(connection["job_id"]))
    return not fields or fields[0] in ("Z", "X")


def bench_local(reps: int, server: PrefectServer, results: dict) -> None:
    home = server.home
    work = BENCH / "local-work"
    floors, plain, flows = [], [], []
    for rep in range(reps):
        floors.append(local_floor(rep, "flow"))
        plain.append(local_floor(rep, "plain"))
        log(f"local floor {rep + 1}/{reps}: {floors[-1].get('ready_s', float('nan')):.2f}s "
            f"(Ray's default ports: {plain[-1].get('ready_s', float('nan')):.2f}s)")
        flows.append(run_flow("local", 1, ["--work-dir", str(work)], run_dir=BENCH / "run-local",
                              env=prefect_env(home, server.url), job_gone=supervisor_gone))
        log(f"local flow (server) {rep + 1}/{reps}: ready {flows[-1].ready_s}s, teardown {flows[-1].teardown_s}s")
    results["local_floor"] = floors
    results["local_floor_plain"] = plain
    results["local_flow"] = [vars(r) | {"ready_from_begin_s": r.ready_from_begin_s} for r in flows]


def bench_local_ephemeral(reps: int, home: Path, results: dict) -> None:
    work = BENCH / "local-work"
    runs = []
    for rep in range(reps):
        runs.append(run_flow("local-ephemeral", 1, ["--work-dir", str(work)], run_dir=BENCH / "run-ephemeral",
                             env=prefect_env(home), job_gone=supervisor_gone))
        log(f"local flow (temporary server) {rep + 1}/{reps}: ready {runs[-1].ready_s}s")
    results["local_ephemeral"] = [vars(r) | {"ready_from_begin_s": r.ready_from_begin_s} for r in runs]


# ------------------------------------------------------------ setup section


def bench_setup(reps: int, results: dict) -> None:
    """scripts/setup_ray.sh when the flow's own interpreter already has the right Ray."""
    from tasks.settings import DEFAULT_RAY_VERSION

    work = BENCH / "setup-work"
    shutil.rmtree(work, ignore_errors=True)
    shims = BENCH / "pip-shim"
    calls = BENCH / "pip-calls.log"
    shims.mkdir(parents=True, exist_ok=True)
    calls.unlink(missing_ok=True)
    for name in ("pip", "pip3", "pip3.11", "uv"):
        shim = shims / name
        shim.write_text(f'#!/bin/sh\necho "{name} $*" >>{shlex.quote(str(calls))}\nexit 1\n')
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}"}
    times, outputs = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        done = subprocess.run(["bash", str(REPO / "scripts/setup_ray.sh"), DEFAULT_RAY_VERSION, str(work), PY],
                              env=env, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - t0)
        outputs.append(done.stdout)
        if done.returncode != 0:
            raise RuntimeError(f"setup_ray.sh failed: {done.stderr[-2000:]}")
    reused = all("RAY_ENV_SOURCE=reused" in out for out in outputs)
    pip_calls = calls.read_text().splitlines() if calls.exists() else []
    results["setup"] = {
        "times_s": times, "reused": reused, "pip_calls": pip_calls,
        "venv_created": (work / "venvs").exists(), "output": outputs[-1].strip(),
    }
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(shims, ignore_errors=True)
    calls.unlink(missing_ok=True)


# ------------------------------------------------------------ cold environment


def bench_cold(results: dict, uv_reps: int = 2, pip_reps: int = 1) -> None:
    """scripts/setup_ray.sh building ray[default] into a fresh work dir from PyPI: with uv
    (on PATH, a fresh UV_CACHE_DIR) and with pip (AR_UV=0, PIP_NO_CACHE_DIR=1), interleaved."""
    from tasks.settings import DEFAULT_RAY_VERSION

    uv_dir = BENCH / "uv-bin"
    shutil.rmtree(uv_dir, ignore_errors=True)
    uv_dir.mkdir(parents=True)
    (uv_dir / "uv").symlink_to(VENV_BIN / "uv")
    # no venv of ours on PATH: the build's base Python is the machine's python3.11
    path = ":".join(p for p in os.environ["PATH"].split(":") if Path(p).resolve() != VENV_BIN.resolve())
    order = ["uv", "pip", "uv", "pip", "uv"][: uv_reps + pip_reps]
    order = [t for t in order if (t == "uv" and order[: order.index(t) + 1].count("uv") <= uv_reps) or t == "pip"]
    runs = []
    for index, tool in enumerate(order):
        work, cache = BENCH / f"cold-work-{index}", BENCH / f"cold-cache-{index}"
        for d in (work, cache):
            shutil.rmtree(d, ignore_errors=True)
        # PyPI alone, as a newcomer has it: this machine's pip.conf adds local file indexes and a links dir
        env = {k: v for k, v in os.environ.items() if k not in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS")}
        env.update(PIP_CONFIG_FILE="/dev/null", PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
                   UV_CACHE_DIR=str(cache))
        if tool == "uv":
            env["PATH"] = f"{uv_dir}:{path}"
        else:
            env.update(PATH=path, AR_UV="0")
        run = {"tool": tool, "ok": False, "busy_before": wait_quiet()}
        t0 = time.perf_counter()
        try:
            done = subprocess.run(["bash", str(REPO / "scripts/setup_ray.sh"), DEFAULT_RAY_VERSION, str(work)],
                                  env=env, capture_output=True, text=True, timeout=900)
            run["time_s"] = time.perf_counter() - t0
            run["log"] = done.stderr.strip()[-500:]
            used = "with uv" if tool == "uv" else "with pip"
            if done.returncode != 0 or "RAY_ENV_SOURCE=created" not in done.stdout or used not in done.stderr:
                raise RuntimeError(f"setup_ray.sh ({tool}) rc {done.returncode}: {done.stderr[-1500:]}")
            python = re.search(r"^RAY_PYTHON=(.+)$", done.stdout, re.M)[1]
            check = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('ray'))"],
                                   capture_output=True, text=True, timeout=60)
            run["ray"] = check.stdout.strip()
            run["ok"] = check.returncode == 0 and run["ray"] == DEFAULT_RAY_VERSION
        except Exception as exc:  # recorded; the benchmark goes on
            run["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"cold build ({tool}) failed: {run['error']}")
        finally:
            for d in (work, cache):
                shutil.rmtree(d, ignore_errors=True)
        log(f"cold build with {tool}: {run.get('time_s', float('nan')):.1f}s")
        runs.append(run)
    shutil.rmtree(uv_dir, ignore_errors=True)
    results["cold"] = runs


# ------------------------------------------------------------ main job section


def bare_main_job(index: int) -> dict:
    """The floor of a flow run with a user script: `ray start --head` (the flow's flags, token
    auth), `ray job submit` of the same script, then the head stopped (SIGKILL of its
    processes, found by its temp dir: never `ray stop`, which stops everyone's Ray)."""
    tag = f"{MARK}-job{index}-{secrets.token_hex(2)}"
    tmp = Path("/tmp") / f"{tag}-head"
    token_file = BENCH / f"{tag}.token"
    write_text_atomic(token_file, secrets.token_hex(32), 0o600)
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    start = [RAY, "start", "--head", f"--temp-dir={tmp}", "--dashboard-host=127.0.0.1", *RAY_RESOURCES.split(),
             *flow_like_ports(gcs, dashboard, free_port(), [free_port() for _ in range(6)],
                              20000 + 50 * secrets.randbelow(150))]
    submit = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--", PY, str(MAIN_JOB)]
    result: dict = {"ok": False, "busy_before": wait_quiet()}
    ray_before = ray_processes()
    t0 = time.time()
    try:
        # its own process group, which the head's daemons keep: kill_marker kills them all
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        if started.returncode != 0:
            raise RuntimeError(f"ray start: {started.stderr[-1500:]}")
        result["head_s"] = time.time() - t0
        job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
                             cwd=BENCH)
        if job.returncode != 0 or "HELLO_RAY_OK" not in job.stdout:
            raise RuntimeError(f"ray job submit rc {job.returncode}: {(job.stdout + job.stderr)[-1500:]}")
        result["job_done_s"] = time.time() - t0
        kill_marker(str(tmp))
        wait_until(lambda: not marker_pids(str(tmp)), 30, "bare head stopped", 0.05)
        result.update(ok=True, total_s=time.time() - t0)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"bare main job failed: {result['error']}")
    finally:
        kill_marker(str(tmp))
        result["orphans_killed"] = kill_pids(ray_processes() - ray_before)
        shutil.rmtree(tmp, ignore_errors=True)
        token_file.unlink(missing_ok=True)
    return result


def flow_main_job(mode: str, env: dict, default_server: Path | None = None) -> dict:
    """`python -m flows.ray_cluster --user-script examples/hello_ray.py` (local), from the
    process's start to its exit, the cluster gone. `default_server`: the state dir of the
    user's default server (flows/user_server.py), which the run may start and later runs reuse:
    its session outlives the run on purpose."""
    run_dir = BENCH / f"run-{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    command = [PY, "-m", "flows.ray_cluster", "--user-script", str(MAIN_JOB), "--work-dir", str(BENCH / "local-work"),
               *FLOW_SIZE]
    result: dict = {"mode": mode, "ok": False, "busy_before": wait_quiet()}
    t0 = time.time()
    process = subprocess.Popen(command, cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    memory = MemorySampler(process.pid)
    clock = LineClock(process.stdout, run_dir / "flow.log")
    try:
        process.wait(300)
        exited = time.time()
        clock.join()
        text = clock.text()
        cluster = re.search(r"cluster (ar-[0-9a-f]{32}) on ", text)
        result["cluster_id"] = cluster[1] if cluster else ""
        if process.returncode != 0 or "HELLO_RAY_OK" not in text:
            raise RuntimeError(f"flow rc {process.returncode}: {text[-2000:]}")
        marker = f"/{node_tmp_name(result['cluster_id'])}"
        wait_until(lambda: not marker_pids(marker), 30, f"{mode}: cluster gone", 0.05)
        begin = clock.first(r"Beginning flow run")
        result.update(ok=True, total_s=exited - t0, gone_s=time.time() - t0, begin_s=begin - t0 if begin else None)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:2500]
        log(f"{mode} failed: {result['error']}")
        if process.poll() is None:
            process.kill()
            process.wait()
    finally:
        memory.stop()
        clock.join()
        spared = default_server_session(default_server)
        for pid, start in memory.descendants.items():
            if spared is None or session_of(pid) != spared:
                kill_if_same(pid, start)
        if result.get("cluster_id"):
            kill_marker(f"/{node_tmp_name(result['cluster_id'])}")
    return result


def bench_main_job(reps: int, server: PrefectServer, results: dict) -> None:
    bare, flows = [], []
    for rep in range(reps):
        bare.append(bare_main_job(rep))
        flows.append(flow_main_job("job-server", prefect_env(server.home, server.url)))
        log(f"main job {rep + 1}/{reps}: bare {bare[-1].get('total_s')}s, flow (server) {flows[-1].get('total_s')}s")
    results["job_bare"] = bare
    results["job_flow"] = flows


def default_server_session(state: Path | None) -> int | None:
    """The session the default server's supervisor leads (its pid), if it runs."""
    try:
        pid = int((state / "pid").read_text()) if state else 0
    except (OSError, ValueError):
        return None
    return pid if pid > 1 and session_of(pid) == pid else None


def session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def bench_main_job_default(reps: int, home: Path, results: dict) -> None:
    """The default path (no PREFECT_API_URL): the first run starts the user's own server
    (flows/user_server.py), the next ones reuse it, as a user's second run within its idle
    timeout does: those are the figure against the bare Ray script."""
    state = BENCH / "default-server"
    env = {**prefect_env(home), "AR_DEFAULT_SERVER_DIR": str(state)}
    try:
        first = flow_main_job("job-default-first", env, state)
        log(f"main job, default server started by the run: {first.get('total_s')}s")
        runs = []
        for rep in range(reps):
            runs.append(flow_main_job("job-default", env, state))
            log(f"main job, default server reused {rep + 1}/{reps}: {runs[-1].get('total_s')}s")
    finally:
        subprocess.run([PY, "-m", "flows.user_server", "stop"], cwd=REPO, env=env, check=False, timeout=60)
    results["job_ephemeral"] = [first]  # the key of the runs that pay a server's start
    results["job_default"] = runs


# ------------------------------------------------------------ Slurm section

# The job scripts compared with the flow, as str.format templates ({tag}, {nodes}, {mem},
# {dir}, {env}, {poller}, {tmp}, {resources}, {head_ports}, {ports}; braces doubled).
TEMPLATES = Path(__file__).resolve().parent / "templates"
# Ray's classic Slurm template (docs: slurm-basic.sh), with what this machine needs.
TEMPLATE_JOB = (TEMPLATES / "ray_docs_slurm_basic.sh.in").read_text()
# The floor: head, then every worker at once in one srun step, polled until all are ALIVE.
BARE_JOB = (TEMPLATES / "bare_parallel.sh.in").read_text()


class SlurmBench:
    def __init__(self, bed, server: PrefectServer):
        self.bed = bed
        self.server = server
        self.home = bed.home_dir("bench")  # the bed user's, on the shared filesystem
        self.work = self.home / "w"

    def run_bed_flow(self, mode: str, nodes: int, args: list[str], ready_timeout: float = 240) -> FlowRun:
        """The flow as the bed's user on the login host, from the bed's copy of the checkout,
        with the site's SSH defaults (the user's key), as tests/helpers.run_flow runs it."""
        from tests.helpers import flow_env

        env = flow_env(self.server.url, None, self.bed.repo)
        return run_flow(
            mode, nodes, args, run_dir=BENCH / f"run-{mode}", env=env, python=self.bed.user_python,
            wrap=lambda argv: self.bed.login_argv(argv, user=self.bed.user, env=env, cwd=self.bed.repo),
            info_dir=self.home, entered=self.bed.entered_pid, head_dirs=self.head_dirs,
            job_gone=lambda _: not self.live_jobs(), ready_timeout=ready_timeout)

    def head_dirs(self, cluster_id: str) -> list[Path]:
        return [d / "r" for n in self.bed.node_names for d in self.bed.node_tmp(n).glob(f"{node_tmp_name(cluster_id)}*")]

    def node_tmps(self, prefix: str) -> list[Path]:
        return [p for n in self.bed.node_names for p in self.bed.node_tmp(n).glob(f"{prefix}-*")]

    def live_jobs(self) -> list[str]:
        done = self.bed.run_login(["squeue", "-h", "-o", "%i %T"], timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"squeue: {done.stderr}")
        return [line for line in done.stdout.splitlines() if line.strip()]

    def nodes_idle(self) -> bool:
        done = self.bed.run_login(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=30)
        states = [line.split()[1] for line in done.stdout.splitlines() if len(line.split()) > 1]
        return bool(states) and all(state == "idle" for state in states)

    def settle(self) -> None:
        """Before each run: no job, every node idle (a new job starts at once)."""
        wait_until(lambda: not self.live_jobs() and self.nodes_idle(), 60, "bed idle", 0.2)

    def flow(self, nodes: int) -> FlowRun:
        self.settle()
        args = [
            "--scheduler", "slurm", "--slurm.nodes", str(nodes), "--slurm.walltime", "00:10:00",
            "--work-dir", str(self.work), "--readiness-timeout", "180",
        ]
        return self.run_bed_flow("slurm", nodes, args)

    def queued(self, nodes: int, build_s: float, hold_s: float = HOLD_S) -> dict:
        """A cold first run on a queued job: a job holding every node for hold_s is running
        when the flow starts, so the flow's job waits in the queue; the environment step on
        the login node takes build_s (the cold uv build measured in this run: the bed's
        namespaces have no route to PyPI), as setup_commands. Times the flow's readiness and
        when its job really started."""
        self.settle()
        done = self.bed.run_login(["sinfo", "-h", "-N", "-o", "%N"], timeout=30)
        all_nodes = len({line.strip() for line in done.stdout.splitlines() if line.strip()})
        job_dir = BENCH / "slurm" / f"{MARK}-hold-{secrets.token_hex(3)}"
        job_dir.mkdir(parents=True)
        done = self.bed.run_login(["sbatch", "--parsable", "--exclusive", f"--nodes={all_nodes}", "--time=00:05:00",
                                   f"--job-name={MARK}-hold", f"--output={job_dir}/hold-%j.out",
                                   f"--wrap=sleep {hold_s:g}"], cwd=job_dir, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch (hold): {done.stderr}")
        blocker = done.stdout.strip().split(";")[0]
        result: dict = {"nodes": nodes, "build_s": build_s, "hold_s": hold_s, "ok": False}
        seen: dict[str, float] = {}
        stop = threading.Event()

        def watch() -> None:  # when the flow's job starts running (any job but the blocker)
            while not stop.is_set():
                try:
                    for line in self.live_jobs():
                        job, state = line.split()[:2]
                        if job != blocker and state == "RUNNING":
                            seen.setdefault(job, time.time())
                except Exception:  # noqa: BLE001 - a failed squeue: poll again
                    pass
                stop.wait(0.2)

        try:
            wait_until(lambda: any(line.split()[:2] == [blocker, "RUNNING"] for line in self.live_jobs()), 60,
                       "hold job running", 0.2)
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            slow = f'case "$(hostname -s)" in login) sleep {build_s:.2f} ;; esac\n'
            args = [
                "--scheduler", "slurm", "--slurm.nodes", str(nodes), "--slurm.walltime", "00:10:00",
                "--work-dir", str(self.work), "--readiness-timeout", "240", "--setup-commands", slow,
            ]
            run = self.run_bed_flow("slurm-queued", nodes, args, ready_timeout=360)
            stop.set()
            watcher.join(5)
            result.update(vars(run))
            submitted = run.marks.get("upload + submit")
            if run.ok and seen and submitted is not None:
                result["job_started_s"] = min(seen.values()) - run.t0
                result["submitted_s"] = submitted
                result["queue_s"] = result["job_started_s"] - submitted  # what the flow's job waited
                result["environment_s"] = run.marks.get("environment (setup_ray.sh)")
            result["ok"] = run.ok and "queue_s" in result
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            log(f"queued run failed: {result['error']}")
        finally:
            stop.set()
            self.bed.run_login(["scancel", blocker], timeout=30)
            wait_until(lambda: not self.live_jobs(), 90, "queued run: jobs gone", 0.2)
            shutil.rmtree(job_dir, ignore_errors=True)
        return result

    def _scale(self, cluster_id: str, *change: str) -> dict:
        from tests.helpers import flow_env

        done = self.bed.run_login([self.bed.user_python, "-m", "flows.ray_cluster", "scale", cluster_id, *change,
                                   "--work-dir", str(self.work), "--timeout", "120"], user=self.bed.user,
                                  env=flow_env(self.server.url, None, self.bed.repo), cwd=self.bed.repo, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"scale {' '.join(change)}: {done.stderr[-1500:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def scaling(self, reps: int) -> dict:
        """Worker jobs on a running 1-node cluster: `scale --add 1` until its node is alive on
        the head's dashboard (the command's own clock; the wall clock around the whole command,
        its Python start included), `--remove 1` until it is gone; and, on a cluster with
        scale.adapt, from a task asking for more CPUs than the cluster has (the driver's clock
        just before .remote()) to the flow's "worker job(s) submitted" log line."""
        from tests.helpers import BackgroundFlow
        from tests.helpers import run_flow as run_test_flow

        result: dict = {"ok": False, "add_s": [], "add_wall_s": [], "remove_s": [], "demand_to_submit_s": []}
        work = self.bed.home_dir("bench-scale")  # the bed user's: the flow writes its info file there
        common = ["--scheduler", "slurm", "--slurm.nodes", "1", "--slurm.walltime", "00:10:00", "--work-dir",
                  str(self.work), "--readiness-timeout", "180", *FLOW_SIZE]
        try:
            self.settle()
            flow = BackgroundFlow(self.bed, [*common, "--keep-alive", "--scale.worker-cpus", "1"], work, self.server.url)
            try:
                cluster_id = flow.wait_ready(240)["cluster_id"]
                for _ in range(reps):
                    began = time.monotonic()
                    added = self._scale(cluster_id, "--add", "1")
                    result["add_wall_s"].append(time.monotonic() - began)
                    result["add_s"].append(added["seconds"])
                    result["remove_s"].append(self._scale(cluster_id, "--remove", "1")["seconds"])
                flow.send_signal(signal.SIGINT)
                flow.wait(120)
            finally:
                flow.kill()
            script = work / "demand.py"
            script.write_text("import time, ray\nray.init()\n@ray.remote(num_cpus=2)\ndef big():\n    return 1\n"
                              "print(f'DEMAND_AT={time.time():.3f}', flush=True)\nray.get(big.remote())\n")
            for rep_index in range(reps):
                self.settle()
                adapt_work = self.bed.home_dir(f"bench-adapt{rep_index}")
                run = run_test_flow(self.bed, [*common, "--user-script", str(script), "--scale.adapt", "min=0,max=1",
                                               "--scale.worker-cpus", "2", "--scale.cooldown", "0"],
                                    work=adapt_work, api=self.server.url, timeout=300)
                demand = re.search(r"DEMAND_AT=([0-9.]+)", run.output)
                submitted = re.search(r"^(\d\d:\d\d:\d\d\.\d{3}) \| INFO .*worker job\(s\) submitted to slurm",
                                      run.output, re.M)
                if run.returncode != 0 or not demand or not submitted:
                    raise RuntimeError(f"adaptive run: rc {run.returncode}, {run.output[-1500:]}")
                clock = dt.datetime.combine(dt.date.today(), dt.time.fromisoformat(submitted.group(1)))
                result["demand_to_submit_s"].append(clock.timestamp() - float(demand.group(1)))
                shutil.rmtree(adapt_work, ignore_errors=True)
            result["ok"] = True
        except Exception as exc:  # recorded: the rest of the report still gets written
            result["error"] = f"{type(exc).__name__}: {exc}"
            log(f"scaling runs failed: {result['error']}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return result

    def baseline(self, kind: str, nodes: int) -> dict:
        self.settle()
        ray_before = ray_processes()
        tag = f"{MARK}-{kind}{nodes}-{secrets.token_hex(3)}"
        job_dir = BENCH / "slurm" / tag
        job_dir.mkdir(parents=True)
        token_file = job_dir / "token"
        write_text_atomic(token_file, secrets.token_hex(32), 0o600)
        tmp = f"/tmp/{tag}"
        env = "\n".join([
            f"export PATH={shlex.quote(str(VENV_BIN))}:$PATH",
            "export RAY_AUTH_MODE=token",
            f"export RAY_AUTH_TOKEN_PATH={shlex.quote(str(token_file))}",
            "unset PREFECT_API_URL",
        ])
        poller = (f"(cd {shlex.quote(str(REPO))} && {shlex.quote(PY)} -m bench --poll-alive "
                  f"{nodes} 8265 {shlex.quote(str(token_file))} {shlex.quote(str(job_dir / 'marks'))})")
        text = (TEMPLATE_JOB if kind == "template" else BARE_JOB).format(
            tag=tag, nodes=nodes, mem=SLURM_MEM_MB, dir=shlex.quote(str(job_dir)), env=env, poller=poller,
            tmp=tmp, resources=RAY_RESOURCES,
            head_ports=" ".join(flow_like_ports(6379, 8265, 10001, list(range(6380, 6386)), 12000)),
            ports=" ".join(flow_like_ports(0, 0, 0, list(range(6380, 6386)), 12000)),
        )
        script = job_dir / "job.sh"
        script.write_text(text)
        marks = job_dir / "marks"
        result: dict = {"kind": kind, "nodes": nodes, "ok": False, "busy_before": wait_quiet()}
        job_id = ""
        t0 = time.time()
        try:
            done = self.bed.run_login(["sbatch", "--parsable", str(script)], cwd=job_dir, timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"sbatch: {done.stderr}")
            job_id = done.stdout.strip().split(";")[0]
            wanted = "ready" if kind == "template" else "alive"

            def marked() -> bool:
                return marks.exists() and f" {wanted}" in marks.read_text()

            wait_until(marked, 180, f"{kind} baseline at {nodes} node(s)", 0.05)
            if kind == "template":  # the poller started with the job: wait for it too
                try:
                    wait_until(lambda: " alive" in marks.read_text(), 60, "template's nodes alive", 0.05)
                except TimeoutError:
                    pass
            stamps = {}
            for line in marks.read_text().splitlines():
                at, name = line.split()
                stamps.setdefault(name, float(at))
            result["ready_s"] = stamps[wanted] - t0
            result["job_start_s"] = stamps["start"] - t0
            if "alive" in stamps:
                result["all_alive_s"] = stamps["alive"] - t0
            registered = sorted(t for node in self.node_tmps(tag) for t in gcs_registrations(str(node)))
            if len(registered) >= nodes:
                result["ray_ready_s"] = registered[nodes - 1] - t0
            result["ok"] = True
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            log(f"{kind} baseline failed: {result['error']}")
        finally:
            if job_id:
                # scancel alone leaves the head's Ray running for 30-60 s here (`ray start
                # --block` dies first, its children escape the step): give it 5 s, then
                # SIGKILL what is left of this baseline (its temp dir is in every command line).
                stop = time.time()
                self.bed.run_login(["scancel", job_id], timeout=30)
                try:
                    wait_until(lambda: not self.live_jobs() and not marker_pids(tmp), 5, "baseline teardown", 0.1)
                    result["teardown_s"] = time.time() - stop
                except TimeoutError:
                    result["killed_after_scancel"] = kill_marker(tmp)
                    wait_until(lambda: not self.live_jobs(), 60, "baseline job gone", 0.2)
            kill_marker(tmp)
            # the renamed agents (`ray::DashboardAgent`) that escape scancel and the marker
            result["orphans_killed"] = kill_pids(ray_processes() - ray_before)
            for path in self.node_tmps(tag):
                shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(job_dir, ignore_errors=True)
        return result


def bench_slurm(reps: int, node_counts: list[int], server: PrefectServer, results: dict,
                build_s: float | None = None) -> None:
    from tests.bed import TestBed
    from tests.nsrelay import NamespaceRelay

    bed = TestBed()
    missing = bed.requirements_missing()
    if missing:
        raise RuntimeError(f"the Slurm bed cannot run here: {missing}")
    try:
        holder = Path("/run/activate-ray-testbed.lock").read_text().strip()
    except OSError:
        holder = ""
    if holder:
        log(f"another bed is up ({holder}): waiting for it")
    t0 = time.time()
    bed.up()
    results["bed"] = {"up_s": time.time() - t0, "waited_for_other_bed": bool(holder)}
    log(f"bed up in {results['bed']['up_s']:.1f}s")
    bench = SlurmBench(bed, server)
    runs: list[dict] = []
    relay = None
    try:
        relay = NamespaceRelay(f"/run/netns/{bed.netns[bed.login_host]}", server.port, server.port)
        for nodes in node_counts:
            for rep in range(reps):
                # rotate the order so that no method always runs first after a pause
                order = ["flow", "bare", "template"]
                order = order[rep % 3:] + order[:rep % 3]
                for method in order:
                    if method == "flow":
                        run = bench.flow(nodes)
                        entry = vars(run) | {"method": "flow", "ready_from_begin_s": run.ready_from_begin_s}
                        log(f"slurm flow {nodes}n {rep + 1}/{reps}: ready {run.ready_s}s "
                            f"(from flow start {run.ready_from_begin_s}s), teardown {run.teardown_s}s")
                    else:
                        entry = bench.baseline(method, nodes) | {"method": method}
                        log(f"slurm {method} {nodes}n {rep + 1}/{reps}: ready {entry.get('ready_s')}s, "
                            f"all alive {entry.get('all_alive_s')}s")
                    runs.append(entry)
        results["slurm_scale"] = [bench.scaling(reps)]
        scale = results["slurm_scale"][0]
        log(f"slurm worker jobs: --add 1 -> alive {median(scale['add_s'])}s, unmet demand -> submitted "
            f"{median(scale['demand_to_submit_s'])}s")
        if build_s is not None:
            nodes = QUEUED_NODES if QUEUED_NODES in node_counts else max(node_counts)
            try:
                queued = bench.queued(nodes, build_s)
            except Exception as exc:  # recorded: the rest of the report still gets written
                queued = {"nodes": nodes, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            results["slurm_queued"] = [queued]
            log(f"slurm queued {nodes}n: ready {queued.get('ready_s')}s, its job waited {queued.get('queue_s')}s, "
                f"build {build_s:.1f}s")
    finally:
        results["slurm"] = runs
        if relay is not None:
            relay.close()
        try:
            leftover_jobs = bench.live_jobs()
        except Exception as exc:  # the bed is going down anyway
            leftover_jobs = [str(exc)]
        results["slurm_jobs_left_before_down"] = leftover_jobs
        bed.down()
        results["bed"]["down"] = not bed._up and not (bed.root and bed.root.exists())
        shutil.rmtree(bench.home, ignore_errors=True)
        shutil.rmtree(BENCH / "slurm", ignore_errors=True)


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


# ------------------------------------------------------------ report


def machine_facts() -> dict:
    def run(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    meminfo = Path("/proc/meminfo").read_text()
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo)[1])
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    os_release = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', Path("/etc/os-release").read_text(), re.M))
    commit = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu[1].strip() if cpu else "",
        "memory_gib": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "os": os_release.get("PRETTY_NAME", ""),
        "python": platform.python_version(),
        "ray": metadata.version("ray"),
        "prefect": metadata.version("prefect"),
        "slurm": run(["slurmctld", "-V"]).replace("slurm-wlm ", "") or "?",
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def fmt(value, unit="s", digits=2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def verdict(value, target) -> str:
    if value is None:
        return "n/a"
    return "pass" if value <= target else "**miss**"


def summarize(results: dict) -> dict:
    """The headline figures (medians)."""
    s: dict = {}
    ok = lambda runs: [r for r in runs if r.get("ok")]  # noqa: E731
    floors = ok(results.get("local_floor", []))
    local = ok(results.get("local_flow", []))
    eph = ok(results.get("local_ephemeral", []))
    s["floor"] = median([r["ready_s"] for r in floors])
    s["floor_plain"] = median([r.get("ready_s") for r in ok(results.get("local_floor_plain", []))])
    s["local_ready"] = median([r["ready_s"] for r in local])
    s["local_ready_begin"] = median([r["ready_from_begin_s"] for r in local])
    s["local_begin"] = median([r["begin_s"] for r in local])
    s["local_teardown"] = median([r["teardown_s"] for r in local])
    s["local_exit"] = median([r["exit_s"] for r in local])
    s["floor_ray_ready"] = median([r.get("ray_ready_s") for r in floors])
    s["local_ray_ready"] = median([r.get("ray_ready_s") for r in local])
    s["local_lag"] = median([r.get("detect_lag_s") for r in local])
    s["busy_before"] = median([r.get("busy_before") for key in ("local_floor", "local_flow", "local_ephemeral", "slurm")
                               for r in results.get(key, [])])
    s["eph_ready"] = median([r["ready_s"] for r in eph])
    s["eph_ready_begin"] = median([r["ready_from_begin_s"] for r in eph])
    s["eph_begin"] = median([r["begin_s"] for r in eph])
    if s["floor"]:
        s["local_ratio_begin"] = s["local_ready_begin"] and s["local_ready_begin"] / s["floor"]
        s["local_ratio_process"] = s["local_ready"] and s["local_ready"] / s["floor"]
        s["eph_ratio_begin"] = s["eph_ready_begin"] and s["eph_ready_begin"] / s["floor"]
        s["eph_ratio_process"] = s["eph_ready"] and s["eph_ready"] / s["floor"]
    s["server_start"] = results.get("server_start_s")
    s["local_hwm"] = max((r["hwm_mb"] for r in local), default=None)
    s["eph_tree"] = max((r["tree_mb"] for r in eph), default=None)
    s["eph_hwm"] = max((r["hwm_mb"] for r in eph), default=None)
    setup = results.get("setup")
    if setup:
        s["setup"] = median(setup["times_s"])
        s["setup_no_pip"] = setup["reused"] and not setup["pip_calls"] and not setup["venv_created"]
    slurm = ok(results.get("slurm", []))
    by: dict = {}
    for r in slurm:
        by.setdefault((r["method"], r["nodes"]), []).append(r)
    s["by"] = by
    table = {}
    for (method, nodes), runs in by.items():
        table[(method, nodes)] = {
            "ready": median([r["ready_s"] for r in runs]),
            "ready_min": min(r["ready_s"] for r in runs),
            "ready_max": max(r["ready_s"] for r in runs),
            "begin": median([r.get("ready_from_begin_s") for r in runs]),
            "all_alive": median([r.get("all_alive_s") for r in runs]),
            "ray_ready": median([r.get("ray_ready_s") for r in runs]),
            "lag": median([r.get("detect_lag_s") for r in runs]),
            "teardown": median([r.get("teardown_s") for r in runs]),
            "exit": median([r.get("exit_s") for r in runs]),
            "hwm": max((r.get("hwm_mb") or 0 for r in runs), default=0),
            "n": len(runs),
        }
    s["table"] = table
    node_counts = sorted({n for _, n in table})
    s["node_counts"] = node_counts
    top = max(node_counts) if node_counts else None
    s["top"] = top
    get = lambda m, n, k="ready": table.get((m, n), {}).get(k)  # noqa: E731
    if top:
        flow, tmpl, bare = get("flow", top), get("template", top), get("bare", top)
        s["vs_template"] = flow / tmpl if flow and tmpl else None
        s["vs_bare"] = flow / bare if flow and bare else None
        s["slurm_teardown"] = get("flow", top, "teardown")
        s["slurm_teardown_max"] = max((r.get("teardown_s") or 0 for r in by.get(("flow", top), [])), default=None)
        low = min(node_counts)
        if low != top and get("flow", low):
            s["scaling"] = get("flow", top) / get("flow", low)
            s["scaling_bare"] = get("bare", top) / get("bare", low) if get("bare", low) and get("bare", top) else None
            ray_low, ray_top = get("bare", low, "ray_ready"), get("bare", top, "ray_ready")
            s["scaling_ray"] = ray_top / ray_low if ray_low and ray_top else None
    s["slurm_hwm"] = max((r.get("hwm_mb") or 0 for r in slurm if r["method"] == "flow"), default=None)
    # the template's sleeps cover Ray's own start when all its nodes are ALIVE by its ready line
    s["template_covers"] = {n: (t["all_alive"] is not None and t["ready"] is not None and t["all_alive"] <= t["ready"])
                            for (m, n), t in table.items() if m == "template"}
    if top:
        # A target against the template is one on this project only where Ray's own parallel
        # start (b) meets it: else the template's sleeps are shorter than Ray's start plus
        # the target's margin, and no launcher could meet it (issue 17: compare with (b)).
        bare_top, template_top = get("bare", top), get("template", top)
        s["bare_vs_template"] = bare_top / template_top if bare_top and template_top else None
        s["template_target"] = bool(s["template_covers"].get(top) and s["bare_vs_template"]
                                    and s["bare_vs_template"] <= TARGETS["vs_template"])
    cold = ok(results.get("cold", []))
    s["cold_uv"] = median([r["time_s"] for r in cold if r["tool"] == "uv"])
    s["cold_pip"] = median([r["time_s"] for r in cold if r["tool"] == "pip"])
    s["cold_n"] = {tool: sum(1 for r in cold if r["tool"] == tool) for tool in ("uv", "pip")}
    s["cold_ratio"] = s["cold_uv"] / s["cold_pip"] if s["cold_uv"] and s["cold_pip"] else None
    s["job_bare"] = median([r["total_s"] for r in ok(results.get("job_bare", []))])
    s["job_bare_head"] = median([r["head_s"] for r in ok(results.get("job_bare", []))])
    s["job_flow"] = median([r["total_s"] for r in ok(results.get("job_flow", []))])
    s["job_flow_begin"] = median([r.get("begin_s") for r in ok(results.get("job_flow", []))])
    s["job_eph"] = median([r["total_s"] for r in ok(results.get("job_ephemeral", []))])
    s["job_eph_begin"] = median([r.get("begin_s") for r in ok(results.get("job_ephemeral", []))])
    s["job_default"] = median([r["total_s"] for r in ok(results.get("job_default", []))])
    if s["job_bare"]:
        s["job_default_ratio"] = s["job_default"] / s["job_bare"] if s["job_default"] else None
        s["job_ratio"] = s["job_flow"] / s["job_bare"] if s["job_flow"] else None
        s["job_eph_ratio"] = s["job_eph"] / s["job_bare"] if s["job_eph"] else None
    scale = ok(results.get("slurm_scale", []))
    if scale:
        bare_one = get("bare", 1)
        s["scale"] = {"add": median(scale[0]["add_s"]), "add_wall": median(scale[0]["add_wall_s"]),
                      "remove": median(scale[0]["remove_s"]), "demand": median(scale[0]["demand_to_submit_s"]),
                      "n": len(scale[0]["add_s"]), "bare_one": bare_one}
        s["scale"]["vs_bare"] = s["scale"]["add"] / bare_one if bare_one and s["scale"]["add"] else None
    queued = ok(results.get("slurm_queued", []))
    if queued:
        q = queued[0]
        start = get("flow", q["nodes"])
        s["queued"] = {
            "nodes": q["nodes"], "ready": q["ready_s"], "build": q["build_s"], "queue": q["queue_s"],
            "hold": q["hold_s"], "start": start, "submitted": q.get("submitted_s"),
            "environment": q.get("environment_s"), "job_started": q.get("job_started_s"),
            "ideal": max(q["build_s"], q["queue_s"]) + start if start else None,
        }
        s["queued"]["ratio"] = q["ready_s"] / s["queued"]["ideal"] if s["queued"]["ideal"] else None
    s["failures"] = [
        f"{key}: {r.get('mode') or r.get('method') or key} {r.get('nodes', '')} - {r.get('error')}"
        for key in ("local_floor", "local_floor_plain", "local_flow", "local_ephemeral", "slurm", "slurm_queued",
                "slurm_scale", "cold", "job_bare", "job_flow", "job_ephemeral", "job_default")
        for r in results.get(key, []) if not r.get("ok")
    ]
    return s


def phase_table(runs: list[dict]) -> list[tuple[str, float]]:
    names: list[str] = []
    for r in runs:
        for name in r.get("phases", {}):
            if name not in names:
                names.append(name)
    return [(name, median([r["phases"].get(name) for r in runs])) for name in names]


def plot(s: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    table, nodes = s["table"], s["node_counts"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    series = [
        ("template", "ready", "Ray's fixed-sleep template (slurm-basic.sh)", "C3", "^-"),
        ("template", "all_alive", "fixed-sleep template: nodes actually alive", "C3", "^:"),
        ("flow", "ready", "activate-ray flow (from process start)", "C0", "o-"),
        ("flow", "begin", "activate-ray flow (from \"Beginning flow run\")", "C0", "o--"),
        ("bare", "ready", "bare parallel ray start (floor)", "C2", "s-"),
    ]
    for method, key, label, color, style in series:
        xs = [n for n in nodes if table.get((method, n), {}).get(key) is not None]
        ys = [table[(method, n)][key] for n in xs]
        if not xs:
            continue
        kwargs = {}
        if key == "ready":
            kwargs["yerr"] = [[y - table[(method, n)]["ready_min"] for n, y in zip(xs, ys, strict=True)],
                              [table[(method, n)]["ready_max"] - y for n, y in zip(xs, ys, strict=True)]]
            ax.errorbar(xs, ys, fmt=style, color=color, label=label, capsize=3, **kwargs)
        else:
            ax.plot(xs, ys, style, color=color, label=label, alpha=0.7)
    ax.set_xticks(nodes)
    ax.set_xlabel("Slurm nodes (one Ray node each)")
    ax.set_ylabel("time to ready (s), median; bars: min-max")
    ax.set_ylim(bottom=0)
    ax.set_title("Ray cluster time-to-ready on the 3-node Slurm bed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return ""


# The headline figures of the previous full run (2026-12-02 23:45, commit 4099630), for "what changed".
PREVIOUS_RUN = "2026-12-03 06:25, commit 6127093"
PREVIOUS = {
    "local_ratio_begin": 1.08, "vs_bare": 1.01, "vs_template": 0.63, "slurm_lag": 0.18, "slurm_teardown": 0.75,
    "local_teardown": 0.62, "setup": 0.099, "slurm_ready": 13.08, "bare_ready": 12.95, "local_hwm": 102, "slurm_hwm": 113,
    "job_ratio": 1.02, "job_flow": 16.92, "job_bare": 16.66, "job_eph": 32.06,
}


def changes_section(s: dict) -> list[str]:
    top = s.get("top")
    flow = s.get("table", {}).get(("flow", top), {}) if top else {}
    bare = s.get("table", {}).get(("bare", top), {}) if top else {}
    now = {
        "local_ratio_begin": s.get("local_ratio_begin"), "vs_bare": s.get("vs_bare"), "vs_template": s.get("vs_template"),
        "slurm_lag": flow.get("lag"), "slurm_teardown": s.get("slurm_teardown"), "local_teardown": s.get("local_teardown"),
        "setup": s.get("setup"), "slurm_ready": flow.get("ready"), "bare_ready": bare.get("ready"),
        "local_hwm": s.get("local_hwm"), "slurm_hwm": s.get("slurm_hwm"),
        "job_ratio": s.get("job_ratio"), "job_flow": s.get("job_flow"), "job_bare": s.get("job_bare"),
        "job_eph": s.get("job_eph"),
    }
    names = {
        "local_ratio_begin": ("local: flow / floor, from flow start", "x"),
        "slurm_ready": (f"Slurm {top} nodes: flow time-to-ready from process start", "s"),
        "bare_ready": (f"Slurm {top} nodes: bare parallel start", "s"),
        "vs_bare": (f"Slurm {top} nodes: flow / bare parallel", "x"),
        "vs_template": (f"Slurm {top} nodes: flow / fixed-sleep template", "x"),
        "slurm_lag": (f"Slurm {top} nodes: readiness detection lag", "s"),
        "slurm_teardown": ("Slurm teardown", "s"),
        "local_teardown": ("local teardown", "s"),
        "setup": ("warm setup (reuse path)", "s"),
        "local_hwm": ("controller peak memory, local (MiB)", ""),
        "slurm_hwm": ("controller peak memory, Slurm (MiB)", ""),
        "job_flow": ("main job: flow, process start to exit (server running)", "s"),
        "job_bare": ("main job: bare Ray script", "s"),
        "job_ratio": ("main job with a server: flow / bare Ray script", "x"),
        "job_eph": ("main job without a server, first run (starts the default server), process start to exit", "s"),
        "job_default": ("main job without a server, later run (default server reused), process start to exit", "s"),
        "job_default_ratio": ("main job on the default path, server reused: flow / bare Ray script", "x"),
    }
    lines = [
        "## What changed since the last run",
        "",
        f"The last full run ({PREVIOUS_RUN}) was made before: the local environment build run through "
        "prefect-shell's ShellOperation, its output streamed into the run log (the module is imported on the local "
        "path); a still-queued head job cancelled at once at teardown; and the user job submitted again while Ray's "
        "job head has no agent yet (no cost when it has one). The machine was slower on this run: the baselines "
        "themselves took 10-25% longer (bare 3-node start 12.95 s then, 16.18 s now), so compare the ratios.",
        "",
        "| figure | last run | this run |",
        "|---|---|---|",
    ]
    for key, (name, unit) in names.items():
        digits = 3 if key == "setup" else 0 if key.endswith("hwm") else 2
        lines.append(f"| {name} | {fmt(PREVIOUS[key], unit, digits)} | {fmt(now[key], unit, digits)} |")
    return [*lines, ""]


def report(results: dict) -> str:
    m, s = results["machine"], summarize(results)
    T = TARGETS
    lines = [
        "# Benchmarks",
        "",
        f"Measured {m['date']} at commit {m['commit']} with",
        "",
        "```bash",
        f"{results['command']}",
        "```",
        "",
        f"(`.venv/bin/python -m bench --help` for the options; every figure is the median of "
        f"{results['args']['reps']} runs; the whole run took {results['total_s'] / 60:.1f} min.)",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPUs (nproc) | {m['nproc']} ({m['cpu']}) |",
        f"| memory | {m['memory_gib']} GiB |",
        f"| kernel / OS | {m['kernel']} / {m['os']} |",
        f"| load average at start | {' '.join(m['loadavg_start'])} (other sessions share this machine; each run "
        f"waited up to 8 s for the CPUs to be under 25% busy: median {fmt((s.get('busy_before') or 0) * 100, '%', 0)} "
        f"busy just before a run) |",
        f"| Python | {m['python']} |",
        f"| Ray | {m['ray']} |",
        f"| Prefect | {m['prefect']} |",
        f"| Slurm | {m['slurm']} (the 3-node bed of `tests/bed/`: network namespaces on this one machine) |",
        "",
        *changes_section(s),
        "## Figures",
        "",
        "| figure | value | target | result |",
        "|---|---|---|---|",
    ]
    row = lambda *cells: lines.append("| " + " | ".join(cells) + " |")  # noqa: E731
    if s.get("cold_uv") or s.get("cold_pip"):
        n = s["cold_n"]
        row(f"cold environment: `setup_ray.sh` builds `ray[default]` into a fresh work dir with uv (fresh UV_CACHE_DIR; "
            f"{n['uv']} run(s))", fmt(s["cold_uv"]), "", "")
        row(f"cold environment: the same with pip (`AR_UV=0`, PIP_NO_CACHE_DIR=1; {n['pip']} run(s))",
            fmt(s["cold_pip"]), "", "")
        row("**cold environment: uv / pip**", fmt(s.get("cold_ratio"), "x"), f"<= {T['cold_ratio']}x",
            verdict(s.get("cold_ratio"), T["cold_ratio"]))
    if s.get("job_bare"):
        row("main job: bare Ray script (`ray start --head`, `ray job submit` of examples/hello_ray.py, head stopped)",
            fmt(s["job_bare"]) + f" (head up after {fmt(s['job_bare_head'])})", "", "")
        row("main job: flow `--user-script examples/hello_ray.py`, process start to exit, cluster gone (server running)",
            fmt(s["job_flow"]), "", "")
        row("**main job with a Prefect server: flow / bare Ray script**", fmt(s.get("job_ratio"), "x"),
            f"<= {T['main_job']}x", verdict(s.get("job_ratio"), T["main_job"]))
        row("**main job on the default path (no PREFECT_API_URL), second run: the user's server reused: flow / bare Ray script**",
            fmt(s.get("job_default_ratio"), "x"), f"<= {T['main_job_default']}x",
            verdict(s.get("job_default_ratio"), T["main_job_default"]))
        row("main job without a server, first run (no PREFECT_API_URL: the run starts the user's default server)",
            fmt(s["job_eph"]) + f" (\"Beginning flow run\" after {fmt(s['job_eph_begin'])}; with a server "
            f"{fmt(s['job_flow_begin'])})", "", "")
        row("main job without a server: flow / bare Ray script (shown, no target: see below)",
            fmt(s.get("job_eph_ratio"), "x"), "(none)", "")
    if s.get("floor"):
        row("local: bare floor, `ray start --head --block` with the flow's flags, until ALIVE", fmt(s["floor"]), "", "")
        row("local: the same with Ray's default ports (reference, not used in ratios)", fmt(s["floor_plain"]), "", "")
        row("local: flow time-to-ready from \"Beginning flow run\" (server running)", fmt(s["local_ready_begin"]), "", "")
        row("local: flow time-to-ready from process start (server running)", fmt(s["local_ready"]), "", "")
        row("**local: flow / floor, from flow start** (the target's figure)", fmt(s.get("local_ratio_begin"), "x"),
            f"<= {T['local_ratio']}x", verdict(s.get("local_ratio_begin"), T["local_ratio"]))
        row("local: flow / floor, from process start", fmt(s.get("local_ratio_process"), "x"), "(none)", "")
        row("local: flow time-to-ready, no PREFECT_API_URL (temporary server), from process start",
            fmt(s["eph_ready"]), "", "")
        row("local: same, from \"Beginning flow run\"", fmt(s["eph_ready_begin"]), "", "")
        row("local: flow / floor with a temporary server (from flow start / process start)",
            f"{fmt(s.get('eph_ratio_begin'), 'x')} / {fmt(s.get('eph_ratio_process'), 'x')}", "", "")
        row("Prefect server start (`prefect server start` to /api/health)", fmt(s["server_start"]), "", "")
        row("local: teardown, SIGTERM to no supervisor and no Ray process of the cluster", fmt(s["local_teardown"]),
            f"<= {T['teardown_s']:g}s", verdict(s["local_teardown"], T["teardown_s"]))
        row("local: SIGTERM to the flow process's exit", fmt(s["local_exit"]), "", "")
        row("local: Ray itself ready (head registered in its GCS) after start: floor / flow",
            f"{fmt(s['floor_ray_ready'])} / {fmt(s['local_ray_ready'])}", "", "")
        row("local: flow's detection lag (connection info written after the head registered)", fmt(s["local_lag"]), "", "")
    top = s.get("top")
    table = s.get("table", {})
    if top:
        flow = table.get(("flow", top), {})
        row(f"Slurm {top} nodes: flow time-to-ready from process start", fmt(flow.get("ready")), "", "")
        row(f"Slurm {top} nodes: flow time-to-ready from \"Beginning flow run\"", fmt(flow.get("begin")), "", "")
        row(f"Slurm {top} nodes: flow's detection lag (connection info after the last node registered in the GCS)",
            fmt(flow.get("lag")), "", "")
        row(f"Slurm {top} nodes: SIGTERM to the flow process's exit", fmt(flow.get("exit")), "", "")
        row(f"Slurm {top} nodes: (a) fixed-sleep template, sbatch to its user-script line",
            fmt(table.get(("template", top), {}).get("ready")), "", "")
        row(f"Slurm {top} nodes: (b) bare parallel start, sbatch to all ALIVE",
            fmt(table.get(("bare", top), {}).get("ready")), "", "")
        if s.get("template_target"):
            row(f"**Slurm {top} nodes: flow / (a) template**", fmt(s.get("vs_template"), "x"), f"<= {T['vs_template']}x",
                verdict(s.get("vs_template"), T["vs_template"]))
        elif not s["template_covers"].get(top):
            row(f"Slurm {top} nodes: flow / (a) template (no target: the template's sleeps ended before its nodes "
                "were ALIVE, so its ready line is not a cluster that is ready; (b) is the comparison)",
                fmt(s.get("vs_template"), "x"), "(none)", "")
        else:
            row(f"Slurm {top} nodes: flow / (a) template (no target: its sleeps are shorter than Ray's own start "
                f"with the target's margin, bare parallel / template = {fmt(s.get('bare_vs_template'), 'x')} > "
                f"{T['vs_template']}x, so no launcher could meet it; (b) is the comparison)",
                fmt(s.get("vs_template"), "x"), "(none)", "")
        row(f"**Slurm {top} nodes: flow / (b) bare parallel**", fmt(s.get("vs_bare"), "x"), f"<= {T['vs_bare']}x",
            verdict(s.get("vs_bare"), T["vs_bare"]))
        q = s.get("queued")
        if q:
            row(f"Slurm {q['nodes']} nodes, cold first run on a queued job: flow time-to-ready from process start "
                f"(nodes held {q['hold']:g}s by another job)", fmt(q["ready"]), "", "")
            row(f"... its parts: build {fmt(q['build'])} (the cold uv build above), queue {fmt(q['queue'])} (the flow's "
                f"job submitted at {fmt(q['submitted'])}, running at {fmt(q['job_started'])}, environment ready at "
                f"{fmt(q['environment'])}), start {fmt(q['start'])} (warm flow, {q['nodes']} nodes, this run)",
                f"max(build, queue) + start = {fmt(q['ideal'])}", "", "")
            row(f"**Slurm {q['nodes']} nodes, cold and queued: flow / (max(build, queue) + start)**",
                fmt(q.get("ratio"), "x"), f"<= {T['queued']}x", verdict(q.get("ratio"), T["queued"]))
        row(f"**Slurm teardown ({top} nodes): SIGTERM to no job and no Ray process** (median, max of {flow.get('n')})",
            f"{fmt(s.get('slurm_teardown'))} (max {fmt(s.get('slurm_teardown_max'))})", f"<= {T['teardown_s']:g}s",
            verdict(s.get("slurm_teardown"), T["teardown_s"]))
        if s.get("scale"):
            sc = s["scale"]
            row(f"**worker job: `scale --add 1` to its node alive on the head's dashboard** (median of {sc['n']})",
                f"{fmt(sc['add'])} ({fmt(sc['add_wall'])} with the command's own start)", "", "")
            row("... against a bare 1-node job's ready time in this run (sbatch to the node alive)",
                fmt(sc.get("vs_bare"), "x"), "", "")
            row("worker job: `scale --remove 1` to its node gone", fmt(sc["remove"]), "", "")
            row("**adaptive: a task asking for more CPUs than the cluster has, to its worker job submitted**",
                fmt(sc["demand"]), "", "")
        if s.get("scaling") is not None:
            low = min(s["node_counts"])
            if s.get("scaling_bare") and s["scaling_bare"] > T["scaling"]:
                # like the template's: a target Ray's own start misses here is not one on this project
                row(f"Slurm scaling: flow t({top})/t({low}) (no target on this bed: Ray's own parallel start scales "
                    f"{fmt(s['scaling_bare'], 'x')} here, over the {T['scaling']}x target, see below; the flow / bare "
                    f"parallel rows are the comparison)", fmt(s["scaling"], "x"), "(none)", "")
            else:
                row(f"**Slurm scaling: flow t({top})/t({low})**", fmt(s["scaling"], "x"), f"<= {T['scaling']}x",
                    verdict(s["scaling"], T["scaling"]))
            row(f"Slurm scaling: bare parallel t({top})/t({low}), for reference", fmt(s.get("scaling_bare"), "x"), "", "")
            row(f"Slurm scaling: Ray itself (bare, last node registered in the GCS) t({top})/t({low})",
                fmt(s.get("scaling_ray"), "x"), "", "")
    if s.get("setup") is not None:
        row("**warm environment setup: `scripts/setup_ray.sh` reuse path**", fmt(s["setup"], "s", 3),
            f"<= {T['setup_s']:g}s", verdict(s["setup"], T["setup_s"]))
        row("warm setup: no pip call (pip shim on PATH recorded nothing, output says `reused`, no venv made)",
            "yes" if s["setup_no_pip"] else "**no**", "yes", "pass" if s["setup_no_pip"] else "**miss**")
    if s.get("local_hwm"):
        row("controller peak memory: flow process VmHWM, local, server running", fmt(s["local_hwm"], " MiB", 0), "", "")
    if s.get("slurm_hwm"):
        row("controller peak memory: flow process VmHWM, Slurm", fmt(s["slurm_hwm"], " MiB", 0), "", "")
    if s.get("eph_tree"):
        row("controller peak memory with a temporary server: flow VmHWM / flow + children RSS",
            f"{fmt(s['eph_hwm'], ' MiB', 0)} / {fmt(s['eph_tree'], ' MiB', 0)}", "", "")
    if results.get("bed"):
        row("bed bring-up (not a target)", fmt(results["bed"]["up_s"]) +
            (" (waited for another bed)" if results["bed"]["waited_for_other_bed"] else ""), "", "")
    row("left behind after the benchmark (Ray processes, Slurm jobs, bed, temp dirs)",
        "nothing" if not results["leftovers"] else "; ".join(results["leftovers"])[:300], "nothing",
        "pass" if not results["leftovers"] else "**miss**")
    if table:
        lines += [
            "",
            "## Time-to-ready vs nodes (Slurm bed)",
            "",
            "![time to ready vs nodes](bench_time_to_ready.png)",
            "",
            "Median (min-max) seconds from `python -m flows.ray_cluster` starting (flow) or `sbatch` being "
            "called (baselines) until every node is usable.",
            "",
            "| nodes | flow (process start) | flow (from \"Beginning flow run\") | (b) bare parallel | "
            "(a) template, its ready line | (a) template, nodes actually alive | Ray ready in GCS: flow / bare / template "
            "| flow teardown | flow / (a) | flow / (b) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n in s["node_counts"]:
            f, b, t = table.get(("flow", n), {}), table.get(("bare", n), {}), table.get(("template", n), {})
            span = lambda d: f"{fmt(d.get('ready'))} ({fmt(d.get('ready_min'), '')}-{fmt(d.get('ready_max'), '')})" if d else "n/a"  # noqa: E731
            ratio = lambda a, b: fmt(a / b, "x") if a and b else "n/a"  # noqa: E731
            lines.append(
                f"| {n} | {span(f)} | {fmt(f.get('begin'))} | {span(b)} | {span(t)} | {fmt(t.get('all_alive'))} | "
                f"{fmt(f.get('ray_ready'), '')} / {fmt(b.get('ray_ready'), '')} / {fmt(t.get('ray_ready'), '')} | "
                f"{fmt(f.get('teardown'))} | {ratio(f.get('ready'), t.get('ready'))} | {ratio(f.get('ready'), b.get('ready'))} |"
            )
    if s.get("scaling_ray"):
        lines += [
            "",
            f"On this bed Ray itself (bare start, last node registered in the GCS) takes {fmt(s['scaling_ray'], 'x')} "
            f"as long for {top} nodes as for {min(s['node_counts'])}: every \"node\" shares the same "
            f"{m['nproc']} CPUs, and starting Ray is CPU-bound. The scaling target can only be judged on nodes "
            "with CPUs of their own.",
        ]
    local = [r for r in results.get("local_flow", []) if r.get("ok")]
    slurm_top = [r for r in s.get("by", {}).get(("flow", top), [])] if top else []
    if local or slurm_top:
        lines += ["", "## Where the flow's seconds go (median per phase, from the flow log's timestamps)", ""]
        lines += ["| phase (ends at the log line) | local, 1 node | " + (f"Slurm, {top} nodes |" if slurm_top else ""),
                  "|---|---|" + ("---|" if slurm_top else "")]
        local_phases, slurm_phases = dict(phase_table(local)), dict(phase_table(slurm_top))
        for name in dict.fromkeys([*local_phases, *slurm_phases]):
            lines.append(f"| {name} | {fmt(local_phases.get(name))} | " +
                         (f"{fmt(slurm_phases.get(name))} |" if slurm_top else ""))
        lag = lambda runs: median([r.get("detect_lag_s") for r in runs])  # noqa: E731
        lines.append("| *of which: detection lag (connection info written after the last node registered in "
                     f"the head's GCS)* | {fmt(lag(local))} | " + (f"{fmt(lag(slurm_top))} |" if slurm_top else ""))
    lags = [(f"local {i + 1}", r.get("detect_lag_s")) for i, r in enumerate(local)]
    lags += [(f"Slurm {r['nodes']}n", r.get("detect_lag_s")) for r in results.get("slurm", [])
             if r.get("method") == "flow" and r.get("ok")]
    if lags:
        lines += [
            "",
            "The readiness loop (`tasks/readiness.py`, `wait_until_ready`) backs off (0.1 s, 1.5 times longer "
            "after every poll, up to 2 s) only while the job waits in the queue; once it runs, it looks for the "
            "head's head.env every 0.25 s, then polls the dashboard every 0.25 s until every node is ALIVE, so "
            "\"dashboard answers\" and \"nodes joining\" above are Ray's own start plus at most a quarter "
            "second. Detection lag of every flow run (s): "
            + ", ".join(f"{name} {fmt(lag, '')}" for name, lag in lags) + ".",
        ]
    if s["failures"]:
        lines += ["", "## Failed runs (not in the medians)", ""] + [f"- {f}" for f in s["failures"]]
    lines += [
        "",
        "## How each figure is measured",
        "",
        "- **Flow time-to-ready**: `python -m flows.ray_cluster --keep-alive --info-file F` with 0.5 GB Ray memory "
        "and 0.25 GB object store per node, 1 CPU; from the process's start, and from its \"Beginning flow run\" log "
        "line (Prefect's own timestamp), to F's mtime. The target ratio uses the figure from \"Beginning flow run\" "
        "(flow start); the process-start figure adds Python start-up, imports and the API round trips before the run.",
        "- **Local floor**: `ray start --head --block` with the same resources, its own `--temp-dir`, token auth, "
        "the dashboard on 127.0.0.1 and the same explicit port flags as the flow's nodes (`scripts/ray_lib.sh`), "
        "polled every 50 ms until `/api/v0/nodes` lists the node ALIVE (the flow's own readiness test); stopped by "
        "its process group, never `ray stop`. The same start with Ray's default ports is shown for reference.",
        "- **Temporary server**: the same flow with no `PREFECT_API_URL`, so Prefect starts a server of its own in "
        "the flow process; the server-start row is `prefect server start` on loopback until `/api/health` answers.",
        "- **(a) fixed-sleep template**: Ray's `slurm-basic.sh` as documented (head via `srun -w`, `sleep 10`, each "
        "worker via `srun -w node ray start --block &` then `sleep 5`), plus a `--temp-dir` per node, explicit "
        "`--address`, small memory and token auth; time from `sbatch` to the point where the template starts the "
        "user's script. A poller started with the job also records when every node really was ALIVE.",
        "- **(b) bare parallel**: `ray start --head --block &`, then one `srun` step that starts every worker at "
        "once, with the flow's port flags, polled (head node, 100 ms) until all are ALIVE. Its teardown is not a "
        "figure: `scancel` alone leaves the head's Ray processes running for 30-60 s on this bed (`ray start "
        "--block` exits first and its children leave the step), so the benchmark SIGKILLs them after 5 s.",
        "- **Ray ready in GCS**: the time the head's `gcs_server.out` logged \"Registering new node\" for the last "
        "node (a node is ALIVE from then on): when Ray itself was ready, whoever was polling. The flow's detection "
        "lag is its connection-info time minus that.",
        "- **Teardown**: SIGTERM to the flow process (as a batch system or a Prefect worker sends it), until "
        "`squeue` lists no job and no process of the cluster (`/<cluster_id>-` in its command line) is left.",
        "- **Cold environment**: `bash scripts/setup_ray.sh <ray version> <fresh work dir>` (no candidate Python, so "
        "it builds `ray[default]` from PyPI), timed to its exit plus a check that the venv has that Ray. uv: this "
        "venv's uv alone on PATH, a fresh empty `UV_CACHE_DIR` per run (deleted after); pip: `AR_UV=0`, "
        "`PIP_NO_CACHE_DIR=1`, no uv on PATH. Both use the machine's python3.11 as base. Runs interleave (uv, pip, "
        "uv). The network (PyPI, its CDN) is shared and varies: this row is the only one that leaves the machine.",
        "- **Cold first run on a queued job**: a job holding every bed node (`sbatch --exclusive --wrap 'sleep "
        f"{HOLD_S}'`) is running when the flow starts, so the flow's job pends in the queue; the bed's namespaces have "
        "no route to PyPI, so the environment step is made cold by `--setup-commands` sleeping, on the login node "
        "only, for the cold uv build time measured above (the flow's own interpreter is then reused). queue = the "
        "flow's \"submitted to\" log line to its job RUNNING in `squeue` (polled every 0.2 s); start = the warm flow's "
        "time-to-ready at the same node count in this run (from process start); the target compares the flow's "
        "time-to-ready from process start with max(build, queue) + start.",
        "- **Main job**: the flow `--user-script examples/hello_ray.py` (local, no `--keep-alive`) from process start "
        "to its exit with no process of the cluster left; the bare Ray script: `ray start --head` with the flow's "
        "flags and token auth, `ray job submit` of the same script (its output checked), then the head's processes "
        "SIGKILLed (found by its temp dir: `ray stop` would stop every Ray on the machine) until none is left. "
        "Without a server, Prefect starts a temporary server inside the flow process (its start, about the server "
        "start row above, and its shutdown are part of every run): `make server` (scripts/prefect_server.sh) "
        "starts a lasting one and sets PREFECT_API_URL in the Prefect profile, and the target applies to that case.",
        "- **Warm setup**: `bash scripts/setup_ray.sh <ray version> <empty work dir> <this venv's python>`, with "
        "shims named pip, pip3, pip3.11 and uv first on PATH that record any call.",
        "- **Peak memory**: `/proc/<pid>/status` VmHWM of the flow process, and the sum of VmRSS over the flow and "
        "its children (including a temporary Prefect server), sampled every 0.25 s.",
        "- The bed's 3 nodes and the controller share the same 2 CPUs: Ray's start-up is CPU-bound (about 9 CPU-s "
        "for 3 nodes), so more nodes start slower here than on a real cluster, for the flow and the baselines "
        "alike: compare the scaling of Ray itself (bare, GCS) with the flow's.",
        "- Other sessions share this machine: runs are interleaved (floor and flow alternate; flow, bare and "
        "template rotate) so that a busy moment does not hit one method only, yet single runs still vary by about "
        "+-1 s; see the min-max columns and `.bench/results.json` for every run.",
    ]
    return "\n".join(lines) + "\n"


def print_summary(results: dict) -> None:
    s = summarize(results)
    keys = ["busy_before", "floor", "floor_plain", "floor_ray_ready", "local_ray_ready", "local_lag", "local_exit", "local_ready_begin", "local_ready", "local_ratio_begin", "local_ratio_process", "eph_ready",
            "eph_ready_begin", "server_start", "local_teardown", "vs_template", "vs_bare", "slurm_teardown",
            "slurm_teardown_max", "scaling", "setup", "setup_no_pip", "local_hwm", "slurm_hwm", "eph_hwm", "eph_tree"]
    for key in keys:
        if key in s:
            value = s[key]
            print(f"  {key:22s} {value:.3f}" if isinstance(value, float) else f"  {key:22s} {value}")
    for (method, nodes), row in sorted(s.get("table", {}).items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"  slurm {method:8s} {nodes}n  ready {fmt(row['ready'])}  begin {fmt(row['begin'])}  "
              f"alive {fmt(row['all_alive'])}  ray {fmt(row['ray_ready'])}  lag {fmt(row['lag'])}  "
              f"teardown {fmt(row['teardown'])}  exit {fmt(row['exit'])}")
    for failure in s["failures"]:
        print(f"  FAILED {failure}")
    print(f"  left behind: {results['leftovers'] or 'nothing'}")


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--poll-alive"]:
        return poll_alive_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2,
                        help="runs per figure (median); default 2 (the whole run stays under 20 min)")
    parser.add_argument("--nodes", default="1,2,3", help="Slurm node counts, comma separated; default 1,2,3")
    parser.add_argument("--sections", default="local,setup,cold,slurm",
                        help="any of local,setup,cold,slurm; default all (cold reaches PyPI)")
    parser.add_argument("--build-s", type=float, default=None,
                        help="the queued-job row's build time when the cold section is not run (default: skip that row)")
    parser.add_argument("--no-write", action="store_true", help="print only: leave BENCHMARKS.md and the plot alone")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite BENCHMARKS.md and the plot from the last .bench/results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads((BENCH / "results.json").read_text())
        print_summary(results)
        write_report(results)
        return 0
    sections = set(args.sections.split(","))
    node_counts = sorted({int(n) for n in args.nodes.split(",")})
    BENCH.mkdir(exist_ok=True)
    command = ".venv/bin/python -m bench " + " ".join(shlex.quote(a) for a in argv) if argv else \
        "make bench   # = .venv/bin/python -m bench"
    results: dict = {"machine": machine_facts(), "command": command, "args": vars(args),
                     "ray_before": sorted(ray_processes())}
    if (Path.home() / ".ray" / "auth_token").exists():
        log("warning: ~/.ray/auth_token exists; Ray heads will turn token auth on by themselves")
    foreign = marker_pids("raylet")
    if foreign:
        log(f"warning: {len(foreign)} raylet(s) of someone else are running: timings share the CPUs with them")
    home = BENCH / "prefect-home"
    home.mkdir(exist_ok=True)
    started = time.time()
    server = PrefectServer(home)
    try:
        if sections & {"local", "slurm"}:
            server.start()
            results["server_start_s"] = server.start_s
            log(f"prefect server up in {server.start_s:.2f}s on {server.url}")
        if "setup" in sections:
            bench_setup(max(args.reps, 5), results)
            log(f"setup_ray.sh reuse: {median(results['setup']['times_s']):.3f}s, pip calls {results['setup']['pip_calls']}")
        if "cold" in sections:
            bench_cold(results)
        if "local" in sections:
            bench_local(args.reps, server, results)
            bench_main_job(args.reps, server, results)
        if "slurm" in sections:
            uv_cold = median([r.get("time_s") for r in results.get("cold", []) if r.get("ok") and r["tool"] == "uv"])
            bench_slurm(args.reps, node_counts, server, results, uv_cold or args.build_s)
        server.stop()  # the temporary-server runs share its database
        if "local" in sections:
            bench_local_ephemeral(args.reps, home, results)
            bench_main_job_default(args.reps, home, results)
    finally:
        server.stop()
        results["total_s"] = time.time() - started
        results["leftovers"] = leftovers(results)
        if server.process and server.process.poll() is None:
            results["leftovers"].append("the benchmark's Prefect server")
        (BENCH / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print_summary(results)
    if not args.no_write:
        write_report(results)
    return 0


def write_report(results: dict) -> None:
    note = plot(summarize(results), REPO / "bench_time_to_ready.png") if results.get("slurm") else "no Slurm runs"
    if note:
        log(f"plot not written: {note}")
    (REPO / "BENCHMARKS.md").write_text(report(results))
    log("wrote BENCHMARKS.md" + ("" if note else " and bench_time_to_ready.png"))


if __name__ == "__main__":
    sys.exit(main())
