"""Prefect tasks on an HPC Ray cluster: start the cluster, run a subflow whose tasks
execute on its nodes through prefect-ray's RayTaskRunner, tear the cluster down.

    PREFECT_API_URL=http://<server the nodes reach>:4200/api \\
    python examples/prefect_tasks_on_ray.py --host alice@login.hpc --scheduler slurm --nodes 2

The cluster's Python needs prefect and prefect-ray too (its tasks run there): give
--python a venv that has them, or --requirements a file naming them.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

from prefect import flow, task

from flows.ray_tasks import ray_cluster_for_tasks, teardown_saved_clusters
from tasks.settings import RayClusterSettings


@task
def where(i: int) -> str:
    time.sleep(0.5)  # long enough that the tasks spread over the nodes
    return socket.gethostname()


@flow(name="hostnames-on-ray")
def hostnames(count: int) -> list[str]:
    return [future.result() for future in where.map(range(count))]


@flow(name="prefect-tasks-on-ray", on_cancellation=[teardown_saved_clusters], on_crashed=[teardown_saved_clusters])
async def prefect_tasks_on_ray(settings: RayClusterSettings, count: int = 8) -> list[str]:
    async with ray_cluster_for_tasks(settings) as cluster:
        hosts = await cluster.run(hostnames, count)
    print("TASK_HOSTS=" + ",".join(sorted(set(hosts))))
    return hosts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="")
    parser.add_argument("--scheduler", default="none", choices=["none", "slurm", "pbs"])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--python", default="")
    parser.add_argument("--work-dir", default="~/.activate-ray")
    parser.add_argument("--requirements", default="")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--info-file", default="ray-cluster.json", help="connection info as JSON (empty: none)")
    args = parser.parse_args()
    size = {"slurm": {"slurm": {"nodes": args.nodes}}, "pbs": {"pbs": {"nodes": args.nodes}},
            "none": {"direct_workers": args.nodes - 1}}[args.scheduler]
    settings = RayClusterSettings(host=args.host, scheduler=args.scheduler, python=args.python,
                                  work_dir=args.work_dir, requirements=args.requirements, info_file=args.info_file,
                                  **size)
    asyncio.run(prefect_tasks_on_ray(settings, args.count))


if __name__ == "__main__":
    main()
