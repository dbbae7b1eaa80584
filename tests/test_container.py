"""The container option (container_image, container_runtime): what is refused before anything
starts, what the env file carries, and the command lines ray_lib.sh's real functions produce for
each runtime (apptainer, singularity, podman) and its auto-detection on the node. The real podman
run on the test bed is tests/test_container_bed.py."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.cluster import CONTAINER_ENVIRONMENT, ClusterPlan
from tasks.shipped import SCRIPTS_DIR
from tests.helpers import REPO
from tests.scheduler_helpers import BASH, settings

WORK_DIR = "/scratch/alice/ar"


@pytest.mark.parametrize(("image", "runtimes"), [
    ("/scratch/images/ray-2.60.sif", ("apptainer", "singularity")),
    ("~/images/ray", ("apptainer", "singularity")),  # a sandbox dir
    ("docker://rayproject/ray:2.60.0-py311", ("apptainer", "singularity", "podman")),
    ("oras://ghcr.io/site/ray:2.60.0", ("apptainer", "singularity")),
    ("library://site/default/ray:latest", ("apptainer", "singularity")),
    ("rayproject/ray:2.60.0", ("podman",)),
    ("registry.site.org:5000/hpc/ray@sha256:" + "a" * 64, ("podman",)),
    ("oci-archive:/scratch/images/ray.tar", ("podman",)),
])
def test_image_reference_decides_which_runtimes_may_run_it(image, runtimes):
    assert settings(container_image=image).environment.container_runtimes == runtimes


@pytest.mark.parametrize("image", [
    "--privileged", "-v/:/host", "ray image", "ray;id", "$(id)", "`id`", "ray\nx", "/a/../etc/x.sif", "relative/x.sif:",
    "docker://UPPER/case", "docker://-x", "oras://", "oci-archive:relative.tar", "http://site/x.sif", "/x'y.sif",
])
def test_image_that_is_no_reference_is_refused(image):
    with pytest.raises(ValidationError, match="container_image"):
        settings(container_image=image)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(container_image="/x/ray.sif", container_runtime="podman"), "cannot be run by podman: it suits apptainer"),
    (dict(container_image="rayproject/ray:2.60.0", container_runtime="apptainer"), "cannot be run by apptainer"),
    (dict(container_runtime="singularity"), "needs a container_image"),
    (dict(container_image="rayproject/ray:2.60.0", python="/usr/bin/python3"), "python applies without a container"),
    (dict(container_runtime="nerdctl", container_image="docker://ray"), "container_runtime"),
])
def test_inconsistent_container_inputs_are_refused(kw, match):
    with pytest.raises(ValidationError, match=match):
        settings(**kw)


@pytest.fixture
def tmp_path():
    """Short: node_tmp is at most 15 characters (Ray's socket paths below it)."""
    path = Path(tempfile.mkdtemp(prefix="c", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def container_plan(tmp_path: Path, image: str, runtime: str = "auto", **kw) -> ClusterPlan:
    s = settings(container_image=image, container_runtime=runtime, work_dir=WORK_DIR, node_tmp=str(tmp_path), **kw)
    plan = ClusterPlan.new(s, WORK_DIR)
    plan.environment = CONTAINER_ENVIRONMENT
    return plan


def test_env_file_names_the_image_the_runtimes_and_the_image_s_own_ray(tmp_path):
    plan = container_plan(tmp_path, "docker://rayproject/ray:2.60.0")
    env = plan.env_file() + plan.environment_file()
    assert "export AR_CONTAINER_IMAGE=docker://rayproject/ray:2.60.0\n" in env
    assert "export AR_CONTAINER_RUNTIMES='apptainer singularity podman'\n" in env
    assert f"export AR_WORK_DIR={WORK_DIR}\n" in env
    assert "export AR_PYTHON=python3\n" in env and "export AR_RAY=ray\n" in env
    assert "AR_CONTAINER" not in ClusterPlan.new(settings(), WORK_DIR).env_file()


def run_lib(tmp_path: Path, plan: ClusterPlan, script: str, path: str = "/usr/bin:/bin", **env) -> subprocess.CompletedProcess:
    """Source the plan's real env file and ray_lib.sh in bash, then run `script` there."""
    cluster_dir = tmp_path / "cluster"
    (cluster_dir / "nodes").mkdir(parents=True, exist_ok=True)
    (cluster_dir / "heartbeat").touch()  # as start_cluster leaves it: the flow is alive
    env_file = tmp_path / "cluster.env"
    env_file.write_text((plan.env_file() + plan.environment_file()).replace(plan.cluster_dir, str(cluster_dir)))
    body = f'set -euo pipefail\n. "{env_file}"\n. "{SCRIPTS_DIR}/ray_lib.sh"\n{script}\n'
    return subprocess.run([BASH, "-c", body], capture_output=True, text=True, check=False,
                          env={"PATH": path, "HOME": "/home/alice", **env})


# The launch prefix, one word per line, then the APPTAINERENV_/SINGULARITYENV_ values it exported.
SHOW_LAUNCH = ('export DASHBOARD_METRIC_PORT=40001\nar_container_launch "$RUNTIME" head "$AR_NODE_TMP/ar-x.abc123"\n'
               'printf "%s\\n" "${AR_CONTAINER_LAUNCH[@]}"; echo ---; env | grep -E "^(APPTAINER|SINGULARITY)ENV_" | sort || true')


@pytest.mark.parametrize("runtime", ["apptainer", "singularity"])
def test_apptainer_command_line(tmp_path, runtime):
    plan = container_plan(tmp_path, "/scratch/images/ray.sif", runtime)
    result = run_lib(tmp_path, plan, SHOW_LAUNCH, RUNTIME=runtime)
    assert result.returncode == 0, result.stderr
    argv, exported = result.stdout.split("---\n")
    cluster_dir, node_tmp = tmp_path / "cluster", f"{tmp_path}/ar-x.abc123"
    assert argv.splitlines() == [runtime, "exec", "--cleanenv", "--bind", WORK_DIR, "--bind", str(cluster_dir),
                                 "--bind", node_tmp, "/scratch/images/ray.sif"]
    prefix = runtime.upper() + "ENV_"
    assert exported.splitlines() == sorted([
        f"{prefix}AR_CLUSTER_ID={plan.cluster_id}",  # how the node's port check knows its processes
        f"{prefix}DASHBOARD_METRIC_PORT=40001", f"{prefix}RAY_AUTH_MODE=token",
        f"{prefix}RAY_AUTH_TOKEN_PATH={cluster_dir}/token", f"{prefix}RAY_enable_metrics_collection=0"])


def test_apptainer_passes_gpus_when_they_are_asked_for(tmp_path):
    plan = container_plan(tmp_path, "~/ray.sif", "apptainer", num_gpus_per_node=2)
    result = run_lib(tmp_path, plan, SHOW_LAUNCH, RUNTIME="apptainer", CUDA_VISIBLE_DEVICES="0,1")
    argv, exported = result.stdout.split("---\n")
    assert argv.splitlines()[:4] == ["apptainer", "exec", "--cleanenv", "--nv"]
    assert argv.splitlines()[-1] == "/home/alice/ray.sif"  # ~ is the node user's home
    assert "APPTAINERENV_CUDA_VISIBLE_DEVICES=0,1" in exported.splitlines()


def test_podman_command_line(tmp_path):
    plan = container_plan(tmp_path, "registry.site.org/hpc/ray:2.60.0", "podman")
    result = run_lib(tmp_path, plan, SHOW_LAUNCH + '\necho ---; cat "$AR_CLUSTER_DIR/nodes/head.container"',
                     RUNTIME="podman")
    assert result.returncode == 0, result.stderr
    argv, exported, recorded = result.stdout.split("---\n")
    cluster_dir, node_tmp = tmp_path / "cluster", f"{tmp_path}/ar-x.abc123"
    name = f"{plan.cluster_id}-head"
    assert argv.splitlines() == [
        "podman", "run", "--rm", "--init", "--name", name, "--network=host", "--userns=keep-id",
        "--volume", "/dev/shm:/dev/shm", "--env", "AR_CLUSTER_ID", "--env", "RAY_AUTH_MODE", "--env", "RAY_AUTH_TOKEN_PATH",
        "--env", "RAY_enable_metrics_collection", "--env", "DASHBOARD_METRIC_PORT",
        "--volume", f"{WORK_DIR}:{WORK_DIR}", "--volume", f"{cluster_dir}:{cluster_dir}",
        "--volume", f"{node_tmp}:{node_tmp}", "registry.site.org/hpc/ray:2.60.0"]
    assert exported == ""
    hostname = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    assert recorded == f"{hostname} {name}\n"  # what the stop removes, from this host only


def test_token_never_reaches_a_command_line(tmp_path):
    """The token is a 0600 file; its path goes in by name only (podman --env NAME, APPTAINERENV_*)."""
    for runtime, image in [("podman", "ray:1"), ("apptainer", "/x/ray.sif")]:
        plan = container_plan(tmp_path, image, runtime)
        result = run_lib(tmp_path, plan, SHOW_LAUNCH, RUNTIME=runtime)
        argv = result.stdout.split("---\n")[0]
        assert plan.token.get_secret_value() not in result.stdout + result.stderr
        assert "token" not in argv.replace("RAY_AUTH_TOKEN_PATH", "")


def stub_runtimes(tmp_path: Path, *names: str) -> str:
    """A dir with executables of these names, only for `command -v` to find (never run)."""
    bin_dir = tmp_path / "runtimes"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        (bin_dir / name).write_text("#!/bin/sh\nexit 99\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    return f"{bin_dir}:/usr/bin:/bin"


@pytest.mark.parametrize(("image", "found", "chosen"), [
    ("docker://rayproject/ray:2.60.0", ("podman", "singularity", "apptainer"), "apptainer"),
    ("docker://rayproject/ray:2.60.0", ("podman", "singularity"), "singularity"),
    ("docker://rayproject/ray:2.60.0", ("podman",), "podman"),
    ("rayproject/ray:2.60.0", ("podman", "apptainer"), "podman"),  # apptainer cannot run a bare name
    ("/x/ray.sif", ("singularity", "podman"), "singularity"),
])
def test_auto_detection_on_the_node(tmp_path, image, found, chosen):
    result = run_lib(tmp_path, container_plan(tmp_path, image), "ar_container_runtime", stub_runtimes(tmp_path, *found))
    assert (result.returncode, result.stdout) == (0, chosen + "\n"), result.stderr


def test_no_runtime_on_the_node_fails_it_naming_the_node(tmp_path):
    result = run_lib(tmp_path, container_plan(tmp_path, "/x/ray.sif"), "ar_container_runtime",
                     stub_runtimes(tmp_path, "podman"))
    hostname = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
    assert result.returncode == 1
    assert f"no container runtime on node {hostname}: none of apptainer singularity is on PATH" in result.stderr
    status = (tmp_path / "cluster" / "status").read_text()
    assert status.startswith(f"RAY_FAILED=no container runtime on node {hostname}")  # the flow fails at once


def test_ray_run_node_checks_the_runtime_before_it_makes_anything(tmp_path):
    """No runtime: ar_run_node returns before the node's temp dir exists (nothing to clean up)."""
    plan = container_plan(tmp_path, "/x/ray.sif")
    result = run_lib(tmp_path, plan, "ar_run_node head head", stub_runtimes(tmp_path))
    assert result.returncode == 1
    assert not list(tmp_path.glob("ar-*")) and not list((tmp_path / "cluster" / "nodes").iterdir())


def test_the_image_s_bare_ray_never_puts_the_cwd_on_path():
    """`dirname ray` is "."; PATH must not get it (a file named python3 in the cwd would run)."""
    lib = (SCRIPTS_DIR / "ray_lib.sh").read_text()
    assert 'case "$AR_RAY" in */*) PATH="$(dirname "$AR_RAY"):$PATH" ;; esac' in lib


def test_container_stop_removes_only_this_host_s_containers_of_this_cluster(tmp_path):
    """The recorded name is acted on only by the host that recorded it and only if it is this cluster's."""
    plan = container_plan(tmp_path, "ray:1", "podman")
    calls = tmp_path / "podman-calls"
    bin_dir = tmp_path / "runtimes"
    bin_dir.mkdir()
    (bin_dir / "podman").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >>{calls}\n')
    (bin_dir / "podman").chmod(stat.S_IRWXU)
    script = (f'h="$(ar_host)"\nprintf "%s %s\\n" "$h" "{plan.cluster_id}-head" >"$AR_CLUSTER_DIR/nodes/head.container"\n'
              f'printf "%s %s\\n" other-host "{plan.cluster_id}-node1" >"$AR_CLUSTER_DIR/nodes/node1.container"\n'
              'printf "%s %s\\n" "$h" someone-elses >"$AR_CLUSTER_DIR/nodes/node2.container"\nar_container_stop_here')
    result = run_lib(tmp_path, plan, script, f"{bin_dir}:/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    assert calls.read_text() == f"rm --force --ignore --time 2 {plan.cluster_id}-head\n"
    assert sorted(p.name for p in (tmp_path / "cluster" / "nodes").iterdir()) == ["node1.container", "node2.container"]


def test_dry_run_shows_the_container(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_CLUSTER_")}
    result = subprocess.run(
        [os.sys.executable, "-m", "flows.ray_cluster", "--container-image", "docker://rayproject/ray:2.60.0",
         "--container-runtime", "podman", "--dry-run"],
        capture_output=True, text=True, check=False, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "every Ray node in container image docker://rayproject/ray:2.60.0 (podman found on the node)" in result.stdout
    assert "export AR_CONTAINER_RUNTIMES=podman" in result.stdout
