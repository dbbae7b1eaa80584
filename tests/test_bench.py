"""The benchmark's own parts that can break without a run: its templates fill in and are
valid bash, every module of bench/ imports, and every command line answers. (Its figures come
from `make bench`, never a test.)"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys

import pytest

from bench.benchmark import main
from bench.slurm import BARE_JOB, TEMPLATE_JOB
from tests.helpers import REPO

KEYS = dict(tag="arbench-x", nodes=3, mem=2560, dir="/tmp/x", env="export A=1", poller="true", tmp="/tmp/arbench",
            resources="--num-cpus=1", head_ports="--port=6379", ports="--min-worker-port=12000", partition="debug")


@pytest.mark.parametrize("template", [TEMPLATE_JOB, BARE_JOB], ids=["ray-docs-template", "bare-parallel"])
def test_template_fills_in_as_valid_bash(template, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(template.format(**KEYS))
    checked = subprocess.run([shutil.which("bash") or "/bin/bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert "#SBATCH --nodes=3" in script.read_text()


def test_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "--sections" in capsys.readouterr().out


# every benchmark of bench/ runnable alone, and the whole (`python -m bench`, its __main__)
MODULES = ["benchmark", "common", "local", "openpbs", "report", "runner", "scale", "setup", "slurm"]
PROGRAMS = {"bench": "--sections", "bench.local": "--reps", "bench.setup": "--sections", "bench.slurm": "--nodes",
            "bench.openpbs": "--reps", "bench.scale": "--nodes"}


def test_every_module_is_listed():
    assert sorted(p.stem for p in (REPO / "bench").glob("*.py") if not p.stem.startswith("__")) == MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    assert importlib.import_module(f"bench.{name}").__doc__


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_program_help(program):
    done = subprocess.run([sys.executable, "-m", program, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {program} ") and PROGRAMS[program] in done.stdout
