"""A Ray job that ends well at the walltime: it works in steps, writes a checkpoint when it
gets SIGTERM, and resumes from its checkpoint when run again.

activate-ray stops the job walltime_margin seconds before the allocation's end as
`ray job stop` does (SIGTERM to the driver, SIGKILL after a grace of up to 60 s), and tells
the driver the end in advance: ACTIVATE_RAY_DEADLINE (Unix seconds) and ACTIVATE_RAY_ATTEMPT
(which allocation this is: with continue_after_walltime the next allocation runs this job
again, with 2, 3, ..., and it goes on from its checkpoint until --steps are done).

    python examples/checkpoint_on_sigterm.py [CHECKPOINT_DIR] [--steps N] [--step-seconds S]

CHECKPOINT_DIR (else $CHECKPOINT_DIR, else ./checkpoints) must be on a filesystem the next
allocation sees (the shared work dir): the driver runs on the cluster's head node.
"""

import argparse
import json
import os
import signal
import sys
import time

import ray


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", nargs="?", default=os.environ.get("CHECKPOINT_DIR", "checkpoints"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--step-seconds", type=float, default=1.0)
    return parser.parse_args()


def load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"step": 0, "total": 0}


def save(path: str, state: dict) -> None:
    """Atomically: a SIGKILL mid-write leaves the previous checkpoint, never half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


@ray.remote(num_cpus=1)
def work(step: int, seconds: float) -> int:
    time.sleep(seconds)
    return step * step


def main() -> int:
    args = parse_args()
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    path = os.path.join(args.checkpoint_dir, "state.json")
    state = load(path)
    deadline = int(os.environ.get("ACTIVATE_RAY_DEADLINE", "0") or 0)
    attempt = os.environ.get("ACTIVATE_RAY_ATTEMPT", "?")
    resumed_from = state["step"]
    print(f"CHECKPOINT_EXAMPLE ACTIVATE_RAY_ATTEMPT={attempt} "
          f"ACTIVATE_RAY_DEADLINE={deadline} started_at={time.time():.1f} "
          f"resuming_at_step={resumed_from}", flush=True)
    if deadline:
        print(f"the allocation ends in {deadline - time.time():.0f}s", flush=True)

    stopping = {"at": 0.0}

    def on_sigterm(signum, frame):  # only note it: the checkpoint is written between steps
        stopping["at"] = time.time()

    ray.init()
    # after ray.init(): it installs a SIGTERM handler of its own in the driver (exit at once)
    signal.signal(signal.SIGTERM, on_sigterm)
    while state["step"] < args.steps and not stopping["at"]:
        state["total"] += ray.get(work.remote(state["step"], args.step_seconds))
        state["step"] += 1
    if stopping["at"]:
        state["sigterm_at"] = stopping["at"]
        state["deadline"] = deadline
        save(path, state)
        print(f"SIGTERM at {stopping['at']:.1f} ({deadline - stopping['at']:.0f}s before the allocation's end): "
              f"CHECKPOINT_WRITTEN step={state['step']} to {path}", flush=True)
        return 143
    save(path, state)
    print(f"CHECKPOINT_EXAMPLE_DONE steps={state['step']} total={state['total']} resumed_from={resumed_from} "
          f"ACTIVATE_RAY_ATTEMPT={attempt}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
