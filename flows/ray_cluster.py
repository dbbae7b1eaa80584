"""The ray-cluster flow: start a Ray cluster, prove it is up, run the job, tear it all down.

    python -m flows.ray_cluster --help
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

# The temporary server's telemetry only fails offline; set before Prefect loads.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from dataclasses import asdict

from prefect import flow
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run as current_flow_run
from pydantic import Field, ValidationError
from pydantic_settings import CliApp, SettingsConfigDict

from flows.settings import RayClusterSettings
from tasks.cluster import (
    ClusterPlan,
    beat,
    get_run_logger,
    load_cluster_states,
    prepare_environment,
    save_cluster_state,
    start_cluster,
    target_work_dir,
    teardown_cluster,
)
from tasks.readiness import publish_connection_info, wait_until_ready, watch_nodes
from tasks.schedulers import Scheduler, scheduler_for
from tasks.transport import LocalTransport, SshParams, SshTransport, Transport
from tasks.user_job import keep_alive, run_user_job


async def open_target(settings: RayClusterSettings) -> Transport:
    """This machine, an SSH target (user@host:port or ~/.ssh/config alias), or a saved SSH block."""
    ssh_options = dict(
        key_file=settings.ssh_key_file or None,
        known_hosts=settings.known_hosts or None,
        accept_new_host_key=settings.accept_new_host_key,
    )
    if not settings.host:
        return LocalTransport(node_ssh=SshParams(host="", **ssh_options))
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


def warn_about_insecure_choices(settings: RayClusterSettings, logger) -> None:
    if settings.dashboard_host != "127.0.0.1":
        logger.warning(
            "dashboard_host=%s: the Ray dashboard and job API (remote code execution) listen beyond loopback%s",
            settings.dashboard_host, "" if settings.token_auth else " WITHOUT authentication",
        )
    if not settings.token_auth:
        logger.warning("token_auth is off: anyone who reaches the cluster's ports can run code as you")


async def _unless_a_node_dies(work, watcher: asyncio.Task):
    """Run the work; a NodeLost from the watcher wins over it."""
    job = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if watcher in done and watcher.exception() is not None:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        raise watcher.exception()
    return await job


@flow(
    name="ray-cluster",
    log_prints=False,
    on_cancellation=[teardown_saved_clusters],
    on_crashed=[teardown_saved_clusters],
)
async def ray_cluster(settings: RayClusterSettings) -> dict:
    """Start a Ray cluster on the host (directly, or as a SLURM/PBS job), wait until
    every node is up, show how to connect, run the user's script, and always tear down."""
    logger = get_run_logger()
    scheduler = scheduler_for(settings)
    async with await open_target(settings) as target:
        work_dir = await target_work_dir(target, settings)
        plan = ClusterPlan.new(settings, work_dir)
        logger.info("cluster %s on %s (%s, %d node(s))", plan.cluster_id, target.label, scheduler.name, settings.nodes)
        warn_about_insecure_choices(settings, logger)
        save_cluster_state(plan, str(current_flow_run.id or ""))
        background: list[asyncio.Task] = []
        try:
            plan.environment = await prepare_environment(target, settings, work_dir)
            await start_cluster(target, scheduler, plan)
            save_cluster_state(plan, str(current_flow_run.id or ""))
            background.append(asyncio.create_task(beat(target, plan, every=max(2.0, settings.heartbeat_timeout / 4))))
            head, local_port, nodes = await wait_until_ready(target, scheduler, plan)
            info = await publish_connection_info(target, scheduler, plan, head, local_port, nodes, settings.info_file)
            watcher = asyncio.create_task(watch_nodes(plan, local_port, nodes))
            background.append(watcher)
            if settings.user_script:
                await _unless_a_node_dies(run_user_job(target, plan, local_port), watcher)
            if settings.keep_alive or not settings.user_script:
                await _unless_a_node_dies(keep_alive(plan, local_port, scheduler.walltime_seconds), watcher)
            return asdict(info)
        finally:
            for job in background:
                job.cancel()
            await teardown_cluster(target, scheduler, plan)


class RayClusterCli(RayClusterSettings):
    """Start a Ray cluster on an HPC resource, run a job on it, tear it down."""

    model_config = SettingsConfigDict(
        cli_prog_name="python -m flows.ray_cluster",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_enforce_required=False,
    )

    dry_run: bool = Field(False, description="Validate the inputs, print what would run on the target, start nothing")


def render_plan(settings: RayClusterSettings) -> str:
    """What a run would do, for --dry-run: no connection is made, nothing starts."""
    scheduler: Scheduler = scheduler_for(settings)
    plan = ClusterPlan.new(settings, settings.work_dir)
    return "\n".join(
        [
            f"# target: {settings.host or 'this machine'}; scheduler: {scheduler.name}; nodes: {settings.nodes}",
            f"# 1. environment: reuse a Python with ray=={settings.ray_version} or build {settings.work_dir}/venvs/ray-{settings.ray_version}",
            f"# 2. upload scripts/ to {plan.cluster_dir}/bin, this env file to {plan.cluster_dir}/cluster.env (0600):",
            plan.env_file().rstrip(),
            f"# 3. job script {plan.cluster_dir}/bin/job.sh:",
            scheduler.render(plan.cluster_id, plan.cluster_dir).rstrip(),
            "# 4. submit:",
            scheduler.submit_command(plan.cluster_dir),
            f"# 5. wait for {settings.nodes} node(s) alive (readiness timeout {settings.readiness_timeout}s)",
            f"# 6. user job: {settings.user_script or '(none: keep alive until idle for ' + str(settings.cluster_idle_timeout) + ' min)'}",
            f"# 7. teardown: cancel the job, bash {plan.cluster_dir}/bin/shutdown_ray.sh {plan.cluster_dir}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    try:
        cli = CliApp.run(RayClusterCli, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "input"
            print(f"invalid input {where}: {error['msg']}", file=sys.stderr)
        return 2
    settings = RayClusterSettings.model_validate(cli.model_dump(exclude={"dry_run"}))
    if cli.dry_run:
        print(render_plan(settings))
        return 0
    # SIGTERM and Ctrl-C end the flow run as Crashed; its on_crashed hook tears the
    # cluster down from the persisted state before the process exits. Prefect re-sends
    # SIGTERM to the handler it found once it is done: make that one exit with 143.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return asyncio.run(_run(settings))
    except TerminationSignal:
        print("terminated (SIGTERM): cluster torn down", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted: cluster torn down", file=sys.stderr)
        return 130


def _exit_on_sigterm(signum, frame) -> None:
    print("terminated (SIGTERM): cluster torn down", file=sys.stderr)
    raise SystemExit(143)


async def _run(settings: RayClusterSettings) -> int:
    try:
        info = await ray_cluster(settings=settings)
    except asyncio.CancelledError:
        print("interrupted: cluster torn down", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"ray-cluster failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"cluster_id": info["cluster_id"], "ready": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
