"""Wait until the head answers and every node is alive; tell the user how to connect."""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from dataclasses import asdict, dataclass, field

import httpx
from prefect import task
from prefect.artifacts import (
    acreate_progress_artifact,
    aupdate_progress_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE

from tasks.atomic_file import write_text_atomic
from tasks.cluster import ClusterPlan, token_block_name
from tasks.events import emit_cluster_event
from tasks.failures import FailureReason
from tasks.head_api import HeadInfo, alive_nodes, auth_headers, node_name, parse_head_env, ports_verified
from tasks.logs import get_run_logger
from tasks.schedulers import JobPhase, Scheduler
from tasks.settings import NodeFailure, RayClusterSettings, SchedulerKind
from tasks.transport import Transport
from tasks.worker_jobs import is_worker_job_node


class ClusterFailed(RuntimeError):
    """The cluster did not come up: job rejected, ended early, or readiness timed out.

    retryable: a fresh allocation may fix it (a node that never joined, a job that ended
    while starting), never a job that can not run as asked. joined: the scheduler's names
    of the nodes that were alive; head_failed: the head itself never came up."""

    def __init__(self, message: str, *, reason: FailureReason, retryable: bool = False,
                 joined: list[str] | None = None, head_failed: bool = False):
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable
        self.joined = joined or []
        self.head_failed = head_failed
        self.failed_nodes: list[str] = []  # filled in by whoever can ask the scheduler


@dataclass
class ReadyCluster:
    """What readiness found: the head, the local ports that reach its dashboard and its
    Ray Client server (the flow's own tunnels), the nodes."""

    head: HeadInfo
    local_port: int
    nodes: list[dict]
    client_local_port: int = 0


@dataclass
class ConnectionInfo:
    cluster_id: str
    scheduler: str
    job_id: str
    head_node: str
    head_ip: str
    ray_address: str
    dashboard_url: str  # through the flow's own tunnel, while the flow runs
    dashboard_port_on_head: int
    ray_client_address: str  # ray:// through the flow's own tunnel, while the flow runs
    ray_client_port_on_head: int
    tunnel_command: str
    job_submit_example: str
    token_file: str
    token_block: str  # Prefect Secret block holding the token while the cluster lives (only if published)
    logs_dir: str  # where every node's logs are copied before teardown ("" with keep_logs off)
    nodes: list[dict] = field(default_factory=list)
    deadline: int = 0  # the allocation's end, Unix seconds, as the scheduler has it (0: none or unknown)
    allocation: int = 1  # which allocation of the run (ACTIVATE_RAY_ATTEMPT)
    allocations: int = 1  # at most this many: 1 + continue_after_walltime

    def as_text(self) -> str:
        return "\n".join(
            [
                f"Ray cluster {self.cluster_id} is ready ({len(self.nodes)} nodes, scheduler {self.scheduler}"
                + (f", job {self.job_id})" if self.scheduler != "none" else ")"),
                f"  head node      : {self.head_node} ({self.head_ip})",
                f"  Ray address    : {self.ray_address}",
                f"  dashboard      : {self.dashboard_url}",
                f"  Ray Client     : {self.ray_client_address}",
                f"  tunnel         : {self.tunnel_command}",
                f"  then open        http://127.0.0.1:{TUNNEL_DASHBOARD_PORT}, "
                f"ray.init(\"ray://127.0.0.1:{TUNNEL_CLIENT_PORT}\")",
                f"  submit a job   : {self.job_submit_example}",
            ]
            + ([f"  logs (after)   : {self.logs_dir}"] if self.logs_dir else [])
            + ([f"  allocation end : {_when(self.deadline)} (ACTIVATE_RAY_DEADLINE={self.deadline})"]
               if self.deadline else [])
            + ([f"  allocation     : {self.allocation} of at most {self.allocations} (ACTIVATE_RAY_ATTEMPT={self.allocation})"]
               if self.allocations > 1 else [])
            + ([f"  Ray token      : {self.token_file} (0600)"
                + (f" or Prefect Secret block '{self.token_block}'" if self.token_block else "")]
               if self.token_file else ["  Ray token      : OFF (token_auth disabled)"])
        )


def _when(unix_seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(unix_seconds))


# The local ports of the tunnel command: Ray's own defaults, so Ray's docs apply as written.
TUNNEL_DASHBOARD_PORT = 8265
TUNNEL_CLIENT_PORT = 10001


def _tunnel_command(settings: RayClusterSettings, target: Transport, head: HeadInfo, head_is_target: bool) -> str:
    # ExitOnForwardFailure: fail when a local port (8265, 10001) is taken (perhaps by another user's
    # listener, which would then get the requests and the token) instead of running on without it.
    forward = (f"-o ExitOnForwardFailure=yes -L {TUNNEL_DASHBOARD_PORT}:127.0.0.1:{head.dashboard_port} "
               f"-L {TUNNEL_CLIENT_PORT}:127.0.0.1:{head.client_port}")
    if target.params is not None:
        p = target.params
        login = (f"{p.username}@" if p.username else "") + p.host
        port = f" -p {p.port}" if p.port else ""
        if head_is_target:
            return f"ssh -N {forward}{port} {login}"
        jump = login + (f":{p.port}" if p.port else "")
        return f"ssh -N {forward} -J {jump} {head.node}"
    if head_is_target:
        return f"(this machine) ssh -N {forward} {shlex.quote(_this_host())}"
    return f"ssh -N {forward} {head.node}"


def _this_host() -> str:
    import socket

    return socket.gethostname()


class ReadinessReport:
    """Each new readiness state said once: in the run log and in the cluster's progress
    artifact (nodes alive of expected), which the run's Artifacts tab shows as it changes."""

    def __init__(self, plan: ClusterPlan):
        self.plan = plan
        self.expected = plan.settings.ready_nodes  # the allocation's nodes and the worker jobs' at start
        self.last = ""
        self.artifact_id = None

    async def say(self, text: str, alive: int = 0) -> None:
        if text == self.last:
            return
        self.last = text
        get_run_logger().info(text)
        progress = round(100.0 * min(alive, self.expected) / self.expected, 1)
        description = f"Ray cluster {self.plan.cluster_id}: {text}"
        try:
            if self.artifact_id is None:
                self.artifact_id = await acreate_progress_artifact(
                    progress, key=f"ray-progress-{self.plan.cluster_id}", description=description)
            else:
                await aupdate_progress_artifact(self.artifact_id, progress, description=description)
        except Exception as exc:  # a progress bar never fails a cluster
            get_run_logger().debug("progress artifact not updated: %s", exc)


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    @property
    def passed(self) -> bool:
        return time.monotonic() > self.at


@task(name="wait-for-ray-cluster", cache_policy=NO_CACHE)
async def wait_until_ready(target: Transport, scheduler: Scheduler, plan: ClusterPlan) -> ReadyCluster:
    """Wait for the head (job state, then its head.env), then for every node ALIVE on its
    dashboard; poll with short backoff."""
    report = ReadinessReport(plan)
    deadline = Deadline(plan.settings.readiness_timeout)
    head = await wait_for_head(target, scheduler, plan, report, deadline)
    # SSH reaches the head by its name, as users do (`ssh node12`): its Ray address may be
    # on a fabric (network_interface) where no sshd listens
    head_host = "127.0.0.1" if plan.settings.scheduler is SchedulerKind.none else head.node
    local_port = await target.forward_to(head_host, head.dashboard_port)
    nodes = await wait_for_nodes(target, scheduler, plan, local_port, report, deadline)
    client_local_port = await target.forward_to(head_host, head.client_port)
    return ReadyCluster(head, local_port, nodes, client_local_port)


async def wait_for_head(
    target: Transport, scheduler: Scheduler, plan: ClusterPlan, report: ReadinessReport, deadline: Deadline
) -> HeadInfo:
    """Until the job runs and its head wrote head.env; fail on a job that ended or can never run."""
    delay, state = 0.1, None
    while True:
        state = await scheduler.state(target, plan.job_id)
        await report.say(f"job {plan.job_id}: {state}")
        status = await target.read_text(f"{plan.cluster_dir}/status")
        if status and "RAY_FAILED=" in status:
            raise ClusterFailed(f"cluster {plan.cluster_id} failed to start: {status.strip()}",
                                reason=FailureReason.start_failed, retryable=_mendable(status), head_failed=True)
        if state.hopeless:
            raise ClusterFailed(f"job {plan.job_id} can never start as asked: {state}", reason=FailureReason.never_startable)
        if state.phase is JobPhase.ended:
            raise ClusterFailed(
                f"job {plan.job_id} ended before the cluster was ready ({state}).\n{await _log_tail(target, plan)}",
                reason=FailureReason.start_failed, retryable=True,
            )
        if state.phase is JobPhase.running:
            text = await target.read_text(f"{plan.cluster_dir}/head.env")
            # only once the head found its ports its own: until then one may be a stranger's
            # listener, and the first request sends it the token
            if ports_verified(text):  # (RAY_DEADLINE is written with it: ar_write_head_env)
                head = parse_head_env(text)
                plan.deadline = head.deadline
                await report.say(f"head is {head.node} ({head.ip}), waiting for {report.expected} node(s)")
                return head
        if deadline.passed:
            # still queued: a fresh allocation would queue the same; started: the head failed it
            raise ClusterFailed(
                f"cluster {plan.cluster_id} not ready after {deadline.seconds:g}s: {report.last or 'no answer'}",
                reason=FailureReason.readiness_timeout, retryable=state.phase is JobPhase.running, head_failed=True,
            )
        await asyncio.sleep(delay)
        # back off while the job waits in the queue; once it runs, its head writes head.env
        # within seconds: look briskly, so the head is seen when it is up, not a backoff step later
        delay = 0.25 if state.phase is JobPhase.running else min(delay * 1.5, 2.0)


async def wait_for_nodes(
    target: Transport, scheduler: Scheduler, plan: ClusterPlan, local_port: int, report: ReadinessReport,
    deadline: Deadline,
) -> list[dict]:
    """Until the head's dashboard lists every expected node ALIVE; fail if the job ends."""
    joined: list[str] = []
    next_state_check = 0.0
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{local_port}", headers=auth_headers(plan), timeout=5
    ) as client:
        while True:
            try:
                nodes = await alive_nodes(client)
            except (httpx.HTTPError, KeyError, ValueError):
                nodes = None  # dashboard not up yet
            if nodes is not None:
                joined = [node_name(n) for n in nodes]
                await report.say(f"{len(nodes)} of {report.expected} nodes alive", alive=len(nodes))
                # and each found its ports its own (ar_verify_ports): Ray's head sends the
                # token to them once the job runs
                if len(nodes) >= report.expected and await _nodes_with_own_ports(target, plan) >= report.expected:
                    return nodes
            if time.monotonic() >= next_state_check:  # the dashboard is cheap; squeue is not
                next_state_check = time.monotonic() + 2
                state = await scheduler.state(target, plan.job_id)
                await _fail_on_node_status(target, plan, joined)
                if state.phase is JobPhase.ended:
                    raise ClusterFailed(f"job {plan.job_id} ended while nodes were joining ({state})",
                                        reason=FailureReason.start_failed, retryable=True, joined=joined)
            if deadline.passed:
                raise ClusterFailed(
                    f"cluster {plan.cluster_id} not ready after {deadline.seconds:g}s: {report.last}"
                    + (f" (joined: {', '.join(joined)})" if joined else ""),
                    reason=FailureReason.readiness_timeout, retryable=True, joined=joined,
                )
            # once the head is up, nodes join within seconds: poll briskly to see readiness at once
            await asyncio.sleep(0.25)


async def _nodes_with_own_ports(target: Transport, plan: ClusterPlan) -> int:
    """How many nodes found every listener on their ports their own (nodes/NAME.ports)."""
    listing = await target.run(f"ls {shlex.quote(plan.cluster_dir + '/nodes')}", check=False)
    return sum(name.endswith(".ports") for name in listing.stdout.split())


async def _fail_on_node_status(target: Transport, plan: ClusterPlan, joined: list[str]) -> None:
    """A node that could not start says why in the cluster's status (RAY_FAILED=..., with
    its name): no address on network_interface, failed setup_commands. Waiting for it
    could only end in the readiness timeout."""
    status = await target.read_text(f"{plan.cluster_dir}/status")
    failed = [line for line in (status or "").splitlines() if line.startswith("RAY_FAILED=")]
    if failed:
        raise ClusterFailed(f"cluster {plan.cluster_id} failed to start: " + "; ".join(f[11:] for f in failed),
                            reason=FailureReason.start_failed, retryable=_mendable(status), joined=joined)


# Failures a fresh cluster with the same inputs would meet again: the cluster's launcher
# (ar_launcher_ended: pbsdsh, srun, pbs_tmrsh or ssh refusing before a worker began), and a
# node's own checks before `ray start` (ar_node_checks: a Ray version, temp dir, limit or
# interface the inputs chose; the line names the fix, so a retry would only queue again).
LAUNCHER_FAILED = "RAY_FAILED=launcher: "
NODE_CHECK_FAILED = "RAY_FAILED=node check on "


def _mendable(status: str) -> bool:
    """Whether a fresh cluster may not fail as this one did (its status's RAY_FAILED lines)."""
    return not any(line.startswith((LAUNCHER_FAILED, NODE_CHECK_FAILED)) for line in status.splitlines())


async def _log_tail(target: Transport, plan: ClusterPlan) -> str:
    logs = shlex.quote(f"{plan.cluster_dir}/logs")
    tail = await target.run(f"tail -n 20 {logs}/*.out {logs}/supervisor.log 2>/dev/null", check=False)
    return tail.stdout[-1500:]


async def confirm_nodes_alive(plan: ClusterPlan, local_port: int, ready_nodes: list[dict]) -> None:
    """Just before the job begins: every node that was ready is still alive. A node lost
    by now is the allocation's fault, not the job's: a fresh cluster without it may work."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{local_port}", headers=auth_headers(plan), timeout=5
    ) as client:
        alive = {node["node_id"]: node for node in await alive_nodes(client)}
    lost = [node_name(node) for node in ready_nodes if node["node_id"] not in alive]
    if lost:
        raise ClusterFailed(
            f"Ray node(s) lost before the job began: {', '.join(lost)} ({len(alive)} of {len(ready_nodes)} alive)",
            reason=FailureReason.node_lost, retryable=True, joined=[node_name(node) for node in alive.values()],
        )


class NodeLost(RuntimeError):
    """A node of the ready cluster died and node_failure is 'stop'."""

    reason = FailureReason.node_lost


async def watch_nodes(plan: ClusterPlan, local_port: int, ready_nodes: list[dict], every: float = 3.0) -> None:
    """Report nodes that die after readiness; raise NodeLost when told to stop on it. Worker
    jobs' nodes come and go (scale --remove, adaptive release, their own walltime): only the
    allocation's nodes are watched."""
    logger = get_run_logger()
    known = {n["node_id"]: node_name(n) for n in ready_nodes if not is_worker_job_node(node_name(n))}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{local_port}", headers=auth_headers(plan), timeout=5
    ) as client:
        while True:
            await asyncio.sleep(every)
            try:
                alive = {n["node_id"] for n in await alive_nodes(client)}
            except (httpx.HTTPError, KeyError, ValueError):
                continue  # the head's own health is the scheduler's and the job's business
            lost = [name for node_id, name in known.items() if node_id not in alive]
            if lost:
                message = f"Ray node(s) lost: {', '.join(map(str, lost))} ({len(alive)} of {len(known)} alive)"
                if plan.settings.node_failure is NodeFailure.stop:
                    raise NodeLost(message + "; stopping the cluster (node_failure=stop)")
                logger.warning(message + "; going on (node_failure=continue)")
                for node_id in [i for i in known if i not in alive]:
                    known.pop(node_id)


@task(name="publish-connection-info", cache_policy=NO_CACHE)
async def publish_connection_info(
    target: Transport, scheduler: Scheduler, plan: ClusterPlan, ready: ReadyCluster
) -> ConnectionInfo:
    """Print, save (JSON, settings.info_file) and publish (Prefect artifact) how to reach the
    cluster. No secret in any of them."""
    logger = get_run_logger()
    settings = plan.settings
    head, local_port, nodes, info_file = ready.head, ready.local_port, ready.nodes, settings.info_file
    head_is_target = settings.scheduler is SchedulerKind.none
    info = ConnectionInfo(
        cluster_id=plan.cluster_id,
        scheduler=scheduler.name,
        job_id=plan.job_id,
        head_node=head.node,
        head_ip=head.ip,
        ray_address=f"{head.ip}:{head.gcs_port}",
        dashboard_url=f"http://127.0.0.1:{local_port}",
        dashboard_port_on_head=head.dashboard_port,
        ray_client_address=f"ray://127.0.0.1:{ready.client_local_port}",
        ray_client_port_on_head=head.client_port,
        tunnel_command=_tunnel_command(settings, target, head, head_is_target),
        job_submit_example=(
            (f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={plan.token_path} " if settings.token_auth else "")
            + f"ray job submit --address http://127.0.0.1:{TUNNEL_DASHBOARD_PORT} --working-dir . -- python my_script.py"
        ),
        token_file=plan.token_path if settings.token_auth else "",
        token_block=token_block_name(plan) if settings.token_auth and settings.publish_token_block else "",
        logs_dir=plan.logs_dir if settings.keep_logs else "",
        deadline=plan.deadline,
        allocation=plan.allocation,
        allocations=1 + settings.continue_after_walltime,
        nodes=[
            {
                "node": node_name(n),
                "ip": n.get("node_ip"),
                "head": bool(n.get("is_head_node")),
                "CPU": n.get("resources_total", {}).get("CPU", 0),
                "GPU": n.get("resources_total", {}).get("GPU", 0),
                "memory_gb": round(n.get("resources_total", {}).get("memory", 0) / 1024**3, 2),
            }
            for n in nodes
        ],
    )
    logger.info("\n%s", info.as_text())
    plan.nodes = [str(node["node"]) for node in info.nodes]
    emit_cluster_event("ready", plan.cluster_id, scheduler=info.scheduler, job_id=info.job_id, nodes=plan.nodes,
                       ray_address=info.ray_address, head_node=info.head_node,
                       dashboard_port_on_head=info.dashboard_port_on_head)
    if info_file:
        # Atomically, 0600 (it names the token file): a reader polling it never sees half a file.
        write_text_atomic(info_file, json.dumps(asdict(info), indent=2) + "\n", mode=0o600)
    # the nodes' own record that the cluster was found ready: a worker whose Ray ends before
    # it starts Ray again (a failed start); after it, its end is a lost node (ar_run_node)
    await target.run(f"touch {shlex.quote(plan.cluster_dir)}/ready", check=False)
    await create_markdown_artifact(
        key=f"ray-cluster-{plan.cluster_id}",
        description="How to connect to the Ray cluster",
        markdown="\n".join(
            [
                f"# Ray cluster `{info.cluster_id}`",
                "| | |",
                "|---|---|",
                f"| scheduler | {info.scheduler} |",
                f"| job id | {info.job_id} |",
                f"| head node | {info.head_node} ({info.head_ip}) |",
                f"| Ray address | `{info.ray_address}` |",
                f"| dashboard (flow's tunnel) | [{info.dashboard_url}]({info.dashboard_url}) |",
                f"| Ray Client (flow's tunnel) | `{info.ray_client_address}` |",
                f"| tunnel | `{info.tunnel_command}` |",
                f"| submit | `{info.job_submit_example}` |",
                *([f"| allocation ends | {_when(info.deadline)} (`{info.deadline}`) |"] if info.deadline else []),
                *([f"| allocation | {info.allocation} of at most {info.allocations} |"] if info.allocations > 1 else []),
            ]
        ),
    )
    await create_table_artifact(
        key=f"ray-nodes-{plan.cluster_id}", table=info.nodes, description="Nodes of the Ray cluster once ready"
    )
    return info
