"""OpenPBS time-to-ready, for real: `python -m bench.openpbs [--reps N]`.

On the site bed with its real OpenPBS (tests/bed/openpbs.py), 3 chunks with
place=scatter: the flow (`--pbs.select 3:ncpus=1`, from the process start to its
connection-info JSON, teardown from SIGTERM to no job and no Ray process) against a
bare floor measured in the same run: one job whose script starts the head and then
every other node at once with one `pbsdsh` (each node retrying a failed `ray start`,
as the raylet's fixed wait for its agent can fail on a busy machine), polled until
the head's dashboard lists every node ALIVE, timed from its `qsub`. The order of the
two alternates between repetitions. Not a timed test: it writes its figures to
.bench/openpbs.json and to the OpenPBS section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import secrets
import shlex
import shutil
import sys
import time
from pathlib import Path

from bench.common import (
    BENCH,
    MEMORY_GB,
    OBJECT_STORE_GB,
    RAY_RESOURCES,
    REPO,
    flow_like_ports,
    job_marks,
    kill_marker,
    kill_pids,
    log,
    median,
    ray_processes,
    record_failure,
    run_flow_on_bed,
    wait_quiet,
    wait_until,
)
from tasks.atomic_file import write_text_atomic
from tasks.schedulers import mem_mb
from tasks.settings import RayClusterSettings

NODES = 3
TARGET = 1.10  # flow / floor
PBS_MEM_MB = mem_mb(RayClusterSettings(scheduler="pbs", ray_memory_gb=MEMORY_GB, object_store_memory_gb=OBJECT_STORE_GB))
SECTION_START, SECTION_END = "<!-- openpbs bench: start -->", "<!-- openpbs bench: end -->"

FLOOR_JOB = """#!/bin/bash
#PBS -N {tag}
#PBS -l select={nodes}:ncpus=1:mem={mem}mb
#PBS -l place=scatter
#PBS -l walltime=00:10:00
#PBS -j oe
#PBS -o {dir}/job.out
# The floor: the head, then every other node at once with one pbsdsh, polled until all are ALIVE.
mark() {{ echo "$(date +%s.%N) $1" >>{dir}/marks; }}
mark start
head=$(hostname -s)
head_ip=$(hostname -I | awk '{{print $1}}')
{poller} &
{auth} {ray} start --head --node-ip-address="$head_ip" --temp-dir={tmp}-"$head" {resources} {head_ports} --block &
pbsdsh -- /bin/bash {dir}/worker.sh "$head" "$head_ip" &
wait
"""
FLOOR_WORKER = """#!/bin/bash
# one pbsdsh task per chunk: the head's returns at once; each other node retries a failed start
here=$(hostname -s)
[ "$here" = "$1" ] && exit 0
for _ in 1 2 3 4 5; do
    {auth} {ray} start --address="$2":6379 --node-ip-address="$(hostname -I | cut -d' ' -f1)" \\
        --temp-dir={tmp}-"$here" {resources} {ports} --block && exit 0
    sleep 1
done
"""


class OpenPBSBench:
    def __init__(self, bed, openpbs, server):
        self.bed, self.openpbs, self.server = bed, openpbs, server
        self.home = bed.home_dir("bench-openpbs")  # the bed user's, on the shared filesystem
        self.work = self.home / "w"

    def settle(self) -> None:
        wait_until(lambda: not self.openpbs.live_jobs(), 60, "no OpenPBS job", 0.2)
        self.openpbs.wait_nodes_free()

    def flow(self) -> dict:
        self.settle()
        args = ["--scheduler", "pbs", "--pbs.select", f"{NODES}:ncpus=1", "--pbs.walltime", "00:10:00",
                "--work-dir", str(self.work), "--readiness-timeout", "180"]
        run = run_flow_on_bed(self.bed, self.server.url, self.home, "openpbs", NODES, args, self.openpbs.live_jobs,
                              scheduler_env=self.openpbs.env())
        return {"method": "flow", "ok": run.ok, "error": run.error, "ready_s": run.ready_s,
                "ready_from_begin_s": run.ready_from_begin_s, "teardown_s": run.teardown_s,
                "ray_ready_s": run.ray_ready_s, "cluster_id": run.cluster_id}

    def qdel(self, job_id: str, result: dict) -> None:
        """The floor's job deleted; its teardown_s when it is gone within 60 s."""
        stop = time.time()
        self.openpbs.run(["qdel", job_id], user=self.bed.user, timeout=30)
        try:
            wait_until(lambda: not self.openpbs.live_jobs(), 60, "floor job gone", 0.2)
            result["teardown_s"] = time.time() - stop
        except TimeoutError:
            pass

    def floor(self) -> dict:
        self.settle()
        ray_before = ray_processes()
        tag = f"arbench-pbs-{secrets.token_hex(3)}"
        job_dir = self.home / tag
        job_dir.mkdir()
        token_file = job_dir / "token"
        write_text_atomic(token_file, secrets.token_hex(32), 0o600)
        tmp = f"/tmp/{tag}"
        ray = shlex.quote(str(self.bed.user_venv / "bin" / "ray"))
        auth = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={shlex.quote(str(token_file))}"
        poller = (f"(cd {shlex.quote(str(self.bed.repo))} && {shlex.quote(self.bed.user_python)} -m bench "
                  f"--poll-alive {NODES} 8265 {shlex.quote(str(token_file))} {shlex.quote(str(job_dir / 'marks'))})")
        common = {"dir": shlex.quote(str(job_dir)), "tmp": tmp, "resources": RAY_RESOURCES, "ray": ray, "auth": auth}
        (job_dir / "job.sh").write_text(FLOOR_JOB.format(
            tag=tag, nodes=NODES, mem=PBS_MEM_MB, poller=poller,
            head_ports=" ".join(flow_like_ports(6379, 8265, 10001, list(range(6380, 6386)), 12000)), **common))
        (job_dir / "worker.sh").write_text(FLOOR_WORKER.format(
            ports=" ".join(flow_like_ports(0, 0, 0, list(range(6380, 6386)), 12000)), **common))
        shutil.chown(job_dir, self.bed.user.uid, self.bed.user.gid)
        for path in job_dir.iterdir():
            shutil.chown(path, self.bed.user.uid, self.bed.user.gid)
        marks = job_dir / "marks"
        result: dict = {"method": "floor", "ok": False, "busy_before": wait_quiet()}
        job_id = ""
        t0 = time.time()
        try:
            done = self.openpbs.run(["qsub", "-f", str(job_dir / "job.sh")], user=self.bed.user, cwd=job_dir, timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"qsub: {done.stderr}")
            job_id = done.stdout.strip()
            wait_until(lambda: marks.exists() and " alive" in marks.read_text(), 180, "floor nodes alive", 0.05)
            stamps = job_marks(marks, t0)
            result.update(ready_s=stamps["alive"], job_start_s=stamps["start"], ok=True)
        except Exception as exc:
            record_failure(result, exc, "floor")
        finally:
            if job_id:
                self.qdel(job_id, result)
            result["killed_after_qdel"] = kill_marker(tmp)
            result["orphans_killed"] = kill_pids(ray_processes() - ray_before)
            for node in self.bed.node_names:
                for path in self.bed.node_tmp(node).glob(f"{tag}-*"):
                    shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(job_dir, ignore_errors=True)
        return result


def measure(reps: int) -> dict:
    from tests.bed import TestBed
    from tests.bed.openpbs import OPENPBS_VERSION, OpenPBS, openpbs_missing
    from tests.helpers import PrefectServer
    from tests.nsrelay import NamespaceRelay

    bed = TestBed()
    missing = bed.requirements_missing() or openpbs_missing()
    if missing:
        raise RuntimeError(f"the OpenPBS bed cannot run here: {missing}")
    results: dict = {"openpbs": OPENPBS_VERSION, "nodes": NODES, "reps": reps, "runs": [],
                     "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    home = BENCH / "prefect-home-openpbs"
    home.mkdir(parents=True, exist_ok=True)
    server = PrefectServer(home).start()
    bed.up()
    openpbs = relay = None
    try:
        openpbs = OpenPBS(bed).up()
        bed.openpbs = openpbs
        relay = NamespaceRelay(f"/run/netns/{bed.netns[bed.login_host]}", server.port, server.port)
        bench = OpenPBSBench(bed, openpbs, server)
        for rep in range(reps):
            for method in (("flow", "floor") if rep % 2 == 0 else ("floor", "flow")):
                entry = bench.flow() if method == "flow" else bench.floor()
                entry["rep"] = rep
                results["runs"].append(entry)
                log(f"openpbs {method} {NODES}n {rep + 1}/{reps}: ready {entry.get('ready_s')}s, "
                    f"teardown {entry.get('teardown_s')}s {entry.get('error', '')}")
        results["jobs_left"] = openpbs.live_jobs()
    finally:
        if relay is not None:
            relay.close()
        if openpbs is not None:
            openpbs.down()
        bed.down()
        server.stop()
    return results


def summary(results: dict) -> dict:
    def figure(method: str, key: str) -> float | None:
        return median([r.get(key) for r in results["runs"] if r["method"] == method and r.get("ok")])

    flow, floor = figure("flow", "ready_s"), figure("floor", "ready_s")
    return {"flow_ready_s": flow, "floor_ready_s": floor, "ratio": flow / floor if flow and floor else None,
            "flow_ready_from_begin_s": figure("flow", "ready_from_begin_s"),
            "flow_teardown_s": figure("flow", "teardown_s"), "floor_teardown_s": figure("floor", "teardown_s")}


def section(results: dict) -> str:
    s = summary(results)

    def fmt(value, unit="s"):
        return "n/a" if value is None else f"{value:.2f}{unit}"

    verdict = "n/a" if s["ratio"] is None else ("met" if s["ratio"] <= TARGET else "missed")
    return "\n".join([
        SECTION_START,
        "## PBS (OpenPBS) 3-node time-to-ready",
        "",
        f"Measured {results['started']} with `.venv/bin/python -m bench.openpbs --reps {results['reps']}` "
        f"on the bed's real {results['openpbs']} (server on the login host, a MoM per node; "
        "medians; flow and floor alternate).",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| flow, `--pbs.select 3:ncpus=1`: process start to connection info | {fmt(s['flow_ready_s'])} | |",
        f"| flow, from its \"Beginning flow run\" line | {fmt(s['flow_ready_from_begin_s'])} | |",
        f"| floor: `qsub -f` to every node ALIVE (head, then one `pbsdsh ray start`) | {fmt(s['floor_ready_s'])} | |",
        f"| flow / floor | {fmt(s['ratio'], 'x')} | <= {TARGET}x: {verdict} |",
        f"| flow teardown (SIGTERM to no job, no Ray process) | {fmt(s['flow_teardown_s'])} | |",
        f"| floor teardown (`qdel` to no job) | {fmt(s['floor_teardown_s'])} | |",
        "",
        "The flow's figure includes its own start (Python, Prefect, the run's first API calls) and"
        " the environment check; the floor's starts at its `qsub`.",
        SECTION_END,
    ])


def write_section(results: dict, path: Path = REPO / "BENCHMARKS.md") -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = section(results)
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openpbs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="runs of each (median); default 3")
    parser.add_argument("--no-write", action="store_true", help="print only: leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    BENCH.mkdir(exist_ok=True)
    results = measure(args.reps)
    (BENCH / "openpbs.json").write_text(json.dumps(results, indent=1, default=str))
    print(section(results))
    if not args.no_write:
        write_section(results)
    return 0 if not results.get("jobs_left") else 1


if __name__ == "__main__":
    sys.exit(main())
