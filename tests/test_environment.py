"""scripts/setup_ray.sh for real: reuse a Python that has the requested Ray with no
pip call at all, and fail clearly (leaving no half-built venv) when pip cannot help."""

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.logging import get_logger
from prefect.logging.configuration import setup_logging

from tasks.local_transport import LocalTransport
from tasks.transport import CommandError
from tests.conftest import REPO
from tests.procs import alive, all_pids, cmdline

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
    """An interpreter with another Ray is skipped; building 0.0.1, which the (local, offline)
    index does not have, fails with the installer's own words."""
    work = tmp_path / "work"
    (tmp_path / "links").mkdir()
    result = setup(work, sys.executable, version="0.0.1", env=offline_env(tmp_path, with_uv=False))
    assert result.returncode != 0
    assert "ray[default]==0.0.1" in result.stderr
    assert "No matching distribution" in result.stderr or "Could not find a version" in result.stderr
    leftovers = list((work / "venvs").iterdir()) if (work / "venvs").exists() else []
    assert leftovers == []


# --------------------------------------------------------------------------- building a venv, offline

def fake_ray_wheel(links: Path, version: str) -> Path:
    """A wheel named ray (with a `default` extra and a `ray` script) in a find-links dir:
    what setup_ray.sh installs, with no index and no network."""
    import base64
    import hashlib
    import zipfile

    links.mkdir(exist_ok=True)
    dist = f"ray-{version}.dist-info"
    files = {
        "ray/__init__.py": f"__version__ = {version!r}\ndef main():\n    print('fake ray {version}')\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: ray\nVersion: {version}\nProvides-Extra: default\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/entry_points.txt": "[console_scripts]\nray = ray:main\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    wheel = links / f"ray-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def offline_env(tmp_path: Path, *, with_uv: bool) -> dict:
    """Debian's python3.11 first on PATH, pip and uv told to use only a local links dir
    (the way a site's pip.conf would point at its mirror); uv on PATH or not."""
    path = "/usr/bin:/bin"
    if with_uv:
        uv_dir = tmp_path / "uv-bin"
        uv_dir.mkdir()
        (uv_dir / "uv").symlink_to(Path(sys.executable).parent / "uv")
        path = f"{uv_dir}:{path}"
    return {"PATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8", "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(tmp_path / "links"), "PIP_CONFIG_FILE": "/dev/null",
            "UV_CACHE_DIR": str(tmp_path / "uv-cache"), "XDG_CACHE_HOME": str(tmp_path / "cache")}


@pytest.mark.bed  # builds real venvs: seconds
def test_a_cold_venv_is_built_with_uv_bytecode_compiled(tmp_path):
    fake_ray_wheel(tmp_path / "links", "0.0.2")
    result = setup(tmp_path / "work", env=offline_env(tmp_path, with_uv=True), version="0.0.2")
    assert result.returncode == 0, result.stderr
    assert "with uv (" in result.stderr and "RAY_ENV_SOURCE=created" in result.stdout
    venv = tmp_path / "work" / "venvs" / "ray-0.0.2"
    assert f"RAY_BIN={venv}/bin/ray" in result.stdout
    assert subprocess.run([venv / "bin" / "ray"], capture_output=True, text=True).stdout == "fake ray 0.0.2\n"
    assert list(venv.glob("lib/python3.11/site-packages/ray/__pycache__/__init__.*.pyc")), "not bytecode compiled"
    again = setup(tmp_path / "work", env=offline_env(tmp_path, with_uv=False), version="0.0.2")
    assert "RAY_ENV_SOURCE=reused" in again.stdout, again.stderr


@pytest.mark.bed
def test_without_uv_pip_builds_the_venv_and_says_so(tmp_path):
    """No uv on PATH and none to be had from the index (the links dir has none): pip."""
    fake_ray_wheel(tmp_path / "links", "0.0.2")
    result = setup(tmp_path / "work", env=offline_env(tmp_path, with_uv=False), version="0.0.2")
    assert result.returncode == 0, result.stderr
    assert "with pip (no uv on this host)" in result.stderr and "RAY_ENV_SOURCE=created" in result.stdout
    assert not (tmp_path / "work" / "tools" / "uv").exists() and not (tmp_path / "work" / "tools" / "uv.part").exists()


@pytest.mark.bed
@pytest.mark.parametrize("with_uv", [True, False])
def test_two_builds_at_once_build_once_and_a_failed_build_leaves_nothing(tmp_path, with_uv):
    fake_ray_wheel(tmp_path / "links", "0.0.2")
    env = offline_env(tmp_path, with_uv=with_uv)
    runs = [subprocess.Popen(["bash", str(SETUP), "0.0.2", str(tmp_path / "work")], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outs
    sources = sorted(out.split("RAY_ENV_SOURCE=")[1].strip() for out, _ in outs)
    assert sources == ["created", "reused"], outs
    failed = setup(tmp_path / "work", env=env, version="0.0.3")  # not in the links dir
    assert failed.returncode != 0 and "0.0.3" in failed.stderr
    assert sorted(p.name for p in (tmp_path / "work" / "venvs").iterdir()) == ["ray-0.0.2"]


class _Lines(logging.Handler):
    """Collects what prefect-shell logs; `on_line` sees each record as it arrives."""

    def __init__(self, on_line=lambda text: None):
        super().__init__()
        self.texts: list[str] = []
        self.on_line = on_line

    def emit(self, record):
        self.texts.append(record.getMessage())
        self.on_line(record.getMessage())


def _run_logged(command: str, handler: logging.Handler, timeout: float = 30):
    """LocalTransport.run_logged outside a flow run: prefect-shell logs to its classes' loggers
    (in a run: to the run logger). Prefect's logging set up first: its first setup drops
    handlers added before it."""
    setup_logging()
    loggers = [get_logger("ShellOperation"), get_logger("ShellProcess")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        return asyncio.run(LocalTransport().run_logged(command, timeout=timeout))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_building_on_this_machine_streams_its_output_into_the_log_as_it_comes(tmp_path):
    """The command waits until its first line has been logged: only a streamed log lets it end."""
    seen = tmp_path / "seen"
    handler = _Lines(lambda text: "first line" in text and seen.touch())
    command = f"echo 'first line' >&2; until [ -e {seen} ]; do sleep 0.05; done; echo RAY_PYTHON=/x/python"
    result = _run_logged(command, handler, timeout=20)
    assert any("first line" in text for text in handler.texts)
    assert "RAY_PYTHON=/x/python" in result.stdout.splitlines()


def test_a_failed_build_on_this_machine_says_why_and_a_timed_out_one_leaves_no_process(tmp_path):
    with pytest.raises(CommandError, match="exit code 3") as failed:
        _run_logged("echo 'no matching distribution for ray' >&2; exit 3", _Lines())
    assert "no matching distribution for ray" in str(failed.value)
    marker = f"ar-test-{tmp_path.name}"
    with pytest.raises(TimeoutError):
        _run_logged(f"bash -c 'exec -a {marker} sleep 300' & sleep 300", _Lines(), timeout=1)
    def marked() -> list[int]:
        return [pid for pid in all_pids() if alive(pid) and marker in (cmdline(pid) or "")]

    deadline = time.monotonic() + 10
    while marked() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marked() == []
