"""scripts/setup_ray.sh for real: reuse a Python that has the requested Ray with no
pip call at all, and fail clearly (leaving no half-built venv) when pip cannot help."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

SETUP = REPO / "scripts" / "setup_ray.sh"
RAY_VERSION = "2.60.0"


def pip_shim(tmp_path: Path) -> tuple[dict, Path]:
    """A PATH where `pip`/`pip3` only record that they were called."""
    shims, calls = tmp_path / "shims", tmp_path / "pip-calls"
    shims.mkdir()
    for name in ("pip", "pip3"):
        (shims / name).write_text(f"#!/bin/sh\necho \"$0 $*\" >> {calls}\nexit 1\n")
        (shims / name).chmod(0o755)
    return {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}"}, calls


def setup(work: Path, *candidates: str, env=None, version=RAY_VERSION):
    return subprocess.run(["bash", str(SETUP), version, str(work), *candidates], capture_output=True, text=True,
                          env=env, timeout=600)


def test_reuses_the_given_interpreter_without_pip_in_under_a_second(tmp_path):
    env, calls = pip_shim(tmp_path)
    start = time.monotonic()
    result = setup(tmp_path / "work", sys.executable, env=env)
    took = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert f"RAY_PYTHON={sys.executable}" in result.stdout and "RAY_ENV_SOURCE=reused" in result.stdout
    assert not calls.exists(), "pip must not be called when the right Ray is there"
    assert took < 1.0, f"warm setup took {took:.2f}s"


def test_accepts_a_venv_directory_and_the_venv_an_earlier_run_made(tmp_path):
    env, calls = pip_shim(tmp_path)
    venv_dir = str(Path(sys.executable).parent.parent)
    assert "RAY_ENV_SOURCE=reused" in setup(tmp_path / "w1", venv_dir, env=env).stdout
    work = tmp_path / "w2"
    (work / "venvs").mkdir(parents=True)
    (work / "venvs" / f"ray-{RAY_VERSION}").symlink_to(venv_dir)  # "built by an earlier run"
    result = setup(work, env=env)
    assert result.returncode == 0, result.stderr
    assert f"RAY_PYTHON={work}/venvs/ray-{RAY_VERSION}/bin/python" in result.stdout
    assert not calls.exists()


@pytest.mark.bed  # a real process or server: seconds, not milliseconds
def test_wrong_version_interpreter_is_not_reused_and_a_failed_build_leaves_nothing(tmp_path):
    """An interpreter with another Ray is skipped; building 0.0.1 fails with pip's own words."""
    work = tmp_path / "work"
    result = setup(work, sys.executable, version="0.0.1")
    assert result.returncode != 0
    assert "ray[default]==0.0.1" in result.stderr
    assert "No matching distribution" in result.stderr or "Could not find a version" in result.stderr
    leftovers = list((work / "venvs").iterdir()) if (work / "venvs").exists() else []
    assert leftovers == []
