"""The command line is a thin layer over the flow: from its `main` to `bring_up`, at most six
of our own frames (frames that only forward are folded). Measured on a real call through the
command line: bring_up's first step fails, and the traceback `main` raises is walked for the
frames whose code is in flows/ or tasks/."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from tests.helpers import REPO

MAX_OWN_FRAMES = 6
OUR_DIRS = (REPO / "flows", REPO / "tasks")


class ReachedBringUp(BaseException):
    """Not an Exception: no handler of ours turns it into an exit code, so main raises it
    with the whole way down in its traceback."""


def our_frames_down_to(name: str, tb) -> list[str]:
    """The names of our frames in the traceback, from the outermost to the first `name`."""
    ours = [frame.f_code.co_name for frame, _ in traceback.walk_tb(tb)
            if any(Path(frame.f_code.co_filename).resolve().is_relative_to(d) for d in OUR_DIRS)]
    assert name in ours, ours
    return ours[: ours.index(name) + 1]


def test_the_command_line_reaches_bring_up_within_six_of_our_frames(monkeypatch, tmp_path):
    import flows.cli as cli
    import flows.ray_cluster as flows_module
    import tasks.cluster

    async def first_step_of_bring_up(*args, **kwargs):
        raise ReachedBringUp()

    async def nothing(*args, **kwargs):
        return None

    monkeypatch.setattr(flows_module, "make_private_work_dir", first_step_of_bring_up)
    monkeypatch.setattr(flows_module, "teardown_cluster", nothing)  # nothing was started
    monkeypatch.setattr(flows_module, "report_failure", nothing)  # no run to attach an artifact to
    # the flow's own body, called as Prefect calls it, without a Prefect server (not our frames either way)
    monkeypatch.setattr(cli, "ray_cluster", flows_module.ray_cluster.fn)
    monkeypatch.setattr(tasks.cluster, "RUNS_DIR", tmp_path / "runs")
    with pytest.raises(ReachedBringUp) as raised:
        cli.main(["--work-dir", str(tmp_path / "work")])
    chain = our_frames_down_to("bring_up", raised.value.__traceback__)
    assert chain[0] == "main" and chain[-1] == "bring_up"
    assert len(chain) <= MAX_OWN_FRAMES, " -> ".join(chain)
    assert not (tmp_path / "work").exists(), "bring_up started nothing"
