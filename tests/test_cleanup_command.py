"""`python -m flows.ray_cluster cleanup CLUSTER_ID` (flows/commands/cleanup.py), in process, on
this machine: the flow's own teardown from the cluster's state file, else its cluster dir;
twice is fine; anything that is not this user's cluster is refused (exit 2) untouched.
tests/test_workflow_yaml.py runs it as workflow.yaml's cleanup step does."""

from __future__ import annotations

import json

import pytest

import tasks.cluster
from flows.cli import main
from tasks.schedulers import SlurmScheduler
from tasks.schedulers.base import JobPhase, JobState
from tasks.settings import RayClusterSettings
from tests.test_workflow_yaml import fake_cluster, new_cluster_id

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir(mode=0o700)
    monkeypatch.setattr(tasks.cluster, "RUNS_DIR", runs)
    return runs


def save_state(runs_dir, cluster_id: str, cluster_dir, work_dir, scheduler="none", job_id="", worker_jobs=(),
               over: dict | None = None):
    """A state file as save_cluster_state writes it (over: fields replaced, as a crafted one would)."""
    settings = RayClusterSettings(scheduler=scheduler, work_dir=str(work_dir)).model_dump(mode="json")
    state = {"flow_run_id": "", "cluster_id": cluster_id, "cluster_dir": str(cluster_dir), "job_id": job_id,
             "worker_jobs": list(worker_jobs), "settings": settings, **(over or {})}
    path = runs_dir / f"{cluster_id}.json"
    path.write_text(json.dumps(state))
    path.chmod(0o600)
    return path


def cleanup(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["cleanup", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("args", [["ar-1234"], ["../ar-" + "0" * 32], ["ar-" + "0" * 32, "--work-dir", "/tmp/$(id)"],
                                  ["ar-" + "0" * 32, "--host=-oProxyCommand=x"]],
                         ids=["short id", "id with a path", "work dir with shell", "host as an option"])
def test_malformed_input_is_refused_before_anything(capsys, runs_dir, args):
    rc, out, err = cleanup(capsys, *args)
    assert rc == 2 and "invalid input" in err and out == ""


def test_the_state_files_cluster_is_torn_down_and_a_second_run_finds_nothing(capsys, tmp_path, runs_dir):
    cluster_id = new_cluster_id()
    cluster_dir, node = fake_cluster(tmp_path / "work", tmp_path / "nt", cluster_id)
    state = save_state(runs_dir, cluster_id, cluster_dir, tmp_path / "work")
    try:
        rc, out, err = cleanup(capsys, cluster_id)  # where it runs: the state file's
        assert rc == 0, out + err
        assert f"tearing down cluster {cluster_id} (scheduler none, job none; from its state file)" in out
        assert node.wait(timeout=10) is not None, "the cluster's node survived"
        assert not cluster_dir.exists() and not state.exists()
        rc, out, err = cleanup(capsys, cluster_id, "--work-dir", str(tmp_path / "work"))
        assert rc == 0 and f"nothing left of cluster {cluster_id}" in out, out + err
    finally:
        if node.poll() is None:
            node.kill()


def test_the_jobs_are_cancelled_with_the_schedulers_own_cancel(capsys, tmp_path, runs_dir, monkeypatch):
    """From the cluster dir alone (no state file): the head job its job_id file names and the
    worker jobs of its worker_jobs/, each by SlurmScheduler.cancel; nothing else."""
    cancelled: list[str] = []

    async def state(self, target, job_id):
        return JobState(JobPhase.ended if job_id in cancelled else JobPhase.pending)

    async def cancel(self, target, job_id, cluster_dir=""):
        cancelled.append(job_id)

    monkeypatch.setattr(SlurmScheduler, "state", state)
    monkeypatch.setattr(SlurmScheduler, "cancel", cancel)
    cluster_id = new_cluster_id()
    cluster_dir, node = fake_cluster(tmp_path / "work", tmp_path / "nt", cluster_id, "slurm")
    (cluster_dir / "job_id").write_text("77\n")
    (cluster_dir / "worker_jobs").mkdir()
    for recorded in ("78", "79", "--all", "80;x"):  # only ids of slurm's own form are jobs
        (cluster_dir / "worker_jobs" / recorded).touch()
    try:
        rc, out, err = cleanup(capsys, cluster_id, "--work-dir", str(tmp_path / "work"))
        assert rc == 0, out + err
        assert sorted(cancelled) == ["77", "78", "79"]
        assert "from its cluster dir" in out and not cluster_dir.exists()
    finally:
        node.kill()


def crafted(runs_dir, tmp_path, cluster_id, cluster_dir, how: str):
    work = tmp_path / "work"
    if how == "not only yours to write":
        save_state(runs_dir, cluster_id, cluster_dir, work).chmod(0o622)
    elif how == "a link":
        elsewhere = save_state(runs_dir, cluster_id, cluster_dir, work)
        elsewhere.rename(tmp_path / "elsewhere.json")
        (runs_dir / f"{cluster_id}.json").symlink_to(tmp_path / "elsewhere.json")
    elif how == "another cluster's id":
        save_state(runs_dir, cluster_id, cluster_dir, work, over={"cluster_id": new_cluster_id()})
    elif how == "another dir":
        save_state(runs_dir, cluster_id, tmp_path / "elsewhere" / "clusters" / cluster_id, work)
    elif how == "job id as an option":
        save_state(runs_dir, cluster_id, cluster_dir, work, scheduler="slurm", job_id="--user=someone")
    elif how == "pbs id for slurm":
        save_state(runs_dir, cluster_id, cluster_dir, work, scheduler="slurm", job_id="12.server")
    elif how == "worker job with shell":
        save_state(runs_dir, cluster_id, cluster_dir, work, scheduler="slurm", job_id="12", worker_jobs=["13;rm -rf ~"])
    elif how == "unknown scheduler":
        path = save_state(runs_dir, cluster_id, cluster_dir, work)
        data = json.loads(path.read_text())
        data["settings"]["scheduler"] = "lsf"
        path.write_text(json.dumps(data))


CRAFTED = ["not only yours to write", "a link", "another cluster's id", "another dir", "job id as an option",
           "pbs id for slurm", "worker job with shell", "unknown scheduler"]


@pytest.mark.parametrize("how", CRAFTED)
def test_a_state_file_that_is_not_this_users_cluster_is_refused_untouched(capsys, tmp_path, runs_dir, how):
    cluster_id = new_cluster_id()
    cluster_dir, node = fake_cluster(tmp_path / "work", tmp_path / "nt", cluster_id)
    crafted(runs_dir, tmp_path, cluster_id, cluster_dir, how)
    try:
        rc, out, err = cleanup(capsys, cluster_id)
        assert rc == 2, out + err
        assert "not tearing down" in err and "tearing down cluster" not in out
        assert cluster_dir.exists() and node.poll() is None, "a refused state must not act"
        assert (runs_dir / f"{cluster_id}.json").is_symlink() or (runs_dir / f"{cluster_id}.json").exists()
    finally:
        node.kill()


def test_another_target_than_the_state_files_is_refused(capsys, tmp_path, runs_dir):
    cluster_id = new_cluster_id()
    cluster_dir, node = fake_cluster(tmp_path / "work", tmp_path / "nt", cluster_id)
    save_state(runs_dir, cluster_id, cluster_dir, tmp_path / "work")
    try:
        for args in (["--host", "alice@login1"], ["--work-dir", str(tmp_path / "other")]):
            rc, out, err = cleanup(capsys, cluster_id, *args)
            assert rc == 2 and "is not where" in err, out + err
        assert cluster_dir.exists() and node.poll() is None
    finally:
        node.kill()


def test_a_cluster_dir_that_is_not_a_dir_of_yours_is_refused(capsys, tmp_path, runs_dir):
    cluster_id = new_cluster_id()
    cluster_dir, node = fake_cluster(tmp_path / "real", tmp_path / "nt", cluster_id)
    (tmp_path / "work" / "clusters").mkdir(parents=True)
    (tmp_path / "work" / "clusters" / cluster_id).symlink_to(cluster_dir)
    try:
        rc, out, err = cleanup(capsys, cluster_id, "--work-dir", str(tmp_path / "work"))
        assert rc == 2 and "is not a dir of yours" in err, out + err
        assert cluster_dir.exists() and node.poll() is None
    finally:
        node.kill()
