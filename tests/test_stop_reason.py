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
