"""Every input of the ray-cluster flow, in one pydantic model.

The same model is the flow's parameters (Prefect form), the command line
(`python -m flows.ray_cluster --help`), the environment (prefix
`RAY_CLUSTER_`, nested with `__`) and the inputs of workflow.yaml.
Validation happens here, before anything is started: a value that reaches a
shell later has already been checked against a strict pattern, and is quoted
on top of that.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import subprocess
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, SecretStr, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from tasks.schedulers.options import positioned
from tasks.schedulers.pbs import PBS_WALLTIME_RE, PbsOptions, pbs_seconds, pbs_select_chunks
from tasks.schedulers.scale_options import ScaleOptions
from tasks.schedulers.slurm import SLURM_WALLTIME_RE, SlurmOptions, slurm_seconds
from tasks.shipped import shipped_example

DEFAULT_RAY_VERSION = "2.60.0"

# A PEP 440 release, the way Ray versions are spelled (2.60.0, 2.9.3, 3.0.0rc1).
RAY_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+((a|b|rc)\d+)?$", re.ASCII)
# user@host:port, an ~/.ssh/config alias, or a saved SSH connection block name.
HOST_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}@)?[A-Za-z0-9_][A-Za-z0-9_.\-]{0,252}(?::\d{1,5})?$", re.ASCII)
# Paths on the target that reach scripts: no quotes, no shell syntax.
TARGET_PATH_RE = re.compile(r"^[A-Za-z0-9_.~/+@\-]{1,200}$", re.ASCII)
ON_FAILURE_RE = re.compile(r"^(teardown|keep(=\d{1,4}(\.\d{1,3})?)?)$", re.ASCII)
BIND_HOST_RE = re.compile(r"^(\d{1,3}\.){3}\d{1,3}$", re.ASCII)
# A Linux interface name (at most 15 bytes, IFNAMSIZ - 1) or an IPv4 subnet in CIDR form.
INTERFACE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,14}$", re.ASCII)
CIDR_RE = re.compile(r"^(\d{1,3}\.){3}\d{1,3}/\d{1,2}$", re.ASCII)
SETUP_COMMANDS_MAX = 16384
# A node's private temp dir is <node_tmp>/<first NODE_TMP_ID_CHARS of the cluster id>.XXXXXX,
# Ray's temp dir is r/ in it, and Ray puts unix sockets below that
# (session_<date>_<time>_<us>_<pid>/sockets/dash_TaskEventsHead), which Linux limits to
# 107 bytes: what is left for node_tmp.
NODE_TMP_ID_CHARS = 11


def node_tmp_name(cluster_id: str) -> str:
    """What every node temp dir of a cluster is named with, before mktemp's random part."""
    return cluster_id[:NODE_TMP_ID_CHARS] + "."

NODE_TMP_MAX_LEN = 107 - len("/ar-01234567.XXXXXX/r") - len("/session_2026-12-02_03-01-57_632069_4194304") - len(
    "/sockets/dash_TaskEventsHead"
)


class SchedulerKind(str, Enum):
    none = "none"
    slurm = "slurm"
    pbs = "pbs"


class NodeFailure(str, Enum):
    """What to do when a node of a ready cluster dies."""

    continue_ = "continue"
    stop = "stop"


# Local files the flow reads (uploads, hashes, hands to asyncssh): regular files only, never
# a pseudo-file or a device (/proc/self/environ, /dev/stdin, /sys/...), also not through a
# symlink or another mount of those file systems. Nothing here reads a file's contents, and
# no error shows any: only the name given, and why it is refused.
PSEUDO_FILE_ROOTS = ("/proc", "/sys", "/dev")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def check_shell_lines(value: str, what: str) -> str:
    """Lines of shell the user owns (they run as the user, on the user's site): checked to be
    text that bash can parse, so a typo is an error now and not a failed job later."""
    value = value.replace("\r\n", "\n").strip("\n")
    if not value.strip():
        return ""
    if len(value.encode()) > SETUP_COMMANDS_MAX:
        raise ValueError(f"{what} is longer than {SETUP_COMMANDS_MAX} bytes")
    if any(ord(c) < 32 and c not in "\n\t" for c in value):
        raise ValueError(f"{what} holds control characters: only text lines are accepted")
    # bash -n parses without running anything
    check = subprocess.run(["bash", "-n"], input=value, capture_output=True, text=True, timeout=10)
    if check.returncode != 0:
        problem = check.stderr.strip().replace("bash: ", "")
        raise ValueError(f"{what} is not valid shell: {problem}")
    return value + "\n"


def check_local_file(value: str, what: str) -> str:
    """value, if it names a regular file the user can read; else ValueError naming `what`."""
    if not value:
        return value
    refused = f"{what} {value[:200]!r} is not a readable regular file"
    try:
        given = os.path.abspath(os.path.expanduser(value))
        real = os.path.realpath(given)
    except (OSError, ValueError) as exc:  # NUL byte, no home directory
        raise ValueError(f"{refused}: {exc.strerror if isinstance(exc, OSError) else 'invalid name'}") from None
    for root in PSEUDO_FILE_ROOTS:
        if _under(given, root) or _under(real, root):
            raise ValueError(f"{refused}: it is under {root} (pseudo-files and devices are not accepted)")
    try:
        info = os.stat(real)
        pseudo = [root for root in PSEUDO_FILE_ROOTS if os.path.ismount(root) and os.stat(root).st_dev == info.st_dev]
    except OSError as exc:  # missing, name too long, a symlink loop, a directory you can not enter
        raise ValueError(f"{refused}: {exc.strerror or type(exc).__name__}") from None
    if pseudo:
        raise ValueError(f"{refused}: it is on the file system of {pseudo[0]} (pseudo-files and devices are not accepted)")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{refused}: it is a directory, device, pipe or socket")
    if not os.access(real, os.R_OK):
        raise ValueError(f"{refused}: you have no read permission")
    return value


# Seconds before the allocation's end that the job is stopped and the cluster torn down.
DEFAULT_WALLTIME_MARGIN = 300
# continue_after_walltime's bound: each successor is a queued job of the user's from the run's start
MAX_SUCCESSOR_ALLOCATIONS = 20


@positioned
class ClusterOptions(BaseModel):
    """How big each Ray node is and how long the cluster lives."""

    model_config = ConfigDict(extra="forbid", title="Cluster")

    direct_workers: int = Field(
        0, ge=0, le=64, title="Extra workers (no scheduler)", description="Worker nodes beside the head on the host"
    )
    # Empty (None) by default: a Ray node takes what the allocation gives it, and only what
    # the user sets is requested from the scheduler.
    num_cpus_per_node: int | None = Field(
        None, ge=1, le=4096, title="CPUs per node",
        description="Ray --num-cpus on every node, also requested from SLURM (--cpus-per-task) or PBS (ncpus). "
        "Empty: what the allocation gives (SLURM_CPUS_ON_NODE, PBS NCPUS; without a scheduler, the host's CPUs shared by its nodes)",
    )
    num_gpus_per_node: int | None = Field(
        None, ge=0, le=64, title="GPUs per node",
        description="Ray --num-gpus on every node, also requested from SLURM (--gpus-per-node) or PBS (ngpus). "
        "Empty: the GPUs Ray finds (CUDA_VISIBLE_DEVICES as the scheduler sets it)",
    )
    ray_memory_gb: float | None = Field(
        None, gt=0, le=65536, title="Memory per node (GB)",
        description="Ray --memory (heap for tasks and actors); with it, this + the object store + 0.5 GB is "
        "requested from SLURM (--mem) or PBS (mem). Empty: Ray's share of the node's (or cgroup's) memory",
    )
    object_store_memory_gb: float | None = Field(
        None, gt=0, le=65536, title="Object store per node (GB)",
        description="Ray --object-store-memory (shared memory for objects). Empty: Ray's default (30% of memory)",
    )
    cluster_idle_timeout: float = Field(
        30, gt=0, le=100000, title="Idle timeout (minutes)", description="Keep-alive clusters stop after this idle time"
    )
    keep_alive: bool = Field(False, title="Keep alive", description="Keep the cluster up after the user job")
    walltime_margin: int = Field(
        DEFAULT_WALLTIME_MARGIN, ge=10, le=86400, title="Walltime margin (seconds)",
        description="SLURM/PBS: this long before the allocation's end (ACTIVATE_RAY_DEADLINE) the user job gets "
        "SIGTERM (Ray's job stop: time to write a checkpoint), then the cluster is torn down and the run ends "
        "'walltime reached'. Must be smaller than the walltime",
    )
    continue_after_walltime: int = Field(
        0, ge=0, le=MAX_SUCCESSOR_ALLOCATIONS, title="Allocations after the walltime",
        description="SLURM/PBS: up to this many successor allocations, queued when the run's first job is "
        "submitted (dependency afterany); an allocation that ends 'walltime reached' is followed by a fresh "
        "cluster in the next one, running the same job with ACTIVATE_RAY_ATTEMPT=2, 3, ... (it resumes from "
        "its own checkpoint); the ones left are cancelled once the job ends otherwise. 0: none",
    )
    node_failure: NodeFailure = Field(
        NodeFailure.continue_,
        title="When a node dies",
        description="continue: report it and go on; stop: report it and tear the cluster down (the flow fails)",
    )
    on_failure: str = Field(
        "teardown", title="On failure",
        description="teardown: at once; keep=MINUTES (keep: 30): a cluster whose job failed or whose node died "
        "stays up that long for debugging (dashboard and connection info as shown), or until cancelled",
        json_schema_extra={"pattern": ON_FAILURE_RE.pattern},
    )
    retries: int = Field(
        1, ge=0, le=5, title="Retries",
        description="Fresh clusters tried after one that failed to come up (a node that never joined, a job that "
        "ended while starting), each without the nodes that failed (SLURM --exclude). Never after invalid input, "
        "a job the scheduler refused or can never run, a launcher or node check that failed, or a failing user job",
    )

    @field_validator("on_failure")
    @classmethod
    def _on_failure(cls, value: str) -> str:
        minutes = value.partition("=")[2]
        if not ON_FAILURE_RE.fullmatch(value) or (minutes and not 0 < float(minutes) <= 1440):
            raise ValueError(f"on_failure {value!r}: use teardown, keep or keep=MINUTES (more than 0, at most 1440)")
        return value

    @property
    def keep_on_failure_seconds(self) -> float:
        """How long a failed cluster stays up for debugging (0: torn down at once)."""
        if self.on_failure == "teardown":
            return 0.0
        return float(self.on_failure.partition("=")[2] or 30) * 60


def _without(model: type[BaseModel], name: str, *left_out: str) -> type[BaseModel]:
    """The group without fields that cannot apply on some form; the same definitions otherwise."""
    fields = {field: (info.annotation, FieldInfo.merge_field_infos(info))
              for field, info in model.model_fields.items() if field not in left_out}
    return positioned(create_model(name, __config__=model.model_config, __doc__=model.__doc__, **fields))


# The batch schedulers' forms: one Ray node per allocated node, no extra workers beside the head.
BatchClusterOptions = _without(ClusterOptions, "BatchClusterOptions", "direct_workers")


# --- container option (issue 16): each Ray node runs inside an image --------------------------
class ContainerRuntime(str, Enum):
    """What runs the image on each node; auto: the first of apptainer, singularity, podman found there."""

    auto = "auto"
    apptainer = "apptainer"
    singularity = "singularity"
    podman = "podman"


# An OCI reference as podman (and apptainer's docker://) spells it: [registry[:port]/]path[:tag][@digest].
_OCI_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
OCI_REFERENCE_RE = re.compile(
    # a registry is a name with a dot, localhost, or has a port: else the first part is a (lowercase) path
    rf"^(?:(?:(?:[A-Za-z0-9\-]{{1,63}}\.)+[A-Za-z0-9\-]{{1,63}}|localhost)(?::\d{{1,5}})?/|[A-Za-z0-9\-]{{1,63}}:\d{{1,5}}/)?"
    rf"{_OCI_COMPONENT}(?:/{_OCI_COMPONENT}){{0,15}}"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127})?(?:@sha256:[0-9a-f]{64})?$",
    re.ASCII,
)
# A path on the target: a .sif file or a sandbox dir for apptainer/singularity, an archive for podman.
IMAGE_PATH_RE = re.compile(r"^~?/[A-Za-z0-9_.+@/\-]{1,250}$", re.ASCII)
# Transports: which runtimes understand each (in auto-detection order), and what follows it.
IMAGE_TRANSPORTS = {
    "docker://": (("apptainer", "singularity", "podman"), OCI_REFERENCE_RE),
    "oras://": (("apptainer", "singularity"), OCI_REFERENCE_RE),
    "library://": (("apptainer", "singularity"), OCI_REFERENCE_RE),
    "oci-archive:": (("podman",), IMAGE_PATH_RE),
    "docker-archive:": (("podman",), IMAGE_PATH_RE),
    "containers-storage:": (("podman",), OCI_REFERENCE_RE),
}


def runtimes_for_image(image: str) -> tuple[str, ...]:
    """The runtimes that can run this image reference, in auto-detection order; ValueError if none."""
    for transport, (runtimes, rest) in IMAGE_TRANSPORTS.items():
        if image.startswith(transport):
            if not rest.fullmatch(image[len(transport):]) or ".." in image.split("/"):
                raise ValueError(f"container_image {image[:200]!r}: not a valid {transport} reference")
            return runtimes
    if image.startswith(("/", "~/")):
        if not IMAGE_PATH_RE.fullmatch(image) or ".." in image.split("/"):
            raise ValueError(f"container_image {image[:200]!r}: a path may use letters, digits and _.+@/- only")
        return ("apptainer", "singularity")  # a .sif file or a sandbox dir
    if OCI_REFERENCE_RE.fullmatch(image):
        return ("podman",)  # a bare name is looked up in podman's storage and registries
    raise ValueError(
        f"container_image {image[:200]!r}: use a .sif path or sandbox dir on the target (/... or ~/...), "
        "docker://, oras:// or library:// for apptainer/singularity, or an image name "
        "(registry/name:tag, oci-archive:/path) for podman"
    )


# --- end of the container option ------------------------------------------------------------------


@positioned
class EnvironmentOptions(BaseModel):
    """The Python and Ray the nodes run, and where the cluster's files live."""

    model_config = ConfigDict(extra="forbid", title="Environment")

    ray_version: str = Field(
        DEFAULT_RAY_VERSION,
        title="Ray version",
        description="Ray release installed on the target, e.g. 2.60.0 (the same on every node)",
        json_schema_extra={"pattern": RAY_VERSION_RE.pattern},
    )
    python: str = Field(
        "",
        title="Python on the target",
        description="An interpreter, venv or conda env on the target that already has this Ray (empty: find or build one)",
        json_schema_extra={"pattern": "^$|" + TARGET_PATH_RE.pattern},
    )
    setup_commands: str = Field(
        "",
        title="Setup commands",
        description="Shell lines run as you before anything else: on the login node before Python is looked for, "
        "and on every node before Ray starts, e.g. 'module load python/3.11 cuda/12.4' or "
        "'source /opt/conda/etc/profile.d/conda.sh && conda activate ray' (empty: none)",
    )
    work_dir: str = Field(
        "~/.activate-ray",
        title="Work dir on the target",
        description="Shared directory for venvs and cluster state (must be visible on every node)",
        json_schema_extra={"pattern": "^$|" + TARGET_PATH_RE.pattern},
    )
    requirements: str = Field(
        "",
        title="requirements.txt",
        description="Extra packages to install: a requirements file on the machine that runs the flow (empty: none)",
    )

    @field_validator("ray_version")
    @classmethod
    def _ray_version(cls, value: str) -> str:
        if not RAY_VERSION_RE.fullmatch(value):
            raise ValueError(f"ray_version {value!r} is not a Ray release such as {DEFAULT_RAY_VERSION}")
        return value

    @field_validator("python", "work_dir")
    @classmethod
    def _target_path(cls, value: str, info) -> str:
        return _check_target_path(value, info.field_name)

    @field_validator("requirements")
    @classmethod
    def _local_file(cls, value: str, info) -> str:
        return check_local_file(value, info.field_name)

    @field_validator("setup_commands")
    @classmethod
    def _setup_commands(cls, value: str) -> str:
        return check_shell_lines(value, "setup_commands")

    # --- container option (issue 16): the image each Ray node runs in
    container_image: str = Field(
        "",
        title="Container image",
        description="Run every Ray node inside this image, with the image's own python and ray: a .sif path "
        "or docker://, oras://, library:// (apptainer/singularity), or name:tag, docker://, oci-archive:/path "
        "(podman). The cluster dir, the node temp dir and the work dir are bound in; host network (empty: no container)",
    )
    container_runtime: ContainerRuntime = Field(
        ContainerRuntime.auto,
        title="Container runtime",
        description="apptainer, singularity or podman; auto: the first of these found on each node "
        "(one that can run the image)",
    )

    @field_validator("container_image")
    @classmethod
    def _container_image(cls, value: str) -> str:
        if value:
            runtimes_for_image(value)
        return value

    @model_validator(mode="after")
    def _container_consistent(self):
        if not self.container_image:
            if self.container_runtime is not ContainerRuntime.auto:
                raise ValueError(f"container_runtime={self.container_runtime.value} needs a container_image")
            return self
        runtimes = runtimes_for_image(self.container_image)
        if self.container_runtime is not ContainerRuntime.auto and self.container_runtime.value not in runtimes:
            raise ValueError(f"container_image {self.container_image!r} cannot be run by "
                             f"{self.container_runtime.value}: it suits {', '.join(runtimes)}")
        for name in ("python", "requirements"):
            if getattr(self, name, ""):
                raise ValueError(f"{name} applies without a container only: with container_image the image's own "
                                 "python and ray run (put extra packages in the image, or in runtime_env.pip)")
        return self

    @property
    def container_runtimes(self) -> tuple[str, ...]:
        """Which runtimes a node may use for the image, in the order it looks for them (empty: no container)."""
        if not self.container_image:
            return ()
        if self.container_runtime is ContainerRuntime.auto:
            return runtimes_for_image(self.container_image)
        return (self.container_runtime.value,)
    # --- end of the container option


@positioned
class AdvancedOptions(BaseModel):
    """Ports, timeouts, security and SSH: the defaults suit most sites."""

    model_config = ConfigDict(extra="forbid", title="Advanced")

    dashboard_port: int = Field(
        0,
        ge=0,
        le=65535,
        title="Dashboard port",
        description="Dashboard port on the head: 0 = a free one (two clusters on a node never race for one port); "
        "else 1024-65535, preferred (a free one if taken). The tunnel maps it to local port 8265 either way",
    )
    dashboard_host: str = Field(
        "127.0.0.1",
        title="Dashboard bind address",
        description="Keep 127.0.0.1 and use the SSH tunnel; anything else exposes an RCE endpoint",
        json_schema_extra={"pattern": BIND_HOST_RE.pattern},
    )
    node_tmp: str = Field(
        "/tmp",
        title="Node temp root",
        description=f"Node-local directory for Ray's temp dirs (at most {NODE_TMP_MAX_LEN} characters: "
        "Ray's unix sockets live below it)",
        json_schema_extra={"pattern": "^$|" + TARGET_PATH_RE.pattern, "maxLength": NODE_TMP_MAX_LEN},
    )
    network_interface: str = Field(
        "",
        title="Network interface",
        description="The network Ray uses between nodes: an interface name (ib0, hsn0) or a subnet "
        "(10.20.0.0/16); every node's Ray address is its address there (empty: the address of the node's hostname)",
        json_schema_extra={"pattern": f"^$|{INTERFACE_RE.pattern}|{CIDR_RE.pattern}"},
    )
    readiness_timeout: int = Field(
        300, ge=5, le=86400, title="Readiness timeout (s)", description="Give up when not every node is up after this long"
    )
    heartbeat_timeout: int = Field(
        120, ge=10, le=86400, title="Dead-man timeout (s)", description="The cluster stops itself when the flow is silent this long"
    )
    token_auth: bool = Field(
        True, title="Ray token authentication", description="A fresh token per cluster; turn off only for Ray without it"
    )
    publish_token_block: bool = Field(
        False,
        title="Publish the token as a Prefect Secret block",
        description="For UI users of a configured Prefect server: EVERY user of that server can read it. "
        "Never done with Prefect's temporary server (no authentication, on a shared loopback)",
    )
    metrics: bool = Field(
        False,
        title="Ray metrics endpoints",
        description="Open Ray's Prometheus endpoints for a scraper: they answer WITHOUT the token, "
        "on every interface of each node (off: not opened at all)",
    )
    accept_new_host_key: bool = Field(
        False, title="Accept unknown host keys", description="Trust on first use: record an unknown host key in ~/.activate-ray/known_hosts (a changed key is always refused)"
    )
    ssh_key_file: str = Field(
        "", title="SSH private key file", description="Key file for the host (empty: the SSH agent and default keys)"
    )
    known_hosts: str = Field(
        "", title="known_hosts file", description="Host keys to trust instead of ~/.ssh/known_hosts; /etc/ssh/ssh_known_hosts is read as well"
    )
    info_file: str = Field(
        "ray-cluster.json", title="Connection info file", description="Where to write connection info as JSON (no secrets)"
    )
    state_file: str = Field(
        "",
        title="Cluster state file",
        description="Where to write cluster_id=, scheduler=, job_id= lines as soon as each is known "
        "(for a cleanup step that runs when the flow could not tear down; empty: none)",
    )
    keep_logs: bool = Field(
        True, title="Keep logs",
        description="Before teardown, every node copies its Ray logs (and the job its output) to "
        "<work_dir>/logs/<cluster id>/, gzip'd: what explains a failure survives the cluster",
    )
    logs_keep_clusters: int = Field(
        20, ge=1, le=10000, title="Logs of how many clusters",
        description="Logs of older clusters are removed before the next cluster starts",
    )
    logs_keep_days: float = Field(
        7, gt=0, le=3650, title="Logs kept (days)", description="Logs older than this are removed before the next cluster starts",
    )
    log_cap_mb: int = Field(
        50, ge=1, le=100000, title="Logs per node (MB)",
        description="At most this much (uncompressed) of each node's logs is kept, the newest files first",
    )

    @field_validator("node_tmp")
    @classmethod
    def _target_path(cls, value: str, info) -> str:
        # Its length (Ray's unix socket paths below it, 107 bytes) is a check's row, said in the
        # same words on the login host before a run submits and on every node (tasks/checks.py)
        return _check_target_path(value, info.field_name)

    @field_validator("network_interface")
    @classmethod
    def _network(cls, value: str) -> str:
        value = value.strip()
        if re.fullmatch(r"(\d{1,3}\.){3}\d{1,3}", value):
            raise ValueError(f"network_interface {value!r} is an address: give an interface name or a subnet "
                             f"such as {value}/24")
        if not value or INTERFACE_RE.fullmatch(value):
            return value
        if CIDR_RE.fullmatch(value):
            try:
                return str(ipaddress.IPv4Network(value, strict=False))
            except ValueError as exc:
                raise ValueError(f"network_interface {value!r} is not an IPv4 subnet: {exc}") from None
        raise ValueError(f"network_interface {value!r} is neither an interface name (such as ib0) "
                         "nor an IPv4 subnet (such as 10.20.0.0/16)")

    @field_validator("dashboard_port")
    @classmethod
    def _dashboard_port(cls, value: int) -> int:
        if 0 < value < 1024:
            raise ValueError(f"dashboard_port {value}: use 0 (a free port) or 1024-65535")
        return value

    @field_validator("dashboard_host")
    @classmethod
    def _bind(cls, value: str) -> str:
        if not BIND_HOST_RE.fullmatch(value) or any(int(p) > 255 for p in value.split(".")):
            raise ValueError(f"dashboard_host {value!r} is not an IPv4 address")
        return value

    @field_validator("ssh_key_file", "known_hosts")
    @classmethod
    def _local_file(cls, value: str, info) -> str:
        return check_local_file(value, info.field_name)

    @model_validator(mode="after")
    def _consistent(self) -> AdvancedOptions:
        if self.publish_token_block and not self.token_auth:
            raise ValueError("publish_token_block needs token_auth: there is no token to publish")
        return self


def _check_target_path(value: str, name: str) -> str:
    if value and not TARGET_PATH_RE.fullmatch(value):
        raise ValueError(f"{name} {value!r}: use letters, digits and _.~/+@- only")
    return value


MAX_SCRIPT_BYTES = 1024 * 1024


def is_script_text(user_script: str) -> bool:
    """The form's editor gives the script's text, a file name never has a line break: text it is."""
    return "\n" in user_script
ENV_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$", re.ASCII)
# runtime_env.env_vars: a value "secret-block:NAME" is the Prefect Secret block NAME, read at
# submission (a deployment run gets its secrets that way: see SECRET_MASK).
SECRET_BLOCK_PREFIX = "secret-block:"
SECRET_BLOCK_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$", re.ASCII)  # Prefect's block names
# What Prefect stores and shows for a SecretStr parameter. A run that gets it as a value (a
# deployment run given a literal secret, a hook rebuilding a saved state) never had the secret.
SECRET_MASK = "**********"


@positioned
class RuntimeEnvOptions(BaseModel):
    """The user job's runtime environment and its driver's resources, as Ray's job API takes them."""

    model_config = ConfigDict(extra="forbid", title="Runtime environment")

    working_dir: str = Field(
        "", title="Working dir",
        description="A directory on the machine that runs the flow, uploaded by Ray and the job's cwd (empty: none)",
    )
    pip: list[str] = Field(default_factory=list, title="pip packages",
                           description="Extra packages for the job's workers, e.g. ['pandas==2.2.3']")
    # Secrets, each: Prefect stores and shows a SecretStr parameter masked (the run's parameters,
    # its form, the saved teardown state), and the value reaches the job only at submission.
    env_vars: dict[str, SecretStr] = Field(
        default_factory=dict, title="Environment variables",
        description="Set for the job's driver and workers; held as secrets (shown masked). A value "
                    "'secret-block:NAME' is the Prefect Secret block NAME, read when the job is submitted")
    # Resources of the job's driver (its entrypoint), as `ray job submit --entrypoint-num-cpus` takes
    # them: the driver then waits for a node that has them instead of running on the head.
    entrypoint_num_cpus: float | None = Field(
        None, ge=0, le=4096, title="Driver CPUs",
        description="CPUs reserved for the job's driver (ray job submit --entrypoint-num-cpus; empty: none)")
    entrypoint_num_gpus: float | None = Field(
        None, ge=0, le=64, title="Driver GPUs",
        description="GPUs reserved for the job's driver, which then runs on a node that has them (empty: none)")
    entrypoint_memory_gb: float | None = Field(
        None, gt=0, le=65536, title="Driver memory (GB)",
        description="Memory reserved for the job's driver (ray job submit --entrypoint-memory; empty: none)")

    @field_validator("working_dir")
    @classmethod
    def _working_dir(cls, value: str) -> str:
        if value and not os.path.isdir(os.path.expanduser(value)):
            raise ValueError(f"runtime_env.working_dir {value[:200]!r} is not a directory")
        return value

    @field_validator("env_vars")
    @classmethod
    def _env_vars(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, secret in value.items():
            if not ENV_VAR_RE.fullmatch(name):
                raise ValueError(f"runtime_env.env_vars: {name[:60]!r} is not an environment variable name")
            if name.startswith("RAY_AUTH"):
                raise ValueError(f"runtime_env.env_vars: {name} is the cluster's own (token auth)")
            text = secret.get_secret_value()
            if text.startswith(SECRET_BLOCK_PREFIX) and not SECRET_BLOCK_RE.fullmatch(text[len(SECRET_BLOCK_PREFIX):]):
                # the value is a block's name, not a secret: safe to show
                raise ValueError(f"runtime_env.env_vars: {name}: {text[:80]!r} is not a Secret block name "
                                 "(lowercase letters, digits and dashes)")
        return value

    def secret_blocks(self) -> dict[str, str]:
        """env_vars given as Prefect Secret blocks: {variable: block name}."""
        return {name: secret.get_secret_value()[len(SECRET_BLOCK_PREFIX):] for name, secret in self.env_vars.items()
                if secret.get_secret_value().startswith(SECRET_BLOCK_PREFIX)}

    def as_ray(self, secrets: dict[str, str] | None = None) -> dict:
        """The runtime_env JobSubmissionClient.submit_job takes: only what is set, env_vars in
        clear (only for the submission), each Secret block's from `secrets` (its value, read by
        the caller). A value that arrived masked never had the secret: refused, with the way out."""
        values = {key: value for key, value in self.model_dump(include={"working_dir", "pip"}).items() if value}
        env = {}
        for name, secret in self.env_vars.items():
            text = secret.get_secret_value()
            if text == SECRET_MASK:
                raise ValueError(f"runtime_env.env_vars: {name} reached this run masked ({SECRET_MASK}): give it as "
                                 f"'{SECRET_BLOCK_PREFIX}NAME' of a Prefect Secret block instead")
            env[name] = (secrets or {}).get(name, text) if text.startswith(SECRET_BLOCK_PREFIX) else text
        if env:
            values["env_vars"] = env
        return values

    def entrypoint_resources(self) -> dict:
        """submit_job's entrypoint_num_cpus / _num_gpus / _memory (bytes): only what is set."""
        values = {"entrypoint_num_cpus": self.entrypoint_num_cpus, "entrypoint_num_gpus": self.entrypoint_num_gpus,
                  "entrypoint_memory": None if self.entrypoint_memory_gb is None else int(self.entrypoint_memory_gb * 1024**3)}
        return {key: value for key, value in values.items() if value is not None}


# The flow's parameter groups, in the order of the form and of workflow.yaml's inputs.
GROUPS: dict[str, type[BaseModel]] = {
    "cluster": ClusterOptions,
    "environment": EnvironmentOptions,
    "advanced": AdvancedOptions,
}
# flat name (the command line's --num-cpus-per-node, RAY_CLUSTER_NUM_CPUS_PER_NODE) -> its group
GROUP_OF: dict[str, str] = {name: group for group, model in GROUPS.items() for name in model.model_fields}


class RayClusterSettings(BaseModel):
    """Start a Ray cluster on an HPC resource, run a job on it, tear it down.

    What the tasks read, built from the flow's parameters: its groups are those
    parameters, and every field of a group is also read flat
    (`settings.num_cpus_per_node` is `settings.cluster.num_cpus_per_node`).
    Flat values are accepted on input too (the command line, blocks, tests)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, title="Ray cluster")

    host: str = Field(
        "",
        title="Host",
        description="Where to run: empty = this machine; else user@host:port, an ~/.ssh/config alias, "
        "or the name of a saved SSH connection block (the login node for SLURM/PBS)",
        json_schema_extra={"pattern": "^$|" + HOST_RE.pattern},
    )
    scheduler: SchedulerKind = Field(
        SchedulerKind.none,
        title="Scheduler",
        description="none: head and workers on the host itself; slurm or pbs: a batch job, one Ray node per node",
    )
    user_script: str = Field(
        "",
        title="User script",
        description="The Ray script: its text (the form's editor; anything with a line break is text) or a "
        "Python file on the machine that runs the flow. Submitted as a Ray job (empty: keep the cluster up until idle)",
        json_schema_extra={"format": "text"},
    )
    script_args: list[str] = Field(
        default_factory=list,
        title="Script arguments",
        description="Arguments after the script: python SCRIPT ARG... (each one word, quoted for you)",
    )
    runtime_env: RuntimeEnvOptions = Field(
        default_factory=RuntimeEnvOptions,
        title="Runtime environment",
        description="What `ray job submit --runtime-env` takes: working_dir, pip, env_vars",
    )
    cluster: ClusterOptions = Field(default_factory=ClusterOptions, title="Cluster",
                                    description="Node sizes and how long the cluster lives")
    slurm: SlurmOptions = Field(
        default_factory=SlurmOptions, title="SLURM", description="Used when the scheduler is slurm"
    )
    pbs: PbsOptions = Field(default_factory=PbsOptions, title="PBS", description="Used when the scheduler is pbs")
    scale: ScaleOptions = Field(default_factory=ScaleOptions, title="Scaling",
                                description="Worker jobs beside the allocation (slurm or pbs): at start, added, adaptive")
    environment: EnvironmentOptions = Field(default_factory=EnvironmentOptions, title="Environment",
                                            description="Ray version, Python and the shared work dir")
    advanced: AdvancedOptions = Field(default_factory=AdvancedOptions, title="Advanced",
                                      description="Ports, timeouts, security and SSH")

    @model_validator(mode="before")
    @classmethod
    def _flat_into_groups(cls, data):
        """num_cpus_per_node=... goes to cluster.num_cpus_per_node (merged with a cluster={...} given too)."""
        if not isinstance(data, dict) or not any(key in GROUP_OF for key in data):
            return data
        data = dict(data)
        for key in [k for k in data if k in GROUP_OF]:
            group = GROUP_OF[key]
            current = data.get(group) or {}
            if isinstance(current, BaseModel):
                current = current.model_dump(exclude_unset=True)
            data[group] = {**current, key: data.pop(key)}
        return data

    def __getattr__(self, name: str):
        group = GROUP_OF.get(name)
        if group is None:
            return super().__getattr__(name)
        return getattr(getattr(self, group), name)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if value and not HOST_RE.fullmatch(value):
            raise ValueError(f"host {value!r} is not user@host[:port], an ssh alias or a block name")
        if ":" in value and not 0 < int(value.rsplit(":", 1)[1]) < 65536:
            raise ValueError(f"host {value!r}: port out of range 1-65535")
        return value

    @field_validator("user_script")
    @classmethod
    def _script(cls, value: str, info) -> str:
        if is_script_text(value):
            if len(value.encode()) > MAX_SCRIPT_BYTES:
                raise ValueError(f"user_script: the script's text is over {MAX_SCRIPT_BYTES // 1024} KiB; "
                                 "give it as a file (and its data through runtime_env.working_dir)")
            try:  # a typo is found here, not after a cluster was allocated for it
                compile(value, "user_script", "exec")
            except SyntaxError as error:
                raise ValueError(f"user_script: the script's text is not valid Python: {error.msg} "
                                 f"(line {error.lineno})") from None
            return value
        # examples/hello_ray.py from outside the checkout (an installed wheel): the shipped one
        return check_local_file(shipped_example(value) or value, info.field_name)

    @property
    def script_is_text(self) -> bool:
        return is_script_text(self.user_script)

    @model_validator(mode="after")
    def _only_what_applies(self) -> RayClusterSettings:
        """Options of another scheduler are refused, not ignored: they say the run was meant otherwise."""
        given = {
            "slurm": self.slurm.model_dump() != SlurmOptions().model_dump(),
            "pbs": self.pbs.model_dump() != PbsOptions().model_dump(),
        }
        for name, set_ in given.items():
            if set_ and self.scheduler.value != name:
                raise ValueError(
                    f"{name} options are set but the scheduler is {self.scheduler.value}: "
                    f"set scheduler={name}, or leave the {name} options out"
                )
        if self.scale.is_set and self.scheduler is SchedulerKind.none:
            raise ValueError("scale options (worker jobs) need a scheduler: set scheduler=slurm or pbs, "
                             "or use direct_workers for workers beside the head on the host")
        walltime_re = {SchedulerKind.slurm: SLURM_WALLTIME_RE, SchedulerKind.pbs: PBS_WALLTIME_RE}.get(self.scheduler)
        if self.scale.worker_walltime and walltime_re and not walltime_re.fullmatch(self.scale.worker_walltime):
            raise ValueError(f"scale.worker_walltime {self.scale.worker_walltime!r} is not a {self.scheduler.value} "
                             "walltime (as slurm.walltime or pbs.walltime takes it)")
        walltime = self.walltime_seconds
        if walltime and self.walltime_margin >= walltime:
            raise ValueError(
                f"walltime_margin={self.walltime_margin}s is not smaller than the {self.scheduler.value} walltime "
                f"({walltime}s): the job would be stopped before it began; give a smaller walltime_margin or a longer walltime"
            )
        if self.continue_after_walltime and self.scheduler is SchedulerKind.none:
            raise ValueError(
                f"continue_after_walltime={self.continue_after_walltime} needs a scheduler (slurm or pbs): without one "
                "there is no allocation that ends, nor a queue to wait in; leave it 0 or set scheduler=slurm or pbs"
            )
        if self.cluster.direct_workers and self.scheduler is not SchedulerKind.none:
            raise ValueError(
                f"direct_workers={self.cluster.direct_workers} applies without a scheduler only: with "
                f"{self.scheduler.value} every allocated node runs one Ray node (set the node count there)"
            )
        return self

    @property
    def nodes(self) -> int:
        """Ray nodes the cluster will have once ready."""
        if self.scheduler is SchedulerKind.slurm:
            return self.slurm.nodes
        if self.scheduler is SchedulerKind.pbs:
            return pbs_select_chunks(self.pbs.select) if self.pbs.select else self.pbs.nodes
        return 1 + self.cluster.direct_workers

    @property
    def walltime_seconds(self) -> int | None:
        """The allocation's walltime as asked for (None without a scheduler)."""
        if self.scheduler is SchedulerKind.slurm:
            return slurm_seconds(self.slurm.walltime)
        if self.scheduler is SchedulerKind.pbs:
            return pbs_seconds(self.pbs.walltime)
        return None

    @property
    def margin_seconds(self) -> int:
        """Seconds before the allocation's end that the job is stopped and the cluster torn down."""
        return self.walltime_margin

    @property
    def ready_nodes(self) -> int:
        """Ray nodes readiness waits for: the allocation's and the worker jobs' at start."""
        return self.nodes + self.scale.worker_jobs

    def parameters(self) -> dict:
        """The ray_cluster flow's parameters for these settings."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def deployment_parameters(self) -> dict:
        """Parameters (JSON) for the flow of this scheduler (ray_cluster_slurm, _pbs, _direct):
        the groups that apply to it, every field spelled out."""
        skip = {"scheduler", "slurm", "pbs"} - {self.scheduler.value}
        if self.scheduler is SchedulerKind.none:
            skip.add("scale")
        parameters = {name: value for name, value in self.model_dump(mode="json").items() if name not in skip}
        if self.scheduler is not SchedulerKind.none:  # BatchClusterOptions: one Ray node per allocated node
            parameters["cluster"].pop("direct_workers")
        return parameters

    def flat(self) -> dict:
        """Every value by its flat name (groups of other schedulers left out): the command line's view."""
        values = {"host": self.host, "scheduler": self.scheduler.value, "user_script": self.user_script,
                  "script_args": self.script_args, "runtime_env": self.runtime_env.model_dump(mode="json")}
        for group in GROUPS:
            values.update(getattr(self, group).model_dump(mode="json"))
        return values
