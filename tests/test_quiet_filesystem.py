"""A running cluster is quiet on the shared filesystem (issue 34), and its teardown is still
at once: as the bed's user, a 3-node SLURM keep-alive cluster; one worker's supervisor (and
everything it runs) straced for 30 s at steady state, counting operations on the cluster
dir: at most 0.2 per second (one glance at the heartbeat every AR_LOOK_EVERY=6 s). Then
Ctrl-C to the flow's process group: the nodes are told to look now through the scheduler
(`scancel --full --signal=28`, WINCH), and nothing of the cluster is left on any host within 10 s."""

from __future__ import annotations

import re
import signal
import time

import pytest

from tests.helpers import BackgroundFlow, assert_nothing_left, batch_args, supervisor_metadata_ops, wait_for

pytestmark = [pytest.mark.bed, pytest.mark.timeout(300)]

STRACE_S = 30


def test_a_running_cluster_is_quiet_on_the_shared_filesystem_and_stops_at_once(work, prefect_api, bed):
    flow = BackgroundFlow(bed, batch_args(work / "w", "--keep-alive", "--slurm.nodes", "3"), work, prefect_api)
    try:
        info = flow.wait_ready()
        time.sleep(3)  # past the start's own writes (ports, temp-dir records)
        worker = next(n["node"] for n in info["nodes"] if n["node"] != info["head_node"])
        cluster_dir = str(work / "w" / "clusters" / info["cluster_id"])
        ops = supervisor_metadata_ops(bed, worker, cluster_dir, STRACE_S, work / "strace.txt")
        per_second = len(ops) / STRACE_S
        print(f"steady state: {len(ops)} metadata operations in {STRACE_S} s ({per_second:.2f}/s) on {worker}")
        assert per_second <= 0.2, ops
        assert ops and all(re.search(r"/heartbeat\"", line) for line in ops), ops
        flow.signal_group(signal.SIGINT)
        signalled = time.monotonic()
        wait_for(flow.exited, 15, "the flow's exit after Ctrl-C")
        gone = wait_for(lambda: not bed.live_jobs(name=info["cluster_id"])
                        and not bed.cluster_processes(info["cluster_id"]), 15, "the cluster's end")
        print(f"teardown: flow exited {time.monotonic() - signalled:.1f}s after Ctrl-C; cluster gone after {gone:.1f}s")
        assert "still RUNNING" not in flow.output and "cancelling it" not in flow.output, flow.output[-3000:]
        assert_nothing_left(bed, info["cluster_id"], work / "w")
    finally:
        flow.stop()
