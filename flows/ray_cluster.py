"""The ray-cluster flow: start a Ray cluster, prove it is up, run the job, tear it all down.

    python -m flows.ray_cluster --help
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import shlex
import signal
import sys
import threading


class SignalStop:
    """SIGINT and SIGTERM of the command line, one way each time.

    The first one asks the running flow to stop: it cancels what is bringing the
    cluster up or holding it, tears the cluster down, and the process exits with
    128 + the signal. Later ones only say that the teardown is under way. The
    handler never raises: a KeyboardInterrupt or Prefect's TerminationSignal
    raised wherever the main thread happens to be can cut a teardown short, abort
    asyncio.run's cleanup, or be swallowed by an event loop callback. It also
    replaces a SIGINT inherited as ignored (`cmd &` in a non-interactive shell),
    which Python, and so asyncio's own Ctrl-C handling, would keep ignoring.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event: asyncio.Event | None = None
        self._previous: dict | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> bool:
        """Take SIGINT and SIGTERM (main thread only); False if already taken."""
        if self._previous is not None or threading.current_thread() is not threading.main_thread():
            return False
        self.signum, self.loop, self.event = None, None, None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return True

    def uninstall(self) -> None:
        for sig, handler in (self._previous or {}).items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = None

    def attach(self) -> None:
        """Called in the flow's event loop: from now on a signal sets self.event there."""
        self.event = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        if self.signum is not None:
            self.event.set()

    def stop_event(self) -> asyncio.Event | None:
        """The event to stop on, in the loop that attached (None elsewhere: a deployment run)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return None
        return self.event if self.loop is running else None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            _say(f"{name}: the cluster is being torn down; the flow exits when that is done")
            return
        self.signum = signum
        _say(f"{name}: stopping, tearing the cluster down")
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._fire)
            except RuntimeError:  # the loop is closed: the flow is over
                pass

    def _fire(self) -> None:
        if self.event is not None:
            self.event.set()


def _say(text: str) -> None:
    """For signal handlers: one write(2), no buffered stream that the handler may have interrupted."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


STOP = SignalStop()
if __name__ == "__main__":
    STOP.install()  # before the slow imports below: a signal in them is not lost

# The temporary server's telemetry only fails offline; set before Prefect loads.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Its first start on a fresh PREFECT_HOME (database migrations) takes 20-30 s on a
# loaded 2-core machine, beyond Prefect's 20 s default: `make demo` failed there.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
from dataclasses import asdict
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import CancelledRun
from prefect.runtime import flow_run as current_flow_run
from prefect.settings import get_current_settings
from prefect.states import Cancelled
from pydantic import BaseModel, Field, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from tasks.atomic_file import write_text_atomic
from tasks.cluster import (
    CLUSTER_ID_RE,
    ClusterPlan,
    beat,
    load_cluster_states,
    logs_dir_of,
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
from tasks.local_transport import LocalTransport
from tasks.logs import get_run_logger
from tasks.readiness import (
    ClusterFailed,
    ConnectionInfo,
    ReadyCluster,
    publish_connection_info,
    wait_until_ready,
    watch_nodes,
)
from tasks.scaling import ScaleRefused, adapt_worker_jobs, add_worker_jobs, scale_running_cluster
from tasks.schedulers import WORKER_JOB_SCRIPT, JobPhase, Scheduler, scheduler_for
from tasks.settings import (
    GROUPS,
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
from tasks.shipped import SCRIPTS_DIR
from tasks.transport import Transport
from tasks.user_job import keep_alive, run_user_job, warm_up_job_client

if TYPE_CHECKING:
    from tasks.ssh_transport import SshParams


async def open_target(settings: RayClusterSettings) -> Transport:
    """This machine, an SSH target (user@host:port or ~/.ssh/config alias), or a saved SSH block."""
    ssh_options = dict(
        key_file=settings.ssh_key_file or None,
        known_hosts=settings.known_hosts or None,
        accept_new_host_key=settings.accept_new_host_key,
    )
    if not settings.host:
        return LocalTransport(node_ssh=ssh_options)
    from tasks.ssh_transport import SshParams, SshTransport  # asyncssh: only where SSH is used

    params = None
    if "@" not in settings.host and ":" not in settings.host:
        params = await _block_params(settings)
    return await SshTransport(params or SshParams.parse(settings.host, **ssh_options)).connect()


async def _block_params(settings: RayClusterSettings) -> SshParams | None:
    from blocks.ssh import SshConnection

    try:
        block = await SshConnection.aload(settings.host)
    except Exception:  # no such block (or no server): host is an ssh alias
        return None
    return block.ssh_params(settings.accept_new_host_key)


async def teardown_saved_clusters(flow, flow_run, state) -> None:
    """on_cancellation / on_crashed: the flow process may be gone (SIGKILL after a
    cancel), so rebuild each target from the state the flow persisted and tear down."""
    logger = get_run_logger()
    for plan in load_cluster_states(str(flow_run.id)):
        logger.info("hook (%s): tearing down cluster %s", state.name, plan.cluster_id)
        async with await open_target(plan.settings) as target:
            await teardown_cluster.fn(target, scheduler_for(plan.settings), plan)


TEMPORARY_SERVER_NOTE = (
    "No Prefect server configured (PREFECT_API_URL): this run starts Prefect's temporary server, "
    "about 15 s of every run, and its record goes when the run ends. `make server` starts a lasting one "
    "(loopback, yours, with a secret) and sets PREFECT_API_URL in your Prefect profile: later runs skip "
    "that wait and show in its UI."
)


def refuse_token_block_without_a_server(settings: RayClusterSettings) -> None:
    """Prefect's temporary server has no authentication and listens on loopback, where
    every user of the machine reaches it: a token saved there is everyone's."""
    if settings.publish_token_block and not get_current_settings().api.url:
        raise InvalidInput(
            "publish_token_block needs a configured Prefect server (PREFECT_API_URL): Prefect's temporary "
            "server has no authentication, and every user of this machine could read the token from it"
        )


def write_state_file(path: str, plan: ClusterPlan, scheduler: Scheduler) -> None:
    """What a cleanup step needs when the flow could not tear down: one KEY=value per line."""
    if path:
        text = f"cluster_id={plan.cluster_id}\nscheduler={scheduler.name}\njob_id={plan.job_id}\n"
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


async def _until_stopped(up: asyncio.Task):
    """The result of `up`, unless the command line's SIGINT/SIGTERM comes first: then
    StoppedOnPurpose, once `up` is cancelled by the caller's teardown."""
    stop = STOP.stop_event()
    if stop is None:  # not started by main(): Prefect's own signal handling applies
        return await up
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({up, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if up.done():
        return up.result()
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
        await start_cluster(target, scheduler, plan)
        remember(plan, scheduler)
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
            await _unless_a_node_dies(keep_alive(plan, ready.local_port, scheduler.walltime_seconds), watcher)
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
    this flow run's id) and for the workflow's cleanup step (settings.state_file)."""
    save_cluster_state(plan, str(current_flow_run.id or ""))
    write_state_file(plan.settings.state_file, plan, scheduler)


async def run_cluster(settings: RayClusterSettings) -> dict:
    """The pipeline, whichever entry point: a cluster from start to teardown, and a fresh
    one (without the nodes that failed) while one fails to come up and retries are left.
    A failure is reported with its reason (tasks/failures.py) before it ends the run."""
    try:
        return await _clusters_until_one_works(settings)
    except BaseException as failure:
        await report_failure(failure)
        raise


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


async def _clusters_until_one_works(settings: RayClusterSettings) -> dict:
    logger = get_run_logger()
    refuse_token_block_without_a_server(settings)
    scheduler = scheduler_for(settings)
    async with await open_target(settings) as target:
        work_dir = await target_work_dir(target, settings)
        warn_about_insecure_choices(settings, logger)
        for attempt in range(1, settings.retries + 2):
            try:
                return await _one_cluster(target, scheduler, settings, work_dir)
            except ClusterFailed as failure:
                if not failure.retryable or attempt > settings.retries:
                    raise
                await _before_retry(scheduler, failure, attempt, settings.retries)
    raise AssertionError("unreachable")


async def _one_cluster(target: Transport, scheduler: Scheduler, settings: RayClusterSettings, work_dir: str):
    logger = get_run_logger()
    plan = ClusterPlan.new(settings, work_dir)
    logger.info("cluster %s on %s (%s, %d node(s))", plan.cluster_id, target.label, scheduler.name, settings.nodes)
    remember(plan, scheduler)
    background: list[asyncio.Task] = []
    # Bring-up and hold run in a task of their own: a stop cancels that task and
    # waits until it is over, and only then does this finally tear down, whole.
    up = asyncio.ensure_future(_bring_up_and_hold(target, scheduler, plan, work_dir, background))
    try:
        try:
            return await _until_stopped(up)
        except ClusterFailed as failure:
            if failure.retryable and plan.job_id:  # asked while the scheduler still knows the job
                failure.failed_nodes = await failed_nodes(target, scheduler, plan, failure)
            raise
        finally:
            await _settle(up)
            for job in background:
                job.cancel()
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
    """The allocated nodes that did not join; [] where that says nothing about a node
    (none joined, or the scheduler cannot tell)."""
    allocated = await scheduler.allocated_nodes(target, plan.job_id)
    if failure.head_failed:
        return allocated[:1]
    missing = [node for node in allocated if node not in failure.joined]
    return missing if len(missing) < len(allocated) else []


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


def _cli_field(info) -> tuple:
    """A field as the command line takes it: an enum by its values (`--node-failure continue`,
    as the form and workflow.yaml spell it), which pydantic-settings would list by member name."""
    annotation = info.annotation
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        default = info.default.value if isinstance(info.default, Enum) else info.default
        info = FieldInfo.merge_field_infos(info, default=default)
        annotation = Literal[tuple(member.value for member in annotation)]
    return annotation, info


def _cli_model() -> type[BaseSettings]:
    """The command line: every field by its flat name (--num-cpus-per-node, --slurm.nodes), read
    from the environment too (RAY_CLUSTER_*). The fields are the groups' own definitions; the
    values are validated by RayClusterSettings, as a flow run's are."""
    top = RayClusterSettings.model_fields
    fields: dict = {name: _cli_field(top[name]) for name in ("host", "scheduler", "user_script", "script_args", "runtime_env")}
    for model in GROUPS.values():
        fields.update({name: _cli_field(info) for name, info in model.model_fields.items()})
    fields.update({name: _cli_field(top[name]) for name in ("slurm", "pbs", "scale")})
    fields["dry_run"] = (bool, Field(False, description="Validate the inputs, print what would run on the target, start nothing"))

    class CliBase(BaseSettings):
        """Start a Ray cluster on an HPC resource, run a job on it, tear it down."""

        model_config = SettingsConfigDict(
            env_prefix="RAY_CLUSTER_",
            env_nested_delimiter="__",
            extra="forbid",
            cli_prog_name="python -m flows.ray_cluster",
            cli_kebab_case=True,
            cli_implicit_flags=True,
            cli_enforce_required=False,
        )

    return create_model("RayClusterCli", __base__=CliBase, **fields)


RayClusterCli = _cli_model()


def _describe_job(settings: RayClusterSettings) -> str:
    if not settings.user_script:
        return f"(none: keep alive until idle for {settings.cluster_idle_timeout} min)"
    script = (f"the script's text ({settings.user_script.count(chr(10)) + 1} lines)" if settings.script_is_text
              else settings.user_script)
    runtime_env = settings.runtime_env.as_ray()
    extra = f", runtime_env {sorted(runtime_env)}" if runtime_env else ""
    extra += "".join(f", {key}={value}" for key, value in settings.runtime_env.entrypoint_resources().items())
    return f"{script}{' ' + shlex.join(settings.script_args) if settings.script_args else ''}{extra}"


def _describe_environment(settings: RayClusterSettings) -> str:
    runtimes = settings.environment.container_runtimes
    if runtimes:
        how = runtimes[0] if settings.container_runtime.value != "auto" else "the first of " + ", ".join(runtimes)
        return (f"# 1. environment: every Ray node in container image {settings.container_image} ({how} found on "
                "the node), with the image's own python3 and ray; work dir, cluster dir and node temp dir bound in")
    return (f"# 1. environment: reuse a Python with ray=={settings.ray_version} or build "
            f"{settings.work_dir}/venvs/ray-{settings.ray_version}")


def _describe_worker_jobs(settings: RayClusterSettings, scheduler: Scheduler, plan: ClusterPlan) -> list[str]:
    if settings.scheduler is SchedulerKind.none:
        return []
    bounds = settings.scale.adapt_bounds
    when = [f"{settings.scale.worker_jobs} at start"] if settings.scale.worker_jobs else []
    when += [f"adaptive between {bounds[0]} and {bounds[1]}"] if bounds else []
    when += [f"`python -m flows.ray_cluster scale {plan.cluster_id} --add K`"]
    return [f"# 3b. worker job script {plan.cluster_dir}/{WORKER_JOB_SCRIPT} ({'; '.join(when)}):",
            scheduler.render_worker(plan.cluster_id, plan.cluster_dir).rstrip()]


def render_plan(settings: RayClusterSettings) -> str:
    """What a run would do, for --dry-run: no connection is made, nothing starts."""
    scheduler: Scheduler = scheduler_for(settings)
    plan = ClusterPlan.new(settings, settings.work_dir)
    return "\n".join(
        [
            f"# target: {settings.host or 'this machine'}; scheduler: {scheduler.name}; nodes: {settings.nodes}",
            *([f"# 0. setup_commands, on the target before Python is looked for, and on every node before Ray starts "
               f"({plan.cluster_dir}/setup_commands.sh):", settings.setup_commands.rstrip()]
              if settings.setup_commands else []),
            _describe_environment(settings),
            f"# 2. upload scripts/ to {plan.cluster_dir}/bin, this env file to {plan.cluster_dir}/cluster.env (0600):",
            plan.env_file().rstrip(),
            f"#    and, once the environment is ready, {plan.cluster_dir}/environment.env (the job script waits for it):",
            plan.environment_file().rstrip(),
            f"# 3. job script {plan.cluster_dir}/bin/job.sh:",
            scheduler.render(plan.cluster_id, plan.cluster_dir).rstrip(),
            *_describe_worker_jobs(settings, scheduler, plan),
            "# 4. submit:",
            scheduler.submit_command(plan.cluster_dir),
            *([f"{scheduler.submit_command(plan.cluster_dir, WORKER_JOB_SCRIPT)}   # x{settings.scale.worker_jobs}"]
              if settings.scale.worker_jobs else []),
            f"# 5. wait for {settings.ready_nodes} node(s) alive (readiness timeout {settings.readiness_timeout}s)",
            f"# 6. user job: {_describe_job(settings)}",
            f"# 7. teardown: cancel the job, bash {plan.cluster_dir}/bin/shutdown_ray.sh {plan.cluster_dir}",
        ]
    )


NODE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")


def _where_the_cluster_is(host: str, work_dir: str, problems: list[str]) -> RayClusterSettings | None:
    """The `logs` and `scale` commands' target, checked as the flow checks it; with the
    command's own problems, every one printed and None when there is any."""
    settings = None
    try:
        settings = RayClusterSettings(host=host, work_dir=work_dir)
    except ValidationError as exc:
        problems = problems + [f"{'.'.join(map(str, e['loc'][-1:]))}: {e['msg']}" for e in exc.errors()]
    for problem in problems:
        print(f"invalid input {problem}", file=sys.stderr)
    return None if problems else settings


def logs_main(argv: list[str]) -> int:
    """python -m flows.ray_cluster logs CLUSTER_ID [--host H] [--work-dir W] [--node N] [--tail K]"""
    import argparse

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
        ("cluster_id: not a cluster id (ar- and 32 hex digits)", not CLUSTER_ID_RE.fullmatch(args.cluster_id)),
        ("--node: not a node name", bool(args.node) and not NODE_NAME_RE.fullmatch(args.node)),
        ("--tail: between 1 and 100000", not 1 <= args.tail <= 100000)] if bad]
    settings = _where_the_cluster_is(args.host, args.work_dir, problems)
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


async def scale_cluster(settings: RayClusterSettings, cluster_id: str, delta: int, timeout: float) -> dict:
    """`scale`: the cluster's target, its dir there, then add or remove worker jobs."""
    async with await open_target(settings) as target:
        work_dir = await target_work_dir(target, settings)
        changed = await scale_running_cluster(target, f"{work_dir}/clusters/{cluster_id}", delta, timeout)
    return {"cluster_id": cluster_id, **changed}


def scale_main(argv: list[str]) -> int:
    """python -m flows.ray_cluster scale CLUSTER_ID --add K | --remove K [--host H] [--work-dir W]"""
    import argparse

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
        ("cluster_id: not a cluster id (ar- and 32 hex digits)", not CLUSTER_ID_RE.fullmatch(args.cluster_id)),
        ("--add/--remove: between 1 and 1000", not 1 <= count <= 1000),
        ("--timeout: between 0 and 86400", not 0 <= args.timeout <= 86400)] if bad]
    settings = _where_the_cluster_is(args.host, args.work_dir, problems)
    if settings is None:
        return 2
    try:
        changed = asyncio.run(scale_cluster(settings, args.cluster_id, args.add - args.remove, args.timeout))
    except (ScaleRefused, ClusterFailed) as exc:
        print(f"scale failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(changed))
    return 0


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["logs"]:
        return logs_main(argv[1:])
    if argv[:1] == ["scale"]:
        return scale_main(argv[1:])
    try:
        cli = CliApp.run(RayClusterCli, cli_args=argv)
        settings = RayClusterSettings.model_validate(cli.model_dump(exclude={"dry_run"}))
    except ValidationError as exc:
        for error in exc.errors():
            loc = error["loc"]
            if len(loc) > 1 and loc[0] in GROUPS:  # the command line's flat name: --ray-version
                loc = loc[1:]
            where = ".".join(str(part) for part in loc) or "input"
            print(f"invalid input {where}: {error['msg']}", file=sys.stderr)
        return 2
    try:
        refuse_token_block_without_a_server(settings)
    except ValueError as exc:
        print(f"invalid input publish_token_block: {exc}", file=sys.stderr)
        return 2
    if cli.dry_run:
        print(render_plan(settings))
        return 0
    if not get_current_settings().api.url:
        print(TEMPORARY_SERVER_NOTE, file=sys.stderr)
    # SIGINT and SIGTERM are STOP's, in the main thread, which only waits for the flow:
    # the flow runs in a thread of its own, where Prefect installs no SIGTERM handler
    # of its own (signal handlers are the main thread's) and asyncio none for SIGINT.
    installed = STOP.install()
    try:
        if STOP.signum is not None:
            print(f"interrupted ({STOP.name}) before the flow started: nothing to tear down", file=sys.stderr)
            return 128 + STOP.signum
        outcome: dict = {}
        thread = threading.Thread(target=_run_flow, args=(settings, outcome), name="ray-cluster-flow")
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
    finally:
        if installed:
            STOP.uninstall()
    if "error" in outcome:
        raise outcome["error"]
    return 128 + STOP.signum if STOP.signum is not None else outcome["rc"]


def _run_flow(settings: RayClusterSettings, outcome: dict) -> None:
    try:
        outcome["rc"] = asyncio.run(_run(settings))
    except BaseException as exc:  # handed to the main thread, which raises it
        outcome["error"] = exc


async def _run(settings: RayClusterSettings) -> int:
    STOP.attach()
    try:
        info = await ray_cluster(**settings.parameters())
    except (asyncio.CancelledError, CancelledRun):
        print(f"interrupted ({STOP.name or 'cancelled'}): cluster torn down", file=sys.stderr)
        return 128 + (STOP.signum or signal.SIGINT)
    except Exception as exc:
        print(f"ray-cluster failed ({reason_of(exc).value}): {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"cluster_id": info["cluster_id"], "ready": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
