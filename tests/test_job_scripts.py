"""What every scheduler's job script shares (tasks/schedulers/base.py): the directive block
first, the cluster env, the launcher and the common body sourced in order, quoting, refused
directives; and the golden job scripts in tests/golden/, one reviewed diff per change."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.schedulers import (
    DirectScheduler,
    PbsScheduler,
    SlurmScheduler,
    scheduler_for,
)
from tests.scheduler_helpers import (
    BASH,
    CLUSTER_DIR,
    CLUSTER_ID,
    assert_bash_syntax,
    directive_lines,
    render,
    settings,
)


@pytest.mark.parametrize("work_dir", ["/scratch/ar\n", "/scratch/%u/ray"])
def test_work_dir_that_would_break_directives_is_refused(work_dir):
    """A newline would split '#SBATCH --output=' in two (sbatch then ignores every later
    directive); '%' would be expanded by sbatch as a filename pattern."""
    with pytest.raises(ValidationError, match="work_dir"):
        settings(scheduler="slurm", work_dir=work_dir)


@pytest.mark.parametrize(("memory", "store", "mb"), [(1.0, None, 1024 + 512), (2.0, 0.5, 2048 + 512 + 512)])
def test_memory_is_requested_only_when_ray_memory_is_set(memory, store, mb):
    """--ray-memory-gb 1 alone asks for 1.5 GB (a 2000 MB node can give it), not heap + a default store."""
    kw = {"ray_memory_gb": memory, **({"object_store_memory_gb": store} if store else {})}
    assert f"--mem={mb}M" in directive_lines(render(settings(scheduler="slurm", **kw)), "#SBATCH")
    assert f"-l select=1:ncpus=1:mem={mb}mb" in directive_lines(render(settings(scheduler="pbs", **kw)), "#PBS")
    only_store = render(settings(scheduler="slurm", object_store_memory_gb=4))
    assert not any(line.startswith("--mem") for line in directive_lines(only_store, "#SBATCH"))


@pytest.mark.parametrize("scheduler,line", [
    ("slurm", "#SBATCH --output=/tmp/x"), ("slurm", "#SBATCH -so/tmp/x"), ("slurm", "#SBATCH --export=ALL"),
    ("slurm", "#SBATCH --array=1-4"), ("pbs", "#PBS -o /tmp/x"), ("pbs", "#PBS -V"), ("pbs", "#PBS -W stageout=a@b:c"),
])
def test_refused_directive_never_reaches_a_job_script(scheduler, line):
    with pytest.raises(ValidationError, match="is not allowed"):
        settings(scheduler=scheduler, **{scheduler: {"extra_directives": line}})


@pytest.mark.parametrize("cls", [SlurmScheduler, PbsScheduler, DirectScheduler])
def test_common_body(cls, tmp_path):
    s = settings(scheduler=cls.name if cls.name != "none" else "none")
    script = cls(s).render(CLUSTER_ID, CLUSTER_DIR)
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    env_at = lines.index('. "$AR_CLUSTER_DIR/cluster.env"')
    fn_at = lines.index(f'. "$AR_CLUSTER_DIR/bin/{cls.launch_script}"')
    main_at = lines.index('. "$AR_CLUSTER_DIR/bin/cluster_main.sh"')
    assert lines.index("set -euo pipefail") < env_at < fn_at < main_at == len(lines) - 1
    assert_bash_syntax(script, tmp_path)


@pytest.mark.parametrize("cls", [SlurmScheduler, PbsScheduler, DirectScheduler])
def test_cluster_dir_is_quoted(cls, tmp_path):
    # work_dir is validated, but the export quotes anyway: a path with odd (allowed) characters stays one word
    odd = "/scratch/a+b@c%d~e/clusters/ar-0123abcd"
    script = cls(settings()).render(CLUSTER_ID, odd)
    assert_bash_syntax(script, tmp_path)
    export = next(l for l in script.splitlines() if l.startswith("export AR_CLUSTER_DIR="))
    result = subprocess.run([BASH, "-c", f'{export}; printf %s "$AR_CLUSTER_DIR"'], check=False, capture_output=True, text=True)
    assert result.stdout == odd


GOLDEN = Path(__file__).parent / "golden"


GOLDEN_SETTINGS = {
    "slurm": dict(scheduler="slurm", num_cpus_per_node=8, num_gpus_per_node=1, ray_memory_gb=16,
                  slurm={"nodes": 4, "account": "proj-1", "partition": "gpu", "walltime": "02:00:00",
                         "extra_directives": "#SBATCH --constraint=a100"}),
    "pbs": dict(scheduler="pbs", num_cpus_per_node=8, pbs={"nodes": 3, "queue": "workq", "account": "proj-1"}),
    "direct": dict(direct_workers=2),
}


@pytest.mark.parametrize("name", GOLDEN_SETTINGS)
def test_job_script_is_the_reviewed_one(name):
    """A change to a generated job script shows as one diff of tests/golden/ (UPDATE_GOLDEN=1 rewrites them)."""
    s = settings(**GOLDEN_SETTINGS[name])
    script = scheduler_for(s).render(CLUSTER_ID, "/scratch/alice/activate-ray/clusters/" + CLUSTER_ID)
    golden = GOLDEN / f"job_{name}.sh"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(script)
    assert script == golden.read_text(), f"job script changed: review, then UPDATE_GOLDEN=1 pytest {__file__}"


# Worker jobs: CPU head job, GPU worker jobs of their own partition and walltime.
WORKER_GOLDEN_SETTINGS = {
    "slurm": dict(GOLDEN_SETTINGS["slurm"], num_gpus_per_node=0,
                  scale={"worker_partition": "gpu-short", "worker_walltime": "00:30:00", "worker_gpus": 2,
                         "worker_cpus": 16}),
    "pbs": dict(GOLDEN_SETTINGS["pbs"], scale={"worker_partition": "gpuq", "worker_gpus": 1}),
}


@pytest.mark.parametrize("name", WORKER_GOLDEN_SETTINGS)
def test_worker_job_script_is_the_reviewed_one(name):
    """The worker job script: one node, its own partition/queue, walltime, CPUs and GPUs, the
    cluster's name and account; its own sizes exported over the cluster's for its Ray node."""
    s = settings(**WORKER_GOLDEN_SETTINGS[name])
    script = scheduler_for(s).render_worker(CLUSTER_ID, "/scratch/alice/activate-ray/clusters/" + CLUSTER_ID)
    golden = GOLDEN / f"worker_job_{name}.sh"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text(), f"worker job script changed: review, then UPDATE_GOLDEN=1 pytest {__file__}"
    result = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("name", "job_id", "command"), [
    ("slurm", "123", "scancel --full --signal=28 123"),
    # WINCH: ignored by default, so the login shell OpenPBS runs the job script under lives
    ("pbs", "12.login.example.org", "command -v qsig >/dev/null && qsig -s WINCH 12.login.example.org"),
])
def test_a_running_job_is_told_to_look_now_through_its_scheduler(name, job_id, command):
    """The teardown's "look now" (WINCH) to a running job's supervisors, where the scheduler can
    send it; an id of another shape is never signalled."""
    scheduler = scheduler_for(settings(**GOLDEN_SETTINGS[name]))
    assert scheduler.wake_command(job_id) == command
    assert not scheduler.job_id_re.match("1; rm -rf ~")
