"""Grow and shrink a running cluster with worker jobs (scale options, tasks/schedulers/scale_options.py):
at start, on `scale --add/--remove` from another shell, and adaptively while the cluster holds.

The worker jobs themselves (recorded in the cluster dir, named wjob-<job id>@<host> as Ray
nodes, ended gracefully) are tasks/worker_jobs.py's; the head's dashboard API is
tasks/head_api.py's.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.failures import FailureReason
from tasks.head_api import alive_nodes, auth_headers, node_name, parse_head_env, ports_verified
from tasks.logs import get_run_logger
from tasks.schedulers import SCHEDULERS, JobPhase, Scheduler
from tasks.settings import RayClusterSettings
from tasks.transport import Transport
from tasks.worker_jobs import (
    end_worker_jobs,
    is_worker_job_node,
    job_of_worker_node,
    job_states,
    live_worker_jobs,
    remove_worker_jobs,
    submit_worker_jobs,
    worker_node_name,
)

if TYPE_CHECKING:
    from tasks.cluster import ClusterPlan

# --- adaptive: worker jobs follow Ray's pending demand ----------------------------------------

PENDING_STATES = ("PENDING_NODE_ASSIGNMENT",)


async def pending_demand(client: httpx.AsyncClient) -> dict[str, float]:
    """What tasks and actors waiting for a node ask for in all (Ray's State API: tasks in
    PENDING_NODE_ASSIGNMENT with their required resources; actor creations are tasks too)."""
    response = await client.get("/api/v0/tasks", params={
        "detail": "true", "limit": 10000, "filter_keys": "state", "filter_predicates": "=",
        "filter_values": PENDING_STATES[0]})
    response.raise_for_status()
    total: dict[str, float] = {}
    for waiting in response.json()["data"]["result"]["result"]:
        for resource, amount in (waiting.get("required_resources") or {}).items():
            total[resource] = total.get(resource, 0.0) + float(amount)
    return total


async def busy_nodes(client: httpx.AsyncClient) -> set[str]:
    """Ray node ids that run a task or hold a live actor."""
    busy: set[str] = set()
    for path, state in (("/api/v0/tasks", "RUNNING"), ("/api/v0/actors", "ALIVE")):
        response = await client.get(path, params={"limit": 10000, "filter_keys": "state", "filter_predicates": "=",
                                                  "filter_values": state})
        response.raise_for_status()
        busy |= {row.get("node_id") for row in response.json()["data"]["result"]["result"] if row.get("node_id")}
    return busy


def worker_jobs_for(demand: dict[str, float], cpus_per_worker: float, gpus_per_worker: float) -> int:
    """Worker jobs that would meet this demand (CPU and GPU; at least one when anything waits)."""
    if not demand:
        return 0
    wanted = 1
    if demand.get("CPU") and cpus_per_worker:
        wanted = max(wanted, math.ceil(demand["CPU"] / cpus_per_worker))
    if demand.get("GPU") and gpus_per_worker:
        wanted = max(wanted, math.ceil(demand["GPU"] / gpus_per_worker))
    return wanted


@dataclass
class Adapter:
    """One decision every few seconds (after dask-jobqueue's adapt): submit worker jobs for
    demand that waited two looks in a row and `settle` seconds (Ray reports a task's state
    about a second late: a task just placed on a node that joined still looks pending),
    release worker jobs idle for idle_timeout, keep between min and max, and wait
    `cooldown` after each change."""

    target: Transport
    scheduler: Scheduler
    cluster_dir: str
    head_job: str
    low: int
    high: int
    idle_timeout: float
    cooldown: float
    cpus_per_worker: float
    gpus_per_worker: float
    on_submit: object = None  # called with the new job ids (the flow records them in its saved state)
    ends_at: int = 0  # the cluster's allocation's end (Unix seconds): no worker job outlives it
    idle_since: dict[str, float] = field(default_factory=dict)
    settle: float = 3.0
    demand_seen: int = 0
    demand_since: float | None = None
    seen_joined: set = field(default_factory=set)
    last_change: float = -1e9

    async def step(self, client: httpx.AsyncClient, nodes: list[dict]) -> str:
        """One look and at most one change; returns what it did ("" for nothing)."""
        now = time.monotonic()
        states = await live_worker_jobs(self.target, self.scheduler, self.cluster_dir)
        joined = {job_of_worker_node(str(n.get("node_name"))): n["node_id"] for n in nodes
                  if is_worker_job_node(str(n.get("node_name")))}
        coming = [j for j in states if j.split(".")[0] not in joined]  # queued, or starting Ray
        demand = await pending_demand(client)
        if set(joined) - self.seen_joined:  # a worker joined: what waited may be going to it right now
            self.demand_seen, self.demand_since = 0, None
        self.seen_joined = set(joined)
        if demand:
            self.demand_seen += 1
            self.demand_since = now if self.demand_since is None else self.demand_since
        else:
            self.demand_seen, self.demand_since = 0, None
        unmet = self.demand_seen >= 2 and self.demand_since is not None and now - self.demand_since >= self.settle
        if now - self.last_change < self.cooldown:
            return ""
        if len(states) < self.low:
            return await self._submit(self.low - len(states), f"below min={self.low}", now)
        if unmet and not coming:
            wanted = min(worker_jobs_for(demand, self.cpus_per_worker, self.gpus_per_worker),
                         self.high - len(states))
            if wanted > 0:
                return await self._submit(wanted, f"unmet demand {demand}", now)
        busy = await busy_nodes(client)
        for job_id, node_id in list(joined.items()):
            if node_id in busy or demand:
                self.idle_since.pop(job_id, None)
                continue
            since = self.idle_since.setdefault(job_id, now)
            full = next((j for j in states if j.split(".")[0] == job_id), None)
            if full and now - since >= self.idle_timeout and len(states) > self.low:
                get_run_logger().info("adapt: worker job %s idle for %.0fs: releasing it", full, now - since)
                await end_worker_jobs(self.target, self.scheduler, self.cluster_dir, [full])
                self.idle_since.pop(job_id, None)
                self.last_change = time.monotonic()
                return f"released {full}"
        return ""

    async def _submit(self, count: int, why: str, now: float) -> str:
        get_run_logger().info("adapt: %s: submitting %d worker job(s)", why, count)
        ids = await submit_worker_jobs(self.target, self.scheduler, self.cluster_dir, count, self.head_job,
                                       self.ends_at)
        if callable(self.on_submit):
            self.on_submit(ids)
        self.last_change = time.monotonic()
        self.demand_seen, self.demand_since = 0, None
        return f"submitted {', '.join(ids)}"


@task(name="submit-worker-jobs", cache_policy=NO_CACHE)
async def add_worker_jobs(target: Transport, scheduler: Scheduler, plan: ClusterPlan, count: int) -> list[str]:
    """Worker jobs for this cluster, recorded in its plan too (the flow's saved state)."""
    ids = await submit_worker_jobs(target, scheduler, plan.cluster_dir, count, plan.job_id, plan.deadline)
    plan.worker_jobs += ids
    return ids


async def adapt_worker_jobs(target: Transport, scheduler: Scheduler, plan: ClusterPlan, local_port: int,
                            on_submit, every: float = 2.0) -> None:
    """The adaptive loop, while the cluster holds (until cancelled): one Adapter step every
    `every` seconds. A failed step (a busy controller, the dashboard restarting) is logged and
    the next one tries again: scaling never fails the cluster."""
    settings = plan.settings
    low, high = settings.scale.adapt_bounds
    adapter = None
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{local_port}", headers=auth_headers(plan),
                                 timeout=10) as client:
        while True:
            if plan.stop_time is not None and time.time() >= plan.stop_time:
                # the job is being stopped and the cluster torn down: a worker job now would
                # only wait in the queue for a cluster that is gone
                get_run_logger().info("adapt: walltime_margin reached (the allocation ends in %.0fs): no more "
                                      "worker jobs", plan.deadline - time.time())
                return
            try:
                nodes = await alive_nodes(client)
                if adapter is None:
                    biggest = max(nodes, key=lambda n: n.get("resources_total", {}).get("CPU", 0))["resources_total"]
                    adapter = Adapter(
                        target, scheduler, plan.cluster_dir, plan.job_id, low, high, settings.scale.idle_timeout,
                        settings.scale.cooldown,
                        cpus_per_worker=settings.scale.worker_cpus or settings.num_cpus_per_node or biggest.get("CPU", 1),
                        gpus_per_worker=(settings.scale.worker_gpus if settings.scale.worker_gpus is not None
                                         else settings.num_gpus_per_node or biggest.get("GPU", 0)),
                        on_submit=on_submit, ends_at=plan.deadline)
                    get_run_logger().info("adapt: between %d and %d worker job(s) of %s CPU(s) each, following Ray's "
                                          "pending demand", low, high, adapter.cpus_per_worker)
                await adapter.step(client, nodes)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (scaling never fails the cluster)
                get_run_logger().warning("adapt: %s: %s", type(exc).__name__, str(exc)[:300])
            await asyncio.sleep(every)


class ScaleRefused(RuntimeError):
    """`scale` cannot act on this cluster (none there, no scheduler, stopping), or its
    worker jobs did not join or leave in time."""

    reason = FailureReason.invalid_input


async def scale_running_cluster(target: Transport, cluster_dir: str, delta: int, timeout: float) -> dict:
    """Add (delta > 0) or remove (delta < 0) worker jobs of a running cluster known only by
    its dir (the flow that started it runs elsewhere), then wait up to `timeout` until
    their nodes are alive on the head's dashboard, or gone from it."""
    env = await target.read_text(f"{cluster_dir}/cluster.env")
    if env is None:
        raise ScaleRefused(f"no cluster at {cluster_dir} on {target.label} (ended, or another host or work dir)")
    kind = re.search(r"^export AR_SCHEDULER=(\w+)$", env, re.M)
    if not kind or kind.group(1) not in ("slurm", "pbs"):
        raise ScaleRefused("worker jobs need a SLURM or PBS cluster; this one runs without a scheduler")
    if await target.read_text(f"{cluster_dir}/stop") is not None:
        raise ScaleRefused("the cluster is stopping")
    head_env = await target.read_text(f"{cluster_dir}/head.env")
    if not ports_verified(head_env):  # its dashboard gets the token: only once it is the head's own
        raise ScaleRefused("the cluster's head is not up yet: try again once the flow says it is ready")
    head = parse_head_env(head_env)
    scheduler = SCHEDULERS[kind.group(1)](RayClusterSettings(scheduler=kind.group(1)))
    headers = {}
    if re.search(r"^export RAY_AUTH_MODE=token$", env, re.M):
        token = (await target.read_text(f"{cluster_dir}/token") or "").strip()
        headers = {"Authorization": f"Bearer {token}"}
    head_job = (await target.read_text(f"{cluster_dir}/job_id") or "").strip()
    local_port = await target.forward_to(head.node, head.dashboard_port)
    started = time.monotonic()
    if delta > 0:
        changed = await submit_worker_jobs(target, scheduler, cluster_dir, delta, head_job)
    else:
        changed = await remove_worker_jobs(target, scheduler, cluster_dir, -delta)
    names = {worker_node_name(job_id) for job_id in changed}
    alive: list[dict] = []
    if timeout == 0:  # not waiting: the jobs may stay queued for long
        return {"added" if delta > 0 else "removed": changed, "seconds": round(time.monotonic() - started, 2)}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{local_port}", headers=headers, timeout=10) as client:
        while True:
            alive = await alive_nodes(client)
            present = {node_name(n).split("@", 1)[0] for n in alive} & names
            if (present == names) if delta > 0 else not present:
                break
            if delta > 0:
                ended = [j for j, s in (await job_states(target, scheduler, changed)).items()
                         if s.phase is JobPhase.ended]
                if ended:
                    raise ScaleRefused(f"worker job(s) {', '.join(ended)} ended before joining: see "
                                       f"{cluster_dir}/logs/wjob-<id>.out")
            if time.monotonic() - started > timeout:
                raise ScaleRefused(f"worker job(s) {', '.join(changed)} not {'joined' if delta > 0 else 'gone'} "
                                   f"after {timeout:g}s ({len(present)} of {len(names)} nodes there)")
            await asyncio.sleep(0.25)
    return {"added" if delta > 0 else "removed": changed, "nodes_alive": len(alive),
            "seconds": round(time.monotonic() - started, 2)}
