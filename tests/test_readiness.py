"""The last check before the job begins, against an HTTP server on loopback that answers
/api/v0/nodes as Ray's dashboard does: a node lost since readiness makes a retryable
failure that names the nodes still alive, so the retry can exclude the lost one."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flows.ray_cluster import failed_nodes
from tasks.cluster import ClusterPlan
from tasks.failures import FailureReason
from tasks.readiness import ClusterFailed, confirm_nodes_alive
from tasks.settings import RayClusterSettings


def ray_node(name: str, state: str = "ALIVE") -> dict:
    return {"node_id": f"id-{name}", "node_name": name, "node_ip": f"10.200.0.{len(name)}", "state": state}


class Dashboard:
    """Serves the node list it is given; remembers the Authorization headers it saw."""

    def __init__(self, nodes: list[dict]):
        self.nodes, self.auth = nodes, []
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                dashboard.auth.append(self.headers.get("Authorization"))
                body = json.dumps({"data": {"result": {"result": dashboard.nodes}}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def plan(tmp_path):
    return ClusterPlan.new(RayClusterSettings(scheduler="slurm"), str(tmp_path))


def test_all_ready_nodes_alive_lets_the_job_begin(plan):
    ready = [ray_node("node1"), ray_node("node2")]
    dashboard = Dashboard(ready)
    try:
        asyncio.run(confirm_nodes_alive(plan, dashboard.port, ready))
    finally:
        dashboard.close()
    assert dashboard.auth == [f"Bearer {plan.token.get_secret_value()}"]  # token auth on the check too


def test_a_node_lost_before_the_job_is_a_retryable_failure_that_blames_it(plan):
    ready = [ray_node("node1"), ray_node("node2"), ray_node("node3")]
    dashboard = Dashboard([ready[0], ray_node("node2", "DEAD"), ready[2]])
    try:
        with pytest.raises(ClusterFailed, match="lost before the job began: node2") as failed:
            asyncio.run(confirm_nodes_alive(plan, dashboard.port, ready))
    finally:
        dashboard.close()
    assert failed.value.retryable and sorted(failed.value.joined) == ["node1", "node3"]

    class Allocation:  # what the scheduler reports allocated to the job
        async def allocated_nodes(self, target, job_id):
            return ["node1", "node2", "node3"]

    plan.job_id = "42"
    assert asyncio.run(failed_nodes(None, Allocation(), plan, failed.value)) == ["node2"]


@pytest.mark.parametrize(("message", "joined", "blamed"), [
    # a node's own words name it: only it, however many others had not joined yet
    ("failed to start: worker node4 on node4: Ray ended while starting, 3 times",
     ["node1", "node2"], ["node4"]),
    # nobody named, a few missing: those
    ("not ready after 300s: 14 of 16 nodes alive", [f"node{i}" for i in range(1, 15)], ["node15", "node16"]),
    # nobody named, most missing: a slow start, not 15 bad nodes (no 16-node job could run without them)
    ("not ready after 300s: 1 of 16 nodes alive", ["node1"], []),
    # node1 named is not node10..node16
    ("failed to start: worker node1 on node1: no address", ["node2"], ["node1"]),
])
def test_the_nodes_blamed_for_a_failed_start(plan, message, joined, blamed):
    class Allocation:
        async def allocated_nodes(self, target, job_id):
            return [f"node{i}" for i in range(1, 17)]

    plan.job_id = "42"
    failure = ClusterFailed(message, reason=FailureReason.start_failed, retryable=True, joined=joined)
    assert asyncio.run(failed_nodes(None, Allocation(), plan, failure)) == blamed


def test_a_retrys_job_refused_without_the_failed_nodes_says_which_and_why():
    from flows.ray_cluster import _said_with_the_excluded_nodes
    from tasks.schedulers import scheduler_for
    from tasks.schedulers.base import SchedulerRejected

    scheduler = scheduler_for(RayClusterSettings(scheduler="slurm"))
    refused = SchedulerRejected("sbatch refused the job: Requested node configuration is not available")
    assert _said_with_the_excluded_nodes(refused, scheduler, "worker node4 failed") is refused  # none left out
    scheduler.exclude_nodes += ["node4"]
    said = str(_said_with_the_excluded_nodes(refused, scheduler, "worker node4 on node4: Ray ended while starting"))
    assert "left out node4, which failed before: worker node4 on node4" in said and "not available" in said
    other = RuntimeError("boom")
    assert _said_with_the_excluded_nodes(other, scheduler, "x") is other
