"""The command line: `python -m flows.ray_cluster [OPTIONS]` runs the ray-cluster flow,
`python -m flows.ray_cluster logs|scale|cleanup|check ...` a subcommand (flows/commands/).

    python -m flows.ray_cluster --help
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from enum import Enum
from typing import Literal

from prefect.exceptions import CancelledRun
from prefect.settings import get_current_settings
from pydantic import Field, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from flows import user_server
from flows.commands import check, cleanup, logs, scale
from flows.plan import render_plan
from flows.ray_cluster import ray_cluster, refuse_token_block_without_a_server
from flows.stop_signals import STOP
from tasks.failures import FailureReason, reason_of
from tasks.settings import GROUPS, RayClusterSettings

# The exit code of a run that reached its walltime (walltime_margin before the allocation's end).
EXIT_WALLTIME = 3

# `python -m flows.ray_cluster NAME ...`: each subcommand parses its own arguments.
SUBCOMMANDS = {"logs": logs.main, "scale": scale.main, "cleanup": cleanup.main,
               "check": lambda argv: check.main(argv, _settings_from)}



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


def main(argv: list[str] | None = None) -> int:
    """The command line: a subcommand, the --dry-run plan, or the flow run in a thread while
    this (main) thread takes the signals. Its exit code: 0, 1 failed, 2 invalid input,
    3 walltime reached (the job stopped and the cluster torn down before the allocation's
    end), 128 + the signal that stopped it."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    parsed = _settings_from(argv)
    if isinstance(parsed, int):
        return parsed
    settings, dry_run = parsed
    if dry_run:
        print(render_plan(settings))
        return 0
    # SIGINT and SIGTERM are STOP's, in the main thread, which only waits for the flow:
    # the flow runs in a thread of its own, where Prefect installs no SIGTERM handler
    # of its own (signal handlers are the main thread's) and asyncio none for SIGINT.
    # The flow's loop attaches to STOP when the flow first asks it (flows/stop_signals.py).
    installed = STOP.install()
    try:
        if not get_current_settings().api.url:
            # not Prefect's temporary server (no credentials, on a loopback every user reaches,
            # and in this process group): the user's own (flows/user_server.py)
            try:
                user_server.use(*user_server.ensure(lambda text: print(text, file=sys.stderr)))
            except (OSError, RuntimeError) as exc:
                print(f"ray-cluster failed (prefect-server): {exc}", file=sys.stderr)
                return 1
        if STOP.signum is not None:
            print(f"interrupted ({STOP.name}) before the flow started: nothing to tear down", file=sys.stderr)
            return 128 + STOP.signum
        with ThreadPoolExecutor(1, thread_name_prefix="ray-cluster-flow") as flow_thread:
            run = flow_thread.submit(asyncio.run, ray_cluster(**settings.parameters()))
            while not run.done():
                wait_for_futures([run], timeout=0.5)
    finally:
        if installed:
            STOP.uninstall()
    try:
        info = run.result()  # anything but a failure or a stop is raised here, in the main thread
    except (asyncio.CancelledError, CancelledRun):
        print(f"interrupted ({STOP.name or 'cancelled'}): cluster torn down", file=sys.stderr)
        rc = 128 + (STOP.signum or signal.SIGINT)
    except Exception as exc:
        print(f"ray-cluster failed ({reason_of(exc).value}): {exc}", file=sys.stderr)
        rc = EXIT_WALLTIME if reason_of(exc) is FailureReason.walltime_reached else 1
    else:
        print(json.dumps({"cluster_id": info["cluster_id"], "ready": True}))
        rc = 0
    return 128 + STOP.signum if STOP.signum is not None else rc


def _settings_from(argv: list[str]) -> tuple[RayClusterSettings, bool] | int:
    """The run's settings and whether it is a dry run, validated as a flow run's are; 2
    (every problem said, by its flag's name) when they are not valid."""
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
    return settings, cli.dry_run


if __name__ == "__main__":
    sys.exit(main())
