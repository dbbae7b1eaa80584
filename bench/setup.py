"""The environment benchmarks, for real: `python -m bench.setup` (what `python -m bench
--sections setup,cold` runs): scripts/setup_ray.sh reusing an interpreter that has the right
Ray (warm), and building ray[default] into a fresh work dir with uv and with pip (cold, from
PyPI)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import runner
from bench.common import (
    BENCH,
    PY,
    REPO,
    VENV_BIN,
    log,
    median,
    wait_quiet,
)
from bench.runner import Run, Section

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


def _setup(run: Run) -> None:
    bench_setup(max(run.args.reps, 5), run.results)
    setup = run.results["setup"]
    log(f"setup_ray.sh reuse: {median(setup['times_s']):.3f}s, pip calls {setup['pip_calls']}")


SETUP = Section("setup", 0, _setup)
COLD = Section("cold", 1, lambda run: bench_cold(run.results))


def main(argv: list[str] | None = None) -> int:
    return runner.main(argv, "python -m bench.setup", __doc__.split("\n\n")[0], [SETUP, COLD])


if __name__ == "__main__":
    sys.exit(main())
