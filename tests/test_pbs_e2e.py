"""PBS mode for real: qsub/qstat/qdel (Debian's slurm-wlm-torque) on the 3-node bed.

What these commands cannot show (OpenPBS JSON status, `.server` ids,
pbsdsh) is covered against documented formats in test_pbs_formats.py."""

import pytest

from tests.conftest import assert_nothing_left, batch_args, live_jobs, run_flow
from tests.test_slurm_e2e import SPREAD

pytestmark = pytest.mark.timeout(400)


def pbs_args(bed, work, *extra):
    return batch_args(bed, work, *extra, scheduler="pbs")


def test_three_node_pbs_cluster_spreads_over_three_hosts(tmp_path, prefect_api, bed):
    work = tmp_path / "work"
    script = tmp_path / "spread.py"
    script.write_text(SPREAD)
    run = run_flow(
        pbs_args(bed, work, "--pbs.nodes", "3", "--user-script", str(script)),
        tmp=tmp_path, api=prefect_api, wrap=bed.login_argv,
    )
    assert run.returncode == 0, run.output[-5000:]
    assert "HOSTS=node1,node2,node3" in run.output
    assert run.info["scheduler"] == "pbs" and run.info["job_id"]
    assert len(run.info["nodes"]) == 3
    assert live_jobs(bed) == []
    assert_nothing_left(work, cluster_id=run.info["cluster_id"])
