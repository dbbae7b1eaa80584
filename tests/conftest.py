"""Session-wide real parts: one Prefect server, one loopback sshd, one Slurm/PBS bed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bed import TestBed, skip_or_fail
from tests.sshd import LoopbackSshd

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RAY_PROCESS_PATTERN = "raylet|gcs_server|ray/dashboard|ray::|default_worker.py"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """The runner's own RAY_CLUSTER_* variables must not leak into the tests or the flows they start."""
    for name in list(os.environ):
        if name.upper().startswith("RAY_CLUSTER_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """A real Prefect server on loopback for every flow the tests run, started once."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_HOST": "127.0.0.1"}
    from tests.sshd import free_port

    port = free_port()
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(PYTHON).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError((home / "server.log").read_text()[-3000:])
        time.sleep(0.3)
    else:
        raise RuntimeError("prefect server did not start")
    os.environ["PREFECT_API_URL"] = url
    yield url
    os.environ.pop("PREFECT_API_URL", None)
    os.killpg(server.pid, 15)
    server.wait(30)


@pytest.fixture(scope="session")
def loopback_sshd():
    skip_or_fail(LoopbackSshd.missing())
    sshd = LoopbackSshd().start()
    yield sshd
    sshd.stop()


@pytest.fixture(scope="session")
def bed(prefect_api):
    """The Slurm/PBS bed; the test Prefect server is relayed into its login namespace."""
    testbed = TestBed()
    skip_or_fail(testbed.requirements_missing())
    testbed.up()
    from tests.nsrelay import NamespaceRelay

    port = int(prefect_api.rsplit(":", 1)[1].split("/")[0])
    relay = NamespaceRelay(f"/run/netns/{testbed.netns[testbed.login_host]}", port, port)
    yield testbed
    relay.close()
    testbed.down()


@dataclass
class FlowRun:
    returncode: int
    output: str
    info: dict | None


def run_flow(args: list[str], *, tmp: Path, api: str, wrap=None, timeout: int = 300,
             env: dict | None = None) -> FlowRun:
    """Run `python -m flows.ray_cluster` for real, as a user would."""
    info_file = tmp / "info.json"
    command = [PYTHON, "-m", "flows.ray_cluster", "--info-file", str(info_file), *args]
    full_env = {**os.environ, "PREFECT_API_URL": api, **(env or {})}
    result = subprocess.run(
        wrap(command) if wrap else command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    (tmp / "flow.log").write_text(output)
    info = json.loads(info_file.read_text()) if info_file.exists() else None
    return FlowRun(result.returncode, output, info)


def ray_processes(pattern: str = RAY_PROCESS_PATTERN) -> list[str]:
    result = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if "pgrep" not in line and "pytest" not in line]


def assert_nothing_left(work_dir: Path, node_tmp: str = "/tmp", cluster_id: str | None = None) -> None:
    """No Ray process, no cluster dir, no node temp dir of ours remains."""
    deadline = time.monotonic() + 15
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_processes() == [], "Ray processes left behind"
    clusters = work_dir / "clusters"
    assert not clusters.exists() or list(clusters.iterdir()) == [], f"cluster dirs left: {list(clusters.iterdir())}"
    pattern = f"{cluster_id}-*" if cluster_id else "ar-*"
    leftovers = [p for p in Path(node_tmp).glob(pattern) if p.is_dir() and not p.name.startswith(("ar-bed", "ar-sshd"))]
    assert leftovers == [], f"temp dirs left: {leftovers}"
    assert not (Path.home() / ".ray" / "auth_token").exists(), "a stray ~/.ray/auth_token would turn auth on for others"


def live_jobs(bed) -> list[str]:
    """Jobs still pending, running or completing (ended ones linger in squeue for MinJobAge)."""
    result = bed.run_login(["squeue", "-h", "-a", "-o", "%i %T"], timeout=30)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.strip()]


def batch_args(bed, work, *extra, scheduler: str = "slurm", readiness: int = 120) -> list[str]:
    """Flow arguments for a SLURM or PBS cluster on the bed: small nodes, the bed's SSH material."""
    return [
        "--scheduler", scheduler, "--ssh-key-file", str(bed.ssh_key), "--known-hosts", str(bed.known_hosts),
        "--work-dir", str(work), f"--{scheduler}.walltime", "00:10:00", "--readiness-timeout", str(readiness),
        "--ray-memory-gb", "0.5", "--object-store-memory-gb", "0.25", *extra,
    ]
