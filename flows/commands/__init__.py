"""The subcommands of `python -m flows.ray_cluster` (flows/cli.py dispatches to them), each
acting on a cluster that a run started: logs, scale, cleanup. What they share is here."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from tasks.settings import RayClusterSettings

# What every subcommand's CLUSTER_ID argument must be (tasks/cluster.py's CLUSTER_ID_RE).
NOT_A_CLUSTER_ID = "cluster_id: not a cluster id (ar- and 32 hex digits)"


def where_the_cluster_is(host: str, work_dir: str, problems: list[str]) -> RayClusterSettings | None:
    """A subcommand's target, checked as the flow checks it; with the command's own
    problems, every one printed and None when there is any."""
    settings = None
    try:
        settings = RayClusterSettings(host=host, work_dir=work_dir)
    except ValidationError as exc:
        problems = problems + [f"{'.'.join(map(str, e['loc'][-1:]))}: {e['msg']}" for e in exc.errors()]
    for problem in problems:
        print(f"invalid input {problem}", file=sys.stderr)
    return None if problems else settings
