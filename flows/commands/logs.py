"""`logs`: show the logs a cluster left in <work_dir>/logs/<cluster id>, on its target."""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import sys

from flows.commands import NOT_A_CLUSTER_ID, where_the_cluster_is
from flows.target import open_target
from tasks.cluster import CLUSTER_ID_RE, logs_dir_of, target_work_dir
from tasks.settings import EnvironmentOptions, RayClusterSettings
from tasks.shipped import SCRIPTS_DIR

NODE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")


def main(argv: list[str]) -> int:
    """python -m flows.ray_cluster logs CLUSTER_ID [--host H] [--work-dir W] [--node N] [--tail K]"""
    parser = argparse.ArgumentParser(
        prog="python -m flows.ray_cluster logs",
        description="Show the logs a cluster left in <work_dir>/logs/<cluster id> (every node's Ray logs and the job's output)")
    parser.add_argument("cluster_id", help="the cluster's id (ar-...), as the flow printed it")
    parser.add_argument("--host", default="", help="where the cluster ran, as given to the flow (empty: this machine)")
    parser.add_argument("--work-dir", default=EnvironmentOptions().work_dir, help="the cluster's work dir")
    parser.add_argument("--node", default="", help="only this node's logs (head, a node name, or job)")
    parser.add_argument("--tail", type=int, default=20, help="last lines of each file (default 20)")
    args = parser.parse_args(argv)
    problems = [what for what, bad in [
        (NOT_A_CLUSTER_ID, not CLUSTER_ID_RE.fullmatch(args.cluster_id)),
        ("--node: not a node name", bool(args.node) and not NODE_NAME_RE.fullmatch(args.node)),
        ("--tail: between 1 and 100000", not 1 <= args.tail <= 100000)] if bad]
    settings = where_the_cluster_is(args.host, args.work_dir, problems)
    if settings is None:
        return 2
    return asyncio.run(_show_logs(settings, args.cluster_id, args.node, args.tail))


async def _show_logs(settings: RayClusterSettings, cluster_id: str, node: str, tail: int) -> int:
    async with await open_target(settings) as target:
        work_dir = await target_work_dir(target, settings)
        await target.put_file(SCRIPTS_DIR / "show_logs.sh", f"{work_dir}/bin/show_logs.sh", 0o700)
        command = shlex.join(["bash", f"{work_dir}/bin/show_logs.sh", logs_dir_of(work_dir, cluster_id), str(tail), node])
        shown = await target.run(command, check=False, timeout=300)
    sys.stdout.write(shown.stdout)
    sys.stderr.write(shown.stderr)
    return shown.returncode

