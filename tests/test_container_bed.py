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
import subprocess

import pytest

from tasks.settings import node_tmp_name
from tests.bed import skip_or_fail
from tests.bed.ray_image import build_rootfs_tar, image_tag, import_command
from tests.helpers import SMALL, BackgroundFlow, assert_nothing_left, wait_for
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


HOLD = JOB + (  # then hold until released: the worker's podman client is killed meanwhile
    "import time\n"
    "print('JOB_STARTED', flush=True)\n"
    "deadline = time.time() + 240\n"
    "while not os.path.exists(sys.argv[1]) and time.time() < deadline:\n"
    "    time.sleep(0.5)\n"
    "print('JOB_RELEASED')\n"
)


def test_podman_cluster_runs_the_job_in_the_image_copes_with_a_killed_client_and_leaves_nothing(
        bed, work, prefect_api, podman_image):
    """Head and worker each in a container: the driver and every task run on the image's
    python. Then SIGKILL to the worker's `podman run` (no signal reaches the container through
    it): the node sees its Ray end, removes its container by name, Ray's processes in it end
    with it, and the job and the teardown go on. (One cluster for both: each start is ~50 s.)"""
    (work / "w").mkdir()
    shutil.chown(work / "w", bed.user.uid, bed.user.gid)
    release = work / "w" / "release"  # the job sees the bound dirs only (and the image)
    flow = BackgroundFlow(bed, ["--user-script", HOLD, "--script-args", f'["{release}"]', "--direct-workers", "1",
                                "--work-dir", work / "w", *SMALL, "--container-image", podman_image,
                                "--container-runtime", "podman"], work, prefect_api)
    failure = None
    try:
        info = flow.wait_ready(timeout=300)
        # once the job runs: a node lost before it is submitted fails the run (confirm_nodes_alive)
        wait_for(lambda: "JOB_STARTED" in flow.output, 120, "the job started")
        cluster_id = info["cluster_id"]
        nodes = work / "w" / "clusters" / cluster_id / "nodes"
        worker_tmp = (nodes / "worker1.tmp").read_text().split()[1]
        container = f"{cluster_id}-worker1"
        clients = [pid for host, pid, _, cmd in bed.processes(user=bed.user)
                   if host == bed.login_host and cmd.startswith("podman run ") and f" {container} " in cmd]
        # rootless podman re-executes itself inside the user's namespace: two processes, one group
        assert clients, bed.processes(user=bed.user)
        assert any(worker_tmp + "/" in line for line in processes_of_cluster_anywhere(bed, cluster_id))
        for pid in clients:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: container not in _podman(bed, "ps", "--all", "--format", "{{.Names}}").stdout, 60,
                 "the worker's container removed")
        wait_for(lambda: not any(worker_tmp + "/" in line for line in processes_of_cluster_anywhere(bed, cluster_id)),
                 30, "the worker's Ray processes gone")
        wait_for((nodes / "worker1.stopped").exists, 30, "the worker's stop recorded")
        assert "Ray ended" in (nodes / "worker1.stopped").read_text()  # the node's own stop, on its host
        release.touch()
        assert flow.wait(timeout=300) == 0, flow.output[-3000:]
    except (AssertionError, subprocess.TimeoutExpired) as error:
        failure = error
        containers = _podman(bed, "ps", "--all").stdout
    finally:
        if flow.process.poll() is None:  # a failed check: the flow's own teardown, then no mercy
            flow.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                flow.wait(timeout=90)
        flow.kill()
    if failure:
        raise AssertionError(f"{failure}\ncontainers then:\n{containers}\n{kept_logs(work / 'w')}")
    assert "JOB_RELEASED" in flow.output
    # the driver and every task ran on the image's python, not on the host venv's
    assert "DRIVER=/opt/ray/bin/python3" in flow.output
    assert "TASKS_IN_IMAGE=True" in flow.output, flow.output[-3000:]
    assert "NODES=2" in flow.output, flow.output[-3000:]
    assert_nothing_left(bed, cluster_id, work / "w")
    assert processes_of_cluster_anywhere(bed, cluster_id) == []
    assert cluster_id not in _podman(bed, "ps", "--all", "--format", "{{.Names}}").stdout
