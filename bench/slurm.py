"""The Slurm benchmarks, for real: `python -m bench.slurm` (what `python -m bench --sections
slurm` runs): on the 3-node bed, the flow against Ray's fixed-sleep template and a bare parallel
start at each node count, worker jobs (`scale`, adaptive), and a cold first run on a queued job."""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from bench import runner
from bench.common import (
    BENCH,
    FLOW_SIZE,
    HOLD_S,
    MARK,
    MEMORY_GB,
    OBJECT_STORE_GB,
    PY,
    RAY_RESOURCES,
    REPO,
    VENV_BIN,
    FlowRun,
    flow_like_ports,
    gcs_registrations,
    job_marks,
    kill_marker,
    kill_pids,
    log,
    marker_pids,
    median,
    ray_processes,
    record_failure,
    run_flow_on_bed,
    wait_quiet,
    wait_until,
)
from bench.runner import Run, Section
from tasks.atomic_file import write_text_atomic
from tasks.schedulers import mem_mb
from tasks.settings import RayClusterSettings
from tests.helpers import PrefectServer

# what the flow asks sbatch for, so the baselines get the same allocation
SLURM_MEM_MB = mem_mb(RayClusterSettings(scheduler="slurm", ray_memory_gb=MEMORY_GB, object_store_memory_gb=OBJECT_STORE_GB))
QUEUED_NODES = 2


# ------------------------------------------------------------ Slurm section

# The job scripts compared with the flow, as str.format templates ({tag}, {nodes}, {mem},
# {dir}, {env}, {poller}, {tmp}, {resources}, {head_ports}, {ports}; braces doubled).
TEMPLATES = Path(__file__).resolve().parent / "templates"
# Ray's classic Slurm template (docs: slurm-basic.sh), with what this machine needs.
TEMPLATE_JOB = (TEMPLATES / "ray_docs_slurm_basic.sh.in").read_text()
# The floor: head, then every worker at once in one srun step, polled until all are ALIVE.
BARE_JOB = (TEMPLATES / "bare_parallel.sh.in").read_text()


class SlurmBench:
    def __init__(self, bed, server: PrefectServer, partition: str = "debug"):
        self.bed = bed
        self.server = server
        self.partition = partition  # "wide": every node of a bed with more than the usual 3
        self.home = bed.home_dir("bench")  # the bed user's, on the shared filesystem
        self.work = self.home / "w"

    def run_bed_flow(self, mode: str, nodes: int, args: list[str], ready_timeout: float = 240) -> FlowRun:
        return run_flow_on_bed(self.bed, self.server.url, self.home, mode, nodes, args, self.live_jobs,
                               ready_timeout=ready_timeout)

    def node_tmps(self, prefix: str) -> list[Path]:
        return [p for n in self.bed.wide_node_names for p in self.bed.node_tmp(n).glob(f"{prefix}-*")]

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

    def flow(self, nodes: int, *extra: str) -> FlowRun:
        self.settle()
        args = [
            "--scheduler", "slurm", "--slurm.nodes", str(nodes), "--slurm.walltime", "00:10:00",
            "--slurm.partition", self.partition, "--work-dir", str(self.work), "--readiness-timeout", "300", *extra,
        ]
        return self.run_bed_flow("slurm", nodes, args, ready_timeout=420)

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
            record_failure(result, exc, "queued run")
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
            record_failure(result, exc, "scaling runs")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return result

    def scancel(self, job_id: str, tmp: str, result: dict) -> None:
        """A baseline's job cancelled. scancel alone leaves the head's Ray running for 30-60 s
        here (`ray start --block` dies first, its children escape the step): give it 5 s, then
        SIGKILL what is left of this baseline (its temp dir is in every command line)."""
        stop = time.time()
        self.bed.run_login(["scancel", job_id], timeout=30)
        try:
            wait_until(lambda: not self.live_jobs() and not marker_pids(tmp), 5, "baseline teardown", 0.1)
            result["teardown_s"] = time.time() - stop
        except TimeoutError:
            result["killed_after_scancel"] = kill_marker(tmp)
            wait_until(lambda: not self.live_jobs(), 60, "baseline job gone", 0.2)

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
            tmp=tmp, resources=RAY_RESOURCES, partition=self.partition,
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

            wait_until(marked, 300, f"{kind} baseline at {nodes} node(s)", 0.05)
            if kind == "template":  # the poller started with the job: wait for it too
                try:
                    wait_until(lambda: " alive" in marks.read_text(), 60, "template's nodes alive", 0.05)
                except TimeoutError:
                    pass
            stamps = job_marks(marks, t0)
            result.update(ready_s=stamps[wanted], job_start_s=stamps["start"])
            if "alive" in stamps:
                result["all_alive_s"] = stamps["alive"]
            registered = sorted(t for node in self.node_tmps(tag) for t in gcs_registrations(str(node)))
            if len(registered) >= nodes:
                result["ray_ready_s"] = registered[nodes - 1] - t0
            result["ok"] = True
        except Exception as exc:
            record_failure(result, exc, f"{kind} baseline")
        finally:
            if job_id:
                self.scancel(job_id, tmp, result)
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


def _slurm(run: Run) -> None:
    node_counts = sorted({int(n) for n in run.args.nodes.split(",")})
    uv_cold = median([r.get("time_s") for r in run.results.get("cold", []) if r.get("ok") and r["tool"] == "uv"])
    bench_slurm(run.args.reps, node_counts, run.server, run.results, uv_cold or run.args.build_s)


SLURM = Section("slurm", 3, _slurm, needs_server=True)


def main(argv: list[str] | None = None) -> int:
    return runner.main(argv, "python -m bench.slurm", __doc__.split("\n\n")[0], [SLURM])


if __name__ == "__main__":
    sys.exit(main())
