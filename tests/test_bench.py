"""The benchmark's own parts that can break without a run: its templates fill in and are
valid bash, and its command line answers. (Its figures come from `make bench`, never a test.)"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from bench.benchmark import BARE_JOB, TEMPLATE_JOB, main

KEYS = dict(tag="arbench-x", nodes=3, mem=2560, dir="/tmp/x", env="export A=1", poller="true", tmp="/tmp/arbench",
            resources="--num-cpus=1", head_ports="--port=6379", ports="--min-worker-port=12000")


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
