"""Plan, start and tear down one Ray cluster on a target."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from tasks.atomic_file import write_text_atomic
from tasks.events import emit_cluster_event, someone_to_tell
from tasks.local_transport import LocalTransport
from tasks.logs import get_run_logger
from tasks.schedulers import WORKER_JOB_SCRIPT, JobPhase, Scheduler, scheduler_for
from tasks.settings import NODE_TMP_MAX_LEN, TARGET_PATH_RE, EnvironmentOptions, RayClusterSettings, node_tmp_name
from tasks.shipped import SCRIPTS_DIR
from tasks.transport import Transport
from tasks.worker_jobs import end_worker_jobs, worker_job_ids_left

# Where the controller keeps what a teardown hook needs if the flow process dies.
RUNS_DIR = Path("~/.activate-ray/runs").expanduser()


CLUSTER_SCRIPTS = ("ray_lib.sh", "cluster_main.sh", "start_ray_ssh.sh", "ray_worker.sh", "shutdown_ray.sh", "submit_job.sh",
                   "exec_holding_ports.py", "node_ip.py", "verify_ports.py", "site_setup.sh", "launch_workers_direct.sh", "launch_workers_slurm.sh", "launch_workers_pbs.sh", "worker_main.sh",
                   "node_check.sh", "peer_check.py", "check_main.sh")
# AR_PYTHON and AR_RAY in the cluster dir, once the environment is ready (cluster_main.sh waits).
ENVIRONMENT_FILE = "environment.env"
# The user's setup_commands in the cluster dir, run by the job script and every worker.
SETUP_COMMANDS_FILE = "setup_commands.sh"
# 128 random bits: a cluster's id (and so its dir, job name and temp dir prefix) cannot be guessed.
CLUSTER_ID_RE = re.compile(r"^ar-[0-9a-f]{32}$")
GIB = 1024**3


def logs_dir_of(work_dir: str, cluster_id: str) -> str:
    return f"{work_dir}/logs/{cluster_id}"


@dataclass
class RayEnvironment:
    python: str
    ray: str
    source: str  # reused | created


@dataclass
class ClusterPlan:
    """What one cluster is, before and after it starts. Holds no secret in repr."""

    cluster_id: str
    cluster_dir: str  # absolute, on the target (shared with every node)
    settings: RayClusterSettings
    token: SecretStr = field(repr=False)
    environment: RayEnvironment | None = None
    job_id: str = ""
    nodes: list[str] = field(default_factory=list)  # the Ray nodes' names once the cluster is ready
    worker_jobs: list[str] = field(default_factory=list)  # worker jobs this flow submitted (tasks/scaling.py)
    deadline: int = 0  # the allocation's end, Unix seconds, once the job runs (head.env's RAY_DEADLINE; 0: none)
    # Which allocation of the run this cluster is (the job's ACTIVATE_RAY_ATTEMPT): 2, 3, ... for
    # the successors continue_after_walltime queues behind the first
    allocation: int = 1
    # The successor allocations queued behind this one's job, next first: each a whole cluster
    # of its own (dir, token, job script), its job submitted with a dependency on the one before
    successors: list[ClusterPlan] = field(default_factory=list, repr=False)

    @classmethod
    def new(cls, settings: RayClusterSettings, work_dir: str, allocation: int = 1) -> ClusterPlan:
        cluster_id = "ar-" + secrets.token_hex(16)
        return cls(cluster_id, f"{work_dir}/clusters/{cluster_id}", settings, SecretStr(secrets.token_hex(32)),
                   allocation=allocation)

    @property
    def token_path(self) -> str:
        return f"{self.cluster_dir}/token"

    @property
    def logs_dir(self) -> str:
        """Where the nodes' logs go before teardown: <work_dir>/logs/<cluster id> (shared)."""
        return logs_dir_of(self.cluster_dir.rsplit("/clusters/", 1)[0], self.cluster_id)

    @property
    def stop_time(self) -> float | None:
        """When (Unix seconds) the job is stopped and the cluster torn down: the allocation's
        end less walltime_margin (None: no known end). The adaptive loop submits no worker job
        after it."""
        return self.deadline - self.settings.margin_seconds if self.deadline else None

    @property
    def node_tmp_prefix(self) -> str:
        """What every node's temp dir of this cluster starts with (see ar_make_node_tmp)."""
        return f"{self.settings.node_tmp}/{node_tmp_name(self.cluster_id)}"

    def environment_file(self) -> str:
        """The Python and Ray the nodes run: known only once the environment is ready,
        which may be after the job was submitted (the job script waits for this file)."""
        env = self.environment
        values = {"AR_PYTHON": env.python if env else "python3", "AR_RAY": env.ray if env else "ray"}
        return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in values.items())

    def env_file(self) -> str:
        s = self.settings
        values = {
            "AR_CLUSTER_ID": self.cluster_id,
            "AR_CLUSTER_DIR": self.cluster_dir,
            "AR_SCHEDULER": s.scheduler.value,  # for `scale`, which knows the cluster by its dir only
            "AR_NODE_TMP": s.node_tmp,
            # what each node checks itself against before `ray start` (node_check.sh)
            "AR_NODE_TMP_MAX_LEN": NODE_TMP_MAX_LEN,
            "AR_RAY_VERSION": s.ray_version,
            "AR_CLIENT_PYTHON": f"{sys.version_info.major}.{sys.version_info.minor}",
            # empty: the node takes what its allocation gives (ar_run_node)
            "AR_NUM_CPUS": "" if s.num_cpus_per_node is None else s.num_cpus_per_node,
            "AR_NUM_GPUS": "" if s.num_gpus_per_node is None else s.num_gpus_per_node,
            "AR_MEMORY": "" if s.ray_memory_gb is None else int(s.ray_memory_gb * GIB),
            "AR_OBJECT_STORE": "" if s.object_store_memory_gb is None else int(s.object_store_memory_gb * GIB),
            "AR_DASHBOARD_HOST": s.dashboard_host,
            "AR_DASHBOARD_PORT": s.dashboard_port,
            "AR_HEARTBEAT_TIMEOUT": s.heartbeat_timeout,
            "AR_DIRECT_WORKERS": s.direct_workers,
            "AR_EXPECTED_NODES": s.nodes,
            "AR_LOGS_DIR": self.logs_dir,
            "AR_KEEP_LOGS": int(s.keep_logs),
            "AR_LOG_CAP_MB": s.log_cap_mb,  # Ray nodes the flow waits for (PBS: one per chunk)
            "AR_NODE_TMP_NAME": node_tmp_name(self.cluster_id).rstrip("."),
            "AR_METRICS": int(s.metrics),
            "AR_NETWORK_INTERFACE": s.network_interface,
            # Off unless asked for: the agents' metrics export answers without the token.
            "RAY_enable_metrics_collection": int(s.metrics),
            # Explicit on every node: a stray token file must not switch it on
            # for the head only (workers would then fail to join).
            "RAY_AUTH_MODE": "token" if s.token_auth else "disabled",
        }
        if s.token_auth:
            values["RAY_AUTH_TOKEN_PATH"] = self.token_path
        values.update(self.container_env())
        return "".join(f"export {key}={shlex.quote(str(value))}\n" for key, value in values.items())


    def container_env(self) -> dict:
        """The container option's values (ar_container_* in ray_lib.sh): none without an image."""
        runtimes = self.settings.environment.container_runtimes
        if not runtimes:
            return {}
        return {"AR_CONTAINER_IMAGE": self.settings.container_image,
                # the runtimes a node may use, in the order it looks for them
                "AR_CONTAINER_RUNTIMES": " ".join(runtimes),
                # bound into the container with the cluster dir and the node's temp dir (venvs, logs)
                "AR_WORK_DIR": self.cluster_dir.rsplit("/clusters/", 1)[0]}


# With a container image, Ray and the job's driver run on the image's own python3 and ray (found on
# the image's PATH): a site image brings the Ray it was built with, and a venv of the host would need
# the same Python at the same path inside the image.
CONTAINER_ENVIRONMENT = RayEnvironment("python3", "ray", "image")


async def target_work_dir(target: Transport, settings: RayClusterSettings) -> str:
    work_dir = settings.work_dir
    if work_dir == "~" or work_dir.startswith("~/"):
        work_dir = (await target.home()) + work_dir[1:]
    return work_dir.rstrip("/")


def _requirements_hash(settings: RayClusterSettings) -> str:
    if not settings.requirements:
        return ""
    return hashlib.sha256(Path(settings.requirements).expanduser().read_bytes()).hexdigest()[:12]


async def make_private_work_dir(target: Transport, work_dir: str) -> None:
    """The work dir holds venvs and every cluster's token: the user's alone, before
    anything is put in it."""
    # made private (with every parent it makes), not made then narrowed; one made before is narrowed
    await target.run(f"(umask 077 && mkdir -p {shlex.quote(work_dir)}) && chmod 700 {shlex.quote(work_dir)}")


@task(name="publish-ray-environment", cache_policy=NO_CACHE)
async def publish_environment(target: Transport, plan: ClusterPlan) -> None:
    """Tell the cluster which Python and Ray to run: the job script waits for this file
    (whole: written aside, then renamed) before it starts Ray."""
    path = f"{plan.cluster_dir}/{ENVIRONMENT_FILE}"
    await target.write_text(path + ".part", plan.environment_file(), 0o600)
    await target.run(f"mv -f -- {shlex.quote(path + '.part')} {shlex.quote(path)}")


@task(name="prepare-ray-environment", cache_policy=NO_CACHE)
async def prepare_environment(target: Transport, settings: RayClusterSettings, work_dir: str,
                              find_only: bool = False) -> RayEnvironment | None:
    """Reuse a Python that has the requested Ray (no pip call), else build a venv once.
    find_only (`check`): None where there is none, nothing built."""
    logger = get_run_logger()
    if settings.container_image:  # (python and requirements are refused beside an image)
        logger.info("Ray on %s: the python3 and ray of image %s", target.label, settings.container_image)
        return CONTAINER_ENVIRONMENT
    candidates = [settings.python] if settings.python else []
    if isinstance(target, LocalTransport):
        candidates.append(sys.executable)
    req_hash = _requirements_hash(settings)
    env_prefix = ""
    if settings.requirements:
        remote_req = f"{work_dir}/requirements-{req_hash}.txt"
        await target.put_file(Path(settings.requirements).expanduser(), remote_req)
        env_prefix = f"AR_REQUIREMENTS={shlex.quote(remote_req)} AR_REQ_HASH={req_hash} "
    await target.put_file(SCRIPTS_DIR / "setup_ray.sh", f"{work_dir}/bin/setup_ray.sh", 0o700)
    if settings.setup_commands:
        await target.put_file(SCRIPTS_DIR / "site_setup.sh", f"{work_dir}/bin/site_setup.sh", 0o700)
        setup_file = f"{work_dir}/setup/{hashlib.sha256(settings.setup_commands.encode()).hexdigest()[:16]}.sh"
        await target.write_text(setup_file, settings.setup_commands, 0o600)
        env_prefix += f"AR_SETUP_COMMANDS={shlex.quote(setup_file)} "
    command = env_prefix + shlex.join(
        ["bash", f"{work_dir}/bin/setup_ray.sh", settings.ray_version, work_dir, *candidates]
    )
    if find_only:
        command = "AR_FIND_ONLY=1 " + command
    result = await target.run_logged(command, timeout=1800)
    values = dict(re.findall(r"^(RAY_\w+)=(.*)$", result.stdout, re.M))
    if "RAY_NOT_FOUND" in values:
        return None
    environment = RayEnvironment(values["RAY_PYTHON"], values["RAY_BIN"], values["RAY_ENV_SOURCE"])
    logger.info("Ray %s on %s: %s (%s)", settings.ray_version, target.label, environment.python, environment.source)
    return environment


@task(name="prune-old-logs", cache_policy=NO_CACHE)
async def prune_old_logs(target: Transport, settings: RayClusterSettings, work_dir: str) -> None:
    """Logs retention: before a new cluster, keep the newest logs_keep_clusters - 1 clusters'
    logs (with the new one: logs_keep_clusters), none older than logs_keep_days."""
    await target.put_file(SCRIPTS_DIR / "prune_logs.sh", f"{work_dir}/bin/prune_logs.sh", 0o700)
    command = shlex.join(["bash", f"{work_dir}/bin/prune_logs.sh", f"{work_dir}/logs",
                          str(settings.logs_keep_clusters - 1), str(settings.logs_keep_days)])
    result = await target.run(command, check=False, timeout=120)
    if result.returncode != 0:
        get_run_logger().warning("old logs not pruned: %s", result.stderr.strip()[-300:])


@task(name="start-ray-cluster", cache_policy=NO_CACHE)
async def start_cluster(target: Transport, scheduler: Scheduler, plan: ClusterPlan, after: str = "") -> str:
    """Upload the cluster's scripts, env and token, then submit the job. Returns the job id.
    after: the job id a successor allocation's job waits for (dependency afterany)."""
    logger = get_run_logger()
    bin_dir = f"{plan.cluster_dir}/bin"
    # A plain mkdir of the cluster dir: an id collision (or a dir made in advance) fails, never shared.
    clusters = shlex.quote(plan.cluster_dir.rsplit("/", 1)[0])
    await target.run(f"mkdir -p {clusters} && mkdir -m 700 {shlex.quote(plan.cluster_dir)} && "
                     + shlex.join(["mkdir", bin_dir, f"{plan.cluster_dir}/logs", f"{plan.cluster_dir}/nodes"]))
    await asyncio.gather(*(target.put_file(SCRIPTS_DIR / name, f"{bin_dir}/{name}", 0o700) for name in CLUSTER_SCRIPTS))
    await target.write_text(f"{plan.cluster_dir}/cluster.env", plan.env_file(), 0o600)
    if plan.settings.setup_commands:
        await target.write_text(f"{plan.cluster_dir}/{SETUP_COMMANDS_FILE}", plan.settings.setup_commands, 0o600)
    if plan.settings.token_auth:
        await target.write_text(plan.token_path, plan.token.get_secret_value(), 0o600)
        if plan.settings.publish_token_block:
            await _save_token_block(plan)
    await target.write_text(f"{bin_dir}/job.sh", scheduler.render(plan.cluster_id, plan.cluster_dir), 0o700)
    if plan.settings.scheduler.value != "none":  # any batch cluster can grow later (`scale --add`)
        worker_job = scheduler.render_worker(plan.cluster_id, plan.cluster_dir)
        await target.write_text(f"{plan.cluster_dir}/{WORKER_JOB_SCRIPT}", worker_job, 0o700)
    await target.run(f"touch {shlex.quote(plan.cluster_dir + '/heartbeat')}")
    plan.job_id = await scheduler.submit(target, plan.cluster_dir, after=after)
    # for `scale`, whose worker job submissions must never take the head job for one of theirs
    await target.write_text(f"{plan.cluster_dir}/job_id", plan.job_id + "\n", 0o600)
    logger.info("cluster %s submitted to %s: job %s%s", plan.cluster_id, scheduler.name, plan.job_id,
                f" (allocation {plan.allocation}, queued after job {after})" if after else "")
    return plan.job_id


def save_cluster_state(plan: ClusterPlan, flow_run_id: str) -> Path:
    """Persist what teardown needs (no secrets), for the on_cancellation/on_crashed hooks."""
    RUNS_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    RUNS_DIR.chmod(0o700)
    state = {
        "flow_run_id": flow_run_id,
        "cluster_id": plan.cluster_id,
        "cluster_dir": plan.cluster_dir,
        "job_id": plan.job_id,
        "worker_jobs": plan.worker_jobs,
        "allocation": plan.allocation,
        "settings": plan.settings.model_dump(mode="json"),
    }
    return write_text_atomic(RUNS_DIR / f"{plan.cluster_id}.json", json.dumps(state), 0o600)


class StateRefused(ValueError):
    """A saved cluster state that teardown must not act on."""


def checked_cluster_state(path: Path, data: dict) -> ClusterPlan:
    """The plan a state file describes, only if it is what this package writes:
    a file of the user's own that others cannot write, a cluster id of ours, its
    dir exactly <work_dir>/clusters/<id>, a job id of the scheduler's own form.
    A teardown then acts on nothing else (no other dir removed, no other job cancelled)."""
    info = path.lstat()
    if not path.is_file() or path.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise StateRefused(f"{path}: not a regular file of yours that only you can write")
    cluster_id, cluster_dir, job_id = data.get("cluster_id"), data.get("cluster_dir"), data.get("job_id")
    if not isinstance(cluster_id, str) or not CLUSTER_ID_RE.fullmatch(cluster_id) or path.stem != cluster_id:
        raise StateRefused(f"{path}: cluster id {str(cluster_id)[:60]!r} is not one of ours")
    settings = RayClusterSettings.model_validate(data.get("settings"))
    work_dir = settings.work_dir.rstrip("/")
    if not isinstance(cluster_dir, str) or not TARGET_PATH_RE.fullmatch(cluster_dir) or ".." in cluster_dir.split("/"):
        raise StateRefused(f"{path}: cluster dir {str(cluster_dir)[:120]!r} is not a plain path")
    expected_tail = f"/clusters/{cluster_id}"
    if work_dir.startswith("~"):  # expanded on the target: the same path below some home
        fits = cluster_dir.startswith("/") and cluster_dir.endswith(work_dir[1:] + expected_tail)
    else:
        fits = cluster_dir == work_dir + expected_tail
    if not fits:
        raise StateRefused(f"{path}: cluster dir {cluster_dir!r} is not {settings.work_dir}{expected_tail}")
    scheduler_class = type(scheduler_for(settings))
    if not isinstance(job_id, str) or (job_id and not scheduler_class.job_id_re.fullmatch(job_id)):
        raise StateRefused(f"{path}: job id {str(job_id)[:60]!r} is not a {scheduler_class.name} job id")
    worker_jobs = data.get("worker_jobs", [])
    if not isinstance(worker_jobs, list) or not all(
            isinstance(j, str) and scheduler_class.job_id_re.fullmatch(j) for j in worker_jobs):
        raise StateRefused(f"{path}: worker jobs {str(worker_jobs)[:60]!r} are not {scheduler_class.name} job ids")
    allocation = data.get("allocation", 1)
    if not isinstance(allocation, int) or isinstance(allocation, bool) or allocation < 1:
        raise StateRefused(f"{path}: allocation {str(allocation)[:20]!r} is not a number from 1")
    return ClusterPlan(cluster_id, cluster_dir, settings, SecretStr(""), job_id=job_id, worker_jobs=worker_jobs,
                       allocation=allocation)


def load_cluster_states(flow_run_id: str) -> list[ClusterPlan]:
    """The clusters a flow run saved, the last allocation first (a queued successor is cancelled
    before the job it waits for ends, so it never starts); a state file that fails the checks
    is reported, never acted on."""
    plans = []
    for path in RUNS_DIR.glob("ar-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("flow_run_id") != flow_run_id:
            continue
        try:
            plans.append(checked_cluster_state(path, data))
        except (StateRefused, ValueError) as exc:
            get_run_logger().error("not tearing down from a state file that fails its checks: %s", exc)
    return sorted(plans, key=lambda plan: -plan.allocation)


def forget_cluster_state(plan: ClusterPlan) -> None:
    (RUNS_DIR / f"{plan.cluster_id}.json").unlink(missing_ok=True)


# How long the nodes get to stop themselves once asked, before the scheduler is told to kill.
# Told to look now they stop in a second or two; where the scheduler cannot tell them (Torque's
# wrappers, PBS's sister hosts: tasks/schedulers/pbs.py) they see the stop at their next glance (6 s).
GRACEFUL_STOP_SECONDS = 20


def request_stop_command(cluster_dir: str) -> str:
    """Ask every node to stop: the stop file, and the heartbeat gone, which a running node's
    glance sees (ar_request_stop in scripts/ray_lib.sh; the beat never makes it again)."""
    quoted = shlex.quote(cluster_dir)
    return f"[ ! -d {quoted} ] || {{ touch {quoted}/stop; rm -f {quoted}/heartbeat; }}"


async def _wait_ended(target: Transport, scheduler: Scheduler, job_id: str, seconds: float, *,
                      or_queued: bool = False):
    """Poll the job with short backoff until it ended or the time is up; its last state.
    or_queued: a job still queued is returned at once (no node of it can stop itself:
    waiting would only delay its cancel)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    delay = 0.1
    while True:
        state = await scheduler.state(target, job_id)
        if state.phase is JobPhase.ended or (or_queued and state.phase is JobPhase.pending) or loop.time() > deadline:
            return state
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.3)  # the nodes stop within a second or two: see it at once


async def _say_where_the_logs_are(plan: ClusterPlan, logs_dir: str, target: Transport) -> None:
    listing = await target.run(f"cd {shlex.quote(logs_dir)} && ls -1", check=False, timeout=30)
    parts = listing.stdout.split()
    command = f"python -m flows.ray_cluster logs {plan.cluster_id}" + (
        f" --host {plan.settings.host}" if plan.settings.host else "") + (
        f" --work-dir {plan.settings.work_dir}"
        if plan.settings.work_dir != EnvironmentOptions.model_fields["work_dir"].default else "")
    get_run_logger().info("logs of cluster %s (%s): %s; show them with: %s", plan.cluster_id,
                          ", ".join(parts) or "none", logs_dir, command)
    if not someone_to_tell():  # a cleanup from the command line: the log line says it
        return
    try:
        await create_markdown_artifact(
            key=f"ray-logs-{plan.cluster_id}", description="Where the cluster's logs are, after teardown",
            markdown=f"# Logs of `{plan.cluster_id}`\n\n`{logs_dir}` on {target.label}: {', '.join(parts) or 'none'}"
                     f"\n\n```\n{command}\n```\n")
    except Exception as exc:  # outside a flow run (a cleanup): the log line says it
        get_run_logger().debug("no logs artifact: %s", exc)


@task(name="teardown-ray-cluster", cache_policy=NO_CACHE)
async def teardown_cluster(target: Transport, scheduler: Scheduler, plan: ClusterPlan) -> None:
    """Idempotent: ask every node to stop (each stops itself, on its own host), let the job
    end, cancel it if it did not, then stop what remains on this host and remove the files."""
    logger = get_run_logger()
    cluster_dir = shlex.quote(plan.cluster_dir)
    await target.run(request_stop_command(plan.cluster_dir), check=False, timeout=30)
    # worker jobs (queued ones too), beside the head job's end: every one the cluster dir or the flow knows
    worker_jobs = [] if plan.settings.scheduler.value == "none" else await worker_job_ids_left(
        target, scheduler, plan.cluster_dir, plan.worker_jobs)
    ending_workers = asyncio.ensure_future(
        end_worker_jobs(target, scheduler, plan.cluster_dir, worker_jobs, grace=GRACEFUL_STOP_SECONDS))
    if plan.job_id:
        # a running job's nodes told to look now (a queued one has nobody to tell: cancelled)
        state = await scheduler.state(target, plan.job_id)
        if state.phase is JobPhase.running:
            await scheduler.wake(target, plan.job_id, plan.cluster_dir)
        state = await _wait_ended(target, scheduler, plan.job_id, GRACEFUL_STOP_SECONDS, or_queued=True)
        if state.phase is JobPhase.pending:
            logger.info("job %s still queued (%s): cancelling it", plan.job_id, state)
        elif state.phase is not JobPhase.ended:
            logger.warning("job %s still %s %ds after the stop request: cancelling it", plan.job_id, state,
                           GRACEFUL_STOP_SECONDS)
        if state.phase is not JobPhase.ended:
            await scheduler.cancel(target, plan.job_id, plan.cluster_dir)
            state = await _wait_ended(target, scheduler, plan.job_id, 120)
            if state.phase is not JobPhase.ended:
                logger.warning("job %s still %s after cancel", plan.job_id, state)
    await ending_workers
    shutdown = shlex.quote(plan.cluster_dir + "/bin/shutdown_ray.sh")
    result = await target.run(
        f"if [ -e {shutdown} ]; then bash {shutdown} {cluster_dir}; else rm -rf {cluster_dir}; fi",
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        logger.warning("shutdown script: %s", result.stderr.strip()[-500:])
    saved = re.findall(r"^RAY_LOGS_DIR=(.+)$", result.stdout, re.M)
    if saved:
        await _say_where_the_logs_are(plan, saved[0], target)
    not_stopped = re.findall(r"^RAY_NODE_NOT_STOPPED=(.+)$", result.stdout, re.M)
    if not_stopped:
        logger.warning("node(s) of %s did not report that they stopped: %s", plan.cluster_id, ", ".join(not_stopped))
    leftover = await target.run(f"pgrep -u \"$(id -u)\" -f -- {shlex.quote(plan.node_tmp_prefix)}", check=False)
    if leftover.stdout.strip():
        logger.warning("Ray processes of %s still running on %s: %s", plan.cluster_id, target.label,
                       leftover.stdout.split())
    forget_cluster_state(plan)
    emit_cluster_event("torn-down", plan.cluster_id, scheduler=scheduler.name, job_id=plan.job_id, nodes=plan.nodes)
    if plan.settings.publish_token_block:
        await _delete_token_block(plan)
    logger.info("cluster %s torn down (job %s%s)", plan.cluster_id, plan.job_id or "never submitted",
                f", worker jobs {', '.join(worker_jobs)}" if worker_jobs else "")


def token_block_name(plan: ClusterPlan) -> str:
    return f"ray-token-{plan.cluster_id}"


async def _save_token_block(plan: ClusterPlan) -> None:
    """The token as a Prefect Secret block, so UI users can connect; removed at teardown."""
    from prefect.blocks.system import Secret

    try:
        await Secret(value=plan.token.get_secret_value()).asave(token_block_name(plan), overwrite=True)
    except Exception as exc:  # no server reachable: the 0600 file on the target still holds it
        get_run_logger().warning("could not save the Ray token as a Prefect Secret block: %s", type(exc).__name__)


async def _delete_token_block(plan: ClusterPlan) -> None:
    from prefect.blocks.system import Secret

    try:
        await Secret.adelete(token_block_name(plan))
    except Exception:  # never saved, or already gone
        pass


async def beat(target: Transport, plan: ClusterPlan) -> None:
    """Keep the dead-man switch from firing while the flow is alive: four beats per
    heartbeat_timeout, so one lost beat never stops a cluster."""
    every = max(2.0, plan.settings.heartbeat_timeout / 4)
    path = shlex.quote(plan.cluster_dir + "/heartbeat")
    while True:
        await asyncio.sleep(every)
        try:
            # -c: never made again once a stop removed it (a stop's sign to every node)
            await target.run(f"touch -c {path}", check=False, timeout=30)
        except Exception as exc:  # a blip must not kill the flow; the switch has slack
            get_run_logger().warning("heartbeat failed: %s", exc)
