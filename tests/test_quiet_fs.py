"""A running cluster is quiet on the shared filesystem: each node's supervisor looks at the
cluster dir (stop, removal, heartbeat) every AR_LOOK_EVERY seconds, two metadata operations
a look, measured with strace on a worker node of a real SLURM cluster; a stop still reaches
every node at once (the flow's teardown wakes the job's shell)."""

import re
import signal
import subprocess
import time

import pytest

from tests.helpers import BackgroundFlow, assert_nothing_left, batch_args

pytestmark = [pytest.mark.bed, pytest.mark.timeout(400)]

WINDOW_S = 45
MAX_OPS_PER_S = 0.2  # per node, at steady state (issue 34)


def worker_supervisor(bed, node: str, cluster_id: str) -> int:
    """The bash that runs ray_worker.sh for this cluster on the node (root-namespace pid)."""
    for host, pid, _, cmd in bed.processes(user=bed.user):
        if host == node and "ray_worker.sh" in cmd and cluster_id in cmd and "bash" in cmd.split()[0]:
            return pid
    raise AssertionError(f"no worker supervisor on {node}: {bed.processes(user=bed.user)}")


def test_a_running_nodes_supervisor_costs_the_shared_filesystem_at_most_0_2_ops_per_second(work, prefect_api, bed):
    flow = BackgroundFlow(bed, batch_args(work / "w", "--slurm.nodes", "2", "--keep-alive"), work, prefect_api)
    try:
        info = flow.wait_ready()
        cluster_dir = str(work / "w" / "clusters" / info["cluster_id"])
        pid = bed.pid_in_host(worker_supervisor(bed, "node2", info["cluster_id"]))
        trace = work / "strace.out"
        # strace on the node itself (its PID namespace), every child of the loop followed
        traced = subprocess.run(
            bed.node_argv("node2", ["timeout", "-s", "INT", str(WINDOW_S), "strace", "-f", "-qq", "-e",
                                    "trace=%file,%stat", "-o", str(trace), "-p", str(pid)]),
            capture_output=True, text=True, timeout=WINDOW_S + 30)
        assert trace.exists(), traced.stderr
        ops = [line for line in trace.read_text().splitlines() if cluster_dir in line and "execve" not in line]
        rate = len(ops) / WINDOW_S
        print(f"node2's supervisor: {len(ops)} metadata operations on the cluster dir in {WINDOW_S} s = {rate:.3f}/s")
        assert rate <= MAX_OPS_PER_S, "\n".join(ops[:40])
        assert ops, "the supervisor never looked at the cluster dir: the measurement saw nothing"
        assert any(re.search(r"heartbeat", line) for line in ops), ops[:10]
        # a stop still reaches every node at once: the teardown wakes the job's shell
        stopped = time.monotonic()
        flow.send_signal(signal.SIGTERM)
        assert flow.wait(90) == 143, flow.output[-3000:]
        took = time.monotonic() - stopped
        assert took < 10, f"teardown took {took:.1f} s:\n{flow.output[-3000:]}"
        assert "did not report that they stopped" not in flow.output
    finally:
        flow.kill()
    assert_nothing_left(bed, info["cluster_id"], work / "w")
