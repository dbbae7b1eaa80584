"""The scale benchmark (issue 34), for real: `python -m bench.scale` (`make bench-scale`). On a
bed of 16 Slurm nodes (network namespaces on this one machine, partition "wide"), time to
ready of 1, 4, 8 and 16 nodes for the flow and for a bare parallel `ray start` floor (one srun
step, each node starting again when its start failed), both in the same run; the flow's
teardown at each size (SIGTERM to no job and no Ray process on any host); and the shared
filesystem's metadata operations per second of one running worker's supervisor (strace).

It writes its own section of BENCHMARKS.md (between the scale markers; the rest of the file
is left as it is) and bench_scale.png."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BENCH, FLOW_SIZE, REPO, log, median, record_failure
from tasks.shipped import SCRIPTS_DIR
from tests.helpers import PrefectServer, supervisor_metadata_ops

BEGIN, END = "<!-- scale: written by python -m bench.scale -->", "<!-- /scale -->"
NODE_COUNTS = [1, 4, 8, 16]
STRACE_S = 30
# how often a running node glances at the cluster dir: scripts/ray_lib.sh's default
AR_LOOK_EVERY = re.search(r'AR_LOOK_EVERY="\$\{AR_LOOK_EVERY:-(\d+)\}"', (SCRIPTS_DIR / "ray_lib.sh").read_text()).group(1)


def strace_metadata_ops(bed, cluster_dir: str, node: str, seconds: float = STRACE_S) -> dict:
    """Operations on the cluster dir by one worker's supervisor, per second (strace -f)."""
    on_dir = supervisor_metadata_ops(bed, node, cluster_dir, seconds, BENCH / f"strace-{node}.txt")
    return {"node": node, "seconds": seconds, "ops": len(on_dir), "per_s": len(on_dir) / seconds,
            "kinds": sorted({m.group(1) for line in on_dir if (m := re.search(r"(\w+)\(", line))})}


def steady_state(bed, server: PrefectServer, nodes: int = 4) -> dict:
    """A keep-alive cluster of `nodes`, ready; one worker's supervisor straced."""
    from tests.helpers import BackgroundFlow

    work = bed.home_dir("bench-quiet")
    result: dict = {"ok": False, "nodes": nodes}
    try:
        flow = BackgroundFlow(bed, ["--scheduler", "slurm", "--slurm.nodes", str(nodes), "--slurm.partition", "wide",
                                    "--slurm.walltime", "00:10:00", "--work-dir", str(work / "w"), "--keep-alive",
                                    "--num-cpus-per-node", "1", *FLOW_SIZE, "--readiness-timeout", "300"],
                              work, server.url)
        try:
            info = flow.wait_ready(420)
            time.sleep(5)  # past the start's own writes
            node = next(n["node"] for n in info["nodes"] if n["node"] != info["head_node"])
            cluster_dir = info.get("cluster_dir") or str(work / "w" / "clusters" / info["cluster_id"])
            result.update(strace_metadata_ops(bed, cluster_dir, node), ok=True)
        finally:
            flow.send_signal(signal.SIGINT)
            flow.wait(120)
            flow.kill()
    except Exception as exc:  # recorded: the rest of the report still gets written
        record_failure(result, exc, "steady-state strace")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def measure(reps: int, node_counts: list[int]) -> dict:
    from bench.slurm import SlurmBench
    from tests.bed import TestBed
    from tests.nsrelay import NamespaceRelay

    results: dict = {"node_counts": node_counts, "reps": reps, "runs": []}
    home = BENCH / "prefect-home-scale"
    home.mkdir(parents=True, exist_ok=True)
    server = PrefectServer(home)
    server.start()
    bed = TestBed(wide_nodes=max(16, max(node_counts)))
    t0 = time.time()
    bed.up()
    results["bed_up_s"] = time.time() - t0
    relay = NamespaceRelay(f"/run/netns/{bed.netns[bed.login_host]}", server.port, server.port)
    bench = SlurmBench(bed, server, partition="wide")
    try:
        for nodes in node_counts:
            for rep in range(reps):
                order = ["flow", "bare"] if rep % 2 == 0 else ["bare", "flow"]
                for method in order:
                    if method == "flow":
                        run = bench.flow(nodes, "--num-cpus-per-node", "1")
                        entry = {"method": "flow", "nodes": nodes, "ok": run.ok, "error": run.error,
                                 "ready_s": run.ready_from_begin_s, "ready_from_start_s": run.ready_s,
                                 "teardown_s": run.teardown_s}
                    else:
                        got = bench.baseline("bare", nodes)
                        entry = {"method": "bare", "nodes": nodes, "ok": got.get("ok"), "error": got.get("error", ""),
                                 "ready_s": got.get("ready_s")}
                    log(f"scale {method} {nodes}n {rep + 1}/{reps}: ready {entry['ready_s']}"
                        + (f", teardown {entry.get('teardown_s')}" if method == "flow" else ""))
                    results["runs"].append(entry)
        results["quiet"] = steady_state(bed, server)
        log(f"steady state: {results['quiet'].get('per_s')} metadata operations per second on one worker")
    finally:
        relay.close()
        results["jobs_left"] = bench.live_jobs()
        bed.down()
        server.stop()
        shutil.rmtree(bench.home, ignore_errors=True)
    return results


def summary(results: dict) -> dict:
    table: dict = {}
    for method in ("flow", "bare"):
        for nodes in results["node_counts"]:
            runs = [r for r in results["runs"] if r["method"] == method and r["nodes"] == nodes and r["ok"]]
            table[(method, nodes)] = {"ready": median([r["ready_s"] for r in runs]),
                                      "teardown": median([r.get("teardown_s") for r in runs if r.get("teardown_s")]),
                                      "ok": len(runs)}
    return table


def section(results: dict, table: dict) -> str:
    counts = results["node_counts"]
    rows = []
    for n in counts:
        flow, bare = table[("flow", n)], table[("bare", n)]
        ratio = flow["ready"] / bare["ready"] if flow["ready"] and bare["ready"] else None
        rows.append(f"| {n} | {_s(flow['ready'])} | {_s(bare['ready'])} | {_x(ratio)} | {_s(flow['teardown'])} |")
    first, last = counts[0], counts[-1]
    growth = {m: (table[(m, last)]["ready"] / table[(m, first)]["ready"]
                  if table[(m, last)]["ready"] and table[(m, first)]["ready"] else None) for m in ("flow", "bare")}
    quiet = results.get("quiet", {})
    failed = [r for r in results["runs"] if not r["ok"]]
    return "\n".join([
        BEGIN,
        "## Scale: 1 to 16 nodes",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {_commit()} with "
        "`make bench-scale` (`python -m bench.scale`): a bed of 16 Slurm nodes (partition `wide`), all on this "
        f"2-core machine, {results['reps']} run(s) per figure (median), one Ray CPU and small memory per node. "
        "Flow: from \"Beginning flow run\" to the connection info (every node alive on the head); floor: a bare "
        "`ray start` on every node in one srun step, each node starting again when its start failed, from "
        "sbatch to every node alive.",
        "",
        "| nodes | flow ready | floor ready | flow / floor | flow teardown (signal to nothing left) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Growth from {first} to {last} nodes: flow {_x(growth['flow'])}, floor {_x(growth['bare'])}. "
        "Teardown targets: 5 s at 16 nodes.",
        "",
        "![time to ready, 1 to 16 nodes](bench_scale.png)",
        "",
        "Metadata operations on the shared cluster dir of one running worker's supervisor "
        f"(strace -f, {quiet.get('seconds', STRACE_S)} s of a ready {quiet.get('nodes', 4)}-node keep-alive cluster): "
        "before: 11.6 per second (a look every 0.25 s, 4 operations each), then 3.73 (every 0.5 s, 2 each); "
        f"now {_rate(quiet)} (a glance every {AR_LOOK_EVERY} s, one stat of the heartbeat; the stop comes as a "
        "signal through the scheduler)"
        + (f" ({', '.join(quiet.get('kinds', []))})" if quiet.get("kinds") else "") + ".",
        *([""] + [f"Failed: {r['method']} at {r['nodes']} nodes: {r['error'][:300]}" for r in failed] if failed else []),
        END,
    ])


def _s(value) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def _x(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _rate(quiet: dict) -> str:
    return f"{quiet['per_s']:.2f} per second" if quiet.get("ok") else f"not measured ({quiet.get('error', '')[:200]})"


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def plot(results: dict, table: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for method, label, style in (("flow", "activate-ray flow", "o-"), ("bare", "bare parallel ray start (floor)", "s-")):
        xs = [n for n in results["node_counts"] if table[(method, n)]["ready"] is not None]
        ax.plot(xs, [table[(method, n)]["ready"] for n in xs], style, label=label)
    ax.set_xticks(results["node_counts"])
    ax.set_xlabel("Slurm nodes (one Ray node each), all on one 2-core machine")
    ax.set_ylabel("time to ready (s), median")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(results: dict) -> None:
    table = summary(results)
    text = section(results, table)
    path = REPO / "BENCHMARKS.md"
    current = path.read_text()
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        current = head + text + rest.split(END, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(current)
    plot(results, table, REPO / "bench_scale.png")
    log("wrote the scale section of BENCHMARKS.md and bench_scale.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=1, help="runs per figure (median); default 1")
    parser.add_argument("--nodes", default=",".join(map(str, NODE_COUNTS)), help="node counts; default 1,4,8,16")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from .bench/scale.json")
    args = parser.parse_args(argv)
    saved = BENCH / "scale.json"
    if args.report_only:
        results = json.loads(saved.read_text())
    else:
        BENCH.mkdir(exist_ok=True)
        results = measure(args.reps, sorted({int(n) for n in args.nodes.split(",")}))
        saved.write_text(json.dumps(results, indent=1, default=str))
    write(results)
    return 0 if all(r["ok"] for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
