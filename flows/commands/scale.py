"""`scale`: grow or shrink a running SLURM/PBS cluster by worker jobs (also the
ray-cluster/scale deployment's flow, flows/ray_cluster.py:ray_cluster_scale)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from flows.commands import NOT_A_CLUSTER_ID, where_the_cluster_is
from flows.target import open_target
from tasks.cluster import CLUSTER_ID_RE, target_work_dir
from tasks.readiness import ClusterFailed
from tasks.scaling import ScaleRefused, scale_running_cluster
from tasks.settings import EnvironmentOptions, RayClusterSettings


async def scale_cluster(settings: RayClusterSettings, cluster_id: str, delta: int, timeout: float) -> dict:
    """`scale`: the cluster's target, its dir there, then add or remove worker jobs."""
    async with await open_target(settings) as target:
        work_dir = await target_work_dir(target, settings)
        changed = await scale_running_cluster(target, f"{work_dir}/clusters/{cluster_id}", delta, timeout)
    return {"cluster_id": cluster_id, **changed}


def main(argv: list[str]) -> int:
    """python -m flows.ray_cluster scale CLUSTER_ID --add K | --remove K [--host H] [--work-dir W]"""
    parser = argparse.ArgumentParser(
        prog="python -m flows.ray_cluster scale",
        description="Grow or shrink a running SLURM/PBS cluster with worker jobs (each a 1-node job of its own, "
                    "sized by the cluster's scale options), and wait until its nodes joined or left")
    parser.add_argument("cluster_id", help="the cluster's id (ar-...), as the flow printed it")
    change = parser.add_mutually_exclusive_group(required=True)
    change.add_argument("--add", type=int, default=0, help="submit this many worker jobs")
    change.add_argument("--remove", type=int, default=0, help="remove this many worker jobs (queued ones first)")
    parser.add_argument("--host", default="", help="the login node, as given to the flow (empty: this machine)")
    parser.add_argument("--work-dir", default=EnvironmentOptions().work_dir, help="the cluster's work dir")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the nodes (0: do not wait)")
    args = parser.parse_args(argv)
    count = args.add or args.remove
    problems = [what for what, bad in [
        (NOT_A_CLUSTER_ID, not CLUSTER_ID_RE.fullmatch(args.cluster_id)),
        ("--add/--remove: between 1 and 1000", not 1 <= count <= 1000),
        ("--timeout: between 0 and 86400", not 0 <= args.timeout <= 86400)] if bad]
    settings = where_the_cluster_is(args.host, args.work_dir, problems)
    if settings is None:
        return 2
    try:
        changed = asyncio.run(scale_cluster(settings, args.cluster_id, args.add - args.remove, args.timeout))
    except (ScaleRefused, ClusterFailed) as exc:
        print(f"scale failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(changed))
    return 0

