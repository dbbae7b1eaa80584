"""continue_after_walltime without the bed: the input's validation, the successor's submit
command (a dependency afterany on the job before it), the run's loop over allocations (which
cluster is torn down when, in which order) and what the state, the hooks and the driver see."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from pydantic import SecretStr, ValidationError

import flows.ray_cluster as flows_module
import tasks.cluster
from flows.cli import main
from tasks.cluster import ClusterPlan, load_cluster_states, save_cluster_state
from tasks.failures import FailureReason, WalltimeReached
from tasks.readiness import ClusterFailed
from tasks.schedulers import PbsScheduler, SlurmScheduler
from tasks.settings import MAX_SUCCESSOR_ALLOCATIONS, RayClusterSettings
from tasks.transport import CommandResult
from tasks.user_job import UserJobFailed, with_allocation_env

DIR = "/home/alice/.activate-ray/clusters/ar-0123abcd"


# --- the input -------------------------------------------------------------------------------

def test_the_default_is_no_successor_and_a_scheduler_takes_them():
    assert RayClusterSettings().continue_after_walltime == 0
    assert RayClusterSettings(scheduler="slurm", continue_after_walltime=3).continue_after_walltime == 3
    assert RayClusterSettings(scheduler="pbs", continue_after_walltime=MAX_SUCCESSOR_ALLOCATIONS).cluster.continue_after_walltime \
        == MAX_SUCCESSOR_ALLOCATIONS


@pytest.mark.parametrize("value", [-1, MAX_SUCCESSOR_ALLOCATIONS + 1])
def test_out_of_range_is_refused(value):
    with pytest.raises(ValidationError, match="continue_after_walltime"):
        RayClusterSettings(scheduler="slurm", continue_after_walltime=value)


def test_without_a_scheduler_successors_are_refused_with_the_reason():
    with pytest.raises(ValidationError, match="continue_after_walltime=1 needs a scheduler"):
        RayClusterSettings(continue_after_walltime=1)
    assert RayClusterSettings(continue_after_walltime=0).continue_after_walltime == 0


def test_the_command_line_says_it(capsys):
    assert main(["--continue-after-walltime", "2", "--dry-run"]) == 2
    assert "continue_after_walltime=2 needs a scheduler (slurm or pbs)" in capsys.readouterr().err
    assert main(["--scheduler", "slurm", "--continue-after-walltime", "2", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "# 4b. continue_after_walltime=2: 2 successor allocation(s)" in plan
    assert "'--dependency=afterany:<job id before>'" in plan


# --- the successor's submission --------------------------------------------------------------

def test_slurm_successor_waits_for_the_job_before_it():
    slurm = SlurmScheduler(RayClusterSettings(scheduler="slurm"))
    assert slurm.submit_command(DIR) == f"cd {DIR} && sbatch --parsable bin/job.sh"
    assert slurm.submit_command(DIR, after="4711") == f"cd {DIR} && sbatch --parsable --dependency=afterany:4711 bin/job.sh"
    assert slurm.dependency_option("4711") == ["--dependency=afterany:4711"]


def test_pbs_successor_waits_for_the_job_before_it_with_openpbs_and_torque():
    pbs = PbsScheduler(RayClusterSettings(scheduler="pbs"))
    command = pbs.submit_command(DIR, after="12.login")
    assert command == (f"cd {DIR} && if qstat --version 2>/dev/null | grep -q '^pbs_version'; "
                       "then qsub -f -W depend=afterany:12.login bin/job.sh; "
                       "else qsub -W depend=afterany:12.login bin/job.sh; fi")
    assert "depend" not in pbs.submit_command(DIR)


@pytest.mark.parametrize("scheduler,bad", [(SlurmScheduler, "12;rm -rf ~"), (SlurmScheduler, "12.login"),
                                           (PbsScheduler, "-W x"), (PbsScheduler, "1 2")])
def test_a_job_id_not_of_the_schedulers_form_never_reaches_the_command(scheduler, bad):
    with pytest.raises(ValueError, match="is not a"):
        scheduler(RayClusterSettings(scheduler=scheduler.name)).submit_command(DIR, after=bad)


# --- what the driver, the hooks and the cleanup see --------------------------------------------

def test_the_driver_is_told_its_allocation_and_it_is_ours():
    settings = RayClusterSettings(scheduler="slurm", continue_after_walltime=2)
    plan = ClusterPlan("ar-x", "/w/clusters/ar-x", settings, SecretStr("t"), allocation=3)
    env = with_allocation_env({"env_vars": {"ACTIVATE_RAY_ATTEMPT": "9", "MINE": "1"}}, plan)
    assert env["env_vars"] == {"ACTIVATE_RAY_ATTEMPT": "3", "MINE": "1"}


def test_the_hooks_tear_down_the_last_allocation_first(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks.cluster, "RUNS_DIR", tmp_path / "runs")
    settings = RayClusterSettings(scheduler="slurm", continue_after_walltime=2, work_dir="/w")
    for allocation in (1, 3, 2):
        plan = ClusterPlan.new(settings, "/w", allocation=allocation)
        plan.job_id = str(100 + allocation)
        save_cluster_state(plan, "run-1")
    assert [plan.allocation for plan in load_cluster_states("run-1")] == [3, 2, 1]
    assert [plan.job_id for plan in load_cluster_states("run-1")] == ["103", "102", "101"]


# --- the run's loop over allocations -----------------------------------------------------------

@dataclass
class Info:
    cluster_id: str
    allocation: int


class FakeTarget:
    label = "fake"

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def run(self, command, check=True, timeout=None):
        return CommandResult(0, "", "")

    async def query(self, command):
        return CommandResult(1, "", "")


class Run:
    """run_cluster with every step that reaches a target replaced: each allocation's cluster
    ends as `outcomes` says (an exception raised by its job, or finished)."""

    def __init__(self, monkeypatch, tmp_path, outcomes: list, refuse_queued: bool = False, **settings):
        self.outcomes, self.events, self.ends, self.states = list(outcomes), [], None, []
        self.settings = RayClusterSettings(scheduler="slurm", state_file=str(tmp_path / "ray-cluster.state"), **settings)
        self.state_file = tmp_path / "ray-cluster.state"
        monkeypatch.setattr(tasks.cluster, "RUNS_DIR", tmp_path / "runs")
        jobs = iter(range(101, 200))

        async def nothing(*args, **kwargs):
            return None

        async def open_target(settings):
            return FakeTarget()

        async def work_dir(target, settings):
            return "/w"

        async def start_cluster(target, scheduler, plan, after=""):
            if refuse_queued and after:
                self.events.append(("refused", plan.allocation, after))
                raise RuntimeError("sbatch: error: QOSMaxSubmitJobPerUserLimit")
            plan.job_id = str(next(jobs))
            self.events.append(("submit", plan.allocation, plan.job_id, after))
            return plan.job_id

        async def teardown_cluster(target, scheduler, plan):
            self.events.append(("teardown", plan.allocation, plan.job_id))

        async def beat(target, plan):
            await asyncio.sleep(3600)

        async def wait_until_ready(target, scheduler, plan):
            return object()

        async def publish_connection_info(target, scheduler, plan, ready):
            return Info(plan.cluster_id, plan.allocation)

        async def hold(target, scheduler, plan, ready, background):
            self.states.append(self.state_file.read_text())
            self.events.append(("job", plan.allocation, with_allocation_env(None, plan)["env_vars"]["ACTIVATE_RAY_ATTEMPT"]))
            outcome = self.outcomes.pop(0)
            if outcome is not None:
                raise outcome

        async def report_allocations(ends, allocations):
            self.ends = [(end.allocation, end.job_id, end.ended) for end in ends]

        for name, fake in {"open_target": open_target, "target_work_dir": work_dir, "start_cluster": start_cluster,
                           "teardown_cluster": teardown_cluster, "beat": beat, "wait_until_ready": wait_until_ready,
                           "publish_connection_info": publish_connection_info, "_run_job_or_hold": hold,
                           "report_allocations": report_allocations, "refuse_what_fails_the_fast_checks": nothing,
                           "make_private_work_dir": nothing, "prepare_environment": nothing,
                           "prune_old_logs": nothing, "publish_environment": nothing, "report_failure": nothing,
                           "create_markdown_artifact": nothing}.items():
            monkeypatch.setattr(flows_module, name, fake)

    def __call__(self):
        return asyncio.run(flows_module.run_cluster(self.settings))


def walltime() -> WalltimeReached:
    return WalltimeReached("walltime reached: the allocation of job 1 ends ...")


def test_after_the_walltime_the_next_allocation_runs_the_job_and_the_rest_is_cancelled(monkeypatch, tmp_path):
    run = Run(monkeypatch, tmp_path, [walltime(), None], continue_after_walltime=2)
    result = run()
    assert result["allocation"] == 2
    assert run.events == [
        ("submit", 1, "101", ""), ("submit", 2, "102", "101"), ("submit", 3, "103", "102"),  # queued at once
        ("job", 1, "1"),
        ("teardown", 1, "101"),  # the walltime: only this one; its end releases job 102
        ("job", 2, "2"),  # the queued job, not submitted again
        ("teardown", 3, "103"),  # the job finished: the successor left cancelled before its job ends
        ("teardown", 2, "102"),
    ]
    assert run.ends == [(1, "101", "walltime reached"), (2, "102", "finished")]
    # the state file named the run's cluster and its queued successors, in order
    assert [line for line in run.states[0].splitlines() if line.startswith("job_id=")] == \
        ["job_id=101", "job_id=102", "job_id=103"]
    assert [line for line in run.states[1].splitlines() if line.startswith("job_id=")] == ["job_id=102", "job_id=103"]


def test_the_last_allocation_at_its_walltime_ends_the_run_walltime_reached(monkeypatch, tmp_path):
    run = Run(monkeypatch, tmp_path, [walltime(), walltime()], continue_after_walltime=1)
    with pytest.raises(WalltimeReached):
        run()
    assert [e for e in run.events if e[0] != "job"] == [
        ("submit", 1, "101", ""), ("submit", 2, "102", "101"), ("teardown", 1, "101"), ("teardown", 2, "102")]
    assert run.ends == [(1, "101", "walltime reached"), (2, "102", "walltime reached")]


def test_a_failing_job_cancels_every_successor_the_last_first(monkeypatch, tmp_path):
    run = Run(monkeypatch, tmp_path, [UserJobFailed("Ray job x FAILED")], continue_after_walltime=2)
    with pytest.raises(UserJobFailed):
        run()
    assert [e for e in run.events if e[0] == "teardown"] == [("teardown", 3, "103"), ("teardown", 2, "102"),
                                                             ("teardown", 1, "101")]
    assert run.ends == [(1, "101", FailureReason.user_job_failed.value)]


def test_a_retry_queues_the_successors_again_behind_its_own_job(monkeypatch, tmp_path):
    failed = ClusterFailed("node never joined", reason=FailureReason.start_failed, retryable=True)
    run = Run(monkeypatch, tmp_path, [failed, None], continue_after_walltime=1, retries=1)
    run()
    assert [e for e in run.events if e[0] != "job"] == [
        ("submit", 1, "101", ""), ("submit", 2, "102", "101"),
        ("teardown", 2, "102"), ("teardown", 1, "101"),  # the failed cluster and its successor
        ("submit", 1, "103", ""), ("submit", 2, "104", "103"),  # the retry: allocation 1 again
        ("teardown", 2, "104"), ("teardown", 1, "103"),
    ]
    assert run.ends == [(1, "101", "start failed: retried"), (1, "103", "finished")]


def test_without_successors_nothing_more_is_submitted(monkeypatch, tmp_path):
    run = Run(monkeypatch, tmp_path, [walltime()])
    with pytest.raises(WalltimeReached):
        run()
    assert [e for e in run.events if e[0] != "job"] == [("submit", 1, "101", ""), ("teardown", 1, "101")]
    assert run.ends is None  # no allocations artifact for a run without successors
    assert run.states[0].count("cluster_id=") == 1


def test_a_cancelled_run_cancels_every_successor_before_its_cluster(monkeypatch, tmp_path):
    run = Run(monkeypatch, tmp_path, [asyncio.CancelledError()], continue_after_walltime=2)
    with pytest.raises(asyncio.CancelledError):
        run()
    assert [e for e in run.events if e[0] == "teardown"] == [("teardown", 3, "103"), ("teardown", 2, "102"),
                                                             ("teardown", 1, "101")]


def test_a_successor_the_scheduler_would_not_queue_early_is_submitted_at_the_walltime(monkeypatch, tmp_path):
    """A site that allows one queued job per user refuses the early successor: the run goes on
    all the same, the next allocation submitted once the first reached its walltime."""
    run = Run(monkeypatch, tmp_path, [walltime(), None], refuse_queued=True, continue_after_walltime=1)
    result = run()
    assert result["allocation"] == 2
    assert run.events == [
        ("submit", 1, "101", ""), ("refused", 2, "101"), ("teardown", 2, ""),
        ("job", 1, "1"), ("teardown", 1, "101"),
        ("submit", 2, "102", ""),  # now: the first job is gone, nothing to wait for
        ("job", 2, "2"), ("teardown", 2, "102"),
    ]
    assert run.ends == [(1, "101", "walltime reached"), (2, "102", "finished")]


def test_a_refused_successor_is_tried_again_only_while_allocations_are_left(monkeypatch, tmp_path):
    run = Run(monkeypatch, tmp_path, [walltime(), walltime()], refuse_queued=True, continue_after_walltime=1)
    with pytest.raises(WalltimeReached):
        run()
    assert [e for e in run.events if e[0] == "submit"] == [("submit", 1, "101", ""), ("submit", 2, "102", "")]
    assert run.ends == [(1, "101", "walltime reached"), (2, "102", "walltime reached")]
