"""What a run would do, for --dry-run: every file it would write and every command it would
run on the target, rendered from the settings; no connection is made, nothing starts."""

from __future__ import annotations

import shlex

from tasks.cluster import ClusterPlan
from tasks.schedulers import WORKER_JOB_SCRIPT, Scheduler, scheduler_for
from tasks.settings import RayClusterSettings, SchedulerKind


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


def _describe_successors(settings: RayClusterSettings, scheduler: Scheduler) -> list[str]:
    count = settings.continue_after_walltime
    if not count:
        return []
    return [f"# 4b. continue_after_walltime={count}: {count} successor allocation(s), each a fresh cluster dir "
            "like this one, submitted at once, each waiting for the job before it:",
            f"#     {shlex.join(scheduler.dependency_option('<job id before>'))} "
            "(cancelled once an allocation ends otherwise than 'walltime reached')"]


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
            *_describe_successors(settings, scheduler),
            f"# 5. wait for {settings.ready_nodes} node(s) alive (readiness timeout {settings.readiness_timeout}s)",
            f"# 6. user job: {_describe_job(settings)}",
            f"# 7. teardown: cancel the job, bash {plan.cluster_dir}/bin/shutdown_ray.sh {plan.cluster_dir}",
        ]
    )
