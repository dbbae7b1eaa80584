"""workflow.yaml (the Parallel Works ACTIVATE workflow) against RayClusterSettings.

- every input reaches the flow as the CLI flag of one settings field
  (input -> WF_* env var of the ray_cluster job -> `--flag` in its script), and
  every user-facing settings field is an input, or excluded below with the reason;
- the form agrees with the model: labels and tooltips everywhere, number limits,
  booleans, dropdown options;
- the job's own script runs here with the inputs' defaults and `--dry-run`
  appended: the flow accepts every flag and prints the plan (nothing starts);
- the cleanup step finds this run's cluster (its state file, never the log or the
  connection info) and runs `python -m flows.ray_cluster cleanup` on it: the cluster's
  real shutdown script, idempotently, refusing a cluster that is not this user's
  (flows/commands/cleanup.py; tests/test_cleanup_command.py tests it on its own).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import types
import typing
from enum import Enum
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tasks.settings import GROUP_OF, GROUPS, RayClusterSettings

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = yaml.safe_load((REPO / "workflow.yaml").read_text())
INPUTS = WORKFLOW["on"]["execute"]["inputs"]
JOB = WORKFLOW["jobs"]["ray_cluster"]
SCRIPT = JOB["steps"][-1]["run"]
CLEANUP = JOB["cleanup"][0]["run"]

# Settings fields that are deliberately not inputs of the workflow.
EXCLUDED = {
    "ssh_key_file": "ACTIVATE gives the workspace its own SSH access to the resource (key, agent, config)",
    "known_hosts": "the workspace's ~/.ssh/known_hosts, which ACTIVATE manages",
    "dashboard_host": "stays 127.0.0.1: the dashboard is reached through the SSH tunnel; binding it wider exposes "
    "an unauthenticated job API",
    "info_file": "set by the workflow to <job dir>/ray-cluster.json: the connection_info job reads it",
    "state_file": "set by the workflow to <job dir>/ray-cluster.state: the cleanup reads it",
    "script_args": "the form's script is an editor: its arguments are written in it",
    "runtime_env": "the form's extra packages are environment.requirements, installed on every node",
    "publish_token_block": "the workflow runs the flow with Prefect's temporary server, where a token block is "
    "refused (every user of the machine could read it)",
}
# Inputs that do not map 1:1 onto one `opt/flag --x "$WF_X"` line of the script.
SPECIAL = {
    "resource": "--host",  # its ip: the login node the flow reaches over SSH
    "scheduler": "--scheduler",  # with resource.schedulerType: slurm/pbs when on, else none
    "user_script": "--user-script",  # editor text -> <job dir>/user_script.py
    "environment.requirements": "--requirements",  # editor text -> <job dir>/requirements.txt
}
# Inputs of the workflow itself, not of the flow: where the setup job checks the code out from.
WORKFLOW_ONLY = {
    "source.repo": "the repository the setup job's parallelworks/checkout clones (a site's mirror)",
    "source.branch": "the branch of that repository the setup job checks out",
}
INPUT_EXPR = re.compile(r"^\$\{\{ inputs\.([\w.]+) \}\}$")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith(("RAY_CLUSTER_", "WF_")):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------- helpers


def leaf_inputs(inputs: dict = INPUTS, prefix: str = "") -> dict[str, dict]:
    """{"cluster.num_cpus_per_node": spec, ...}: groups flattened, the way expressions name them."""
    leaves: dict[str, dict] = {}
    for name, spec in inputs.items():
        if spec.get("type") == "group":
            leaves.update(leaf_inputs(spec["items"], f"{prefix}{name}."))
        else:
            leaves[prefix + name] = spec
    return leaves


def settings_fields() -> dict[str, object]:
    """{"num_cpus_per_node": FieldInfo, "slurm.walltime": FieldInfo, ...}."""
    fields: dict[str, object] = {}
    for name, info in RayClusterSettings.model_fields.items():
        if name in GROUPS:  # cluster, environment, advanced: their fields go by their flat names (the flags)
            fields.update(GROUPS[name].model_fields)
        elif name == "runtime_env":  # one input (Ray's runtime_env dict), not a group of the form
            fields[name] = info
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            for sub, sub_info in info.annotation.model_fields.items():
                fields[f"{name}.{sub}"] = sub_info
        else:
            fields[name] = info
    return fields


def field_for_flag(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def env_to_input() -> dict[str, str]:
    """{"WF_NUM_CPUS_PER_NODE": "cluster.num_cpus_per_node", ...} from the job's env."""
    mapping = {}
    for var, expr in JOB["env"].items():
        match = INPUT_EXPR.match(str(expr))
        if match and not match.group(1).startswith("resource."):  # the resource's attributes: SPECIAL
            mapping[var] = match.group(1)
    return mapping


def flag_to_env() -> dict[str, str]:
    """{"--num-cpus-per-node": "WF_NUM_CPUS_PER_NODE", ...} from the script's opt/flag lines."""
    pairs = re.findall(r'^\s*(?:opt|flag) (--[\w.-]+) "\$\{(WF_\w+)-\}"', SCRIPT, re.M)
    assert pairs, "no opt/flag lines found in the ray_cluster step"
    flags = [flag for flag, _ in pairs]
    assert len(flags) == len(set(flags)), "a flag is passed twice"
    return dict(pairs)


def input_to_flag() -> dict[str, str]:
    env_inputs = env_to_input()
    mapping = {env_inputs[var]: flag for flag, var in flag_to_env().items()}
    return {**mapping, **SPECIAL}


def as_env_value(value) -> str:
    """A default the way ACTIVATE substitutes it: true/false, 4 not 4.0, text as is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def job_env(scheduler_type: str, tmp: Path, **overrides: str) -> dict[str, str]:
    """The ray_cluster job's environment with every input at its default."""
    leaves = leaf_inputs()
    resource = {"ip": "login.example.org", "schedulerType": scheduler_type}
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("RAY_CLUSTER_", "WF_"))}
    for var, expr in JOB["env"].items():
        expr = str(expr)
        if expr == "${{ needs.setup.outputs.python }}":
            env[var] = sys.executable
        elif expr == "${{ needs.setup.outputs.repo }}":
            env[var] = str(REPO)
        elif expr.startswith("${{ inputs.resource."):
            env[var] = resource[expr.removeprefix("${{ inputs.resource.").removesuffix(" }}")]
        else:
            path = INPUT_EXPR.match(expr).group(1)
            group = path.split(".")[0]
            ignored = group in ("slurm", "pbs") and group != scheduler_type  # hidden: ACTIVATE leaves it out
            env[var] = "" if ignored else as_env_value(leaves[path].get("default"))
    env.update(PW_PARENT_JOB_DIR=str(tmp), **overrides)
    return env


def run_script(script: str, env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script, "bash", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


# --------------------------------------------------------------------------- inputs <-> settings


def test_every_input_maps_onto_a_settings_field_by_its_cli_flag():
    fields = settings_fields()
    leaves = leaf_inputs()
    mapping = input_to_flag()
    assert set(env_to_input().values()) <= set(leaves), "the job's env names an input that does not exist"
    unmapped = sorted(set(leaves) - set(mapping) - set(WORKFLOW_ONLY))
    assert unmapped == [], f"inputs that reach no CLI flag: {unmapped}"
    assert set(WORKFLOW_ONLY) <= set(leaves) and not set(WORKFLOW_ONLY) & set(mapping)
    for path, flag in mapping.items():
        assert path in leaves, f"{path} is mapped but is no input"
        assert field_for_flag(flag) in fields, f"input {path} -> {flag}: no settings field {field_for_flag(flag)}"
    # the special ones really are on the command line
    assert 'args=(--host "$WF_HOST"' in SCRIPT
    assert 'args+=(--scheduler "$scheduler")' in SCRIPT
    assert 'args+=(--user-script "$job_dir/user_script.py")' in SCRIPT
    assert 'args+=(--requirements "$job_dir/requirements.txt")' in SCRIPT
    assert JOB["env"]["WF_HOST"] == "${{ inputs.resource.ip }}"
    assert JOB["env"]["WF_SCHEDULER_TYPE"] == "${{ inputs.resource.schedulerType }}"


def test_every_user_facing_settings_field_is_an_input_or_excluded_with_a_reason():
    fields = settings_fields()
    covered = {field_for_flag(flag) for flag in input_to_flag().values()}
    assert not covered & set(EXCLUDED), "a field is both an input and excluded"
    assert set(EXCLUDED) <= set(fields), "an exclusion names no settings field"
    missing = sorted(set(fields) - covered - set(EXCLUDED))
    assert missing == [], f"settings fields with no workflow input (add one, or exclude with a reason): {missing}"
    assert all(len(reason) > 20 for reason in EXCLUDED.values())


def test_the_form_agrees_with_the_settings_model():
    fields = settings_fields()
    leaves = leaf_inputs()
    for path, flag in input_to_flag().items():
        group = path.split(".")[0]
        if group in GROUPS:  # the form's group is the flow parameter's: cluster.num_cpus_per_node
            assert GROUP_OF[field_for_flag(flag)] == group, f"{path} is in the flow's {GROUP_OF[field_for_flag(flag)]}"
        spec = leaves[path]
        assert spec.get("label"), f"{path} has no label"
        assert spec.get("tooltip"), f"{path} has no tooltip"
        if path in ("resource", "scheduler"):
            continue
        info = fields[field_for_flag(flag)]
        annotation = info.annotation
        optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)
        if optional:  # empty = not set (num_cpus_per_node: what the allocation gives)
            (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
            assert spec.get("optional") is True and "default" not in spec, f"{path}: optional, without a default"
        limits = {type(m).__name__: m for m in info.metadata}
        if annotation in (int, float):
            assert spec["type"] == "number", path
            if "Ge" in limits:
                assert spec["min"] == limits["Ge"].ge, f"{path}: min {spec.get('min')} != ge {limits['Ge'].ge}"
            if "Gt" in limits:
                assert spec["min"] > limits["Gt"].gt, path
            if "Le" in limits:
                assert spec["max"] == limits["Le"].le, f"{path}: max {spec.get('max')} != le {limits['Le'].le}"
        elif annotation is bool:
            assert spec["type"] == "boolean", path
            assert isinstance(spec.get("default"), bool), path
        elif isinstance(annotation, type) and issubclass(annotation, Enum):
            assert spec["type"] == "dropdown", path
            assert [o["value"] for o in spec["options"]] == [m.value for m in annotation], path
        else:
            assert annotation is str or typing.get_origin(annotation) is None, path
            assert spec["type"] in ("string", "editor", "slurm-accounts", "slurm-partitions", "slurm-qos"), path
    # the scheduler switch and the scheduler groups follow the resource's scheduler
    assert INPUTS["resource"]["type"] == "compute-clusters"
    assert INPUTS["scheduler"]["type"] == "boolean"
    assert "inputs.resource.schedulerType != 'slurm'" in INPUTS["scheduler"]["hidden"]
    assert "inputs.resource.schedulerType != 'pbs'" in INPUTS["scheduler"]["hidden"]
    assert INPUTS["slurm"]["hidden"].startswith("${{ inputs.resource.schedulerType != 'slurm'")
    assert INPUTS["pbs"]["hidden"].startswith("${{ inputs.resource.schedulerType != 'pbs'")
    assert INPUTS["user_script"]["type"] == "editor" and INPUTS["user_script"]["language"] == "python"


@pytest.mark.parametrize("scheduler", ["none", "slurm", "pbs"])
def test_the_defaults_are_valid_settings(scheduler):
    """The form's defaults, through the same mapping, make valid settings (no file, no connection);
    as the script does, only the groups of the scheduler in use are passed."""
    leaves = leaf_inputs()
    values: dict = {"scheduler": scheduler}
    for path, flag in input_to_flag().items():
        if path in SPECIAL or path.split(".")[0] in {"slurm", "pbs"} - {scheduler}:
            continue
        default = leaves[path].get("default")
        if default in (None, ""):
            continue
        target = values
        *groups, name = field_for_flag(flag).split(".")
        for group in groups:
            target = target.setdefault(group, {})
        target[name] = default
    RayClusterSettings.model_validate(values)


# --------------------------------------------------------------------------- the job's command line, for real


@pytest.mark.parametrize(
    ("scheduler_type", "plan_line"),
    [
        ("slurm", "# target: login.example.org; scheduler: slurm; nodes: 2"),
        ("pbs", "# target: login.example.org; scheduler: pbs; nodes: 2"),
        ("", "# target: login.example.org; scheduler: none; nodes: 1"),  # a resource without a scheduler
    ],
)
@pytest.mark.bed  # a real process or server: seconds, not milliseconds
def test_the_job_command_line_with_the_defaults_dry_runs(tmp_path, scheduler_type, plan_line):
    result = run_script(SCRIPT, job_env(scheduler_type, tmp_path), tmp_path, "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert plan_line in result.stdout, result.stdout[:2000]
    user_script = tmp_path / "user_script.py"
    assert user_script.read_text().strip() == INPUTS["user_script"]["default"].strip()
    assert f"# 6. user job: {user_script}" in result.stdout
    assert (tmp_path / "ray-cluster.log").read_text() == result.stdout
    assert (tmp_path / "ray-cluster.ended").exists(), "connection_info waits on this marker"
    if scheduler_type == "slurm":
        assert "#SBATCH" in result.stdout and "--time=01:00:00" in result.stdout


@pytest.mark.bed  # a real process or server: seconds, not milliseconds
def test_the_job_command_line_passes_edited_inputs_through(tmp_path):
    env = job_env(
        "slurm",
        tmp_path,
        WF_SCHEDULER="true",
        WF_SLURM_WALLTIME="1-12:00:00",
        WF_SLURM_NODES="3",
        WF_SLURM_PARTITION="gpu",
        WF_SLURM_EXTRA_DIRECTIVES="#SBATCH --constraint=a100\n#SBATCH --exclusive",
        WF_NUM_GPUS_PER_NODE="2",
        WF_USER_SCRIPT="",
        WF_KEEP_ALIVE="true",
        WF_REQUIREMENTS="numpy\n",
    )
    result = run_script(SCRIPT, env, tmp_path, "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "scheduler: slurm; nodes: 3" in out
    for expected in ("--time=1-12:00:00", "--partition=gpu", "--constraint=a100", "--exclusive"):
        assert expected in out, expected
    assert "user job: (none: keep alive" in out
    assert (tmp_path / "requirements.txt").read_text().split() == ["numpy"]
    assert not (tmp_path / "user_script.py").exists()


@pytest.mark.bed  # a real process or server: seconds, not milliseconds
def test_a_bad_input_is_refused_with_the_field_named(tmp_path):
    env = job_env("slurm", tmp_path, WF_SLURM_WALLTIME="abc")
    result = run_script(SCRIPT, env, tmp_path, "--dry-run")
    assert result.returncode == 2, result.stdout + result.stderr  # the flow's exit code, through the tee
    assert "invalid input slurm.walltime" in result.stdout  # the job log has stdout and stderr


# --------------------------------------------------------------------------- cleanup


def fake_cluster(work_dir: Path, node_tmp: Path, cluster_id: str, scheduler: str = "none") -> tuple[Path, subprocess.Popen]:
    """A cluster dir as start_cluster leaves it, with one live 'node' process group."""
    cluster_dir = work_dir / "clusters" / cluster_id
    (cluster_dir / "bin").mkdir(parents=True)
    (cluster_dir / "nodes").mkdir()
    for name in ("shutdown_ray.sh", "ray_lib.sh"):
        shutil.copy(REPO / "scripts" / name, cluster_dir / "bin" / name)
    (cluster_dir / "cluster.env").write_text(
        f"export AR_CLUSTER_ID={cluster_id}\nexport AR_CLUSTER_DIR={cluster_dir}\nexport AR_SCHEDULER={scheduler}\n"
        f"export AR_NODE_TMP={node_tmp}\nexport AR_NODE_TMP_NAME={cluster_id[:11]}\n"
    )
    # the cluster's id in its environment, as every node has it (cluster.env is exported): the
    # teardown signals no recorded group that is not the cluster's (ar_group_is_ours)
    node = subprocess.Popen(["sleep", "300"], start_new_session=True, env={**os.environ, "AR_CLUSTER_ID": cluster_id})
    (cluster_dir / "nodes" / "head.pgid").write_text(f"{socket.gethostname().split('.')[0]} {node.pid}")
    return cluster_dir, node


def cleanup_env(tmp: Path, work_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("RAY_CLUSTER_", "WF_"))}
    return {**env, "PW_PARENT_JOB_DIR": str(tmp / "job"), "WF_HOST": "", "WF_WORK_DIR": work_dir, "HOME": str(tmp),
            "WF_PYTHON": sys.executable, "WF_REPO": str(REPO)}


def new_cluster_id() -> str:
    return "ar-" + os.urandom(16).hex()


def write_state(job_dir: Path, text: str) -> Path:
    path = job_dir / "ray-cluster.state"
    path.write_text(text)
    path.chmod(0o600)
    return path


# a direct cluster's job id is its supervisor's pid: one beyond any pid_max, never a live process here
@pytest.mark.parametrize("job_id", ["999999999", ""], ids=["submitted", "before-submission"])
def test_cleanup_tears_down_the_cluster_named_in_the_state_file(tmp_path, job_id):
    (tmp_path / "job").mkdir()
    cluster_id = new_cluster_id()
    cluster_dir, node = fake_cluster(tmp_path / "work", tmp_path / "nodetmp", cluster_id)
    if job_id:  # as start_cluster records it: a pid that is not the node's, so the sweep stops the node
        (cluster_dir / "job_id").write_text(job_id + "\n")
    write_state(tmp_path / "job", f"cluster_id={cluster_id}\nscheduler=none\njob_id={job_id}\n")
    env = cleanup_env(tmp_path, "~/work")  # ~ is the target's home
    try:
        result = run_script(CLEANUP, env, tmp_path / "job")
        assert result.returncode == 0, result.stdout + result.stderr
        # the job id is the cluster's own (its dir's job_id file), never the one the run's state file says
        assert f"tearing down cluster {cluster_id} (scheduler none, job {job_id or 'none'}; from its cluster dir)" in result.stdout
        assert f"cluster {cluster_id} torn down" in result.stdout
        assert node.wait(timeout=10) is not None, "the cluster's node process survived"
        assert not cluster_dir.exists()
        again = run_script(CLEANUP, env, tmp_path / "job")  # idempotent: a second cleanup finds nothing
        assert again.returncode == 0 and f"nothing left of cluster {cluster_id}" in again.stdout, again.stdout + again.stderr
    finally:
        if node.poll() is None:
            node.kill()


def test_cleanup_tears_down_every_cluster_of_the_state_file_the_last_first(tmp_path):
    """continue_after_walltime: the run's cluster, then its queued successor allocations; the
    last is torn down first, so none starts when the job it waits for ends."""
    (tmp_path / "job").mkdir()
    ids = [new_cluster_id(), new_cluster_id(), new_cluster_id()]
    clusters = [fake_cluster(tmp_path / "work", tmp_path / "nodetmp", cluster_id) for cluster_id in ids]
    write_state(tmp_path / "job", "".join(f"cluster_id={cluster_id}\nscheduler=none\njob_id=\n" for cluster_id in ids))
    try:
        result = run_script(CLEANUP, cleanup_env(tmp_path, "~/work"), tmp_path / "job")
        assert result.returncode == 0, result.stdout + result.stderr
        order = [result.stdout.index(f"cluster {cluster_id} torn down") for cluster_id in ids]
        assert order == sorted(order, reverse=True), result.stdout
        for cluster_dir, node in clusters:
            assert node.wait(timeout=10) is not None and not cluster_dir.exists()
    finally:
        for _, node in clusters:
            if node.poll() is None:
                node.kill()


def test_cleanup_never_takes_a_cluster_from_the_log_or_the_connection_info(tmp_path):
    """Both can hold text a job wrote (its output is logged): without the flow's own state file, nothing is done."""
    (tmp_path / "job").mkdir()
    cluster_id = new_cluster_id()
    cluster_dir, node = fake_cluster(tmp_path / "work", tmp_path / "nodetmp", cluster_id)
    (tmp_path / "job" / "ray-cluster.log").write_text(
        f"INFO | Flow run 'x' - cluster {cluster_id} on localhost (none, 1 node(s))\n"
        f"INFO | Task run 'start-ray-cluster' - cluster {cluster_id} submitted to none: job 4793\n"
    )
    info = {"cluster_id": cluster_id, "scheduler": "none", "job_id": "4242"}
    (tmp_path / "job" / "ray-cluster.json").write_text(json.dumps(info, indent=2) + "\n")
    try:
        result = run_script(CLEANUP, cleanup_env(tmp_path, str(tmp_path / "work")), tmp_path / "job")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "no cluster of this run to tear down" in result.stdout
        assert cluster_dir.exists() and node.poll() is None
    finally:
        node.kill()


# The run's state file names the cluster; what the cluster is (scheduler, job ids) is the
# cluster's own, checked by the cleanup command (the runs/ state file, else the cluster dir).
CRAFTED_STATES = {
    "short cluster id": ("run", "cluster_id=ar-1234abcd\nscheduler=none\njob_id=\n"),
    "cluster id with a path": ("run", "cluster_id=../../{id}\nscheduler=none\njob_id=\n"),
    "cluster id as an option": ("run", "cluster_id=--host=elsewhere\nscheduler=none\njob_id=\n"),
    "job id as an option": ("job_id", "--user=someone"),
    "job id with a leading dash": ("job_id", "-1"),
    "job id with shell": ("job_id", "12;rm -rf ~"),
    "pbs id for slurm": ("job_id", "12.server"),
    "unknown scheduler": ("scheduler", "lsf"),
    "another cluster's env": ("scheduler", "none\nexport AR_CLUSTER_ID=ar-" + "0" * 32),
}


@pytest.mark.parametrize(("where", "text"), CRAFTED_STATES.values(), ids=CRAFTED_STATES.keys())
def test_cleanup_refuses_a_crafted_state(tmp_path, where, text):
    (tmp_path / "job").mkdir()
    cluster_id = new_cluster_id()
    scheduler = text if where == "scheduler" else "slurm"
    cluster_dir, node = fake_cluster(tmp_path / "work", tmp_path / "nodetmp", cluster_id, scheduler)
    run_state = text.format(id=cluster_id) if where == "run" else f"cluster_id={cluster_id}\nscheduler=slurm\njob_id=\n"
    write_state(tmp_path / "job", run_state)
    if where == "job_id":
        (cluster_dir / "job_id").write_text(text + "\n")
    try:
        result = run_script(CLEANUP, cleanup_env(tmp_path, str(tmp_path / "work")), tmp_path / "job")
        assert result.returncode == 2, result.stdout + result.stderr
        assert "not tearing down" in result.stderr or "invalid input cluster_id" in result.stderr, result.stderr
        assert "tearing down cluster" not in result.stdout
        assert cluster_dir.exists() and node.poll() is None, "a refused state must not act"
    finally:
        node.kill()


def test_cleanup_ignores_a_state_file_that_is_a_symlink(tmp_path):
    (tmp_path / "job").mkdir()
    cluster_id = new_cluster_id()
    cluster_dir, node = fake_cluster(tmp_path / "work", tmp_path / "nodetmp", cluster_id)
    elsewhere = write_state(tmp_path, f"cluster_id={cluster_id}\nscheduler=none\njob_id=\n")
    (tmp_path / "job" / "ray-cluster.state").symlink_to(elsewhere)
    try:
        result = run_script(CLEANUP, cleanup_env(tmp_path, str(tmp_path / "work")), tmp_path / "job")
        assert "no cluster of this run to tear down" in result.stdout
        assert cluster_dir.exists() and node.poll() is None
    finally:
        node.kill()


def test_cleanup_without_a_cluster_does_nothing(tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "ray-cluster.log").write_text("invalid input slurm.walltime: ...\n")
    result = run_script(CLEANUP, cleanup_env(tmp_path, "~/.activate-ray"), tmp_path / "job")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no cluster of this run to tear down" in result.stdout


# --------------------------------------------------------------------------- the other steps


def all_run_scripts() -> list[tuple[str, str]]:
    scripts = []
    for job_name, job in WORKFLOW["jobs"].items():
        for kind in ("steps", "cleanup"):
            for step in job.get(kind, []):
                if "run" in step:
                    scripts.append((f"{job_name}/{step.get('name')}", step["run"]))
    return scripts


@pytest.mark.parametrize(("where", "script"), all_run_scripts(), ids=[w for w, _ in all_run_scripts()])
def test_every_step_is_valid_bash(where, script):
    result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{where}: {result.stderr}"


def test_connection_info_publishes_the_outputs_once_the_cluster_is_ready(tmp_path):
    step = WORKFLOW["jobs"]["connection_info"]["steps"][0]
    assert step["early-cancel"] == "any-job-failed"
    info = {
        "cluster_id": "ar-0123abcd", "scheduler": "slurm", "job_id": "77", "head_node": "c1",
        "ray_address": "10.0.0.1:6379", "dashboard_url": "http://127.0.0.1:8265",
        "ray_client_address": "ray://127.0.0.1:41234",
        "tunnel_command": "ssh -N -L 8265:127.0.0.1:8265 login", "nodes": [{}, {}],
    }
    (tmp_path / "ray-cluster.json").write_text(json.dumps(info, indent=2))
    outputs = tmp_path / "outputs"
    env = {**os.environ, "PW_PARENT_JOB_DIR": str(tmp_path), "OUTPUTS": str(outputs), "WF_PYTHON": sys.executable}
    result = run_script(step["run"], env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    published = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert published["cluster_id"] == "ar-0123abcd" and published["nodes"] == "2"
    assert published["tunnel_command"] == info["tunnel_command"]
    assert published["ray_client_address"] == info["ray_client_address"]
    # a run that ended before it was ready: the step stops waiting
    (tmp_path / "ray-cluster.json").unlink()
    (tmp_path / "ray-cluster.ended").touch()
    result = run_script(step["run"], env, tmp_path)
    assert result.returncode == 0 and "ended before the cluster was ready" in result.stdout


# --------------------------------------------------------------------------- the connection info file, written atomically


def big_info(round_: int) -> dict:
    """Connection info large enough that a non-atomic write is seen half done (many nodes)."""
    return {
        "cluster_id": "ar-0123abcd", "scheduler": "pbs", "job_id": str(round_), "head_node": "c1",
        "ray_address": "10.0.0.1:6379", "dashboard_url": "http://127.0.0.1:8265",
        "tunnel_command": "ssh -N -L 8265:127.0.0.1:8265 login", "token_file": "/home/a/.activate-ray/x/token",
        "nodes": [{"node": f"c{i}", "ip": f"10.0.{i // 250}.{i % 250}", "CPU": 64.0, "GPU": 0} for i in range(2000)],
    }


@pytest.mark.bed  # a real process or server: seconds, not milliseconds
def test_info_file_rewritten_under_a_polling_reader_is_always_whole(tmp_path):
    import threading

    from tasks.atomic_file import write_text_atomic

    path = tmp_path / "ray-cluster.json"
    texts = [json.dumps(big_info(i), indent=2) + "\n" for i in range(2)]
    write_text_atomic(path, texts[0])
    stop, seen, bad = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError as exc:  # the final name must never go missing
                bad.append(repr(exc))
                continue
            try:
                seen.append(json.loads(text)["job_id"])
            except ValueError as exc:
                bad.append(f"{exc} after {len(text)} of {len(texts[0])} characters")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for round_ in range(200):
            assert write_text_atomic(path, texts[round_ % 2]) == path
    finally:
        stop.set()
        thread.join(30)
    assert bad == [], bad[:5]
    assert len(seen) > 10 and set(seen) <= {"0", "1"}
    assert (path.stat().st_mode & 0o777) == 0o600  # it names the token file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ray-cluster.json"]  # no temp file left behind


def test_info_file_mode_is_0600_whatever_the_umask_and_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    from tasks import atomic_file

    path = tmp_path / "info.json"
    path.write_text('{"old": true}\n')
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        atomic_file.write_text_atomic(path, '{"new": true}\n')
    finally:
        os.umask(old_umask)
    assert json.loads(path.read_text()) == {"new": True}
    assert (path.stat().st_mode & 0o777) == 0o600

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_file.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_file.write_text_atomic(path, '{"newer": true}\n')
    assert json.loads(path.read_text()) == {"new": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["info.json"]


@pytest.mark.bed  # a real process or server: seconds, not milliseconds
def test_publish_connection_info_writes_the_info_file_atomically(tmp_path, monkeypatch):
    import asyncio

    import tasks.atomic_file
    import tasks.readiness as readiness
    from tasks.cluster import ClusterPlan
    from tasks.local_transport import LocalTransport
    from tasks.schedulers import PbsScheduler

    async def no_artifact(*args, **kwargs):
        return None

    monkeypatch.setattr(readiness, "create_markdown_artifact", no_artifact)
    monkeypatch.setattr(readiness, "create_table_artifact", no_artifact)
    writes = []
    real = tasks.atomic_file.write_text_atomic
    monkeypatch.setattr(readiness, "write_text_atomic", lambda *a, **k: writes.append(a[0]) or real(*a, **k))
    info_file = tmp_path / "ray-cluster.json"
    settings = RayClusterSettings(scheduler="pbs", pbs={"select": "2:ncpus=1"}, info_file=str(info_file))
    plan = ClusterPlan.new(settings, "/home/a/.activate-ray")
    plan.job_id = "77.pbs"
    head = readiness.HeadInfo("c1", "10.0.0.1", 6379, 8265, 10001)
    nodes = [{"node_name": f"c{i}", "node_ip": f"10.0.0.{i}", "is_head_node": i == 1,
              "resources_total": {"CPU": 1.0, "memory": 2 * 1024**3}} for i in (1, 2)]
    info = asyncio.run(readiness.publish_connection_info.fn(
        LocalTransport(), PbsScheduler(settings), plan, readiness.ReadyCluster(head, 40001, nodes)))
    assert writes == [str(info_file)]
    written = json.loads(info_file.read_text())
    assert written["cluster_id"] == info.cluster_id == plan.cluster_id
    assert written["token_file"] == plan.token_path and len(written["nodes"]) == 2
    assert plan.token.get_secret_value() not in info_file.read_text()
    assert (info_file.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ray-cluster.json"]


def test_connection_info_job_reads_a_file_that_is_being_rewritten(tmp_path):
    """The job polls until the file parses, then reads it again: with atomic writes both reads see a whole file."""
    import threading

    from tasks.atomic_file import write_text_atomic

    step = WORKFLOW["jobs"]["connection_info"]["steps"][0]
    path = tmp_path / "ray-cluster.json"
    texts = [json.dumps(big_info(i), indent=2) + "\n" for i in range(2)]
    write_text_atomic(path, texts[0])
    stop = threading.Event()

    def writer():
        round_ = 0
        while not stop.is_set():
            round_ += 1
            write_text_atomic(path, texts[round_ % 2])

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        outputs = tmp_path / "outputs"
        env = {**os.environ, "PW_PARENT_JOB_DIR": str(tmp_path), "OUTPUTS": str(outputs), "WF_PYTHON": sys.executable}
        result = run_script(step["run"], env, tmp_path)
    finally:
        stop.set()
        thread.join(30)
    assert result.returncode == 0, result.stdout + result.stderr
    published = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert published["cluster_id"] == "ar-0123abcd" and published["nodes"] == "2000"
    assert published["job_id"] in ("0", "1")


# --------------------------------------------------------------------------- the platform's shapes, the session


def test_the_workflow_has_the_platforms_shape_and_every_reference_resolves():
    """The runner's strict checks (tests/workflow_runner.py): known keys only, needs that
    exist, actions with the inputs they document; every ${{ }} of the jobs names an input,
    a declared session or an output of a needed job; the form's own expressions resolve
    for every kind of resource."""
    from tests.workflow_runner import check_references, check_workflow, references, resolve_inputs

    check_workflow(WORKFLOW)
    check_references(WORKFLOW)
    assert len(references(WORKFLOW)) > 40  # the checks above saw the job env and the session's inputs
    for scheduler_type in ("slurm", "pbs", ""):
        resolved = resolve_inputs(INPUTS, {"resource": {"ip": "login.example.org", "schedulerType": scheduler_type}})
        assert (resolved["slurm"]["walltime"] is None) == (scheduler_type != "slurm")


def test_the_checkout_comes_from_the_source_inputs_defined_once():
    (checkout,) = [s for s in WORKFLOW["jobs"]["setup"]["steps"] if s.get("uses") == "parallelworks/checkout"]
    assert checkout["with"] == {"repo": "${{ inputs.source.repo }}", "branch": "${{ inputs.source.branch }}"}
    source = INPUTS["source"]["items"]
    assert source["repo"]["default"] == "https://github.com/activate-ray/activate-ray.git"
    assert source["branch"]["default"] == "main"
    text = (REPO / "workflow.yaml").read_text()
    assert text.count("github.com/activate-ray/activate-ray") == 1, "the default is defined once"
    assert "parallelworks/activate-ray" not in text, "that is another project"


def test_the_dashboard_session_is_declared_and_set_from_the_flows_tunnel():
    from tests.workflow_runner import ACTION_INPUTS

    assert WORKFLOW["sessions"] == {"dashboard": {"redirect": True, "useTLS": False}}
    job = WORKFLOW["jobs"]["dashboard_session"]
    assert job["needs"] == ["connection_info"]
    assert job["if"] == "${{ needs.connection_info.outputs.dashboard_port != '' }}"
    (step,) = job["steps"]
    assert step["uses"] == "parallelworks/update-session"
    documented = ACTION_INPUTS["parallelworks/update-session"]
    assert documented["required"] <= set(step["with"]) <= documented["required"] | documented["optional"]
    assert step["with"] == {
        "name": "${{ sessions.dashboard }}",
        "target": "user-workspace",  # the flow and its tunnel run in the user workspace
        "remoteHost": "${{ needs.connection_info.outputs.dashboard_host }}",
        "remotePort": "${{ needs.connection_info.outputs.dashboard_port }}",
        "status": "running",
    }
    # the cleanup and the outputs for users who want their own tunnel stay
    assert JOB["cleanup"] and "tunnel_command" in WORKFLOW["jobs"]["connection_info"]["steps"][0]["run"]


DASHBOARD_STEP = WORKFLOW["jobs"]["connection_info"]["steps"][1]


def run_dashboard_step(tmp_path: Path, info: dict | None, ended: bool = False) -> tuple[subprocess.CompletedProcess, dict]:
    if info is not None:
        (tmp_path / "ray-cluster.json").write_text(json.dumps(info))
    if ended:
        (tmp_path / "ray-cluster.ended").touch()
    outputs = tmp_path / "outputs"
    outputs.write_text("")
    env = {**os.environ, "PW_PARENT_JOB_DIR": str(tmp_path), "OUTPUTS": str(outputs), "WF_PYTHON": sys.executable}
    result = run_script(DASHBOARD_STEP["run"], env, tmp_path)
    return result, dict(line.split("=", 1) for line in outputs.read_text().splitlines())


def test_the_dashboard_step_publishes_the_tunnels_host_and_port_once_it_answers(tmp_path):
    import http.server
    import threading

    assert DASHBOARD_STEP["early-cancel"] == "any-job-failed"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result, published = run_dashboard_step(tmp_path, {"dashboard_url": f"http://127.0.0.1:{port}"})
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    assert published == {"dashboard_host": "127.0.0.1", "dashboard_port": str(port)}


@pytest.mark.parametrize("info", [None, {"dashboard_url": "http://127.0.0.1:{port}"}], ids=["no info", "no answer"])
def test_the_dashboard_step_publishes_no_port_when_the_run_ended_first(tmp_path, info):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if info:
        info = {"dashboard_url": info["dashboard_url"].format(port=port)}
    result, published = run_dashboard_step(tmp_path, info, ended=True)
    assert result.returncode == 0, result.stderr
    assert published == {"dashboard_host": "", "dashboard_port": ""}


@pytest.mark.parametrize("url", ["http://10.0.0.5:8265", "https://127.0.0.1:8265", "http://127.0.0.1"])
def test_the_dashboard_step_exposes_the_flows_own_tunnel_only(tmp_path, url):
    result, published = run_dashboard_step(tmp_path, {"dashboard_url": url}, ended=True)
    assert result.returncode != 0 and "is not the flow's tunnel" in result.stderr
    assert published == {}
