"""The one runner of every benchmark of bench/: its command line, the Prefect server the
sections share, the raw results (.bench/results.json), the leftover check and the report.
`python -m bench` runs every section; `python -m bench.<name>` the sections of one module."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench.common import BENCH, REPO, leftovers, log, marker_pids, poll_alive_main, ray_processes
from bench.report import print_summary, write_report
from tests.helpers import PrefectServer


@dataclass
class Run:
    """What a section gets: the command line's options, the Prefect server of the run (up
    while `run` runs, stopped for `after_server`), its home, and the results it adds to."""

    args: argparse.Namespace
    server: PrefectServer
    home: Path
    results: dict


@dataclass(frozen=True)
class Section:
    """One benchmark, as `--sections` names it. Sections run by `step` (setup and cold before
    local, cold before slurm, which reuses the cold uv build time), whatever order is asked;
    `after_server` parts run once the shared server is stopped (runs with a temporary server
    share its database)."""

    name: str
    step: int
    run: Callable[[Run], None]
    after_server: Callable[[Run], None] | None = None
    needs_server: bool = False


def arguments(prog: str, description: str, names: list[str], reps: int = 2,
              reps_note: str = " (the whole run stays under 20 min)") -> argparse.ArgumentParser:
    """The options of a benchmark offering the sections `names`: --sections only where there
    are more than one, --nodes and --build-s only with slurm."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--reps", type=int, default=reps, help=f"runs per figure (median); default {reps}{reps_note}")
    if "slurm" in names:
        parser.add_argument("--nodes", default="1,2,3", help="Slurm node counts, comma separated; default 1,2,3")
    if len(names) > 1:
        parser.add_argument("--sections", default=",".join(names),
                            help=f"any of {','.join(names)}; default all" + (" (cold reaches PyPI)" if "cold" in names else ""))
    elif names:
        parser.set_defaults(sections=names[0])
    if "slurm" in names:
        parser.add_argument("--build-s", type=float, default=None,
                            help="the queued-job row's build time when the cold section is not run (default: skip that row)")
    return parser


def main(argv: list[str] | None, prog: str, description: str, sections: list[Section],
         command: str | None = None) -> int:
    """Run the asked sections of `sections`, record .bench/results.json, print the summary and
    (unless --no-write) rewrite BENCHMARKS.md and the plot. command: what the report names as
    the command when no option was given (default: .venv/bin/<prog>)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--poll-alive"]:
        return poll_alive_main(argv[1:])
    parser = arguments(prog, description, [s.name for s in sections])
    parser.add_argument("--no-write", action="store_true", help="print only: leave BENCHMARKS.md and the plot alone")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite BENCHMARKS.md and the plot from the last .bench/results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads((BENCH / "results.json").read_text())
        print_summary(results)
        write_report(results)
        return 0
    asked = set(args.sections.split(","))
    chosen = sorted((s for s in sections if s.name in asked), key=lambda s: s.step)
    BENCH.mkdir(exist_ok=True)
    whole = f".venv/bin/{prog}"
    command = whole + " " + " ".join(shlex.quote(a) for a in argv) if argv else (command or whole)
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
    run = Run(args, server, home, results)
    try:
        if any(s.needs_server for s in chosen):
            server.start()
            results["server_start_s"] = server.start_s
            log(f"prefect server up in {server.start_s:.2f}s on {server.url}")
        for section in chosen:
            section.run(run)
        server.stop()  # the temporary-server runs share its database
        for section in chosen:
            if section.after_server:
                section.after_server(run)
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
