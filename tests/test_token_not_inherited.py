"""The Ray token never reaches a command line or the environment a scheduler keeps with a
job: while the driver holds it in this process's environment (flows/ray_tasks.py), the
worker jobs adaptive scaling submits (tasks/scaling.py through the scheduler's submit)
run their sbatch/qsub through the real LocalTransport without it. The fake sbatch/qsub
here record the command line and the environment they were given, as the scheduler would
keep them (sbatch's default --export=ALL, qsub -V)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tasks.cluster import WORKER_JOB_SCRIPT
from tasks.local_transport import LocalTransport
from tests.scheduler_helpers import BASH, pbs, slurm

TOKEN = "0123456789abcdef" * 4
ANSWERS = {"sbatch": "4242", "qsub": "4242.pbs-server"}


@pytest.fixture
def recording_schedulers(tmp_path, monkeypatch) -> Path:
    """sbatch and qsub first on PATH, each writing its argv and environment beside it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program, job_id in ANSWERS.items():
        fake = bin_dir / program
        fake.write_text(f'#!{BASH}\nprintf "%s\\n" "$*" >"{tmp_path}/{program}.argv"\n'
                        f'env >"{tmp_path}/{program}.env"\necho {job_id}\n')
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)  # as ray_token_in_environment leaves it for the driver
    return tmp_path


@pytest.mark.parametrize("scheduler", [slurm, pbs], ids=["slurm", "pbs"])
def test_a_worker_job_submission_carries_no_token(recording_schedulers, scheduler):
    tmp_path = recording_schedulers
    cluster_dir = tmp_path / "ar-0123abcd"
    (cluster_dir / "bin").mkdir(parents=True)
    (cluster_dir / WORKER_JOB_SCRIPT).write_text("#!/usr/bin/env bash\n")
    chosen = scheduler()
    job_id = asyncio.run(chosen.submit(LocalTransport(), str(cluster_dir), WORKER_JOB_SCRIPT))
    program = chosen.submit_program
    assert job_id == ANSWERS[program]
    assert TOKEN not in (tmp_path / f"{program}.argv").read_text()
    environment = (tmp_path / f"{program}.env").read_text()
    assert TOKEN not in environment and "RAY_AUTH_TOKEN=" not in environment
    assert "PATH=" in environment  # the rest of the environment is still passed on
    assert os.environ["RAY_AUTH_TOKEN"] == TOKEN  # the driver's own is left as it was


def test_no_command_run_here_inherits_the_token(recording_schedulers):
    result = asyncio.run(LocalTransport().run('printf %s "${RAY_AUTH_TOKEN-unset}"; tr "\\0" "\\n" </proc/$$/environ'))
    assert result.stdout.startswith("unset") and TOKEN not in result.stdout
