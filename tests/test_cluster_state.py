"""The runs state file the teardown hooks act on: what the flow writes is accepted;
a tampered one is reported and never acted on (no other dir removed, no other job cancelled)."""

from __future__ import annotations

import json
import logging

import pytest

import tasks.cluster as cluster
from tasks.cluster import (
    ClusterPlan,
    checked_cluster_state,
    load_cluster_states,
    save_cluster_state,
)
from tasks.settings import RayClusterSettings


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "RUNS_DIR", tmp_path / "runs")
    return tmp_path / "runs"


def saved(runs_dir, scheduler="slurm", job_id="1234", work_dir="~/.activate-ray", home="/home/u"):
    settings = RayClusterSettings(scheduler=scheduler, work_dir=work_dir)
    expanded = home + work_dir[1:] if work_dir.startswith("~") else work_dir
    plan = ClusterPlan.new(settings, expanded)
    plan.job_id = job_id
    return plan, save_cluster_state(plan, "run-1")


def test_what_the_flow_saves_is_accepted_and_private(runs_dir):
    plan, path = saved(runs_dir)
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(runs_dir.stat().st_mode & 0o777) == "0o700"
    (loaded,) = load_cluster_states("run-1")
    assert (loaded.cluster_id, loaded.cluster_dir, loaded.job_id) == (plan.cluster_id, plan.cluster_dir, "1234")
    assert len(plan.cluster_id) == 35  # ar- and 128 bits in hex
    assert load_cluster_states("another-run") == []


def test_an_absolute_work_dir_must_match_exactly(runs_dir):
    plan, path = saved(runs_dir, work_dir="/scratch/u/ar")
    assert checked_cluster_state(path, json.loads(path.read_text())).cluster_dir == plan.cluster_dir


TAMPERED = {
    "cluster dir elsewhere": lambda d: d.update(cluster_dir="/home/u/important"),
    "cluster dir of another cluster": lambda d: d.update(cluster_dir="/home/u/.activate-ray/clusters/ar-" + "0" * 32),
    "cluster dir with ..": lambda d: d.update(cluster_dir=d["cluster_dir"].replace("clusters/", "clusters/../../")),
    "cluster dir relative": lambda d: d.update(cluster_dir=d["cluster_dir"].lstrip("/")),
    "cluster dir with shell": lambda d: d.update(cluster_dir=d["cluster_dir"] + ";rm -rf ~"),
    "short cluster id": lambda d: d.update(cluster_id="ar-1234abcd"),
    "cluster id not a string": lambda d: d.update(cluster_id=["ar-" + "0" * 32]),
    "job id an option": lambda d: d.update(job_id="--user=me"),
    "job id negative": lambda d: d.update(job_id="-1"),
    "job id with shell": lambda d: d.update(job_id="1; rm -rf ~"),
    "pbs job id for slurm": lambda d: d.update(job_id="12.server"),
    "settings invalid": lambda d: d["settings"].update(work_dir="$(id)"),
}


@pytest.mark.parametrize("tamper", TAMPERED.values(), ids=TAMPERED.keys())
def test_a_tampered_state_file_is_reported_not_acted_on(runs_dir, tamper, caplog):
    _, path = saved(runs_dir)
    data = json.loads(path.read_text())
    tamper(data)
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.ERROR, logger="activate_ray"):
        assert load_cluster_states("run-1") == []
    assert "not tearing down from a state file that fails its checks" in caplog.text


def test_a_state_file_others_can_write_is_refused(runs_dir, caplog):
    _, path = saved(runs_dir)
    path.chmod(0o622)
    with caplog.at_level(logging.ERROR, logger="activate_ray"):
        assert load_cluster_states("run-1") == []
    assert "only you can write" in caplog.text


def test_a_state_file_renamed_to_another_cluster_is_refused(runs_dir):
    _, path = saved(runs_dir)
    other = path.with_name("ar-" + "f" * 32 + ".json")
    path.rename(other)
    assert load_cluster_states("run-1") == []


def test_the_crash_and_cancel_hook_tears_down_what_the_run_saved(runs_dir, tmp_path, monkeypatch):
    """on_crashed / on_cancellation: from the saved state alone (the flow process is gone),
    the cluster's dir is removed and its state forgotten; another run's cluster is left."""
    import asyncio
    from types import SimpleNamespace

    from flows.ray_cluster import teardown_saved_clusters

    # the torn-down event outside a flow run would start Prefect's temporary server (15 s); events: test_prefect_deploy
    monkeypatch.setattr(cluster, "emit_cluster_event", lambda *args, **kwargs: None)
    work_dir = tmp_path / "w"
    ours, _ = saved(runs_dir, scheduler="none", job_id="", work_dir=str(work_dir))
    other = ClusterPlan.new(RayClusterSettings(work_dir=str(work_dir)), str(work_dir))
    save_cluster_state(other, "run-2")
    for plan in (ours, other):
        (work_dir / "clusters" / plan.cluster_id).mkdir(parents=True)
    asyncio.run(teardown_saved_clusters(None, SimpleNamespace(id="run-1"), SimpleNamespace(name="Crashed")))
    assert not (work_dir / "clusters" / ours.cluster_id).exists()
    assert not (runs_dir / f"{ours.cluster_id}.json").exists()
    assert (work_dir / "clusters" / other.cluster_id).exists() and (runs_dir / f"{other.cluster_id}.json").exists()
