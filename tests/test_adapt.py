"""The adaptive loop's decisions (tasks/scaling.py `Adapter`), one look at a time: a cluster
dir on this machine, a scheduler whose jobs are a dict, Ray's State API answers from a
table. The real thing (SLURM, Ray's demand) is tests/test_scaling.py on the bed."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from tasks.local_transport import LocalTransport
from tasks.scaling import Adapter, worker_jobs_for
from tasks.schedulers import JobPhase, JobState, Scheduler
from tasks.settings import RayClusterSettings


class QueueOfDicts(Scheduler):
    """Jobs are entries of a dict: submit adds one (pending), cancel ends it, and a running
    one ends once its node is asked to stop (nodes/wjob-<id>.remove), as worker_main.sh does."""

    name = "slurm"
    job_id_re = re.compile(r"^[0-9]{1,12}$")

    def __init__(self, cluster_dir: Path):
        super().__init__(RayClusterSettings(scheduler="slurm"))
        self.jobs: dict[str, JobPhase] = {}
        self.walltimes: dict[str, int | None] = {}
        self.cluster_dir = cluster_dir

    async def submit(self, target, cluster_dir, script="bin/job.sh", known=frozenset(), walltime=None) -> str:
        job_id = str(100 + len(self.jobs))
        self.jobs[job_id] = JobPhase.pending
        self.walltimes[job_id] = walltime
        return job_id

    @property
    def worker_walltime_seconds(self):
        return 3600  # the cluster's walltime, an hour

    async def state(self, target, job_id):
        if (self.cluster_dir / "nodes" / f"wjob-{job_id}.remove").exists():
            self.jobs[job_id] = JobPhase.ended
        return JobState(self.jobs.get(job_id, JobPhase.ended))

    async def cancel(self, target, job_id):
        self.jobs[job_id] = JobPhase.ended


class StateApi:
    """What Ray's State API answers: pending tasks with their resources, running tasks by node."""

    def __init__(self):
        self.pending: list[dict] = []
        self.running_on: set[str] = set()

    def handler(self, request: httpx.Request) -> httpx.Response:
        state = request.url.params.get("filter_values")
        if request.url.path == "/api/v0/tasks" and state == "PENDING_NODE_ASSIGNMENT":
            rows = [{"required_resources": r} for r in self.pending]
        elif request.url.path == "/api/v0/tasks":
            rows = [{"node_id": n} for n in self.running_on]
        else:
            rows = []
        return httpx.Response(200, json={"data": {"result": {"result": rows}}})


@pytest.fixture
def world(tmp_path):
    scheduler, api = QueueOfDicts(tmp_path), StateApi()
    (tmp_path / "nodes").mkdir()
    adapter = Adapter(LocalTransport(), scheduler, str(tmp_path), "1", low=0, high=2, idle_timeout=0.0, cooldown=0.0,
                      cpus_per_worker=2, gpus_per_worker=0, settle=0.0)
    client = httpx.AsyncClient(transport=httpx.MockTransport(api.handler), base_url="http://ray")
    return scheduler, api, adapter, client


def step(adapter, client, nodes=()):
    return asyncio.run(adapter.step(client, list(nodes)))


def worker_node(job_id: str) -> dict:
    return {"node_id": f"id-{job_id}", "node_name": f"wjob-{job_id}@node2"}


def test_demand_seen_twice_submits_what_meets_it_never_beyond_max(world):
    scheduler, api, adapter, client = world
    api.pending = [{"CPU": 2.0}] * 3  # 6 CPUs: 3 workers of 2 would meet it; max is 2
    assert step(adapter, client) == ""  # seen once: a task that waits a moment is no demand yet
    assert step(adapter, client) == "submitted 100, 101"
    assert step(adapter, client) == "", "nothing more while the first ones are on their way"
    scheduler.jobs = dict.fromkeys(scheduler.jobs, JobPhase.running)
    nodes = [worker_node("100"), worker_node("101")]
    for _ in range(3):
        assert step(adapter, client, nodes) == "", "at max: no more, however long the demand waits"


def test_demand_still_reported_after_a_worker_joined_is_looked_at_afresh(world):
    """Ray reports a task's state late: the task the new worker took still looks pending for
    a moment. A join starts the count again, so that no second job is submitted for it."""
    scheduler, api, adapter, client = world
    adapter.high = 5
    api.pending = [{"CPU": 2.0}]
    step(adapter, client)
    assert step(adapter, client) == "submitted 100"
    scheduler.jobs["100"] = JobPhase.running
    assert step(adapter, client, [worker_node("100")]) == "", "just joined: not yet unmet"
    assert step(adapter, client, [worker_node("100")]) == "submitted 101", "still waiting two looks later: unmet"


def test_an_idle_worker_job_is_released_and_a_busy_one_kept(world):
    scheduler, api, adapter, client = world
    api.pending = [{"CPU": 4.0}]
    step(adapter, client)
    assert step(adapter, client) == "submitted 100, 101"
    scheduler.jobs = dict.fromkeys(scheduler.jobs, JobPhase.running)
    api.pending, api.running_on = [], {"id-100"}
    nodes = [worker_node("100"), worker_node("101")]
    assert step(adapter, client, nodes) == "released 101"
    assert scheduler.jobs["101"] is JobPhase.ended and scheduler.jobs["100"] is JobPhase.running


def test_min_is_kept_and_cooldown_waits(world):
    scheduler, api, adapter, client = world
    adapter.low, adapter.cooldown = 1, 3600.0
    assert step(adapter, client) == "submitted 100"  # below min: at once, no demand needed
    api.pending = [{"CPU": 2.0}]
    for _ in range(3):
        assert step(adapter, client) == "", "within the cool-down nothing changes"


@pytest.mark.parametrize("demand, wanted", [({}, 0), ({"CPU": 1.0}, 1), ({"CPU": 5.0}, 3), ({"GPU": 3.0}, 2),
                                            ({"memory": 1e9}, 1)])
def test_worker_jobs_for_a_demand(demand, wanted):
    assert worker_jobs_for(demand, cpus_per_worker=2, gpus_per_worker=2) == wanted


def test_past_walltime_margin_the_loop_submits_nothing_and_ends(tmp_path):
    """The job is being stopped and the cluster torn down: no worker job is submitted then,
    even below min (it would wait in the queue for a cluster that is gone)."""
    import time

    from pydantic import SecretStr

    from tasks.cluster import ClusterPlan
    from tasks.scaling import adapt_worker_jobs

    scheduler = QueueOfDicts(tmp_path)
    settings = RayClusterSettings(scheduler="slurm", slurm={"walltime": "10"}, walltime_margin=60,
                                  scale={"adapt": "min=2,max=4"})
    plan = ClusterPlan("ar-x", str(tmp_path), settings, SecretStr("t"), job_id="1", deadline=int(time.time()) + 30)
    asyncio.run(asyncio.wait_for(adapt_worker_jobs(LocalTransport(), scheduler, plan, 1, None, every=0.01), 5))
    assert scheduler.jobs == {}


def test_a_worker_job_never_asks_for_more_than_the_allocation_has_left(tmp_path):
    """The adaptive loop's worker jobs end with the cluster's allocation: their walltime is the
    time left when that is less than their own (scale.worker_walltime, else the cluster's)."""
    import time

    from tasks.worker_jobs import worker_walltime

    scheduler = QueueOfDicts(tmp_path)  # the cluster's walltime: an hour
    (tmp_path / "nodes").mkdir()
    now = time.time()
    assert worker_walltime(scheduler, 0, now) is None  # no known end: the job's own
    assert worker_walltime(scheduler, int(now) + 7200, now) is None  # more left than its own hour
    assert worker_walltime(scheduler, int(now) + 600, now) in (599, 600)
    adapter = Adapter(LocalTransport(), scheduler, str(tmp_path), "1", low=1, high=2, idle_timeout=0.0, cooldown=0.0,
                      cpus_per_worker=2, gpus_per_worker=0, settle=0.0, ends_at=int(now) + 900)
    client = httpx.AsyncClient(transport=httpx.MockTransport(StateApi().handler), base_url="http://ray")
    step(adapter, client)
    assert list(scheduler.walltimes.values()) == [pytest.approx(900, abs=5)]
