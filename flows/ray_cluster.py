"""The ray-cluster flows and their deployment entry points (prefect.yaml): start a Ray
cluster, prove it is up, run the job, tear it all down.

    python -m flows.ray_cluster --help

The command line is flows/cli.py, its subcommands flows/commands/, the --dry-run plan
flows/plan.py: this module is the pipeline they and the deployments run.
"""

from __future__ import annotations

if __name__ == "__main__":
    # The program, before anything slow is imported (a signal meanwhile is not lost): the
    # command line, which loads this module under its own name, flows.ray_cluster, once.
    import sys

    from flows.stop_signals import STOP

    STOP.install()
    from flows.cli import main

    sys.exit(main())

import asyncio
import inspect
import json
import re
import shlex
from dataclasses import asdict, dataclass
from typing import Annotated

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run as current_flow_run
from prefect.settings import get_current_settings
from prefect.states import Cancelled
from pydantic import BaseModel, Field

from flows.commands.scale import scale_cluster
from flows.stop_signals import STOP
from flows.target import open_target
from tasks.atomic_file import write_text_atomic
from tasks.checks import (
    PASS,
    WARN,
    CheckRow,
    failed,
    fast_login_rows,
    host_key_row,
    render_markdown,
    rows_json,
    run_checks,
)
from tasks.cluster import (
    CLUSTER_ID_RE,
    ClusterPlan,
    beat,
    load_cluster_states,
    make_private_work_dir,
    prepare_environment,
    prune_old_logs,
    publish_environment,
    save_cluster_state,
    start_cluster,
    target_work_dir,
    teardown_cluster,
)
from tasks.failures import FailureReason, InvalidInput, reason_of
from tasks.logs import get_run_logger
from tasks.readiness import (
    ClusterFailed,
    ConnectionInfo,
    ReadyCluster,
    publish_connection_info,
    wait_until_ready,
    watch_nodes,
)
from tasks.scaling import adapt_worker_jobs, add_worker_jobs
from tasks.schedulers import JobPhase, Scheduler, scheduler_for
from tasks.schedulers.base import SchedulerRejected
from tasks.settings import (
    AdvancedOptions,
    BatchClusterOptions,
    ClusterOptions,
    EnvironmentOptions,
    PbsOptions,
    RayClusterSettings,
    RuntimeEnvOptions,
    ScaleOptions,
    SchedulerKind,
    SlurmOptions,
)
from tasks.transport import Transport
from tasks.user_job import keep_alive, run_user_job, warm_up_job_client

__all__ = ["STOP", "bring_up", "check_site", "ray_cluster_check_direct", "ray_cluster_check_pbs", "ray_cluster_check_slurm", "open_target", "ray_cluster", "ray_cluster_direct", "ray_cluster_pbs",
           "ray_cluster_scale", "ray_cluster_slurm", "remember", "run_cluster", "start_adapting",
           "teardown_saved_clusters"]



async def teardown_saved_clusters(flow, flow_run, state) -> None:
    """on_cancellation / on_crashed: the flow process may be gone (SIGKILL after a
    cancel), so rebuild each target from the state the flow persisted and tear down."""
    logger = get_run_logger()
    for plan in load_cluster_states(str(flow_run.id)):
        logger.info("hook (%s): tearing down cluster %s", state.name, plan.cluster_id)
        async with await open_target(plan.settings) as target:
            await teardown_cluster.fn(target, scheduler_for(plan.settings), plan)


def refuse_token_block_without_a_server(settings: RayClusterSettings) -> None:
    """Only to a server the user chose and configured: without one a run has Prefect's
    temporary server (a deployment's process with no API: no authentication, on a loopback
    every user reaches) or, from the command line, the user's default server, which the
    command line looks at only after this check (flows/user_server.py)."""
    if settings.publish_token_block and not get_current_settings().api.url:
        raise InvalidInput(
            "publish_token_block needs a configured Prefect server (PREFECT_API_URL, e.g. `make server`): "
            "without one the token would go to a server you did not choose, possibly one with no authentication"
        )


def write_state_file(path: str, plan: ClusterPlan, scheduler: Scheduler) -> None:
    """What a cleanup step needs when the flow could not tear down: one KEY=value per line,
    the cluster's, then each queued successor allocation's, in order (cleanup: the last first)."""
    if path:
        text = "".join(f"cluster_id={each.cluster_id}\nscheduler={scheduler.name}\njob_id={each.job_id}\n"
                       for each in (plan, *plan.successors))
        write_text_atomic(path, text, 0o600)


def warn_about_insecure_choices(settings: RayClusterSettings, logger) -> None:
    if settings.dashboard_host != "127.0.0.1":
        logger.warning(
            "dashboard_host=%s: the Ray dashboard and job API (remote code execution) listen beyond loopback%s",
            settings.dashboard_host, "" if settings.token_auth else " WITHOUT authentication",
        )
    if not settings.token_auth:
        logger.warning("token_auth is off: anyone who reaches the cluster's ports can run code as you")


async def _unless_a_node_dies(work, watcher: asyncio.Task):
    """Run the work; a NodeLost from the watcher wins over it. Cancelled, it cancels the work."""
    job = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if watcher in done and watcher.exception() is not None:
            raise watcher.exception()
        return await job
    finally:
        if not job.done():
            job.cancel()
            await asyncio.wait({job}, timeout=5)


class StoppedOnPurpose(Exception):
    """SIGINT/SIGTERM to the command line: the user stopped the cluster (the run ends Cancelled)."""


async def _until_stopped(up: asyncio.Task) -> None:
    """Wait until `up` is done, unless the command line's SIGINT/SIGTERM comes first: then
    StoppedOnPurpose, and the caller's teardown cancels `up`. Its result is the caller's to
    take: a failure's traceback then goes from the caller straight into `up`'s frames."""
    stop = STOP.stop_event()
    if stop is None:  # not started by the command line: Prefect's own signal handling applies
        await asyncio.wait({up})
        return
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({up, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if not up.done():
        raise StoppedOnPurpose(f"stopped by {STOP.name}")


async def _settle(task: asyncio.Task, grace: float = 5.0) -> None:
    """Cancel `task` and wait until it is over, so nothing it started races the teardown.
    Cancelled again while it runs on: Python 3.11's wait_for can swallow a cancellation."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if task.done() and not task.cancelled():
        task.exception()  # seen (raised, if at all, by whoever awaited it)
    elif not task.done():
        get_run_logger().warning("bring-up still running %.0fs after cancel; tearing down anyway", grace)


async def _bring_up_and_hold(
    target: Transport, scheduler: Scheduler, plan: ClusterPlan, work_dir: str, background: list[asyncio.Task]
) -> dict:
    """The pipeline of one cluster: environment, start, readiness, connection info, then
    the user job and/or keep-alive. Its teardown is the caller's (_one_cluster)."""
    if plan.settings.user_script:
        background.append(warm_up_job_client())
    ready, info = await bring_up(target, scheduler, plan, work_dir, background)
    await _run_job_or_hold(target, scheduler, plan, ready, background)
    return asdict(info)


async def bring_up(
    target: Transport, scheduler: Scheduler, plan: ClusterPlan, work_dir: str, background: list[asyncio.Task]
) -> tuple[ReadyCluster, ConnectionInfo]:
    """Environment, start, readiness, connection info: a cluster ready for work. The
    heartbeat joins `background`; teardown is the caller's, whatever happens here."""
    await make_private_work_dir(target, work_dir)
    # Submit first, build meanwhile: a batch job waits in the queue while the environment
    # is built (time-to-ready is max(build, queue) + start, not their sum), a local
    # supervisor starts its scripts. Either waits for environment.env; a build that fails
    # ends here, and teardown cancels the job.
    building = asyncio.create_task(prepare_environment(target, plan.settings, work_dir))
    try:
        await prune_old_logs(target, plan.settings, work_dir)
        if not plan.job_id:  # a successor allocation's job was queued with the first one's
            await start_cluster(target, scheduler, plan)
        remember(plan, scheduler)
        await queue_successors(target, scheduler, plan, work_dir)
        background.append(asyncio.create_task(beat(target, plan)))
        if plan.settings.scale.worker_jobs:  # queued beside the head job; readiness waits for them too
            await add_worker_jobs(target, scheduler, plan, plan.settings.scale.worker_jobs)
            remember(plan, scheduler)
        plan.environment = await building
    finally:
        if not building.done():
            building.cancel()
            await asyncio.gather(building, return_exceptions=True)
    await publish_environment(target, plan)
    remember(plan, scheduler)
    ready = await wait_until_ready(target, scheduler, plan)
    info = await publish_connection_info(target, scheduler, plan, ready)
    return ready, info


async def _run_job_or_hold(
    target: Transport, scheduler: Scheduler, plan: ClusterPlan, ready, background: list[asyncio.Task]
) -> None:
    """The user's script, then keep-alive if asked (or if there is no script); a node lost
    meanwhile (node_failure=stop) ends both."""
    watcher = asyncio.create_task(watch_nodes(plan, ready.local_port, ready.nodes))
    background.append(watcher)
    settings = plan.settings
    start_adapting(target, scheduler, plan, ready, background)
    try:
        if settings.user_script:
            await _unless_a_node_dies(run_user_job(target, plan, ready.local_port, ready.nodes), watcher)
        if settings.keep_alive or not settings.user_script:
            await _unless_a_node_dies(keep_alive(plan, ready.local_port), watcher)
    except Exception as failure:
        await keep_the_failed_cluster_up(target, scheduler, plan, ready, failure)
        raise


async def keep_the_failed_cluster_up(
    target: Transport, scheduler: Scheduler, plan: ClusterPlan, ready, failure: Exception
) -> None:
    """on_failure keep=MINUTES: a cluster whose job failed or whose node died stays up for
    debugging, that long, until cancelled, or until its job ends; then the usual teardown.
    A failure that a retry will answer is not kept (the retry needs the allocation)."""
    seconds = plan.settings.cluster.keep_on_failure_seconds
    if not seconds or (isinstance(failure, ClusterFailed) and failure.retryable and plan.settings.retries):
        return
    if reason_of(failure) is FailureReason.walltime_reached:  # the allocation is ending: nothing to keep
        return
    get_run_logger().warning(
        "%s: keeping the failed cluster %s up for %.1f min for debugging (dashboard http://127.0.0.1:%d "
        "through the flow's tunnel; the tunnel command and Ray address are above); cancel the run to tear it down now",
        reason_of(failure).value, plan.cluster_id, seconds / 60, ready.local_port)
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        await asyncio.sleep(min(5.0, max(0.0, until - loop.time())))
        if (await scheduler.state(target, plan.job_id)).phase is JobPhase.ended:
            get_run_logger().warning("the job of cluster %s ended while kept up", plan.cluster_id)
            return
    get_run_logger().info("kept cluster %s up for %.1f min: tearing it down", plan.cluster_id, seconds / 60)


def start_adapting(target: Transport, scheduler: Scheduler, plan: ClusterPlan, ready: ReadyCluster,
                   background: list[asyncio.Task]) -> None:
    """scale.adapt: the adaptive loop beside whatever holds the cluster (a job, keep-alive, tasks)."""
    if not plan.settings.scale.adapt_bounds:
        return

    def record(ids: list[str]) -> None:  # in the saved state at once: a crash hook cancels them too
        plan.worker_jobs += ids
        remember(plan, scheduler)

    background.append(asyncio.create_task(adapt_worker_jobs(target, scheduler, plan, ready.local_port, record)))


def remember(plan: ClusterPlan, scheduler: Scheduler) -> None:
    """Save what a teardown needs if this process dies: for the crash/cancel hooks (under
    this flow run's id) and for the workflow's cleanup step (settings.state_file); the
    queued successor allocations with the cluster."""
    for each in (plan, *plan.successors):
        save_cluster_state(each, str(current_flow_run.id or ""))
    write_state_file(plan.settings.state_file, plan, scheduler)


# --- continue_after_walltime: successor allocations, queued while the first one runs ----------

async def queue_successors(target: Transport, scheduler: Scheduler, plan: ClusterPlan, work_dir: str) -> None:
    """continue_after_walltime: the successor allocations, each a whole cluster of its own whose
    job waits (afterany) for the one before it, submitted now so they queue while this one
    runs. Only those missing (a retry's fresh cluster queues again what the failed one had);
    one the scheduler refuses is submitted when the one before reaches its walltime
    (_next_cluster), so the run goes on all the same, after a wait in the queue."""
    wanted = plan.settings.continue_after_walltime - (plan.allocation - 1)
    while len(plan.successors) < wanted:
        before = plan.successors[-1] if plan.successors else plan
        successor = ClusterPlan.new(plan.settings, work_dir, allocation=before.allocation + 1)
        plan.successors.append(successor)
        remember(plan, scheduler)  # before its submission: a crash hook or a cleanup finds it too
        try:
            await start_cluster(target, scheduler, successor, after=before.job_id)
        except Exception as exc:
            get_run_logger().warning("allocation %d not queued (%s): it will be submitted when allocation %d reaches "
                                     "its walltime", successor.allocation,
                                     str(exc).splitlines()[0] if str(exc) else type(exc).__name__, before.allocation)
            plan.successors.remove(successor)
            await teardown_cluster(target, scheduler, successor)
            remember(plan, scheduler)
            return
        remember(plan, scheduler)


async def cancel_successors(target: Transport, scheduler: Scheduler, plan: ClusterPlan) -> None:
    """The successor allocations still queued, when the run does not go on in them: the last
    first, so none starts when the job it waits for ends. One that cannot be torn down now is
    left to the crash hooks and the cleanup (its state is kept), never to block this one's."""
    if not plan.successors:
        return
    get_run_logger().info("cancelling the successor allocation(s) still queued: %s",
                          ", ".join(f"{each.allocation} (job {each.job_id or 'not submitted'})" for each in plan.successors))
    left = []
    for successor in reversed(plan.successors):
        try:
            await teardown_cluster(target, scheduler, successor)
        except Exception as exc:
            get_run_logger().warning("successor allocation %d (cluster %s) not torn down: %s",
                                     successor.allocation, successor.cluster_id, exc)
            left.insert(0, successor)
    plan.successors = left
    remember(plan, scheduler)


def _reached_walltime(up: asyncio.Future) -> bool:
    """The cluster's work ended 'walltime reached' (its queued successors, if any, go on)."""
    return (up.done() and not up.cancelled() and up.exception() is not None
            and reason_of(up.exception()) is FailureReason.walltime_reached)


@dataclass
class AllocationEnd:
    """How one allocation of the run ended, for the run's report."""

    allocation: int
    cluster_id: str
    job_id: str
    ended: str


async def report_allocations(ends: list[AllocationEnd], allocations: int) -> None:
    """The `ray-cluster-allocations` artifact: every allocation of a run that may go on after
    its walltime (continue_after_walltime), how each ended."""
    rows = "".join(f"| {end.allocation} | `{end.cluster_id}` | {end.job_id or '-'} | {end.ended} |\n" for end in ends)
    try:
        await create_markdown_artifact(
            key="ray-cluster-allocations", description="The run's allocations (continue_after_walltime)",
            markdown=f"# Allocations: {len(ends)} of at most {allocations}\n\n"
                     f"| allocation | cluster | job | ended |\n|---|---|---|---|\n{rows}")
    except Exception as exc:  # the artifact is a courtesy; the log says the same
        get_run_logger().debug("no allocations artifact: %s", exc)


async def run_cluster(settings: RayClusterSettings) -> dict:
    """The pipeline, whichever entry point: a cluster from start to teardown, and a fresh
    one (without the nodes that failed) while one fails to come up and retries are left; one
    that reaches its walltime with a successor allocation queued (continue_after_walltime)
    is followed by the successor's fresh cluster, until one ends otherwise.
    A failure is reported with its reason (tasks/failures.py) before it ends the run."""
    ends: list[AllocationEnd] = []
    try:
        refuse_token_block_without_a_server(settings)
        scheduler = scheduler_for(settings)
        async with await open_target(settings) as target:
            work_dir = await target_work_dir(target, settings)
            warn_about_insecure_choices(settings, get_run_logger())
            await refuse_what_fails_the_fast_checks(target, settings)
            plan, retried, previous = ClusterPlan.new(settings, work_dir), 0, ""
            while True:
                try:
                    result = await _one_cluster(target, scheduler, plan, work_dir)
                except Exception as failure:
                    ending = _said_with_the_excluded_nodes(failure, scheduler, previous) if retried else failure
                    following = await _next_cluster(scheduler, ending, plan, retried, work_dir, ends)
                    if following is None:
                        # none left queued behind a run that ends (a teardown that failed kept them)
                        await cancel_successors(target, scheduler, plan)
                        if ending is failure:
                            raise
                        raise ending from failure
                    retried = retried + 1 if following.allocation == plan.allocation else 0
                    previous = str(failure).splitlines()[0]
                    plan = following
                    continue
                ends.append(AllocationEnd(plan.allocation, plan.cluster_id, plan.job_id,
                                          "finished" if isinstance(result, dict) else "cancelled"))
                return result
    except BaseException as failure:
        await report_failure(failure)
        raise
    finally:
        if settings.continue_after_walltime:
            await report_allocations(ends, 1 + settings.continue_after_walltime)


def _said_with_the_excluded_nodes(failure: Exception, scheduler: Scheduler, previous: str) -> Exception:
    """A retry's job refused once nodes were left out of it: the scheduler's words alone
    ("Requested node configuration is not available") hide why, so the nodes and the
    failure that had them left out are said with them."""
    if not (isinstance(failure, SchedulerRejected) and scheduler.exclude_nodes):
        return failure
    return SchedulerRejected(f"{failure} (the retry left out {', '.join(scheduler.exclude_nodes)}, which failed "
                             f"before: {previous}; the site may have no other nodes to take their place)")


async def _next_cluster(scheduler: Scheduler, failure: Exception, plan: ClusterPlan, retried: int, work_dir: str,
                        ends: list[AllocationEnd]) -> ClusterPlan | None:
    """After a cluster that failed: a fresh one for the same allocation (a retry), the next
    allocation's queued one (walltime reached), or None: the run ends with the failure."""
    settings = plan.settings
    reason = reason_of(failure)
    if isinstance(failure, ClusterFailed) and failure.retryable and retried < settings.retries:
        ends.append(AllocationEnd(plan.allocation, plan.cluster_id, plan.job_id, f"{reason.value}: retried"))
        await _before_retry(scheduler, failure, retried + 1, settings.retries)
        return ClusterPlan.new(settings, work_dir, allocation=plan.allocation)
    ends.append(AllocationEnd(plan.allocation, plan.cluster_id, plan.job_id, reason.value))
    if reason is not FailureReason.walltime_reached or plan.allocation > settings.continue_after_walltime:
        return None
    if not plan.successors:
        # the scheduler would not queue it beside this one (a site's limit on queued jobs, say):
        # submitted now, with no dependency left to wait for; it queues what follows it
        get_run_logger().warning(
            "allocation %d of at most %d (cluster %s, job %s) reached its walltime: going on in allocation %d, "
            "submitted now (it could not be queued before), the job with ACTIVATE_RAY_ATTEMPT=%d",
            plan.allocation, 1 + settings.continue_after_walltime, plan.cluster_id, plan.job_id, plan.allocation + 1,
            plan.allocation + 1)
        return ClusterPlan.new(settings, work_dir, allocation=plan.allocation + 1)
    successor, successor.successors = plan.successors[0], plan.successors[1:]
    get_run_logger().warning(
        "allocation %d of at most %d (cluster %s, job %s) reached its walltime: going on in allocation %d "
        "(cluster %s, job %s, queued since the first), the job with ACTIVATE_RAY_ATTEMPT=%d",
        plan.allocation, 1 + settings.continue_after_walltime, plan.cluster_id, plan.job_id, successor.allocation,
        successor.cluster_id, successor.job_id, successor.allocation)
    return successor


async def refuse_what_fails_the_fast_checks(target: Transport, settings: RayClusterSettings) -> None:
    """`check`'s fast login rows (the scheduler answers, Ray's socket paths fit), before
    anything is submitted: a failure costs seconds, not a queue wait; said in check's words."""
    rows = await fast_login_rows(target, settings)
    for row in rows:
        if row.status == WARN:
            get_run_logger().warning("check %s: %s; fix: %s", row.check, row.found, row.fix)
    if failed(rows):
        raise InvalidInput("; ".join(f"check {row.check} failed: {row.found}; fix: {row.fix}" for row in failed(rows)))


async def report_failure(failure: BaseException) -> None:
    """The run log and the `ray-cluster-failure` artifact: the reason, then what happened."""
    reason = reason_of(failure)
    if reason is FailureReason.cancelled:
        return  # not a failure: the Cancelled state says it
    get_run_logger().error("ray-cluster failed (%s): %s", reason.value, str(failure).splitlines()[0] if str(failure) else type(failure).__name__)
    try:
        await create_markdown_artifact(
            key="ray-cluster-failure", description=f"Why the run failed: {reason.value}",
            markdown=f"# Failed: {reason.value}\n\n```\n{str(failure)[-6000:]}\n```\n")
    except Exception:  # the artifact is a courtesy; the error itself is what counts
        pass


async def _one_cluster(target: Transport, scheduler: Scheduler, plan: ClusterPlan, work_dir: str):
    logger = get_run_logger()
    settings = plan.settings
    logger.info("cluster %s on %s (%s, %d node(s)%s)", plan.cluster_id, target.label, scheduler.name, settings.nodes,
                f", allocation {plan.allocation} of at most {1 + settings.continue_after_walltime}"
                if settings.continue_after_walltime else "")
    remember(plan, scheduler)
    background: list[asyncio.Task] = []
    # Bring-up and hold run in a task of their own: a stop cancels that task and
    # waits until it is over, and only then does this finally tear down, whole.
    up = asyncio.ensure_future(_bring_up_and_hold(target, scheduler, plan, work_dir, background))
    try:
        try:
            await _until_stopped(up)
            return up.result()
        except ClusterFailed as failure:
            if failure.retryable and plan.job_id:  # asked while the scheduler still knows the job
                failure.failed_nodes = await failed_nodes(target, scheduler, plan, failure)
            raise
        finally:
            await _settle(up)
            for job in background:
                job.cancel()
            try:
                if not _reached_walltime(up):  # before this job ends: the successor waits for that
                    await cancel_successors(target, scheduler, plan)
            finally:
                await teardown_cluster(target, scheduler, plan)
    except StoppedOnPurpose as stop:
        # on purpose, and torn down: Cancelled, not Crashed (a failure stays Failed)
        return Cancelled(message=f"{FailureReason.cancelled.value}: {stop}; cluster {plan.cluster_id} torn down")
    except ClusterFailed as failure:
        await show_the_failed_nodes_logs(target, plan, failure)
        raise


# The log that explains a node that failed: `ray start`'s own output (which of Ray's
# processes died, and how), then the raylet's (a worker) or the GCS's (the head).
EXPLAINING_LOGS = {"head": ("ray-head.log", "gcs_server.out", "raylet.out"), "worker": ("ray-{node}.log", "raylet.out")}
# Ray's C++ logs: "[2026-12-02 13:55:30,123 E 1234 5678] ..." - the warnings and errors say why
RAY_WARNING_LINES = r"^\[[^]]* [WEFC] "


async def show_the_failed_nodes_logs(target: Transport, plan: ClusterPlan, failure: ClusterFailed) -> None:
    """After teardown (the nodes have copied their logs): the failure names the node(s) that
    failed and ends with the last lines of the log that explains each."""
    if not plan.settings.keep_logs:
        return
    nodes = ["head"] if failure.head_failed else failure.failed_nodes[:3]
    tails = []
    for node in nodes:
        names = EXPLAINING_LOGS["head" if node == "head" else "worker"]
        for name in (n.format(node=node) for n in names):
            path = f"{plan.logs_dir}/{node}/{name}.gz"
            quoted = shlex.quote(path)
            show = f"zcat {quoted}"
            if name.endswith(".out"):  # a C++ log: its warnings and errors, else its end
                show = f"{{ zcat {quoted} | grep -E {shlex.quote(RAY_WARNING_LINES)} || zcat {quoted}; }}"
            shown = await target.run(f"{show} 2>/dev/null | tail -n 15", check=False, timeout=30)
            if shown.stdout.strip():
                tails.append(f"--- {node}: last lines of {name} ({path}) ---\n{shown.stdout.rstrip()}")
    if nodes:
        where = f"failed node(s): {', '.join(nodes)}; logs of every node: {plan.logs_dir}"
        failure.args = ("\n".join([str(failure), where, *tails]),)


async def failed_nodes(target: Transport, scheduler: Scheduler, plan: ClusterPlan, failure: ClusterFailed) -> list[str]:
    """The allocated nodes to blame: those that did not join and that the failure names
    (a node's own RAY_FAILED line), else those that did not join when they are a few; []
    where that says nothing about a node (none or most did not join: a slow start, not bad
    nodes, and excluding most of a big allocation leaves a job no partition can run)."""
    allocated = await scheduler.allocated_nodes(target, plan.job_id)
    if failure.head_failed:
        return allocated[:1]
    missing = [node for node in allocated if node not in failure.joined]
    named = [node for node in missing if re.search(rf"\b{re.escape(node)}\b", str(failure))]
    if named:
        return named
    return missing if len(missing) <= len(allocated) // 2 else []


async def _before_retry(scheduler: Scheduler, failure: ClusterFailed, attempt: int, retries: int) -> None:
    """Say why (log and artifact), and keep the failed nodes out of the next allocation."""
    logger = get_run_logger()
    new = [node for node in failure.failed_nodes if node not in scheduler.exclude_nodes]
    if new and scheduler.can_exclude_nodes:
        scheduler.exclude_nodes += new
        excluding = f"without {', '.join(scheduler.exclude_nodes)}"
    elif new:
        excluding = f"{scheduler.name} has no portable way to exclude {', '.join(new)}: it may be allocated again"
    else:
        excluding = "no node to blame"
    reason = str(failure).splitlines()[0]
    logger.warning("attempt %d of %d failed: %s; torn down, retrying with a fresh cluster (%s)",
                   attempt, retries + 1, reason, excluding)
    await create_markdown_artifact(
        key="ray-cluster-retry",
        description=f"Why attempt {attempt} was retried",
        markdown=f"# Attempt {attempt} of {retries + 1} failed\n\n{reason}\n\nNext attempt: {excluding}.\n",
    )


def run_name_for(scheduler: SchedulerKind | None):
    """A flow run name that says where its cluster runs: ray-slurm-hpc-login-4n."""

    def run_name() -> str:
        try:
            settings = settings_from_parameters(current_flow_run.parameters, scheduler)
            where = re.sub(r"[^A-Za-z0-9.-]+", "-", settings.host.rsplit("@", 1)[-1].split(":")[0]) or "local"
            return f"ray-{settings.scheduler.value}-{where}-{settings.nodes}n"
        except Exception:  # a name never fails a run: invalid inputs are reported by the run itself
            return "ray-cluster"

    return run_name


def settings_from_parameters(parameters: dict, scheduler: SchedulerKind | None = None) -> RayClusterSettings:
    """The flow's parameter groups as one RayClusterSettings, checked across fields."""
    values = {key: value.model_dump(exclude_unset=False) if isinstance(value, BaseModel) else value
              for key, value in parameters.items()}
    if scheduler is not None:
        values["scheduler"] = scheduler
    return RayClusterSettings.model_validate(values)


# Each parameter's help, shown under its field in the run form (Prefect reads it from
# the flow function's docstring, which `described` writes from here).
PARAMETER_HELP = {
    'user_script': 'The Ray script: its text (anything with a line break) or a Python file on the machine that runs the flow, submitted as a Ray job (empty: keep the cluster up until idle)',
    'script_args': 'Arguments after the script: python SCRIPT ARG...',
    'runtime_env': "The job's runtime environment, as `ray job submit --runtime-env` takes it (working_dir, pip, env_vars), and its driver's resources (--entrypoint-num-cpus, ...)",
    'host': 'The login node: user@host:port, an ~/.ssh/config alias, or a saved SSH connection block',
    'scheduler': 'none (head and workers on the host itself), slurm or pbs (a batch job, one Ray node per allocated node)',
    'cluster': 'Node sizes and how long the cluster lives',
    'slurm': 'SLURM job options (scheduler slurm only)',
    'pbs': 'PBS job options (scheduler pbs only)',
    'scale': 'Worker jobs beside the allocation (slurm/pbs): at start, added later (scale --add), or adaptive to Ray\'s pending demand',
    'environment': 'Ray version, Python and the shared work dir (visible on every node)',
    'advanced': 'Ports, timeouts, security and SSH',
    'on_nodes': 'Also run the node checks in a short, small job (1-2 nodes, 5 minutes; nothing left after)',
}


def described(summary: str, **own: str):
    """Write a flow function's docstring: the summary, then Args for its parameters, each
    from PARAMETER_HELP unless the flow says it its own way."""

    def decorate(fn):
        args = "".join(f"        {name}: {own.get(name, PARAMETER_HELP[name])}\n"
                       for name in inspect.signature(fn).parameters)
        fn.__doc__ = f"{summary}\n\n    Args:\n{args}"
        return fn

    return decorate


FLOW_OPTIONS = dict(
    name="ray-cluster",
    log_prints=False,
    on_cancellation=[teardown_saved_clusters],
    on_crashed=[teardown_saved_clusters],
)


@flow(**FLOW_OPTIONS, flow_run_name=run_name_for(None))
@described(
    "Start a Ray cluster on the host (directly, or as a SLURM/PBS job), wait until every node is up, show how to connect, run the user's script, and always tear down.",
    host="Where to run: empty = the worker's machine; else user@host:port, an ~/.ssh/config alias, or a saved SSH connection block (the login node for SLURM/PBS)",
    environment='Ray version, Python and the shared work dir on the target',
)
async def ray_cluster(
    user_script: str = "",
    script_args: list[str] = [],  # noqa: B006 (Prefect copies parameters; the form needs the default)
    runtime_env: RuntimeEnvOptions = RuntimeEnvOptions(),
    host: str = "",
    scheduler: SchedulerKind = SchedulerKind.none,
    cluster: ClusterOptions = ClusterOptions(),
    slurm: SlurmOptions = SlurmOptions(),
    pbs: PbsOptions = PbsOptions(),
    scale: ScaleOptions = ScaleOptions(),
    environment: EnvironmentOptions = EnvironmentOptions(),
    advanced: AdvancedOptions = AdvancedOptions(),
) -> dict:
    return await run_cluster(settings_from_parameters(locals()))


@flow(**FLOW_OPTIONS, flow_run_name=run_name_for(SchedulerKind.slurm))
@described(
    'A Ray cluster as one SLURM job through the login node: one Ray node per allocated node.',
    slurm='Nodes, walltime, account, partition, QOS and extra directives of the job',
)
async def ray_cluster_slurm(
    *,
    user_script: str = "",
    script_args: list[str] = [],  # noqa: B006 (Prefect copies parameters; the form needs the default)
    runtime_env: RuntimeEnvOptions = RuntimeEnvOptions(),
    host: str,  # required: the login node (keyword-only, so it can stand in form order)
    cluster: BatchClusterOptions = BatchClusterOptions(),
    slurm: SlurmOptions = SlurmOptions(),
    scale: ScaleOptions = ScaleOptions(),
    environment: EnvironmentOptions = EnvironmentOptions(),
    advanced: AdvancedOptions = AdvancedOptions(),
) -> dict:
    return await run_cluster(settings_from_parameters(locals(), SchedulerKind.slurm))


@flow(**FLOW_OPTIONS, flow_run_name=run_name_for(SchedulerKind.pbs))
@described(
    'A Ray cluster as one PBS job through the login node: one Ray node per chunk.',
    pbs='Chunks (select) or nodes, walltime, account, queue and extra directives of the job',
)
async def ray_cluster_pbs(
    *,
    user_script: str = "",
    script_args: list[str] = [],  # noqa: B006 (Prefect copies parameters; the form needs the default)
    runtime_env: RuntimeEnvOptions = RuntimeEnvOptions(),
    host: str,  # required: the login node (keyword-only, so it can stand in form order)
    cluster: BatchClusterOptions = BatchClusterOptions(),
    pbs: PbsOptions = PbsOptions(),
    scale: ScaleOptions = ScaleOptions(),
    environment: EnvironmentOptions = EnvironmentOptions(),
    advanced: AdvancedOptions = AdvancedOptions(),
) -> dict:
    return await run_cluster(settings_from_parameters(locals(), SchedulerKind.pbs))


@flow(**FLOW_OPTIONS, flow_run_name=run_name_for(SchedulerKind.none))
@described(
    'A Ray cluster directly on one host (this machine or one over SSH), no scheduler.',
    host="Empty = the worker's machine; else user@host:port, an ~/.ssh/config alias, or a saved SSH connection block",
    cluster='Node sizes (extra workers beside the head) and how long the cluster lives',
    environment='Ray version, Python and the work dir on the host',
)
async def ray_cluster_direct(
    user_script: str = "",
    script_args: list[str] = [],  # noqa: B006 (Prefect copies parameters; the form needs the default)
    runtime_env: RuntimeEnvOptions = RuntimeEnvOptions(),
    host: str = "",
    cluster: ClusterOptions = ClusterOptions(),
    environment: EnvironmentOptions = EnvironmentOptions(),
    advanced: AdvancedOptions = AdvancedOptions(),
) -> dict:
    return await run_cluster(settings_from_parameters(locals(), SchedulerKind.none))

@flow(name="ray-cluster", flow_run_name="ray-cluster-scale")
async def ray_cluster_scale(
    cluster_id: Annotated[str, Field(pattern=CLUSTER_ID_RE.pattern, description="The cluster's id (ar-...), as its run printed it")],
    add: Annotated[int, Field(ge=0, le=1000, description="Worker jobs to submit")] = 0,
    remove: Annotated[int, Field(ge=0, le=1000, description="Worker jobs to remove (queued ones first, then the newest)")] = 0,
    host: Annotated[str, Field(description="The login node, as the cluster's run was given it (empty: the worker's machine)")] = "",
    work_dir: Annotated[str, Field(description="The cluster's work dir")] = EnvironmentOptions().work_dir,
    timeout: Annotated[float, Field(ge=0, le=86400, description="Seconds to wait for the nodes to join or leave")] = 600,
) -> dict:
    """Grow (add) or shrink (remove) a running SLURM/PBS cluster by worker jobs, and wait until
    their nodes joined or left: the `scale` command as a flow (the ray-cluster/scale deployment).

    Args:
        cluster_id: The cluster's id (ar-...), as its run printed it
        add: Worker jobs to submit, each a 1-node job sized by the cluster's scale options
        remove: Worker jobs to remove (queued ones first, then the newest)
        host: The login node, as the cluster's run was given it (empty: the worker's machine)
        work_dir: The cluster's work dir
        timeout: Seconds to wait for the nodes to join or leave
    """
    if not CLUSTER_ID_RE.fullmatch(cluster_id) or (add > 0) == (remove > 0) or max(add, remove) > 1000:
        raise InvalidInput("give a cluster id (ar-...) and one of add or remove (1 to 1000)")
    return await scale_cluster(RayClusterSettings(host=host, work_dir=work_dir), cluster_id, add - remove, timeout)



# --- `check` (issue 36): what would break a cluster on this site, before the queue ----------

class CheckFailed(RuntimeError):
    """A check row failed: the run of a check deployment ends Failed, its table in the artifact."""


async def check_site(settings: RayClusterSettings, on_nodes: bool) -> list[CheckRow]:
    """The check's rows (tasks/checks.py): the target opened (host keys), the login rows, and
    with on_nodes the check job's. Nothing is left on the target."""
    try:
        target = await open_target(settings)
    except Exception as exc:
        if not settings.host:
            raise
        return [host_key_row(settings, exc)]
    async with target:
        rows = [CheckRow("host key", PASS, f"{settings.host}: known, connected")] if settings.host else []
        work_dir = await target_work_dir(target, settings)
        rows += await run_checks(target, settings, work_dir, on_nodes)
    return rows


async def _check_flow(settings: RayClusterSettings, on_nodes: bool) -> dict:
    rows = await check_site(settings, on_nodes)
    try:
        await create_markdown_artifact(key="ray-cluster-check", markdown=render_markdown(rows),
                                       description="What would break a cluster on this site")
    except Exception as exc:  # the artifact is a courtesy; the rows are in the log and the result
        get_run_logger().debug("no check artifact: %s", exc)
    for row in rows:
        log = get_run_logger().error if row.status == "fail" else get_run_logger().info
        log("%s %s (%s): %s%s", row.status.upper(), row.check, row.where, row.found, f"; fix: {row.fix}" if row.fix else "")
    if failed(rows):
        raise CheckFailed("; ".join(f"{row.check} ({row.where}): {row.found}; fix: {row.fix}" for row in failed(rows)))
    return json.loads(rows_json(rows))


@flow(name="ray-cluster", flow_run_name="ray-cluster-check-slurm")
@described("Check, before the queue, what would break a SLURM cluster with these inputs: login host, then (on_nodes) the compute nodes.",
           slurm='Nodes, walltime, account, partition, QOS and extra directives of the job')
async def ray_cluster_check_slurm(
    *,
    user_script: str = "",
    script_args: list[str] = [],  # noqa: B006 (Prefect copies parameters; the form needs the default)
    runtime_env: RuntimeEnvOptions = RuntimeEnvOptions(),
    host: str,
    cluster: BatchClusterOptions = BatchClusterOptions(),
    slurm: SlurmOptions = SlurmOptions(),
    scale: ScaleOptions = ScaleOptions(),
    environment: EnvironmentOptions = EnvironmentOptions(),
    advanced: AdvancedOptions = AdvancedOptions(),
    on_nodes: bool = False,
) -> dict:
    parameters = {k: v for k, v in locals().items() if k != "on_nodes"}
    return await _check_flow(settings_from_parameters(parameters, SchedulerKind.slurm), on_nodes)


@flow(name="ray-cluster", flow_run_name="ray-cluster-check-pbs")
@described("Check, before the queue, what would break a PBS cluster with these inputs: login host, then (on_nodes) the compute nodes.",
           pbs='Chunks (select) or nodes, walltime, account, queue and extra directives of the job')
async def ray_cluster_check_pbs(
    *,
    user_script: str = "",
    script_args: list[str] = [],  # noqa: B006 (Prefect copies parameters; the form needs the default)
    runtime_env: RuntimeEnvOptions = RuntimeEnvOptions(),
    host: str,
    cluster: BatchClusterOptions = BatchClusterOptions(),
    pbs: PbsOptions = PbsOptions(),
    scale: ScaleOptions = ScaleOptions(),
    environment: EnvironmentOptions = EnvironmentOptions(),
    advanced: AdvancedOptions = AdvancedOptions(),
    on_nodes: bool = False,
) -> dict:
    parameters = {k: v for k, v in locals().items() if k != "on_nodes"}
    return await _check_flow(settings_from_parameters(parameters, SchedulerKind.pbs), on_nodes)


@flow(name="ray-cluster", flow_run_name="ray-cluster-check-direct")
@described("Check what would break a Ray cluster directly on one host with these inputs (on_nodes: the host's node checks too).",
           host="Empty = the worker's machine; else user@host:port, an ~/.ssh/config alias, or a saved SSH connection block",
           cluster='Node sizes (extra workers beside the head) and how long the cluster lives',
           environment='Ray version, Python and the work dir on the host')
async def ray_cluster_check_direct(
    user_script: str = "",
    script_args: list[str] = [],  # noqa: B006 (Prefect copies parameters; the form needs the default)
    runtime_env: RuntimeEnvOptions = RuntimeEnvOptions(),
    host: str = "",
    cluster: ClusterOptions = ClusterOptions(),
    environment: EnvironmentOptions = EnvironmentOptions(),
    advanced: AdvancedOptions = AdvancedOptions(),
    on_nodes: bool = False,
) -> dict:
    parameters = {k: v for k, v in locals().items() if k != "on_nodes"}
    return await _check_flow(settings_from_parameters(parameters, SchedulerKind.none), on_nodes)
