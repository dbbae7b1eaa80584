"""`check`: what would break a cluster with these inputs on this site, before the queue
(tasks/checks.py). The same inputs as a run, plus:

    python -m flows.ray_cluster check [RUN OPTIONS] [--on-nodes] [--json]

--on-nodes: also a short, small job on the compute nodes (1-2 nodes, 5 minutes, nothing left
after); --json: the rows as JSON on stdout instead of the table. Exit codes: 0 nothing fails,
1 a row fails, 2 invalid input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tasks.checks import failed, render_table, rows_json

# The check's own flags; every other argument is a run's (flows/cli.py parses them).
OWN_FLAGS = ("--on-nodes", "--json")


def main(argv: list[str], settings_from: Callable) -> int:
    """settings_from: the run's own parsing of its options (flows/cli.py's, handed in: it
    imports this module)."""
    if "-h" in argv or "--help" in argv:
        print(__doc__)
    own = {flag: flag in argv for flag in OWN_FLAGS}
    rest = [arg for arg in argv if arg not in OWN_FLAGS]
    from flows.ray_cluster import check_site

    parsed = settings_from(rest)
    if isinstance(parsed, int):
        return parsed
    settings, _ = parsed
    rows = asyncio.run(check_site(settings, own["--on-nodes"]))
    print(rows_json(rows) if own["--json"] else render_table(rows))
    return 1 if failed(rows) else 0
