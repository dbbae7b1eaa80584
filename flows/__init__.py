"""The flows (ray_cluster.py), their command line (cli.py) and its subcommands (commands/)."""

import os

# Every entry point of ours imports this package first, so these are set before Prefect
# loads, whichever module comes first. The temporary server's telemetry only fails offline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Its first start on a fresh PREFECT_HOME (database migrations) takes 20-30 s on a
# loaded 2-core machine, beyond Prefect's 20 s default: `make demo` failed there.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
