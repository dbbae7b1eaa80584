"""Retries on the bed: a node killed while the cluster starts gets a fresh cluster without
that node; a refused job and a failing user job are never retried; a submission whose
answer was lost is not submitted twice. Each attempt leaves nothing behind."""

from __future__ import annotations

import os
import re

import pytest

from tests.helpers import CLUSTER_STARTED_RE, KeepKilling, assert_nothing_left, batch_args, run_flow

pytestmark = [pytest.mark.bed, pytest.mark.timeout(400)]

JOB_RE = re.compile(r"submitted to slurm: job (\d+)")


def clusters_and_jobs(output: str) -> tuple[list[str], list[str]]:
    return list(dict.fromkeys(CLUSTER_STARTED_RE.findall(output))), JOB_RE.findall(output)


def test_a_node_killed_while_starting_is_retried_without_that_node(work, prefect_api, bed):
    script = work / "where.py"
    script.write_text("import ray, socket\nray.init()\n"
                      "print('NODES=' + ','.join(sorted(n['NodeManagerHostname'] for n in ray.nodes() if n['Alive'])))\n")
    with KeepKilling(bed, "node2") as killer:
        run = run_flow(bed, batch_args(work / "w", "--slurm.nodes", "2", "--user-script", script, readiness=40),
                       work=work, api=prefect_api, timeout=360)
    assert killer.kills >= 1, "the fault never happened: node2's raylet was never seen"
    assert run.returncode == 0, run.output[-5000:]
    clusters, jobs = clusters_and_jobs(run.output)
    assert len(clusters) == 2 and len(jobs) == 2, run.output[-5000:]
    assert re.search(r"attempt 1 of 2 failed: .*retrying with a fresh cluster \(without node2\)", run.output)
    assert bed.job_fields(jobs[1]).get("ExcNodeList") == "node2"
    assert sorted(n["node"] for n in run.info["nodes"]) == ["node1", "node3"]
    nodes = re.search(r"NODES=(\S+)", run.output)
    assert nodes and len(nodes.group(1).split(",")) == 2 and "node2" not in nodes.group(1), run.output[-3000:]
    for cluster_id in clusters:
        assert_nothing_left(bed, cluster_id, work / "w")


def test_a_refused_job_is_not_retried(work, prefect_api, bed):
    run = run_flow(bed, batch_args(work / "w", "--slurm.partition", "nosuchpartition", "--retries", "3"),
                   work=work, api=prefect_api)
    assert run.returncode != 0
    assert "sbatch refused the job" in run.output and "retrying" not in run.output, run.output[-3000:]
    clusters, _ = clusters_and_jobs(run.output)
    assert len(clusters) == 1
    assert_nothing_left(bed, clusters[0], work / "w")


def test_a_failing_user_job_is_not_retried(work, prefect_api, bed):
    script = work / "boom.py"
    script.write_text("raise SystemExit(3)\n")
    run = run_flow(bed, batch_args(work / "w", "--user-script", script, "--retries", "3"),
                   work=work, api=prefect_api)
    assert run.returncode == 1, run.output[-3000:]
    clusters, jobs = clusters_and_jobs(run.output)
    assert len(clusters) == 1 and len(jobs) == 1 and "retrying" not in run.output, run.output[-3000:]
    assert_nothing_left(bed, clusters[0], work / "w")


# The real sbatch takes the job, then the answer is lost as on a controller that timed out.
# The pre-flight check's `sbatch --version` and `--test-only` submit nothing: they pass through.
LOST_ANSWER_SBATCH = """#!/bin/bash
set -euo pipefail
marker="$(dirname "$0")/answer-lost-once"
if [[ " $* " != *" --test-only "* && " $* " != *" --version "* && ! -e "$marker" ]]; then
    touch "$marker"
    /usr/bin/sbatch "$@" >/dev/null
    echo "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation" >&2
    exit 1
fi
exec /usr/bin/sbatch "$@"
"""


def test_a_submission_whose_answer_was_lost_does_not_start_a_second_job(work, prefect_api, bed):
    wrappers = work / "bin"
    wrappers.mkdir()
    (wrappers / "sbatch").write_text(LOST_ANSWER_SBATCH)
    (wrappers / "sbatch").chmod(0o755)
    os.chown(wrappers, bed.user.uid, bed.user.gid)
    script = work / "hello.py"
    script.write_text("print('SUBMITTED_ONCE_OK')\n")
    run = run_flow(bed, batch_args(work / "w", "--user-script", script), work=work, api=prefect_api,
                   env={"PATH": f"{wrappers}:/usr/local/bin:/usr/bin:/bin"})
    assert (wrappers / "answer-lost-once").exists(), "the wrapper never ran"
    assert run.returncode == 0, run.output[-4000:]
    assert "SUBMITTED_ONCE_OK" in run.output
    assert "Socket timed out" in run.output and "had taken the job after all" in run.output
    clusters, jobs = clusters_and_jobs(run.output)
    assert len(clusters) == 1 and len(jobs) == 1
    # one job of that name ever: none still queued, the one that ran is the flow's
    named = bed.run_login(["squeue", "-h", "--name", clusters[0], "-o", "%i"]).stdout.split()
    assert named == []
    assert bed.job_fields(jobs[0]).get("JobName") == clusters[0]
    assert_nothing_left(bed, clusters[0], work / "w")
