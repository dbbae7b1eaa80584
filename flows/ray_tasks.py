"""Hand a Ray cluster to Prefect tasks: start it, run your own Prefect flow with its tasks
on the cluster's nodes (prefect-ray's RayTaskRunner), tear the cluster down, always.

    from prefect import flow
    from flows.ray_tasks import ray_cluster_for_tasks, teardown_saved_clusters
    from tasks.settings import RayClusterSettings

    @flow(on_cancellation=[teardown_saved_clusters], on_crashed=[teardown_saved_clusters])
    async def my_pipeline():
        settings = RayClusterSettings(host="alice@login.hpc", scheduler="slurm", slurm={"nodes": 4})
        async with ray_cluster_for_tasks(settings) as cluster:
            return await cluster.run(my_subflow, items)  # my_subflow's tasks run on the 4 nodes

The runner connects with the cluster's explicit Ray Client address through the flow's
own tunnel (never a bare `ray.init()`, which could attach to another cluster on the
node) and the cluster's token; the tasks report to the Prefect API from the nodes, so
PREFECT_API_URL must be a server they reach. examples/prefect_tasks_on_ray.py is a
whole, tested example.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from prefect.settings import get_current_settings

from flows.ray_cluster import bring_up, open_target, remember, start_adapting, teardown_saved_clusters
from tasks.cluster import ClusterPlan, target_work_dir, teardown_cluster
from tasks.environ import environ_set
from tasks.failures import InvalidInput
from tasks.local_transport import LocalTransport
from tasks.logs import get_run_logger
from tasks.readiness import ConnectionInfo
from tasks.schedulers import scheduler_for
from tasks.settings import RayClusterSettings, SchedulerKind

CLIENT_ATTEMPTS = 3
# What ray.init("ray://...") raises when the head's per-connection Ray Client server did not
# start (its process died at once, or was not up in time): before any task ran.
CLIENT_START_FAILED = ("Starting Ray client server failed", "Initialization failure from server")

__all__ = ["ClusterForTasks", "ray_cluster_for_tasks", "teardown_saved_clusters"]


@dataclass
class ClusterForTasks:
    """A ready cluster, for the length of the `async with` block."""

    info: ConnectionInfo
    api_url: str

    def task_runner(self):
        """A RayTaskRunner for this cluster: its ray:// address through the flow's tunnel, and
        the Prefect API the tasks report to in the runtime env of every worker."""
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=self.info.ray_client_address,
                             init_kwargs={"runtime_env": {"env_vars": {"PREFECT_API_URL": self.api_url}}})

    async def run(self, subflow, *args, **kwargs):
        """Run `subflow` as a subflow whose tasks execute on the cluster; its result. In a
        thread of its own: the flow's heartbeat to the cluster goes on meanwhile."""
        on_cluster = subflow.with_options(task_runner=self.task_runner())
        for attempt in range(1, CLIENT_ATTEMPTS + 1):
            try:
                return await asyncio.to_thread(on_cluster, *args, **kwargs)
            except ConnectionAbortedError as exc:
                # The head starts a Ray Client server per connection; on a loaded machine its
                # start fails now and then (before any task ran): connect again.
                said = next((words for words in CLIENT_START_FAILED if words in str(exc)), None)
                if said is None or attempt == CLIENT_ATTEMPTS:
                    raise
                get_run_logger().warning("Ray Client connection %d of %d failed (%s); connecting again",
                                         attempt, CLIENT_ATTEMPTS, said)
                await asyncio.sleep(2.0 * attempt)


def api_the_nodes_reach(settings: RayClusterSettings, local_target: bool, api: str | None = None) -> str:
    """PREFECT_API_URL (or `api`), if the cluster's nodes can reach it: loopback only when
    they run on this very machine. Refused before anything starts, with the reason, otherwise."""
    api = get_current_settings().api.url if api is None else api
    if not api:
        raise InvalidInput("Prefect tasks on the cluster report to a Prefect server from its nodes: set "
                           "PREFECT_API_URL to one they reach (Prefect's temporary server is not reachable)")
    host = urlsplit(api).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        loopback = False
    if loopback and not (local_target and settings.scheduler is SchedulerKind.none):
        raise InvalidInput(f"PREFECT_API_URL {api} is on loopback: the cluster's nodes cannot reach it; "
                           "use the server's address on a network the nodes share")
    return api


@contextmanager
def ray_token_in_environment(plan: ClusterPlan):
    """The driver (this process) authenticates its Ray Client connection with the cluster's
    token, from the environment only this user can read; restored afterwards."""
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": plan.token.get_secret_value()} if plan.settings.token_auth else {}
    with environ_set(RAY_AUTH_TOKEN_PATH=None, **token):
        yield


@asynccontextmanager
async def ray_cluster_for_tasks(settings: RayClusterSettings) -> AsyncIterator[ClusterForTasks]:
    """Inside a flow: a cluster started and ready, torn down when the block ends, however it
    ends. The flow's on_cancellation/on_crashed hooks (teardown_saved_clusters) find it too."""
    scheduler = scheduler_for(settings)
    async with await open_target(settings) as target:
        api_url = api_the_nodes_reach(settings, isinstance(target, LocalTransport))
        work_dir = await target_work_dir(target, settings)
        plan = ClusterPlan.new(settings, work_dir)
        remember(plan, scheduler)
        background: list[asyncio.Task] = []
        try:
            ready, info = await bring_up(target, scheduler, plan, work_dir, background)
            start_adapting(target, scheduler, plan, ready, background)  # scale.adapt: workers follow the tasks
            with ray_token_in_environment(plan):
                yield ClusterForTasks(info, api_url)
        finally:
            for job in background:
                job.cancel()
            await teardown_cluster(target, scheduler, plan)
