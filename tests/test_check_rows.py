"""`check`'s rows without the bed: node_check.sh on this machine says the socket-paths row in
the login host's words (tasks/checks.py), its rows parse, a failing row exits 1."""

from __future__ import annotations

import os
import subprocess
import sys

from tasks.checks import CheckRow, render_markdown, render_table, rows_in, socket_paths_row
from tasks.settings import NODE_TMP_MAX_LEN
from tasks.shipped import SCRIPTS_DIR


def node_check_env(tmp_path, node_tmp: str | None = None) -> dict:
    """node_check.sh's environment (cluster.env's values) for a cluster dir under tmp_path."""
    cluster = tmp_path / "w" / "clusters" / "ar-x"
    (cluster / "bin").mkdir(parents=True, exist_ok=True)
    (cluster / "bin" / "node_ip.py").write_text((SCRIPTS_DIR / "node_ip.py").read_text())
    return {"AR_NODE_TMP": node_tmp or str(tmp_path), "AR_NODE_TMP_MAX_LEN": str(NODE_TMP_MAX_LEN),
            "AR_PYTHON": sys.executable, "AR_RAY": "ray", "AR_RAY_VERSION": "0.0.1", "AR_CLIENT_PYTHON": "",
            "AR_OBJECT_STORE": "", "AR_NETWORK_INTERFACE": "", "AR_CLUSTER_DIR": str(cluster), "AR_SCHEDULER": "slurm"}


def node_check(tmp_path, node_tmp: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS_DIR / "node_check.sh")], capture_output=True, text=True,
                          env={**os.environ, **node_check_env(tmp_path, node_tmp), **env}, timeout=60)


def test_a_node_says_the_socket_paths_row_in_the_login_hosts_words(tmp_path):
    long_root = str(tmp_path / ("x" * 40))
    os.mkdir(long_root)
    done = node_check(tmp_path, long_root)
    rows = rows_in(done.stdout, "node1")
    socket = [row for row in rows if row.check == "socket paths"][0]
    expected = socket_paths_row(long_root)
    assert (socket.status, socket.found, socket.fix) == (expected.status, expected.found, expected.fix)
    assert done.returncode == 1  # that row fails (and the ray row: version 0.0.1 is asked for)
    ray = [row for row in rows if row.check == "ray"][0]
    assert ray.status == "fail" and "the client asks for ray 0.0.1" in ray.found and "--python" in ray.fix


def test_a_temp_dir_under_the_work_dir_is_not_node_local(tmp_path):
    shared = tmp_path / "w" / "t"
    shared.mkdir(parents=True)
    rows = rows_in(node_check(tmp_path, str(shared)).stdout, "node1")
    temp = [row for row in rows if row.check == "temp dir"][0]
    assert temp.status == "fail" and "under the work dir" in temp.found and "--node-tmp /local/scratch" in temp.fix


def test_table_and_markdown_name_every_failing_rows_fix():
    rows = [CheckRow("scheduler", "pass", "slurm answers"), CheckRow("open files", "fail", "ulimit -n is 256 | x", "`ulimit -n 65536`", "node1")]
    table = render_table(rows)
    assert "FAIL  open files" in table and "fix: `ulimit -n 65536`" in table and "1 failed" in table
    assert "ulimit -n is 256 \\| x" in render_markdown(rows)


def test_the_heads_open_file_limit_is_checked_against_the_node_count(tmp_path):
    """The head's GCS needs descriptors for every node: a limit fine for 16 nodes fails 1,024 on
    the head, and a worker is held to the usual floor only."""
    def open_files(node: str, nodes: int, limit: int) -> CheckRow:
        script = f"ulimit -n {limit} && exec bash {SCRIPTS_DIR / 'node_check.sh'}"
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **node_check_env(tmp_path), "AR_CHECK_NODE": node,
                                   "AR_EXPECTED_NODES": str(nodes)})
        return [row for row in rows_in(done.stdout, node) if row.check == "open files"][0]

    assert open_files("head", 16, 4096).status == "warn"  # below Ray's 65536, enough for 16 nodes
    big = open_files("head", 1024, 4096)
    assert big.status == "fail" and "1024 nodes needs about 32768" in big.found and "ulimit -n 65536" in big.fix
    assert open_files("node7", 1024, 4096).status == "warn"
