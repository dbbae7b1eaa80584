"""A recorded process group is checked before any signal (ar_group_is_ours in
scripts/ray_lib.sh): an integer > 1, every process in it this user's, one of them this
cluster's. Run by bash on a cluster dir made here, with `kill` replaced by a recorder
that only passes on signals to the one group the test made for the cluster: a guard that
failed shows in the record and never reaches a real process (these tests may run as
root, where `kill -- -1` would reach every process of the machine)."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tasks.cluster import SCRIPTS_DIR
from tasks.local_transport import LocalTransport
from tasks.schedulers.direct import DirectScheduler
from tasks.settings import RayClusterSettings
from tests.scheduler_helpers import BASH

CLUSTER_ID = "ar-0badc0de"
TMP_NAME = "ar-0badc0de"

# `kill` as the library calls it, recorded; a real signal only to ALLOWED_GROUP (the test's own
# process of the cluster), never to anything else, whatever the guard decided
RECORDING_KILL = '''
kill() {
    printf '%s\\n' "$*" >>"$KILL_LOG"
    case " $* " in *" -- -$ALLOWED_GROUP "*) builtin kill "$@" ;; *) return 1 ;; esac
}
'''


def cluster_env(tmp_path: Path) -> dict:
    cluster = tmp_path / "cluster"
    (cluster / "nodes").mkdir(parents=True, exist_ok=True)
    (tmp_path / "node-tmp").mkdir(exist_ok=True)
    return {"PATH": os.environ["PATH"], "AR_CLUSTER_ID": CLUSTER_ID, "AR_CLUSTER_DIR": str(cluster),
            "AR_NODE_TMP": str(tmp_path / "node-tmp"), "AR_NODE_TMP_NAME": TMP_NAME,
            "KILL_LOG": str(tmp_path / "kill.log"), "ALLOWED_GROUP": "none"}


def run_lib(env: dict, script: str) -> subprocess.CompletedProcess:
    body = f'. "{SCRIPTS_DIR}/ray_lib.sh"\n{RECORDING_KILL}\n{script}\n'
    return subprocess.run([BASH, "-c", body], env=env, capture_output=True, text=True, timeout=60, check=False)


def signals_sent(env: dict) -> list[str]:
    """The kill calls that would signal (probes with -0 left out)."""
    log = Path(env["KILL_LOG"])
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if not line.startswith("-0 ")]


def sleeper(env: dict | None = None, naming: str = "", prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """A shell that sleeps in a session of its own (so its pid is its process group), as a
    node's `setsid` makes; `naming` on its command line."""
    argv = [*prefix, "sh", "-c", 'sleep 300; : "$0"', naming or "unnamed"]
    return subprocess.Popen(argv, env=env if env is not None else {"PATH": os.environ["PATH"]},
                            start_new_session=True)


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


@pytest.mark.parametrize("recorded", ["1", "0", "-5", "abc", "", "01", "1 2", "99999999999", "-1"])
def test_a_crafted_group_is_never_signalled(tmp_path, recorded):
    env = cluster_env(tmp_path)
    done = run_lib(env, f'ar_stop_group "{recorded}"; echo "rc=$?"')
    assert "rc=0" in done.stdout, done.stderr
    assert signals_sent(env) == []


def test_an_unrelated_process_of_this_user_is_never_signalled(tmp_path):
    env = cluster_env(tmp_path)
    unrelated = sleeper()  # neither the cluster's id in its environment nor its dirs on its command line
    try:
        done = run_lib(env, f'ar_stop_group {unrelated.pid}')
        assert signals_sent(env) == [], done.stderr
        assert unrelated.poll() is None
        assert "not this cluster's: not signalled" in done.stderr
    finally:
        stop(unrelated)


def test_another_cluster_of_this_user_is_never_signalled(tmp_path):
    env = cluster_env(tmp_path)
    other = sleeper({"PATH": os.environ["PATH"], "AR_CLUSTER_ID": "ar-0badc0de1"})  # a prefix is no match
    try:
        run_lib(env, f'ar_stop_group {other.pid}')
        assert signals_sent(env) == [] and other.poll() is None
    finally:
        stop(other)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to make another user's process")
def test_another_user_s_process_is_never_signalled_even_when_it_names_the_cluster(tmp_path):
    env = cluster_env(tmp_path)
    stranger_env = {"PATH": os.environ["PATH"], "AR_CLUSTER_ID": CLUSTER_ID}
    stranger = sleeper(stranger_env, env["AR_CLUSTER_DIR"] + "/x",
                       prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))
    try:
        run_lib(env, f'ar_stop_group {stranger.pid}')
        assert signals_sent(env) == [] and stranger.poll() is None
    finally:
        stop(stranger)


@pytest.mark.parametrize("how", ["environment", "command line"])
def test_a_group_of_this_cluster_is_stopped(tmp_path, how):
    env = cluster_env(tmp_path)
    if how == "environment":
        node = sleeper({"PATH": os.environ["PATH"], "AR_CLUSTER_ID": CLUSTER_ID})
    else:  # a container's cleaned environment: its command line names the node's temp dir
        node = sleeper(naming=f"{env['AR_NODE_TMP']}/{TMP_NAME}.Xy12ab/r")
    try:
        run_lib({**env, "ALLOWED_GROUP": str(node.pid)}, f'ar_stop_group {node.pid}')
        assert node.wait(10) == -signal.SIGTERM
        assert signals_sent(env)[0] == f"-TERM -- -{node.pid}"
    finally:
        stop(node)


def test_the_sweep_stops_only_the_recorded_group_of_this_cluster(tmp_path):
    """ar_stop_cluster_here over crafted nodes/*.pgid files and one real node of the cluster."""
    env = cluster_env(tmp_path)
    nodes = Path(env["AR_CLUSTER_DIR"]) / "nodes"
    here = socket.gethostname().split(".")[0]
    unrelated = sleeper()
    node = sleeper({"PATH": os.environ["PATH"], "AR_CLUSTER_ID": CLUSTER_ID})
    try:
        crafted = {"one": "1", "zero": "0", "negative": "-5", "word": "abc", "unrelated": str(unrelated.pid)}
        for name, pgid in {**crafted, "head": str(node.pid)}.items():
            (nodes / f"{name}.pgid").write_text(f"{here} {pgid}\n")
        done = run_lib({**env, "ALLOWED_GROUP": str(node.pid)}, "ar_stop_cluster_here")
        assert done.returncode == 0, done.stderr
        assert node.wait(10) == -signal.SIGTERM
        assert [line for line in signals_sent(env) if f"-{node.pid}" not in line] == []
        assert unrelated.poll() is None
    finally:
        stop(unrelated, node)


def direct_cluster(tmp_path: Path, allowed_group: str) -> tuple[Path, dict]:
    """A cluster dir as start_cluster leaves it for the no-scheduler case, its ray_lib.sh
    with the recording `kill` (the cancel's own `kill` is then the recorder too)."""
    env = cluster_env(tmp_path)
    cluster = Path(env["AR_CLUSTER_DIR"])
    (cluster / "bin").mkdir()
    (cluster / "bin" / "ray_lib.sh").write_text((SCRIPTS_DIR / "ray_lib.sh").read_text() + RECORDING_KILL)
    values = {**env, "ALLOWED_GROUP": allowed_group}
    (cluster / "cluster.env").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items()
                                                 if k != "PATH"))
    return cluster, env


@pytest.mark.parametrize("job_id", ["1", "0", "-1", "abc", "unrelated"])
def test_the_no_scheduler_cancel_signals_no_group_but_the_cluster_s(tmp_path, job_id):
    unrelated = sleeper()
    try:
        job_id = str(unrelated.pid) if job_id == "unrelated" else job_id
        cluster, env = direct_cluster(tmp_path, allowed_group="none")
        scheduler = DirectScheduler(RayClusterSettings())
        asyncio.run(scheduler.cancel(LocalTransport(), job_id, str(cluster)))
        assert signals_sent(env) == [] and unrelated.poll() is None
    finally:
        stop(unrelated)


def test_the_no_scheduler_cancel_stops_the_cluster_s_supervisor(tmp_path):
    env = cluster_env(tmp_path)
    supervisor = sleeper(naming=f"{env['AR_CLUSTER_DIR']}/bin/job.sh")  # as start_ray_ssh.sh starts it
    try:
        cluster, env = direct_cluster(tmp_path, allowed_group=str(supervisor.pid))
        scheduler = DirectScheduler(RayClusterSettings())
        asyncio.run(scheduler.cancel(LocalTransport(), str(supervisor.pid), str(cluster)))
        assert supervisor.wait(10) == -signal.SIGTERM
        # without the cluster's dir, no check can be made: nothing is signalled
        other = sleeper(naming=f"{env['AR_CLUSTER_DIR']}/bin/job.sh")
        asyncio.run(scheduler.cancel(LocalTransport(), str(other.pid)))
        assert other.poll() is None
        stop(other)
    finally:
        stop(supervisor)
