"""Session-wide real parts: one Prefect server, one site-like Slurm/PBS/SSH bed.

Every end-to-end test runs the product on the bed as its unprivileged user;
helpers for that live in tests/helpers.py."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.bed import TestBed, skip_or_fail
from tests.helpers import REPO, PrefectServer

PYTHON = sys.executable
__all__ = ["REPO", "PYTHON"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """The runner's own RAY_CLUSTER_* variables must not leak into the tests or the flows they start."""
    for name in list(os.environ):
        if name.upper().startswith("RAY_CLUSTER_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session", autouse=True)
def _own_default_server(tmp_path_factory):
    """A run with no server configured starts the user's default Prefect server (flows/user_server.py),
    which would outlive the session in this user's home: the tests' own is under the session's
    temp dir, and stopped at the end."""
    state = tmp_path_factory.mktemp("default-server")
    os.environ["AR_DEFAULT_SERVER_DIR"] = str(state)
    yield
    os.environ.pop("AR_DEFAULT_SERVER_DIR", None)
    if (state / "pid").exists():
        import subprocess

        subprocess.run([PYTHON, "-m", "flows.user_server", "stop"], cwd=REPO, timeout=60, capture_output=True,
                       env={**os.environ, "AR_DEFAULT_SERVER_DIR": str(state)})


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """A real Prefect server on loopback for every flow the tests run, started once."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-home")).start()
    os.environ["PREFECT_API_URL"] = server.url
    yield server.url
    os.environ.pop("PREFECT_API_URL", None)
    server.stop()


def bed_leftovers(bed: TestBed) -> list[str]:
    """Anything of ours still on the bed: the session-end check."""
    left = [f"process of {bed.user_name if uid == bed.user.uid else bed.other_name} on {host}: {pid} {cmd}"
            for host, pid, uid, cmd in bed.processes() if uid in (bed.user.uid, bed.other.uid)]
    left += [f"Ray process on {line}" for line in bed.ray_processes()]
    left += [f"temp dir {path}" for path in bed.temp_dirs("ar-*")]
    left += [f"job {line}" for line in bed.live_jobs()]
    for user in (bed.user, bed.other):
        runs = user.home / ".activate-ray" / "runs"
        left += [f"state file {path}" for path in runs.glob("*.json")] if runs.is_dir() else []
    return left


@pytest.fixture(scope="session")
def bed(prefect_api):
    """The site bed; the test Prefect server is relayed into its login namespace.

    At the end of the session nothing of ours may be left on any host: a leak
    that a test's own check missed fails the run here."""
    # 16 nodes in all: three in the default partition and queue, all in "wide" (the scale tests)
    testbed = TestBed(wide_nodes=int(os.environ.get("AR_BED_WIDE_NODES", "16")))
    skip_or_fail(testbed.requirements_missing())
    testbed.up()
    from tests.nsrelay import NamespaceRelay

    port = int(prefect_api.rsplit(":", 1)[1].split("/")[0])
    relay = NamespaceRelay(f"/run/netns/{testbed.netns[testbed.login_host]}", port, port)
    try:
        yield testbed
        deadline = time.monotonic() + 20
        while (left := bed_leftovers(testbed)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == [], "left on the bed at the end of the session:\n" + "\n".join(left)
    finally:
        relay.close()
        root = testbed.root
        testbed.down()
    # the bed's own teardown leaves nothing either
    assert testbed.leftovers(root) == []


@pytest.fixture(scope="session")
def openpbs(bed):
    """A real OpenPBS on the bed (server on login, a MoM per node), beside its Slurm: a test
    that takes it runs the product with ``openpbs.env()``. Nothing of ours may be left in
    its queue at the end of the session."""
    from tests.bed.openpbs import OpenPBS, openpbs_missing

    skip_or_fail(openpbs_missing())
    pbs = OpenPBS(bed)
    try:
        pbs.up()
        bed.openpbs = pbs
        yield pbs
        deadline = time.monotonic() + 20
        while (left := pbs.live_jobs()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == [], "left in OpenPBS's queue at the end of the session:\n" + "\n".join(left)
    finally:
        bed.openpbs = None
        pbs.down()


@pytest.fixture
def pbs_work(openpbs, work) -> Path:
    """work, on a bed whose OpenPBS nodes are all free."""
    openpbs.wait_nodes_free()
    return work


@pytest.fixture
def work(bed, request) -> Path:
    """A fresh dir of the bed user's on the shared filesystem (its home), removed afterwards;
    the test starts with every Slurm node idle."""
    bed.wait_nodes_idle()
    path = bed.home_dir(request.node.name)
    yield path
    import shutil

    from tests.helpers import stop_default_server

    stop_default_server(bed, path)  # a default server the test's runs started (default_server_env)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def no_backoff(monkeypatch):
    """Submissions retried at once: the backoff is the scheduler's, its length is not under test."""
    from tasks.schedulers import Scheduler

    monkeypatch.setattr(Scheduler, "submit_backoff", 0.0)
