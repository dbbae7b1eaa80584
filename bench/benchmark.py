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

import sys

from bench import runner
from bench.local import LOCAL
from bench.setup import COLD, SETUP
from bench.slurm import SLURM

SECTIONS = [LOCAL, SETUP, COLD, SLURM]  # as --sections lists them; they run by their step


def main(argv: list[str] | None = None) -> int:
    return runner.main(argv, "python -m bench", __doc__.split("\n\n")[0], SECTIONS,
                       command="make bench   # = .venv/bin/python -m bench")


if __name__ == "__main__":
    sys.exit(main())
