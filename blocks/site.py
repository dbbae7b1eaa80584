"""An HPC site: where and how Ray clusters run there, saved once, reused by every run.

A site holds what stays the same between runs on one machine: the login node,
the scheduler, the default account and partition/queue, the Python (a conda env
or venv that already has Ray), the shared work dir, the setup commands (modules,
conda) and the fast network's interface. It turns into the
parameters of the ray-cluster flow:

    from blocks.site import HpcSite
    site = HpcSite.load("my-hpc")
    settings = site.to_settings(user_script="train.py", slurm={"nodes": 4})

or a run of a deployment (prefect.yaml) with this site's values:

    site.run_deployment("ray-cluster/slurm", user_script="/abs/train.py", slurm={"nodes": 4})

Every value is checked by RayClusterSettings when the block is saved or loaded,
so a bad account name is refused here, not at submit time.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import BaseModel, Field, model_validator
from pydantic.fields import FieldInfo

from tasks.schedulers.options import name_field, pattern_field
from tasks.settings import (
    HOST_RE,
    AdvancedOptions,
    EnvironmentOptions,
    RayClusterSettings,
    SchedulerKind,
)


def _as_in_the_flow(group: type[BaseModel], name: str, **label: str) -> Any:
    """The flow's own field (its default, pattern and limits), labelled for the site's form."""
    field = group.model_fields[name]
    extra = {k: v for k, v in (field.json_schema_extra or {}).items() if k != "position"}
    return FieldInfo.merge_field_infos(field, json_schema_extra=extra, **label)


class HpcSite(Block):
    """An HPC site for Ray clusters: login node, scheduler, account, partition or queue, Python env, work dir."""

    _block_type_name = "Activate Ray HPC Site"
    _block_type_slug = "activate-ray-hpc-site"
    _description = (
        "Where Ray clusters run on one HPC machine: login node, scheduler, default account, "
        "partition or queue, the Python env with Ray, the shared work dir"
    )

    host: str = pattern_field(..., "Login node", "user@host:port, an ~/.ssh/config alias, or the name of a saved "
                              "Activate Ray SSH Connection block", HOST_RE.pattern)
    scheduler: SchedulerKind = Field(
        SchedulerKind.slurm,
        title="Scheduler",
        description="slurm or pbs: clusters run as batch jobs; none: directly on the login node",
    )
    account: str = name_field("Default account", "SLURM --account / PBS -A (empty: your default)")
    partition: str = name_field("Partition or queue", "SLURM --partition / PBS -q (empty: the site default)")
    qos: str = name_field("QOS (SLURM)", "SLURM --qos (empty: the default; ignored for PBS)")
    extra_directives: str = Field(
        "",
        title="Site directives",
        description="'#SBATCH --option=value' or '#PBS -option value' lines every job here needs, one per line",
    )
    python: str = _as_in_the_flow(
        EnvironmentOptions, "python", title="Python env with Ray",
        description="Conda env, venv or interpreter on the site that already has Ray (empty: build a venv in the work dir)",
    )
    work_dir: str = _as_in_the_flow(
        EnvironmentOptions, "work_dir", title="Shared work dir",
        description="Directory visible on every node (venvs, cluster state), e.g. /scratch/alice/activate-ray",
    )
    node_tmp: str = _as_in_the_flow(AdvancedOptions, "node_tmp")
    setup_commands: str = _as_in_the_flow(
        EnvironmentOptions, "setup_commands", title="Setup commands",
        description="What every run here does first, on the login node and on every node: "
        "'module load python/3.11 cuda/12.4', 'source /opt/conda/etc/profile.d/conda.sh && conda activate ray'",
    )
    network_interface: str = _as_in_the_flow(AdvancedOptions, "network_interface")

    @model_validator(mode="after")
    def _valid_for_the_flow(self) -> HpcSite:
        RayClusterSettings.model_validate(self.settings_values())
        return self

    def settings_values(self) -> dict[str, Any]:
        """This site as (nested) RayClusterSettings values."""
        values: dict[str, Any] = {
            "host": self.host,
            "scheduler": self.scheduler.value,
            "python": self.python,
            "work_dir": self.work_dir,
            "node_tmp": self.node_tmp,
            "setup_commands": self.setup_commands,
            "network_interface": self.network_interface,
        }
        if self.scheduler is SchedulerKind.slurm:
            values["slurm"] = {
                "account": self.account,
                "partition": self.partition,
                "qos": self.qos,
                "extra_directives": self.extra_directives,
            }
        elif self.scheduler is SchedulerKind.pbs:
            values["pbs"] = {
                "account": self.account,
                "queue": self.partition,
                "extra_directives": self.extra_directives,
            }
        return values

    def to_settings(self, **overrides: Any) -> RayClusterSettings:
        """The flow's settings for a run here; `overrides` win, groups merge (slurm={"nodes": 4})."""
        return RayClusterSettings.model_validate(_merge(self.settings_values(), overrides))

    def run_deployment(self, name: str | None = None, **overrides: Any):
        """Start a flow run of a ray-cluster deployment (prefect.yaml; default: the one for this
        site's scheduler) with this site's settings and `overrides`. Returns the flow run at once."""
        from prefect.deployments import run_deployment

        name = name or f"ray-cluster/{'ssh' if self.scheduler is SchedulerKind.none else self.scheduler.value}"
        return run_deployment(name, parameters=self.parameters(**overrides), timeout=0)

    def parameters(self, **overrides: Any) -> dict[str, Any]:
        """Flow-run parameters for this site's ray-cluster deployment: the groups of its
        scheduler's flow, every field spelled out (a run's group replaces the deployment's)."""
        return self.to_settings(**overrides).deployment_parameters()


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
