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
from tasks.failures import FailureReason, InvalidInput
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
    job_id = await asyncio.to_thread(
        submit_when_agent_ready, client, f"{plan.cluster_id}-{script.stem}"[:60], entrypoint=entrypoint,
        runtime_env=await submitted_runtime_env(settings.runtime_env), **settings.runtime_env.entrypoint_resources(),
    )
    reserved = settings.runtime_env.entrypoint_resources()
    logger.info("submitted Ray job %s: %s%s", job_id, script.name, f" (its driver reserves {reserved})" if reserved else "")
    status, message = await follow_job(client, local_port, auth_headers(plan), job_id,
                                       lambda line: logger.info("[%s] %s", script.name, line))
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


@task(name="keep-cluster-alive", cache_policy=NO_CACHE)
async def keep_alive(plan: ClusterPlan, local_port: int, walltime_s: int | None) -> str:
    """Hold the cluster until cancelled, idle for cluster_idle_timeout, or near the walltime.

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
            if walltime_s and now - started >= walltime_s - 60:
                logger.info("walltime almost over: stopping the cluster")
                return "walltime"
            if now >= next_report:
                left = idle_limit - (now - idle_since)
                wall = f", walltime left {int(walltime_s - (now - started))}s" if walltime_s else ""
                logger.info("cluster up; idle shutdown in %ds%s", left, wall)
                next_report = now + 300
            await asyncio.sleep(min(10, max(1, idle_limit / 10)))
