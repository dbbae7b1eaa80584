"""`cleanup`: tear down what is left of one cluster of yours, the way the flow's own teardown
does (tasks/cluster.py:teardown_cluster: every node asked to stop, the jobs cancelled with the
scheduler's own `cancel`, this cluster's Ray stopped and its dirs removed); safe to run twice.

What the cluster is comes from its own state, never from a log or a job's output:
- the state file the flow keeps while the cluster lives, on the machine that runs the flow
  (~/.activate-ray/runs/<cluster id>.json: target, work dir, scheduler, job ids), checked by
  tasks/cluster.py:checked_cluster_state;
- else its cluster dir on the target (<work_dir>/clusters/<cluster id>: cluster.env names the
  cluster, its scheduler and node temp dir; job_id holds the head job; worker_jobs/ the worker
  jobs), what is left once the flow's process is gone and its state file with it.

Exit codes: 0 torn down, or nothing left; 1 the teardown failed (the target could not be
reached, a command failed); 2 refused: a malformed id or option, a state that is not this
user's or names another cluster, another target than the state's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys

from pydantic import SecretStr

import tasks.cluster
from flows.commands import NOT_A_CLUSTER_ID, where_the_cluster_is
from flows.target import open_target
from tasks.cluster import (
    CLUSTER_ID_RE,
    ClusterPlan,
    StateRefused,
    checked_cluster_state,
    target_work_dir,
    teardown_cluster,
)
from tasks.schedulers import SCHEDULERS, scheduler_for
from tasks.settings import TARGET_PATH_RE, EnvironmentOptions, RayClusterSettings
from tasks.transport import Transport

REFUSED, FAILED = 2, 1


class CleanupRefused(Exception):
    """The state found is not this user's cluster of that id: nothing is done."""


def main(argv: list[str]) -> int:
    """python -m flows.ray_cluster cleanup CLUSTER_ID [--host H] [--work-dir W]"""
    parser = argparse.ArgumentParser(
        prog="python -m flows.ray_cluster cleanup",
        description="Tear down what is left of a cluster of yours (its jobs cancelled, its Ray stopped on every "
                    "host, its files removed), from its state file, else from its cluster dir on the target. "
                    "Safe to run twice: exit 0 when nothing is left; exit 2, and nothing done, for a cluster "
                    "that is not yours")
    parser.add_argument("cluster_id", help="the cluster's id (ar-...), as the flow printed it")
    parser.add_argument("--host", default=None,
                        help="where the cluster runs, as given to the flow (default: its state file's, else this machine)")
    parser.add_argument("--work-dir", default=None,
                        help=f"the cluster's work dir (default: its state file's, else {EnvironmentOptions().work_dir})")
    args = parser.parse_args(argv)
    problems = [] if CLUSTER_ID_RE.fullmatch(args.cluster_id) else [NOT_A_CLUSTER_ID]
    where = where_the_cluster_is(args.host or "", args.work_dir or EnvironmentOptions().work_dir, problems)
    if where is None:
        return REFUSED
    try:
        saved = saved_plan(args.cluster_id, args.host, args.work_dir)
        return asyncio.run(clean_up(saved, where, args.cluster_id))
    except CleanupRefused as refused:
        print(f"cleanup refused, not tearing down: {refused}", file=sys.stderr)
        return REFUSED
    except Exception as exc:  # the target, or a command on it: said, and the exit code says it
        print(f"cleanup of {args.cluster_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return FAILED


def saved_plan(cluster_id: str, host: str | None, work_dir: str | None) -> ClusterPlan | None:
    """The cluster as the flow's state file saved it (None without one), checked as the crash
    hooks check it; an explicit --host/--work-dir must be the state's own."""
    path = tasks.cluster.RUNS_DIR / f"{cluster_id}.json"
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise StateRefused(f"{path}: not a state this package writes")
        plan = checked_cluster_state(path, data)
    except (OSError, ValueError) as exc:  # StateRefused and pydantic's ValidationError are ValueErrors
        raise CleanupRefused(str(exc).splitlines()[0]) from exc
    for option, given, saved in (("--host", host, plan.settings.host), ("--work-dir", work_dir, plan.settings.work_dir)):
        if given is not None and given.rstrip("/") != saved.rstrip("/"):
            raise CleanupRefused(f"{option} {given!r} is not where {path} says the cluster runs ({saved!r})")
    return plan


async def clean_up(saved: ClusterPlan | None, where: RayClusterSettings, cluster_id: str) -> int:
    """The flow's own teardown of the saved cluster, else of the one its dir on the target
    describes; nothing when neither is there."""
    async with await open_target(saved.settings if saved else where) as target:
        plan = saved or await plan_from_cluster_dir(target, where, cluster_id)
        if plan is None:
            print(f"nothing left of cluster {cluster_id} on {target.label}: no state file, no cluster dir")
            return 0
        scheduler = scheduler_for(plan.settings)
        print(f"tearing down cluster {plan.cluster_id} (scheduler {scheduler.name}, job {plan.job_id or 'none'}; "
              f"from its {'state file' if saved else 'cluster dir'})")
        await teardown_cluster.fn(target, scheduler, plan)
        print(f"cluster {plan.cluster_id} torn down on {target.label}")
    return 0


# Answers the one question asked of the cluster dir on the target: none there, one of
# this user's own (a real dir, not a link), or anything else.
CLUSTER_DIR_CHECK = ('if [ ! -e {d} ] && [ ! -L {d} ]; then echo absent; '
                     'elif [ -d {d} ] && [ ! -L {d} ] && [ -O {d} ]; then echo ours; else echo foreign; fi')


async def plan_from_cluster_dir(target: Transport, where: RayClusterSettings, cluster_id: str) -> ClusterPlan | None:
    """The cluster its dir on the target describes, checked: a dir of this user's, whose
    cluster.env names this cluster and this dir, with a known scheduler and a job id of that
    scheduler's form. None when there is no such dir (torn down already)."""
    cluster_dir = f"{await target_work_dir(target, where)}/clusters/{cluster_id}"
    found = (await target.run(CLUSTER_DIR_CHECK.format(d=shlex.quote(cluster_dir)), check=False)).stdout.strip()
    if found == "absent":
        return None
    if found != "ours":
        raise CleanupRefused(f"{cluster_dir} on {target.label} is not a dir of yours")
    env_text = await target.read_text(f"{cluster_dir}/cluster.env")
    if env_text is None:
        raise CleanupRefused(f"{cluster_dir} has no cluster.env: not a cluster the flow started")
    env = exported_values(env_text)
    if env.get("AR_CLUSTER_ID") != cluster_id or env.get("AR_CLUSTER_DIR") != cluster_dir:
        raise CleanupRefused(f"{cluster_dir}/cluster.env names another cluster "
                             f"({env.get('AR_CLUSTER_ID', '')[:60]!r} in {env.get('AR_CLUSTER_DIR', '')[:200]!r})")
    kind = env.get("AR_SCHEDULER", "")
    if kind not in SCHEDULERS:
        raise CleanupRefused(f"{cluster_dir}/cluster.env: scheduler {kind[:40]!r} is none of {', '.join(SCHEDULERS)}")
    job_id = (await target.read_text(f"{cluster_dir}/job_id") or "").strip()
    if job_id and not SCHEDULERS[kind].job_id_re.fullmatch(job_id):
        raise CleanupRefused(f"{cluster_dir}/job_id: {job_id[:60]!r} is not a {kind} job id")
    # The node temp dir as the cluster has it: the teardown looks for Ray processes left by
    # its prefix. A plain path; its length limit is a new cluster's (Ray's socket paths), not this.
    node_tmp = env.get("AR_NODE_TMP", "")
    if not TARGET_PATH_RE.fullmatch(node_tmp):
        raise CleanupRefused(f"{cluster_dir}/cluster.env: node temp dir {node_tmp[:200]!r} is not a plain path")
    settings = RayClusterSettings(host=where.host, work_dir=where.work_dir, scheduler=kind)
    settings = settings.model_copy(update={"advanced": settings.advanced.model_copy(update={"node_tmp": node_tmp})})
    return ClusterPlan(cluster_id, cluster_dir, settings, SecretStr(""), job_id=job_id)


def exported_values(env_text: str) -> dict[str, str]:
    """cluster.env's `export KEY=value` lines (values shell-quoted, as the flow writes them)."""
    values = {}
    for line in env_text.splitlines():
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            values[key] = value
    return values

