"""Every input of the ray-cluster flow, in one pydantic model.

The same model is the flow's parameters (Prefect form), the command line
(`python -m flows.ray_cluster --help`), the environment (prefix
`RAY_CLUSTER_`, nested with `__`) and the inputs of workflow.yaml.
Validation happens here, before anything is started: a value that reaches a
shell later has already been checked against a strict pattern, and is quoted
on top of that.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_RAY_VERSION = "2.60.0"

# Characters Slurm and PBS accept in account, partition, qos and queue names.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$", re.ASCII)
# A PEP 440 release, the way Ray versions are spelled (2.60.0, 2.9.3, 3.0.0rc1).
RAY_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+((a|b|rc)\d+)?$", re.ASCII)
# user@host:port, an ~/.ssh/config alias, or a saved SSH connection block name.
HOST_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}@)?[A-Za-z0-9_][A-Za-z0-9_.\-]{0,252}(?::\d{1,5})?$", re.ASCII)
# Slurm --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
SLURM_WALLTIME_RE = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{2}|\d+-\d{1,2}:\d{2}:\d{2})$", re.ASCII)
# PBS walltime: [[HH:]MM:]SS, or plain seconds.
PBS_WALLTIME_RE = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2})$", re.ASCII)
# One directive argument: options, values, lists; no shell or quoting characters.
DIRECTIVE_ARG_RE = re.compile(r"^[A-Za-z0-9_=:,.+/@%\-\[\] ]{1,200}$", re.ASCII)
# A PBS select statement: chunks like 2:ncpus=4:mem=8gb:ngpus=1 joined by '+'; a
# chunk without a leading count (ncpus=4:mem=8gb) is one chunk, as in PBS.
_PBS_RESOURCE = r"[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9_.\-]+"
_PBS_CHUNK = r"(\d+(:" + _PBS_RESOURCE + r")+|" + _PBS_RESOURCE + r"(:" + _PBS_RESOURCE + r")*)"
PBS_SELECT_RE = re.compile(r"^" + _PBS_CHUNK + r"(\+" + _PBS_CHUNK + r")*$", re.ASCII)
# Paths on the target that reach scripts: no quotes, no shell syntax.
TARGET_PATH_RE = re.compile(r"^[A-Za-z0-9_.~/+@\-]{1,200}$", re.ASCII)
BIND_HOST_RE = re.compile(r"^(\d{1,3}\.){3}\d{1,3}$", re.ASCII)


class Scheduler(str, Enum):
    none = "none"
    slurm = "slurm"
    pbs = "pbs"


class NodeFailure(str, Enum):
    """What to do when a node of a ready cluster dies."""

    continue_ = "continue"
    stop = "stop"


def _check_name(value: str, what: str) -> str:
    if value and not NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a valid scheduler name: use letters, digits, "
            "'_', '.', '-' (up to 64, starting with a letter or digit)"
        )
    return value


def pbs_select_chunks(select: str) -> int:
    """Chunks a select statement asks for: the sum of its chunk counts, 1 for a chunk without one.

    With `-l place=scatter` (always in the job script) every chunk is on its own
    host: this is also the number of nodes, and of Ray nodes."""
    total = 0
    for chunk in select.split("+"):
        count = chunk.split(":", 1)[0]
        total += int(count) if count.isascii() and count.isdigit() else 1
    return total


def _pbs_resource_options(argument: str) -> list[str]:
    """name=value items of the -l options in one '#PBS' directive argument."""
    items, words = [], argument.split()
    for index, word in enumerate(words):
        if word == "-l" and index + 1 < len(words):
            items += words[index + 1].split(",")
        elif word.startswith("-l") and len(word) > 2:
            items += word[2:].split(",")
    return items


def _check_directives(value: str, prefix: str) -> str:
    for number, line in enumerate(value.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if not line.startswith(prefix + " "):
            raise ValueError(f"extra directive line {number} must start with '{prefix} ': {line[:80]!r}")
        argument = line[len(prefix) + 1 :].strip()
        if not DIRECTIVE_ARG_RE.fullmatch(argument) or not argument.startswith("-"):
            raise ValueError(
                f"extra directive line {number} {line[:80]!r}: expected '{prefix} -option[=value]' "
                "with letters, digits and _=:,.+/@%-[] only"
            )
        for option in argument.split():
            if prefix == "#SBATCH" and re.match(r"^(--?wrap|--?wait|-W)(=|$|\b)", option):
                raise ValueError(f"extra directive line {number}: {option.split('=')[0]!r} is not allowed")
    return "\n".join(line.strip() for line in value.splitlines() if line.strip())


class SlurmOptions(BaseModel):
    """Where and how long the SLURM job runs."""

    model_config = ConfigDict(extra="forbid", title="SLURM")

    account: str = Field(
        "",
        title="Account",
        description="--account to charge (empty: your default)",
        json_schema_extra={"pattern": "^$|" + NAME_RE.pattern},
    )
    partition: str = Field(
        "",
        title="Partition",
        description="--partition (empty: the cluster default)",
        json_schema_extra={"pattern": "^$|" + NAME_RE.pattern},
    )
    qos: str = Field(
        "", title="QOS", description="--qos (empty: the default)", json_schema_extra={"pattern": "^$|" + NAME_RE.pattern}
    )
    walltime: str = Field(
        "01:00:00",
        title="Walltime",
        description="--time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, e.g. 30, 01:00:00 or 1-12:00:00",
        json_schema_extra={"pattern": SLURM_WALLTIME_RE.pattern},
    )
    nodes: int = Field(1, ge=1, le=10000, title="Nodes", description="Nodes in the allocation: one Ray node on each")
    extra_directives: str = Field(
        "", title="Extra directives", description="More '#SBATCH --option=value' lines, one per line"
    )

    @field_validator("account", "partition", "qos")
    @classmethod
    def _names(cls, value: str, info) -> str:
        return _check_name(value, f"slurm.{info.field_name}")

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str) -> str:
        if not SLURM_WALLTIME_RE.fullmatch(value):
            raise ValueError(
                f"slurm.walltime {value!r} is not a Slurm time: use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
            )
        return value

    @field_validator("extra_directives")
    @classmethod
    def _directives(cls, value: str) -> str:
        return _check_directives(value, "#SBATCH")


class PbsOptions(BaseModel):
    """Where and how long the PBS job runs."""

    model_config = ConfigDict(extra="forbid", title="PBS")

    account: str = Field(
        "",
        title="Account",
        description="-A account (empty: your default)",
        json_schema_extra={"pattern": "^$|" + NAME_RE.pattern},
    )
    queue: str = Field(
        "",
        title="Queue",
        description="-q queue (empty: the server default)",
        json_schema_extra={"pattern": "^$|" + NAME_RE.pattern},
    )
    walltime: str = Field(
        "01:00:00",
        title="Walltime",
        description="-l walltime=: HH:MM:SS, MM:SS or seconds, e.g. 01:00:00",
        json_schema_extra={"pattern": PBS_WALLTIME_RE.pattern},
    )
    nodes: int = Field(
        1, ge=1, le=10000, title="Nodes",
        description="Chunks (nodes): one Ray node on each (with a select statement: its chunk count, leave this out)",
    )
    select: str = Field(
        "",
        title="Select",
        description="Your own -l select= statement, e.g. 2:ncpus=8:mem=32gb; its chunks are the nodes "
        "(empty: built from nodes, CPUs, memory, GPUs)",
        json_schema_extra={"pattern": "^$|" + PBS_SELECT_RE.pattern},
    )
    extra_directives: str = Field(
        "", title="Extra directives", description="More '#PBS -option value' lines, one per line"
    )

    @field_validator("account", "queue")
    @classmethod
    def _names(cls, value: str, info) -> str:
        return _check_name(value, f"pbs.{info.field_name}")

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str) -> str:
        if not PBS_WALLTIME_RE.fullmatch(value):
            raise ValueError(f"pbs.walltime {value!r} is not a PBS walltime: use HH:MM:SS, MM:SS or seconds")
        return value

    @field_validator("select")
    @classmethod
    def _select(cls, value: str) -> str:
        if value and not PBS_SELECT_RE.fullmatch(value):
            raise ValueError(
                f"pbs.select {value!r} is not a select statement: expected [N:]res=value[:res=value]...[+[N:]...]"
            )
        if value:
            for chunk in value.split("+"):
                count = chunk.split(":", 1)[0]
                if count.isdigit() and int(count) == 0:
                    raise ValueError(f"pbs.select {value!r}: chunk {chunk!r} asks for 0 chunks")
            if pbs_select_chunks(value) > 10000:
                raise ValueError(f"pbs.select {value!r} asks for {pbs_select_chunks(value)} chunks: at most 10000")
        return value

    @field_validator("extra_directives")
    @classmethod
    def _directives(cls, value: str) -> str:
        value = _check_directives(value, "#PBS")
        # The job script asks for its own select and place=scatter: one chunk per host,
        # one Ray node per chunk. A directive overriding them would change the node count.
        for number, line in enumerate(value.splitlines(), 1):
            for item in _pbs_resource_options(line[len("#PBS ") :]):
                name, _, setting = item.partition("=")
                if name == "select":
                    raise ValueError(f"extra directive line {number}: use pbs.select for -l select=, not a directive")
                if name == "place" and "scatter" not in setting.split(":"):
                    raise ValueError(
                        f"extra directive line {number}: -l place={setting} can put several chunks on one host; "
                        "the cluster needs place=scatter (one Ray node per chunk), e.g. -l place=scatter:excl"
                    )
        return value

    @model_validator(mode="after")
    def _nodes_from_select(self) -> "PbsOptions":
        """With a select statement, its chunks are the nodes: nodes given beside it must agree."""
        if not self.select:
            return self
        chunks = pbs_select_chunks(self.select)
        if "nodes" in self.model_fields_set and self.nodes != chunks:
            raise ValueError(
                f"pbs.nodes={self.nodes} but pbs.select asks for {chunks} chunks ({self.select}): "
                "leave pbs.nodes out (the select statement sets it) or make them agree"
            )
        # Not an assignment through pydantic: nodes stays "not given" in model_fields_set.
        object.__setattr__(self, "nodes", chunks)
        return self


class RayClusterSettings(BaseSettings):
    """Start a Ray cluster on an HPC resource, run a job on it, tear it down."""

    model_config = SettingsConfigDict(
        env_prefix="RAY_CLUSTER_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        title="Ray cluster",
    )

    # --- cluster
    host: str = Field(
        "",
        title="Host",
        description="Where to run: empty = this machine; else user@host:port, an ~/.ssh/config alias, "
        "or the name of a saved SSH connection block (the login node for SLURM/PBS)",
        json_schema_extra={"pattern": "^$|" + HOST_RE.pattern},
    )
    scheduler: Scheduler = Field(
        Scheduler.none,
        title="Scheduler",
        description="none: head and workers on the host itself; slurm or pbs: a batch job, one Ray node per node",
    )
    direct_workers: int = Field(
        0, ge=0, le=64, title="Extra workers (no scheduler)", description="Worker nodes beside the head on the host"
    )
    # --- resources
    num_cpus_per_node: int = Field(
        1, ge=1, le=4096, title="CPUs per node", description="Ray --num-cpus on every node (head and workers)"
    )
    num_gpus_per_node: int = Field(
        0, ge=0, le=64, title="GPUs per node", description="Ray --num-gpus on every node; also requested from SLURM/PBS"
    )
    ray_memory_gb: float = Field(
        2.0, gt=0, le=65536, title="Memory per node (GB)", description="Ray --memory: heap memory for tasks and actors"
    )
    object_store_memory_gb: float = Field(
        0.5, gt=0, le=65536, title="Object store per node (GB)", description="Ray --object-store-memory: shared memory for objects"
    )
    # --- environment
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
    requirements: str = Field(
        "",
        title="requirements.txt",
        description="Extra packages to install: a requirements file on the machine that runs the flow (empty: none)",
    )
    work_dir: str = Field(
        "~/.activate-ray",
        title="Work dir on the target",
        description="Shared directory for venvs and cluster state (must be visible on every node)",
        json_schema_extra={"pattern": "^$|" + TARGET_PATH_RE.pattern},
    )
    node_tmp: str = Field(
        "/tmp",
        title="Node temp root",
        description="Node-local directory for Ray's temp dirs (at most 40 characters)",
        json_schema_extra={"pattern": "^$|" + TARGET_PATH_RE.pattern, "maxLength": 40},
    )
    # --- cluster behaviour
    dashboard_port: int = Field(
        8265, ge=1024, le=65535, title="Dashboard port", description="Preferred dashboard port on the head (a free one if taken)"
    )
    dashboard_host: str = Field(
        "127.0.0.1",
        title="Dashboard bind address",
        description="Keep 127.0.0.1 and use the SSH tunnel; anything else exposes an RCE endpoint",
        json_schema_extra={"pattern": BIND_HOST_RE.pattern},
    )
    token_auth: bool = Field(
        True, title="Ray token authentication", description="A fresh token per cluster; turn off only for Ray without it"
    )
    cluster_idle_timeout: float = Field(
        30, gt=0, le=100000, title="Idle timeout (minutes)", description="Keep-alive clusters stop after this idle time"
    )
    keep_alive: bool = Field(False, title="Keep alive", description="Keep the cluster up after the user job")
    node_failure: NodeFailure = Field(
        NodeFailure.continue_,
        title="When a node dies",
        description="continue: report it and go on; stop: report it and tear the cluster down (the flow fails)",
    )
    readiness_timeout: int = Field(
        300, ge=5, le=86400, title="Readiness timeout (s)", description="Give up when not every node is up after this long"
    )
    heartbeat_timeout: int = Field(
        120, ge=10, le=86400, title="Dead-man timeout (s)", description="The cluster stops itself when the flow is silent this long"
    )
    # --- job
    user_script: str = Field(
        "",
        title="User script",
        description="A Python file on the machine that runs the flow, submitted as a Ray job "
        "(empty: keep the cluster up until idle)",
    )
    info_file: str = Field(
        "ray-cluster.json", title="Connection info file", description="Where to write connection info as JSON (no secrets)"
    )
    # --- SSH
    ssh_key_file: str = Field(
        "", title="SSH private key file", description="Key file for the host (empty: the SSH agent and default keys)"
    )
    known_hosts: str = Field(
        "", title="known_hosts file", description="Host keys to trust instead of ~/.ssh/known_hosts; /etc/ssh/ssh_known_hosts is read as well"
    )
    accept_new_host_key: bool = Field(
        False, title="Accept unknown host keys", description="Trust on first use: record an unknown host key in ~/.activate-ray/known_hosts (a changed key is always refused)"
    )
    # --- scheduler groups
    slurm: SlurmOptions = Field(
        default_factory=SlurmOptions, title="SLURM", description="Used when the scheduler is slurm"
    )
    pbs: PbsOptions = Field(default_factory=PbsOptions, title="PBS", description="Used when the scheduler is pbs")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if value and not HOST_RE.fullmatch(value):
            raise ValueError(f"host {value!r} is not user@host[:port], an ssh alias or a block name")
        if ":" in value and not 0 < int(value.rsplit(":", 1)[1]) < 65536:
            raise ValueError(f"host {value!r}: port out of range 1-65535")
        return value

    @field_validator("ray_version")
    @classmethod
    def _ray_version(cls, value: str) -> str:
        if not RAY_VERSION_RE.fullmatch(value):
            raise ValueError(f"ray_version {value!r} is not a Ray release such as {DEFAULT_RAY_VERSION}")
        return value

    @field_validator("python", "work_dir", "node_tmp")
    @classmethod
    def _target_path(cls, value: str, info) -> str:
        if value and not TARGET_PATH_RE.fullmatch(value):
            raise ValueError(f"{info.field_name} {value!r}: use letters, digits and _.~/+@- only")
        return value

    @field_validator("dashboard_host")
    @classmethod
    def _bind(cls, value: str) -> str:
        if not BIND_HOST_RE.fullmatch(value) or any(int(p) > 255 for p in value.split(".")):
            raise ValueError(f"dashboard_host {value!r} is not an IPv4 address")
        return value

    @field_validator("user_script", "requirements", "ssh_key_file", "known_hosts")
    @classmethod
    def _local_file(cls, value: str, info) -> str:
        try:
            exists = Path(value).expanduser().is_file() if value else True
        except (OSError, ValueError):  # name too long, NUL byte
            exists = False
        if not exists:
            raise ValueError(f"{info.field_name} {value[:200]!r} is not a readable file")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "RayClusterSettings":
        if self.node_tmp and len(self.node_tmp) > 40:
            raise ValueError("node_tmp must be at most 40 characters (Ray's unix socket paths are limited)")
        return self

    @property
    def nodes(self) -> int:
        """Ray nodes the cluster will have once ready."""
        if self.scheduler is Scheduler.slurm:
            return self.slurm.nodes
        if self.scheduler is Scheduler.pbs:
            return pbs_select_chunks(self.pbs.select) if self.pbs.select else self.pbs.nodes
        return 1 + self.direct_workers
