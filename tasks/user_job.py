"""Run the user's script as a Ray job, or keep the cluster up until it idles out."""

from __future__ import annotations

import asyncio
import importlib
import shlex
import time
from pathlib import Path

import httpx
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.cluster import ClusterPlan
from tasks.events import emit_cluster_event
from tasks.failures import FailureReason, InvalidInput, WalltimeReached
from tasks.head_api import auth_headers
from tasks.logs import get_run_logger
from tasks.readiness import confirm_nodes_alive
from tasks.transport import Transport

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class UserJobFailed(RuntimeError):
    """The user's Ray job ended in FAILED or STOPPED."""

    reason = FailureReason.user_job_failed


def warm_up_job_client() -> asyncio.Future:
    """Import Ray's job client (about 2 s: it pulls in most of Ray) in a thread while the
    cluster starts, so the job is submitted the moment the cluster is ready."""
    return asyncio.ensure_future(asyncio.to_thread(importlib.import_module, "ray.job_submission"))


# Ray's job head gives up after 10 s when the head node's dashboard agent has not yet
# published its address (a busy or shared head node), and asks to "try again later".
NO_AGENT_YET = "No available agent to submit job"
AGENT_WAIT_S = 120.0


def submit_when_agent_ready(client, submission_id: str, wait_s: float = AGENT_WAIT_S, **job) -> str:
    """`client.submit_job`, tried again while the head's job agent is not yet reachable.

    A retry after a submission the agent took but whose answer was lost finds the
    submission id already there: that is the job, submitted once."""
    deadline = time.monotonic() + wait_s
    delay, tried = 0.5, False
    while True:
        try:
            return client.submit_job(submission_id=submission_id, **job)
        except RuntimeError as exc:
            if tried and "already exists" in str(exc):
                return submission_id
            if NO_AGENT_YET not in str(exc) or time.monotonic() + delay > deadline:
                raise
        if not tried:
            get_run_logger().info("the head's job agent is not up yet; submitting again for up to %.0f s", wait_s)
        tried = True
        time.sleep(delay)
        delay = min(delay * 1.5, 3.0)


def _client(plan: ClusterPlan, local_port: int):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(f"http://127.0.0.1:{local_port}", headers=auth_headers(plan))


async def follow_job(client, local_port: int, headers: dict[str, str], job_id: str, emit) -> tuple[str, str]:
    """Stream the job's log lines to `emit` until the job ends; return its final status and
    Ray's message about it.

    Ray's log stream closes only after a few 1 s EOF checks past the job's end (about 3 s
    with every job), so the end is taken from the status, polled every 0.1-0.5 s, and what
    the stream had not yet delivered is read from the finished log."""
    delivered = 0

    async def stream() -> None:
        nonlocal delivered
        async for chunk in client.tail_job_logs(job_id):
            delivered += len(chunk)
            for line in chunk.splitlines():
                emit(line)

    streaming = asyncio.ensure_future(stream())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{local_port}", headers=headers, timeout=30) as api:
        try:
            delay = 0.1
            while (status := (details := await _job_details(api, job_id))["status"]) not in TERMINAL:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.5)
        finally:
            streaming.cancel()
            try:
                await streaming
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the log stream can drop; the status is what counts
                get_run_logger().warning("log stream ended early: %s", exc)
        response = await api.get(f"/api/jobs/{job_id}/logs")
        response.raise_for_status()
        for line in response.json().get("logs", "")[delivered:].splitlines():
            emit(line)
    return status, details.get("message") or ""


async def _job_details(api: httpx.AsyncClient, job_id: str) -> dict:
    """The job API's record of one job, its status as a bare name (SUCCEEDED)."""
    response = await api.get(f"/api/jobs/{job_id}")
    response.raise_for_status()
    details = response.json()
    return {**details, "status": str(details.get("status")).split(".")[-1]}


@task(name="run-user-job", cache_policy=NO_CACHE)
async def run_user_job(target: Transport, plan: ClusterPlan, local_port: int, ready_nodes: list[dict]) -> str:
    """Upload the script, check the ready nodes are all still there, submit it with
    JobSubmissionClient, stream its logs, fail when it fails."""
    logger = get_run_logger()
    settings = plan.settings
    script = Path("user_script.py" if settings.script_is_text else settings.user_script).expanduser()
    remote = f"{plan.cluster_dir}/job/{script.name}"
    if settings.script_is_text:  # the form's editor: the text is the script
        await target.write_text(remote, settings.user_script)
    else:
        await target.put_file(script, remote)
    client = await asyncio.to_thread(_client, plan, local_port)
    await confirm_nodes_alive(plan, local_port, ready_nodes)
    entrypoint = shlex.join([plan.environment.python, remote, *settings.script_args])
    runtime_env = with_allocation_env(await submitted_runtime_env(settings.runtime_env), plan)
    job_id = await asyncio.to_thread(
        submit_when_agent_ready, client, f"{plan.cluster_id}-{script.stem}"[:60], entrypoint=entrypoint,
        runtime_env=runtime_env, **settings.runtime_env.entrypoint_resources(),
    )
    reserved = settings.runtime_env.entrypoint_resources()
    logger.info("submitted Ray job %s: %s%s", job_id, script.name, f" (its driver reserves {reserved})" if reserved else "")
    following = asyncio.ensure_future(follow_job(client, local_port, auth_headers(plan), job_id,
                                                 lambda line: logger.info("[%s] %s", script.name, line)))
    try:
        if not await _ended_before_walltime(following, plan):
            await stop_at_walltime(plan, [job_id], lambda: asyncio.wait({following}), client)
            status, message = following.result() if following.done() else ("RUNNING", "")
            raise WalltimeReached(walltime_message(plan, f"Ray job {job_id} ({script.name}) stopped (SIGTERM), "
                                                         f"then {status}; the cluster is torn down"))
        status, message = following.result()
    finally:
        if not following.done():
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
    emit_cluster_event("job-finished", plan.cluster_id, scheduler=plan.settings.scheduler.value, job_id=plan.job_id,
                       nodes=plan.nodes, ray_job_id=job_id, status=status)
    await create_markdown_artifact(
        key=f"ray-job-{plan.cluster_id}",
        markdown=f"# Ray job `{job_id}`\n\nscript `{script.name}`: **{status}**\n\n{message}",
        description="The user job's final status",
    )
    if status != "SUCCEEDED":
        raise UserJobFailed(f"Ray job {job_id} ({script.name}) {status}: {message}")
    logger.info("Ray job %s SUCCEEDED", job_id)
    return job_id


# Seconds the driver gets between SIGTERM and SIGKILL at the walltime margin: at most this,
# at most a third of the margin. The rest is the teardown, which must reach the cluster before
# the job script stops it itself (AR_END_MARGIN, 10 s before the end, and then exits 1: a
# failed job in the scheduler's record); with half of a 45 s margin it had 8 s on a busy host.
WALLTIME_GRACE_S = 60


def walltime_grace(plan: ClusterPlan) -> int:
    return max(1, min(WALLTIME_GRACE_S, plan.settings.margin_seconds // 3))


def walltime_message(plan: ClusterPlan, what: str) -> str:
    end = time.strftime("%H:%M:%S %Z", time.localtime(plan.deadline))
    return (f"walltime reached: the allocation of job {plan.job_id} ends at {end} ({plan.deadline}); "
            f"{plan.settings.margin_seconds}s before it (walltime_margin) {what}")


def with_allocation_env(runtime_env: dict | None, plan: ClusterPlan) -> dict:
    """The job's runtime_env with what its driver should know of the allocation:
    ACTIVATE_RAY_DEADLINE (its end, Unix seconds; absent without one), ACTIVATE_RAY_ATTEMPT
    (which allocation of the run: 2, 3, ... after a walltime, continue_after_walltime), both
    ours whatever env_vars says, and Ray's grace between the SIGTERM of a stop and the SIGKILL
    (RAY_JOB_STOP_WAIT_TIME_S, unless the user set it): the driver's time to write its checkpoint."""
    runtime_env = dict(runtime_env or {})
    ours = {"ACTIVATE_RAY_ATTEMPT": str(plan.allocation)}
    defaults = {}
    if plan.deadline:
        ours["ACTIVATE_RAY_DEADLINE"] = str(plan.deadline)
        defaults["RAY_JOB_STOP_WAIT_TIME_S"] = str(walltime_grace(plan))
    runtime_env["env_vars"] = {**defaults, **(runtime_env.get("env_vars") or {}), **ours}
    return runtime_env


async def _ended_before_walltime(following: asyncio.Future, plan: ClusterPlan) -> bool:
    """Wait until the job ends (True) or its stop time comes (False)."""
    at = plan.stop_time
    if at is None:
        await asyncio.wait({following})
        return True
    done, _ = await asyncio.wait({following}, timeout=max(0.0, at - time.time()))
    return bool(done)


async def stop_at_walltime(plan: ClusterPlan, job_ids: list[str], ended, client) -> None:
    """Stop the jobs as `ray job stop` does (SIGTERM to each driver, SIGKILL after
    RAY_JOB_STOP_WAIT_TIME_S) and wait for `ended()` up to the grace and a little more."""
    grace = walltime_grace(plan)
    get_run_logger().warning(
        "walltime: the allocation ends in %.0fs (walltime_margin %ds): stopping Ray job(s) %s (SIGTERM, "
        "%ds to write a checkpoint), then tearing the cluster down",
        plan.deadline - time.time(), plan.settings.margin_seconds, ", ".join(job_ids), grace)
    for job_id in job_ids:
        try:
            await asyncio.to_thread(client.stop_job, job_id)
        except Exception as exc:  # already ended, or the head is going: the teardown follows anyway
            get_run_logger().warning("could not stop Ray job %s: %s", job_id, exc)
    try:
        await asyncio.wait_for(ended(), timeout=grace + 5)
    except TimeoutError:
        get_run_logger().warning("Ray job(s) %s still running %ds after the stop: tearing down", ", ".join(job_ids), grace + 5)


async def submitted_runtime_env(runtime_env) -> dict | None:
    """runtime_env as the job gets it, secrets in clear for this call only: each env_vars value
    given as 'secret-block:NAME' read from that Prefect Secret block now, never before."""
    from prefect.blocks.system import Secret

    secrets = {}
    for variable, block in runtime_env.secret_blocks().items():
        try:
            secrets[variable] = str((await Secret.aload(block)).get())
        except ValueError as exc:  # no such block: its name is not a secret
            raise InvalidInput(f"runtime_env.env_vars: {variable}: no Prefect Secret block {block!r} ({exc})") from None
    try:
        return runtime_env.as_ray(secrets) or None
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


async def _active_jobs(client: httpx.AsyncClient) -> int:
    """How many Ray jobs are PENDING or RUNNING (the job API's list, as `ray job list` reads it)."""
    response = await client.get("/api/jobs/")
    response.raise_for_status()
    return sum(1 for job in response.json() if str(job.get("status")).split(".")[-1] in ("PENDING", "RUNNING"))


async def _active_job_ids(client: httpx.AsyncClient) -> list[str]:
    response = await client.get("/api/jobs/")
    response.raise_for_status()
    return [job.get("submission_id") or job.get("job_id") for job in response.json()
            if str(job.get("status")).split(".")[-1] in ("PENDING", "RUNNING")]


@task(name="keep-cluster-alive", cache_policy=NO_CACHE)
async def keep_alive(plan: ClusterPlan, local_port: int) -> str:
    """Hold the cluster until cancelled, idle for cluster_idle_timeout, or until the
    allocation's end less walltime_margin: then its running Ray jobs are stopped (SIGTERM,
    a grace to checkpoint) and WalltimeReached ends the run.

    Polls the job API with an async client and a timeout, never in a worker thread: a
    cancel ends it at once, and no blocked request can hold the process at exit."""
    logger = get_run_logger()
    idle_limit = plan.settings.cluster_idle_timeout * 60
    started = idle_since = time.monotonic()
    next_report = started
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{local_port}", headers=auth_headers(plan), timeout=30
    ) as client:
        while True:
            if await _active_jobs(client):
                idle_since = time.monotonic()
            now = time.monotonic()
            if now - idle_since >= idle_limit:
                logger.info("no Ray job for %g min: stopping the cluster", plan.settings.cluster_idle_timeout)
                return "idle"
            stop_at = plan.stop_time
            if stop_at is not None and time.time() >= stop_at:
                await _stop_jobs_at_walltime(plan, client, local_port)
                raise WalltimeReached(walltime_message(plan, "the cluster kept alive is torn down"))
            if now >= next_report:
                left = idle_limit - (now - idle_since)
                wall = f", walltime left {int(plan.deadline - time.time())}s" if plan.deadline else ""
                logger.info("cluster up; idle shutdown in %ds%s", left, wall)
                next_report = now + 300
            pause = min(10, max(1, idle_limit / 10))
            if stop_at is not None:
                pause = min(pause, max(0.1, stop_at - time.time()))
            await asyncio.sleep(pause)


async def _stop_jobs_at_walltime(plan: ClusterPlan, api: httpx.AsyncClient, local_port: int) -> None:
    """keep_alive's end at the walltime: the Ray jobs users submitted stopped with a grace."""
    running = await _active_job_ids(api)
    if not running:
        return
    client = await asyncio.to_thread(_client, plan, local_port)

    async def ended() -> None:
        while await _active_job_ids(api):
            await asyncio.sleep(0.5)

    await stop_at_walltime(plan, running, ended, client)
