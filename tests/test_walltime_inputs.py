"""walltime_margin, the deadline in head.env and what the driver is told (no bed)."""

from __future__ import annotations

import subprocess

import pytest
from pydantic import SecretStr, ValidationError

from flows.cli import EXIT_WALLTIME, main
from tasks.cluster import ClusterPlan
from tasks.failures import FailureReason, WalltimeReached, reason_of
from tasks.head_api import parse_head_env
from tasks.settings import RayClusterSettings
from tasks.user_job import walltime_grace, walltime_message, with_allocation_env

HEAD_ENV = "RAY_HEAD_NODE=n1\nRAY_HEAD_IP=10.0.0.1\nRAY_GCS_PORT=1\nRAY_DASHBOARD_PORT=2\nRAY_CLIENT_PORT=3\n"


def plan(deadline: int = 0, **values) -> ClusterPlan:
    settings = RayClusterSettings(scheduler="slurm", **values)
    return ClusterPlan("ar-x", "/w/clusters/ar-x", settings, SecretStr("t"), deadline=deadline)


def test_the_margin_must_be_smaller_than_the_walltime():
    with pytest.raises(ValidationError, match="walltime_margin=300s is not smaller than the slurm walltime"):
        RayClusterSettings(scheduler="slurm", slurm={"walltime": "5"})
    with pytest.raises(ValidationError, match="walltime_margin=120s is not smaller than the pbs walltime"):
        RayClusterSettings(scheduler="pbs", pbs={"walltime": "00:02:00"}, walltime_margin=120)
    assert RayClusterSettings(scheduler="pbs", pbs={"walltime": "00:02:00"}, walltime_margin=45).margin_seconds == 45
    assert RayClusterSettings().walltime_margin == 300  # no scheduler: no walltime to compare with


def test_the_command_line_says_the_margin_is_too_big(capsys):
    assert main(["--scheduler", "slurm", "--slurm.walltime", "2", "--walltime-margin", "200", "--dry-run"]) == 2
    assert "walltime_margin=200s is not smaller than the slurm walltime (120s)" in capsys.readouterr().err


def test_head_env_deadline():
    assert parse_head_env(HEAD_ENV).deadline == 0
    assert parse_head_env(HEAD_ENV + "RAY_DEADLINE=\n").deadline == 0
    assert parse_head_env(HEAD_ENV + "RAY_DEADLINE=1700000000\n").deadline == 1700000000


def test_the_driver_is_told_the_end_and_given_a_grace():
    env = with_allocation_env({"env_vars": {"MINE": "1"}, "pip": ["x"]}, plan(1700000000, walltime_margin=60))
    assert env["pip"] == ["x"]
    assert env["env_vars"] == {"MINE": "1", "ACTIVATE_RAY_ATTEMPT": "1", "ACTIVATE_RAY_DEADLINE": "1700000000",
                               "RAY_JOB_STOP_WAIT_TIME_S": "20"}
    # the user's own stop wait wins; no deadline: only the attempt
    env = with_allocation_env({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "5"}}, plan(1700000000))
    assert env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "5"
    assert with_allocation_env(None, plan()) == {"env_vars": {"ACTIVATE_RAY_ATTEMPT": "1"}}


def test_stop_time_and_grace():
    assert plan().stop_time is None
    assert plan(1000, walltime_margin=60).stop_time == 940
    assert walltime_grace(plan(1000, walltime_margin=300)) == 60
    assert walltime_grace(plan(1000, walltime_margin=45)) == 15


def test_walltime_reached_is_its_own_reason_and_exit_code():
    failure = WalltimeReached(walltime_message(plan(1700000000, walltime_margin=60), "the job stopped"))
    assert reason_of(failure) is FailureReason.walltime_reached
    assert FailureReason.walltime_reached.value == "walltime reached"
    assert str(failure).startswith("walltime reached: ") and "60s before it" in str(failure)
    assert EXIT_WALLTIME not in (0, 1, 2)


@pytest.mark.parametrize("walltime,expected", [("00:02:00", 1000 + 120), ("90", 1090), ("1:00:00", 4600)])
def test_pbs_job_deadline_from_qstat(tmp_path, walltime, expected):
    """ar_job_deadline (launch_workers_pbs.sh): qstat's stime + Resource_List.walltime."""
    qstat = tmp_path / "qstat"
    qstat.write_text("#!/bin/sh\nprintf '    stime = @1000\\n    Resource_List.walltime = %s\\n' " + walltime + "\n")
    qstat.chmod(0o755)
    out = subprocess.run(["bash", "-c", f'PATH={tmp_path}:$PATH; . scripts/launch_workers_pbs.sh; ar_job_deadline'],
                         capture_output=True, text=True, env={"PBS_JOBID": "1.x", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == str(expected), out


def test_slurm_job_deadline_from_its_end_time(tmp_path):
    squeue = tmp_path / "squeue"
    squeue.write_text("#!/bin/sh\necho 2030-01-02T03:04:05\n")
    squeue.chmod(0o755)
    run = lambda extra: subprocess.run(  # noqa: E731
        ["bash", "-c", f'PATH={tmp_path}:$PATH; . scripts/launch_workers_slurm.sh; ar_job_deadline'],
        capture_output=True, text=True, env={"SLURM_JOB_ID": "7", "PATH": "/usr/bin:/bin", "TZ": "UTC", **extra})
    assert run({}).stdout.strip() == "1893553445"
    assert run({"SLURM_JOB_END_TIME": "1893550000"}).stdout.strip() == "1893550000"
