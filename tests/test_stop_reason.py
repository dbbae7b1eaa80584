"""ar_stop_reason (scripts/ray_lib.sh), as every node's supervisor runs it: under the job
scripts' `set -euo pipefail`, with and without a node name, for each reason to stop."""

import os
import subprocess
import time

import pytest

from tasks.shipped import SCRIPTS_DIR

LIB = SCRIPTS_DIR / "ray_lib.sh"


def stop_reason(cluster_dir, node_name: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "AR_CLUSTER_DIR": str(cluster_dir), "AR_HEARTBEAT_TIMEOUT": "60"}
    if node_name is not None:
        env["AR_NODE_NAME"] = node_name
    return subprocess.run(["bash", "-c", f"set -euo pipefail; . {LIB}; ar_stop_reason; echo END"],
                          env=env, capture_output=True, text=True, timeout=10)


@pytest.fixture
def cluster(tmp_path):
    (tmp_path / "c" / "nodes").mkdir(parents=True)
    (tmp_path / "c" / "heartbeat").touch()
    return tmp_path / "c"


@pytest.mark.parametrize("node_name", [None, "head", "node2", "wjob-42"])
def test_no_reason_to_stop(cluster, node_name):
    done = stop_reason(cluster, node_name)
    assert (done.returncode, done.stdout, done.stderr) == (0, "END\n", "")


@pytest.mark.parametrize("node_name", [None, "node2", "wjob-42"])
def test_each_reason_to_stop(cluster, node_name):
    (cluster / "stop").touch()
    assert stop_reason(cluster, node_name).stdout == "stop requested\nEND\n"
    (cluster / "stop").unlink()
    old = time.time() - 61
    os.utime(cluster / "heartbeat", (old, old))
    assert "dead-man switch" in stop_reason(cluster, node_name).stdout
    os.utime(cluster / "heartbeat")
    (cluster / "nodes" / f"{node_name}.remove").touch()
    removed = stop_reason(cluster, node_name).stdout
    # only a worker job is removed by a file (scale --remove, the adaptive loop)
    assert ("removed from the cluster" in removed) == (node_name == "wjob-42"), removed


def test_a_removed_cluster_dir_stops_every_node(tmp_path):
    done = stop_reason(tmp_path / "gone", "node2")
    assert (done.stdout, done.stderr) == ("cluster dir removed\nEND\n", "")


def glance(cluster_dir, node_name: str = "node2", trace: bool = False) -> subprocess.CompletedProcess:
    """ar_stop_glance, as a running node's periodic look runs it (under strace when asked)."""
    env = {"PATH": os.environ["PATH"], "AR_CLUSTER_DIR": str(cluster_dir), "AR_HEARTBEAT_TIMEOUT": "60",
           "AR_NODE_NAME": node_name}
    command = ["bash", "-c", f"set -euo pipefail; . {LIB}; ar_stop_glance; echo END"]
    if trace:
        command = ["strace", "-f", "-qq", "-e", "trace=%file,%stat", "-o", str(cluster_dir.parent / "trace"), *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=10)


def test_a_glance_is_one_metadata_operation_on_the_cluster_dir(cluster):
    """Issue 34: a running node costs the shared filesystem one operation per look."""
    if subprocess.run(["strace", "-V"], capture_output=True).returncode != 0:
        pytest.skip("no strace")
    done = glance(cluster, trace=True)
    assert (done.returncode, done.stdout) == (0, "END\n"), done.stderr
    touched = [line for line in (cluster.parent / "trace").read_text().splitlines() if str(cluster) in line]
    assert len(touched) == 1 and "heartbeat" in touched[0], touched


def test_a_glance_sees_a_stop_request_a_removed_dir_and_a_silent_flow(cluster):
    # a stop request removes the heartbeat beside writing the stop file (ar_request_stop)
    env = {"PATH": os.environ["PATH"], "AR_CLUSTER_DIR": str(cluster)}
    subprocess.run(["bash", "-c", f". {LIB}; ar_request_stop"], env=env, check=True, timeout=10)
    assert not (cluster / "heartbeat").exists() and (cluster / "stop").exists()
    assert glance(cluster).stdout == "stop requested\nEND\n"
    (cluster / "stop").unlink()
    old = time.time() - 61
    (cluster / "heartbeat").touch()
    os.utime(cluster / "heartbeat", (old, old))
    assert "dead-man switch" in glance(cluster).stdout
    assert glance(cluster.parent / "gone").stdout == "cluster dir removed\nEND\n"


def test_a_worker_job_s_glance_also_sees_its_own_removal(cluster):
    """A worker job's node glances at its removal file too (scale --remove, the adaptive loop,
    where no scheduler can tell it to look now): two operations, so it glances half as often."""
    assert glance(cluster, "wjob-42").stdout == "END\n"
    (cluster / "nodes" / "wjob-42.remove").touch()
    assert "removed from the cluster" in glance(cluster, "wjob-42").stdout
    assert glance(cluster, "node2").stdout == "END\n"  # only a worker job is removed by a file
    env = {"PATH": os.environ["PATH"], "AR_CLUSTER_DIR": str(cluster)}
    every = subprocess.run(["bash", "-c", f". {LIB}; ar_glance_every wjob-42; ar_glance_every node2"], env=env,
                           capture_output=True, text=True, timeout=10).stdout.split()
    assert every == ["12", "6"], every
