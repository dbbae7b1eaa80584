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
from tasks.failures import FailureReason
from tasks.logs import get_run_logger
from tasks.readiness import auth_headers, confirm_nodes_alive
from tasks.transport import Transport

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class UserJobFailed(RuntimeError):
    """The user's Ray job ended in FAILED or STOPPED."""

    reason = FailureReason.user_job_failed


def warm_up_job_client() -> asyncio.Future:
    """Import Ray's job client (about 2 s: it pulls in most of Ray) in a thread while the
    cluster starts, so the job is submitted the moment the cluster is ready."""
    return asyncio.ensure_future(asyncio.to_thread(importlib.import_module, "ray.job_submission"))


def _client(plan: ClusterPlan, local_port: int):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(f"http://127.0.0.1:{local_port}", headers=auth_headers(plan))


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
        client.submit_job, entrypoint=entrypoint, submission_id=f"{plan.cluster_id}-{script.stem}"[:60],
        runtime_env=settings.runtime_env.as_ray() or None, **settings.runtime_env.entrypoint_resources(),
    )
    reserved = settings.runtime_env.entrypoint_resources()
    logger.info("submitted Ray job %s: %s%s", job_id, script.name, f" (its driver reserves {reserved})" if reserved else "")
    try:
        async for chunk in client.tail_job_logs(job_id):
            for line in chunk.splitlines():
                logger.info("[%s] %s", script.name, line)
    except Exception as exc:  # the log stream can drop; the status below is what counts
        logger.warning("log stream ended early: %s", exc)
    delay = 0.2
    while (status := str(await asyncio.to_thread(client.get_job_status, job_id)).split(".")[-1]) not in TERMINAL:
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 2)
    info = await asyncio.to_thread(client.get_job_info, job_id)
    emit_cluster_event("job-finished", plan.cluster_id, scheduler=plan.settings.scheduler.value, job_id=plan.job_id,
                       nodes=plan.nodes, ray_job_id=job_id, status=status)
    await create_markdown_artifact(
        key=f"ray-job-{plan.cluster_id}",
        markdown=f"# Ray job `{job_id}`\n\nscript `{script.name}`: **{status}**\n\n{info.message or ''}",
        description="The user job's final status",
    )
    if status != "SUCCEEDED":
        raise UserJobFailed(f"Ray job {job_id} ({script.name}) {status}: {info.message}")
    logger.info("Ray job %s SUCCEEDED", job_id)
    return job_id


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
