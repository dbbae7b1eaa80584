"""Signal a keep-alive local flow again and again; count slow exits and leaks.

    python -m tests.stress_signals --runs 20 --signal INT
    python -m tests.stress_signals --runs 20 --signal TERM

Standalone (not collected by pytest). Starts one Prefect server on loopback
with a temporary PREFECT_HOME, then, one run at a time (never two clusters at
once): starts `python -m flows.ray_cluster --keep-alive ...` on this machine,
waits until its info file exists and signals it at a varied delay (0 to 3 s
after ready; every --startup-every'th run at a random point of the startup,
before ready). For each run it records the exit code, the seconds from the
signal to the exit, and whatever of that cluster is left: a process whose
command line holds `/<cluster_id>-`, its cluster dir, a node temp dir, a saved
teardown state, ~/.ray/auth_token. A flow that has not exited after --hang
seconds gets SIGABRT (faulthandler prints every thread's stack to its log),
then SIGKILL, and its cluster is cleaned up so the next run starts clean.

The flow starts with SIGINT at its default disposition, as from a terminal,
even when this script inherited it ignored (`cmd &` in a non-interactive
shell ignores SIGINT, and an ignored signal stays ignored across exec);
--sigint-ignored starts it with SIGINT ignored instead, like such a launcher.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks.settings import node_tmp_name
from tests.helpers import PrefectServer

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RUNS_DIR = Path("~/.activate-ray/runs").expanduser()
AUTH_TOKEN = Path.home() / ".ray" / "auth_token"
EXPECTED = {"INT": 130, "TERM": 143}
CURRENT: list[subprocess.Popen] = []  # the flow being signalled, for a clean stop on Ctrl-C


@dataclass
class Run:
    number: int
    phase: str  # "ready+1.23s" or "startup+4.56s"
    returncode: int | None = None
    seconds: float | None = None  # signal -> exit
    cluster_id: str = ""
    leaks: list[str] = field(default_factory=list)
    log: Path | None = None

    @property
    def startup(self) -> bool:
        return self.phase.startswith("startup")


def cluster_processes(cluster_id: str) -> list[str]:
    result = subprocess.run(["pgrep", "-af", f"/{node_tmp_name(cluster_id)}"], capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if "pgrep" not in line]


def cluster_id_of(info_file: Path, log: Path) -> str:
    try:
        return json.loads(info_file.read_text())["cluster_id"]
    except (OSError, ValueError, KeyError):
        pass
    match = re.search(r"cluster (ar-[0-9a-f]{32}) on ", log.read_text(errors="replace"))
    return match.group(1) if match else ""


def leftovers(cluster_id: str, work: Path, node_tmp: str = "/tmp") -> list[str]:
    found = []
    if cluster_id:
        found += [f"process {line[:160]}" for line in cluster_processes(cluster_id)]
        if (work / "clusters" / cluster_id).exists():
            found.append(f"cluster dir {work / 'clusters' / cluster_id}")
        found += [f"node temp dir {p}" for p in Path(node_tmp).glob(node_tmp_name(cluster_id) + "*")]
        if (RUNS_DIR / f"{cluster_id}.json").exists():
            found.append(f"teardown state {RUNS_DIR / (cluster_id + '.json')}")
    elif (work / "clusters").exists() and any((work / "clusters").iterdir()):
        found.append(f"cluster dir(s) {[p.name for p in (work / 'clusters').iterdir()]}")
    if AUTH_TOKEN.exists():
        found.append(str(AUTH_TOKEN))
    return found


def clean_up(cluster_id: str, work: Path, node_tmp: str = "/tmp") -> None:
    """Remove what a failed run left, so it cannot spoil the next one."""
    if cluster_id:
        for line in cluster_processes(cluster_id):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for path in Path(node_tmp).glob(node_tmp_name(cluster_id) + "*"):
            shutil.rmtree(path, ignore_errors=True)
        (RUNS_DIR / f"{cluster_id}.json").unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)


def one_run(number: int, signame: str, server: PrefectServer, root: Path, rng: random.Random, args) -> Run:
    run_dir = root / f"run{number:02d}"
    run_dir.mkdir()
    work, info_file, log = run_dir / "work", run_dir / "info.json", run_dir / "flow.log"
    command = [
        PYTHON, "-X", "faulthandler", "-m", "flows.ray_cluster", "--keep-alive", "--work-dir", str(work),
        "--ray-memory-gb", "0.5", "--object-store-memory-gb", "0.25", "--info-file", str(info_file),
    ]
    env = {**os.environ, "PREFECT_API_URL": server.url, "PREFECT_HOME": str(server.home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env = {k: v for k, v in env.items() if not k.startswith("RAY_CLUSTER_")}
    disposition = signal.SIG_IGN if args.sigint_ignored else signal.SIG_DFL
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
        preexec_fn=lambda: signal.signal(signal.SIGINT, disposition),
    )
    CURRENT[:] = [process]
    startup = args.startup_every and number % args.startup_every == args.startup_every - 1
    phase = ""
    if startup:
        # somewhere in the startup: Prefect's engine, the env check, start, readiness
        when = started + rng.uniform(0.5, args.startup_max)
        while time.monotonic() < when and not info_file.exists() and process.poll() is None:
            time.sleep(0.05)
        phase = f"startup+{time.monotonic() - started:.2f}s" if not info_file.exists() else ""
    if not phase:
        deadline = started + args.ready_timeout
        while not info_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                cluster_id = cluster_id_of(info_file, log)
                run = Run(number, "never ready", process.returncode, None, cluster_id, leftovers(cluster_id, work), log)
                clean_up(cluster_id, work)
                return run
            time.sleep(0.05)
        ready = time.monotonic()
        delay = rng.uniform(0, 3)
        time.sleep(delay)
        phase = f"ready+{time.monotonic() - ready:.2f}s"
    signalled = time.monotonic()
    process.send_signal(getattr(signal, "SIG" + signame))
    if args.second_after is not None:  # an impatient user: again, while it tears down
        try:
            process.wait(args.second_after)
        except subprocess.TimeoutExpired:
            process.send_signal(getattr(signal, "SIG" + signame))
            phase += f" +again@{args.second_after:g}s"
    try:
        process.wait(max(0.0, args.hang - (time.monotonic() - signalled)))
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack into the log
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        run = Run(number, phase, None, None, "", [], log)
    else:
        run = Run(number, phase, process.returncode, time.monotonic() - signalled, "", [], log)
    run.cluster_id = cluster_id_of(info_file, log)
    run.leaks = leftovers(run.cluster_id, work)
    clean_up(run.cluster_id, work)
    return run


def verdict(run: Run, signame: str, limit: float) -> bool:
    """A good run exits within the limit, with the signal's code (any code before ready), leaving nothing."""
    if run.returncode is None or run.seconds is None or run.seconds > limit or run.leaks:
        return False
    return run.startup or run.returncode == EXPECTED[signame]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stress_signals", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--signal", choices=sorted(EXPECTED), default="INT")
    parser.add_argument("--limit", type=float, default=15, help="seconds from the signal to the exit (default 15)")
    parser.add_argument("--hang", type=float, default=60, help="give up on a run after this long (default 60)")
    parser.add_argument("--startup-every", type=int, default=5,
                        help="every N-th run is signalled during startup, before ready (0: never; default 5)")
    parser.add_argument("--startup-max", type=float, default=12, help="latest startup signal, s after launch")
    parser.add_argument("--ready-timeout", type=float, default=180)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--second-after", type=float, default=None, metavar="S",
                        help="send the signal a second time S s after the first (during the teardown)")
    parser.add_argument("--sigint-ignored", action="store_true",
                        help="start the flow with SIGINT ignored, as `cmd &` in a non-interactive shell does")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (flow logs) even when all is well")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops this script, even if launched with `&`
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    signame = args.signal
    root = Path(tempfile.mkdtemp(prefix="ar-stress-"))
    token_before = AUTH_TOKEN.exists()
    print(f"stress SIG{signame}: {args.runs} run(s), seed {seed}, logs in {root}"
          + (", flow started with SIGINT ignored" if args.sigint_ignored else ""), flush=True)
    if token_before:
        print(f"warning: {AUTH_TOKEN} exists before the first run (not ours)", flush=True)
    server = PrefectServer(root / "prefect-home").start()
    runs: list[Run] = []
    try:
        for number in range(args.runs):
            run = one_run(number, signame, server, root, rng, args)
            runs.append(run)
            took = "HUNG" if run.seconds is None else f"{run.seconds:5.1f}s"
            mark = "ok  " if verdict(run, signame, args.limit) else "FAIL"
            print(f"{mark} run {number:2d} {run.phase:>16} -> exit {run.returncode} after {took}"
                  f" {run.cluster_id or '(no cluster)'}" + (f" LEFT: {run.leaks}" if run.leaks else ""), flush=True)
    except KeyboardInterrupt:
        print("stopped", flush=True)
        for process in CURRENT:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
    finally:
        server.stop()
    ready = [r for r in runs if not r.startup and r.phase != "never ready"]
    early = [r for r in runs if r.startup]
    good = [r for r in ready if verdict(r, signame, args.limit)]
    times = [r.seconds for r in runs if r.seconds is not None]
    leaks = sum(1 for r in runs if r.leaks)
    print(
        f"SIG{signame}: {len(good)}/{len(ready)} exited {EXPECTED[signame]} within {args.limit:g} s"
        f" (max {max(times, default=0):.1f} s), {leaks} leaks"
        + (f"; before ready: {sum(verdict(r, signame, args.limit) for r in early)}/{len(early)} clean within"
           f" {args.limit:g} s (exit codes {sorted({r.returncode for r in early}, key=str)})" if early else "")
        + (f"; {sum(r.phase == 'never ready' for r in runs)} never ready" if any(r.phase == "never ready" for r in runs) else "")
    )
    failed = [r for r in runs if not verdict(r, signame, args.limit)]
    if failed or args.keep:
        print(f"logs kept in {root}" + (": failed runs " + ", ".join(str(r.number) for r in failed) if failed else ""))
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
