"""The local benchmarks, for real: `python -m bench.local` (what `python -m bench --sections local`
runs): the flow's time-to-ready on this machine against a bare `ray start --head` floor, with a
running Prefect server and then with a temporary one, and the main job (a user script) against
a bare `ray start` + `ray job submit`."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import runner
from bench.common import (
    BENCH,
    FLOW_SIZE,
    MARK,
    PY,
    RAY,
    RAY_RESOURCES,
    REPO,
    VENV_BIN,
    LineClock,
    MemorySampler,
    _stat,
    alive_count,
    flow_like_ports,
    gcs_registrations,
    kill_if_same,
    kill_marker,
    kill_pids,
    log,
    marker_pids,
    ray_processes,
    record_failure,
    run_flow,
    wait_quiet,
    wait_until,
)
from bench.runner import Run, Section
from tasks.atomic_file import write_text_atomic
from tasks.settings import node_tmp_name
from tests.helpers import PrefectServer, free_port, prefect_env

MAIN_JOB = REPO / "examples" / "hello_ray.py"


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
        record_failure(result, exc, "bare main job")
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
    runs: list[dict] = []
    first: dict = {}
    try:
        first = flow_main_job("job-default-first", env, state)
        log(f"main job, default server started by the run: {first.get('total_s')}s")
        for rep in range(reps):
            runs.append(flow_main_job("job-default", env, state))
            log(f"main job, default server reused {rep + 1}/{reps}: {runs[-1].get('total_s')}s")
    finally:
        subprocess.run([PY, "-m", "flows.user_server", "stop"], cwd=REPO, env=env, check=False, timeout=60)
    results["job_ephemeral"] = [first]  # the key of the runs that pay a server's start
    results["job_default"] = runs


def _local(run: Run) -> None:
    bench_local(run.args.reps, run.server, run.results)
    bench_main_job(run.args.reps, run.server, run.results)


def _local_without_server(run: Run) -> None:
    bench_local_ephemeral(run.args.reps, run.home, run.results)
    bench_main_job_default(run.args.reps, run.home, run.results)


LOCAL = Section("local", 2, _local, after_server=_local_without_server, needs_server=True)


def main(argv: list[str] | None = None) -> int:
    return runner.main(argv, "python -m bench.local", __doc__.split("\n\n")[0], [LOCAL])


if __name__ == "__main__":
    sys.exit(main())
