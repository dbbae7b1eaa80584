"""Sixteen nodes on the bed (issue 34), under Slurm and under OpenPBS, as the unprivileged
user: small Ray nodes (one CPU, small memory and object store), one parallel launch, the job
sees all 16 nodes, and teardown leaves nothing on any host.

The bed's 16 nodes share this machine's 2 cores: 16 raylets and their dashboard agents
starting at once is where Ray's fixed 15 s wait for a node's agent is missed, and a worker
whose Ray ended while starting starts it again (scripts/ray_lib.sh, ar_run_node). Fewer of
these than of the 3-node tests: each costs about a minute of the bed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import assert_nothing_left, batch_args, run_flow

pytestmark = [pytest.mark.bed, pytest.mark.timeout(900)]

NODES = 16
COUNT_NODES = """\
import ray
ray.init()
alive = sorted(n["NodeManagerHostname"] for n in ray.nodes() if n["Alive"])
print("ALIVE_NODES=%d HOSTS=%s" % (len(alive), ",".join(alive)))
"""


def _wide_bed(bed) -> None:
    if len(bed.wide_node_names) < NODES:
        pytest.skip(f"the bed has {len(bed.wide_node_names)} nodes (AR_BED_WIDE_NODES), not {NODES}")


def _check_sixteen(bed, run, work, expected_hosts: list[str]) -> None:
    if run.returncode != 0:
        controller = (bed.log_dir / "slurmctld.log").read_text(errors="replace")[-3000:]
        said = "\n".join(line[:400] for line in run.output.splitlines() if re.search(r"WARN|ERROR|attempt|fail", line))
        raise AssertionError(f"{said[-8000:]}\n--- slurmctld.log ---\n{controller}")
    seen = re.search(r"ALIVE_NODES=(\d+) HOSTS=(\S+)", run.output)
    assert seen and int(seen.group(1)) == NODES, run.output[-4000:]
    assert sorted(seen.group(2).split(",")) == sorted(expected_hosts), seen.group(2)
    assert len(run.info["nodes"]) == NODES, run.info["nodes"]
    # every node's logs kept, each within the per-node cap (--log-cap-mb, 50 MB)
    logs = Path(run.info["logs_dir"])
    kept = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in logs.iterdir() if d.is_dir()}
    workers = {h for h in expected_hosts if h != run.info["head_node"]}
    assert workers <= set(kept) and "head" in kept, sorted(kept)
    assert max(kept.values()) <= 50 * 1024**2, kept
    assert_nothing_left(bed, run.cluster_id, work / "w", settle=30)


def test_sixteen_slurm_nodes_start_run_the_job_and_leave_nothing(work, prefect_api, bed):
    _wide_bed(bed)
    script = work / "count.py"
    script.write_text(COUNT_NODES)
    run = run_flow(bed, batch_args(work / "w", "--slurm.nodes", str(NODES), "--slurm.partition", "wide",
                                   "--num-cpus-per-node", "1", "--user-script", script, readiness=420),
                   work=work, api=prefect_api, timeout=800)
    _check_sixteen(bed, run, work, bed.wide_node_names[:NODES])


def test_sixteen_openpbs_chunks_start_run_the_job_and_leave_nothing(pbs_work, prefect_api, bed, openpbs):
    _wide_bed(bed)
    work = pbs_work
    script = work / "count.py"
    script.write_text(COUNT_NODES)
    with openpbs.wide() as queue:
        run = run_flow(bed, batch_args(work / "w", "--pbs.select", f"{NODES}:ncpus=1", "--pbs.queue", queue,
                                       "--num-cpus-per-node", "1", "--user-script", script,
                                       scheduler="pbs", readiness=420),
                       work=work, api=prefect_api, env=openpbs.env(), timeout=800)
        _check_sixteen(bed, run, work, bed.wide_node_names[:NODES])
        job = openpbs.wait_job_finished(run.info["job_id"])
        assert job.get("job_state") == "F" and job.get("Exit_status") == 0, job
