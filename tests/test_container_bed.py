"""The container option for real: rootless podman on the site bed. The bed's user runs a
direct-mode cluster (head + 1 worker on the login node) with container_image set; Ray runs on
the image's own python and ray; the job runs; afterwards no container, no Ray process (in any
PID namespace: the containers have their own) and no temp dir is left.

The image is made here without a registry (tests/bed/ray_image.py: this machine's python3.11
and the bed venv's packages, `podman import`ed). The user's podman is set up the way a site
does it: storage on node-local disk (/tmp of each host), and runc as the OCI runtime, as crun
refuses this machine's hybrid cgroup v1/v2 layout."""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import signal
import time

import pytest

from tasks.settings import node_tmp_name
from tests.bed import skip_or_fail
from tests.bed.ray_image import build_rootfs_tar, image_tag, import_command
from tests.helpers import SMALL, assert_nothing_left, run_flow
from tests.procs import all_pids, cmdline, uid

pytestmark = [pytest.mark.bed, pytest.mark.timeout(900)]

CONTAINERS_CONF = '[engine]\nruntime = "runc"\n'
# node-local, as podman wants it (rootless storage on the shared /home would be one store for every host)
STORAGE_CONF = '[storage]\ndriver = "overlay"\nrootless_storage_path = "/tmp/podman-storage-$USER"\n'


def _podman(bed, *args: str, timeout: int = 120):
    return bed.run_login(["podman", *args], user=bed.user, timeout=timeout)


@pytest.fixture(scope="module")
def podman_image(bed):
    """A Ray image in the bed user's podman storage on the login node; the user's podman
    state (storage, its pause process, its config) removed afterwards."""
    missing = [tool for tool in ("podman", "runc", "newuidmap", "catatonit") if not shutil.which(tool)]
    skip_or_fail(f"the container bed test needs {' '.join(missing)} (bash tests/bed/install_system_deps.sh)"
                 if missing else None)
    bed.ensure_subordinate_ids(bed.user)
    config = bed.user.home / ".config" / "containers"
    config.mkdir(parents=True, exist_ok=True)
    (config / "containers.conf").write_text(CONTAINERS_CONF)
    (config / "storage.conf").write_text(STORAGE_CONF)
    for path in (config.parent, config, *config.iterdir()):
        shutil.chown(path, bed.user.uid, bed.user.gid)
    try:
        tar = build_rootfs_tar(bed.user_venv, bed.root / "ray-image.tar")
        tag = image_tag(bed.user_venv)
        imported = bed.run_login(import_command(tar, tag), user=bed.user, timeout=600)
        assert imported.returncode == 0, imported.stdout + imported.stderr
        tar.unlink()
        yield tag
    finally:
        _podman(bed, "system", "reset", "--force", timeout=300)
        # rootless podman keeps one pause process per user and host (it holds the user namespace)
        for host, pid, _, cmd in bed.processes(user=bed.user):
            if host == bed.login_host and cmd.startswith("catatonit -P"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(config, ignore_errors=True)


def processes_of_cluster_anywhere(bed, cluster_id: str) -> list[str]:
    """The user's processes naming the cluster's node temp dirs, in ANY PID namespace (a podman
    container has its own, which the bed's per-host listing does not see)."""
    needle = "/" + node_tmp_name(cluster_id)
    return [f"{pid} {cmd}" for pid in all_pids()
            if uid(pid) == bed.user.uid and needle in (cmd := cmdline(pid) or "")]


def kept_logs(work_dir) -> str:
    """The tails of the logs the nodes kept (what says why a node did not come up)."""
    texts = []
    for path in sorted(work_dir.glob("logs/*/*/*.gz")):
        if path.name.startswith(("ray-", "supervisor", "raylet.out", "gcs_server.out")):
            texts.append(f"--- {path}\n" + gzip.decompress(path.read_bytes()).decode(errors="replace")[-1500:])
    return "\n".join(texts)


JOB = (
    "import os, sys, ray\n"
    "ray.init()\n"
    "@ray.remote(num_cpus=0.5)\n"
    "def where():\n"
    "    return sys.executable, os.path.exists('/opt/ray/pyvenv.cfg'), ray.get_runtime_context().get_node_id()\n"
    "found = ray.get([where.remote() for _ in range(8)])\n"
    "print('DRIVER=' + sys.executable)\n"
    "print('TASKS=' + repr(sorted({(e, inside) for e, inside, _ in found})))\n"
    "print('TASKS_IN_IMAGE=%s' % all(e.startswith('/opt/ray/bin/python') and inside for e, inside, _ in found))\n"
    "print('NODES=%d' % len(ray.nodes()))\n"
)


def test_direct_cluster_in_podman_runs_the_job_and_leaves_nothing(bed, work, prefect_api, podman_image):
    run = run_flow(
        bed, ["--user-script", JOB, "--direct-workers", "1", "--work-dir", work / "w", *SMALL,
              "--container-image", podman_image, "--container-runtime", "podman"],
        work=work, api=prefect_api, timeout=600,
    )
    assert run.returncode == 0, run.output[-3000:] + kept_logs(work / "w")
    # the driver and every task ran on the image's python, not on the host venv's
    assert "DRIVER=/opt/ray/bin/python3" in run.output
    assert "TASKS_IN_IMAGE=True" in run.output, run.output[-3000:]
    assert "NODES=2" in run.output, run.output[-3000:]
    assert_nothing_left(bed, run.cluster_id, work / "w")
    deadline = time.monotonic() + 15
    while (left := processes_of_cluster_anywhere(bed, run.cluster_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], "processes of the cluster left in a container:\n" + "\n".join(left)
    containers = _podman(bed, "ps", "--all", "--format", "{{.Names}}")
    assert containers.returncode == 0, containers.stderr
    assert run.cluster_id not in containers.stdout, containers.stdout
