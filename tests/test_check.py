"""`python -m flows.ray_cluster check --on-nodes` on the bed, Slurm and OpenPBS: on the bed as
it is nothing fails; each check broken once for real gives its row as fail with its fix,
exit code 1, and no job or cluster dir left.

The bed's /home and each host's /tmp are one filesystem type (ext4, one disk), so a temp dir
on the shared /home is told by its path: under the home or the work dir, which every node
shares by definition (scripts/node_check.sh)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import SMALL, assert_nothing_left, batch_args, clusters_submitted, flow_env, never_runs, run_flow

pytestmark = [pytest.mark.bed, pytest.mark.timeout(600)]

# Rows that may warn on the bed as it is: its open-file limit (20000) is below Ray's 65536.
BED_WARNINGS = {"open files"}


def check(bed, work: Path, api: str, *extra: str, scheduler: str = "slurm", env: dict | None = None):
    argv = [bed.user_python, "-m", "flows.ray_cluster", "check", "--scheduler", scheduler,
            "--work-dir", str(work / "w"), f"--{scheduler}.walltime", "00:10:00", "--readiness-timeout", "120",
            *SMALL, *extra, "--on-nodes", "--json"]
    result = bed.run_on("login", argv, user=bed.user, env=flow_env(api, env, bed.repo), cwd=bed.repo, timeout=500)
    (work / "check.log").write_text(result.stdout + result.stderr)
    start = result.stdout.find("{\n")
    assert start >= 0, (result.stdout + result.stderr)[-4000:]
    return result.returncode, json.loads(result.stdout[start:])["rows"], result.stdout + result.stderr


def nothing_left(bed, work: Path, openpbs=None) -> None:
    assert [job for job in bed.live_jobs() if bed.user_name in job] == []
    if openpbs is not None:
        assert [job for job in openpbs.live_jobs() if bed.user_name in job] == []
    clusters = work / "w" / "clusters"
    assert not clusters.exists() or list(clusters.iterdir()) == []
    assert bed.temp_dirs("ar-*") == []


def rows_of(rows: list[dict], name: str) -> list[dict]:
    return [row for row in rows if row["check"] == name]


def assert_all_pass(rc: int, rows: list[dict], output: str, nodes: int = 2) -> None:
    assert rc == 0, output[-4000:]
    bad = [row for row in rows if row["status"] == "fail"
           or (row["status"] == "warn" and row["check"] not in BED_WARNINGS)]
    assert bad == [], bad
    # every node of the check job ran every node check, and reached the other
    assert len({row["where"] for row in rows if row["where"] != "login"}) == nodes, rows
    assert len(rows_of(rows, "node to node")) == nodes and all(
        "reaches" in row["found"] for row in rows_of(rows, "node to node")), rows


def assert_fails(rc: int, rows: list[dict], output: str, name: str, found: str, fix: str) -> None:
    assert rc == 1, output[-4000:]
    failing = [row for row in rows_of(rows, name) if row["status"] == "fail"]
    assert failing, f"no failing {name} row in {rows}"
    assert any(found in row["found"] and fix in row["fix"] for row in failing), failing


def fake_pythons(bed, kind: str) -> str:
    """/tmp/arpy/bin/python on every host (each host has its own /tmp): on the login host a
    Python with the bed's ray 2.60.0; on the nodes one without ray ("none") or whose ray is
    another version ("other"), as a site whose login and compute nodes differ."""
    venv = Path(bed.user_python).parent
    for host in [bed.login_host, *bed.node_names]:
        root = bed.node_tmp(host) / "arpy"
        shutil.rmtree(root, ignore_errors=True)
        (root / "bin").mkdir(parents=True)
        if host == bed.login_host:
            python, ray, path = f"{venv}/python", f"{venv}/ray", ""
        else:
            python, ray, path = "/usr/bin/python3.11", "/bin/false", ""
            if kind == "other":
                dist = root / "site" / "ray-2.9.3.dist-info"
                dist.mkdir(parents=True)
                (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ray\nVersion: 2.9.3\n")
                python, path = f"{venv}/python", f"PYTHONPATH={root / 'site'} "
        (root / "bin" / "python").write_text(f"#!/bin/sh\n{path}exec {python} \"$@\"\n")
        (root / "bin" / "ray").write_text(f"#!/bin/sh\nexec {ray} \"$@\"\n")
        for path_ in [root, *root.rglob("*")]:
            os.chown(path_, bed.user.uid, bed.user.gid)
            path_.chmod(0o755 if path_.is_dir() or path_.parent.name == "bin" else 0o644)
    return "/tmp/arpy/bin/python"


def remove_fake_pythons(bed) -> None:
    for host in [bed.login_host, *bed.node_names]:
        shutil.rmtree(bed.node_tmp(host) / "arpy", ignore_errors=True)


def test_slurm_on_the_bed_as_it_is_nothing_fails(work, prefect_api, bed):
    rc, rows, output = check(bed, work, prefect_api, "--slurm.nodes", "2")
    assert_all_pass(rc, rows, output)
    assert rows_of(rows, "job script")[0]["status"] == "pass"
    nothing_left(bed, work)


BROKEN = {
    # name: (extra args, the row, words found, words of the fix)
    "node_tmp too long": (["--node-tmp", "/tmp/" + "x" * 30], "socket paths", "over the 107-byte AF_UNIX limit", "--node-tmp /tmp"),
    "temp dir on the shared home": (["--node-tmp", "/home/aruser"], "temp dir", "not node-local", "--node-tmp /local/scratch"),
    "no ray on the nodes": (["--python", "@none"], "ray", "no ray in /tmp/arpy/bin/python", "--python"),
    "another ray on the nodes": (["--python", "@other"], "ray", "ray 2.9.3 in /tmp/arpy/bin/python", "--python"),
    "ulimit -n 256": (["--setup-commands", "ulimit -n 256"], "open files", "ulimit -n is 256", "ulimit -n 65536"),
    "missing interface": (["--network-interface", "eth9"], "network", "no IPv4 address on interface eth9", "--network-interface"),
    "rejected partition": (["--slurm.partition", "nosuchpartition"], "job script", "sbatch refuses the job", "partition"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_slurm_each_check_broken_once_fails_its_row(work, prefect_api, bed, broken):
    args, name, found, fix = BROKEN[broken]
    args = [fake_pythons(bed, arg[1:]) if arg.startswith("@") else arg for arg in args]
    try:
        rc, rows, output = check(bed, work, prefect_api, "--slurm.nodes", "2", *args)
    finally:
        remove_fake_pythons(bed)
    assert_fails(rc, rows, output, name, found, fix)
    nothing_left(bed, work)


def test_openpbs_on_the_bed_as_it_is_nothing_fails(pbs_work, prefect_api, bed, openpbs):
    rc, rows, output = check(bed, pbs_work, prefect_api, "--pbs.nodes", "2", scheduler="pbs", env=openpbs.env())
    assert_all_pass(rc, rows, output)
    nothing_left(bed, pbs_work, openpbs)


PBS_BROKEN = {
    **{name: case for name, case in BROKEN.items() if name != "rejected partition"},
    "rejected queue": (["--pbs.queue", "nosuchqueue"], "job script", "qsub refuses the job", "queue"),
}


@pytest.mark.parametrize("broken", list(PBS_BROKEN))
def test_openpbs_each_check_broken_once_fails_its_row(pbs_work, prefect_api, bed, openpbs, broken):
    args, name, found, fix = PBS_BROKEN[broken]
    args = [fake_pythons(bed, arg[1:]) if arg.startswith("@") else arg for arg in args]
    try:
        rc, rows, output = check(bed, pbs_work, prefect_api, "--pbs.nodes", "2", *args, scheduler="pbs",
                                 env=openpbs.env())
    finally:
        remove_fake_pythons(bed)
    assert_fails(rc, rows, output, name, found, fix)
    nothing_left(bed, pbs_work, openpbs)


def test_a_run_fails_on_the_node_in_the_checks_own_words(work, prefect_api, bed):
    """A run whose nodes have `ulimit -n` 256 (the login host does not check a node's limits):
    node1's own checks stop it before `ray start`, and the run fails at once with the row
    `check` gives, its fix included, no retry, nothing left."""
    run = run_flow(bed, batch_args(work / "w", "--slurm.nodes", "2", "--setup-commands", "ulimit -n 256",
                                   "--user-script", never_runs(work)), work=work, api=prefect_api)
    assert run.returncode == 1, run.output[-3000:]
    assert "node check on node1: open files: ulimit -n is 256" in run.output, run.output[-3000:]
    assert "ulimit -n 65536" in run.output and "NEVER_RUNS" not in run.output
    assert "readiness timeout" not in run.output and "not ready after" not in run.output
    assert len(clusters_submitted(run.output)) == 1, "a node check failure is not retried"
    assert_nothing_left(bed, run.cluster_id, work / "w")
