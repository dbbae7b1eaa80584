"""SLURM mode on the real 3-node bed: the flow runs on the login node, as at a real site."""

import re
import sys
import textwrap

import pytest

from tests.conftest import assert_nothing_left, batch_args, live_jobs, run_flow

pytestmark = pytest.mark.timeout(400)

SPREAD = textwrap.dedent(
    """
    import socket, time
    import ray
    ray.init()

    @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
    def host():
        time.sleep(0.5)
        return socket.gethostname()

    hosts = sorted(set(ray.get([host.remote() for _ in range(9)])))
    print("HOSTS=" + ",".join(hosts))
    """
)


def slurm_args(bed, work, *extra, readiness=120):
    return batch_args(bed, work, *extra, scheduler="slurm", readiness=readiness)


def test_three_node_slurm_cluster_spreads_over_three_hosts(tmp_path, prefect_api, bed):
    work = tmp_path / "work"
    script = tmp_path / "spread.py"
    script.write_text(SPREAD)
    run = run_flow(
        slurm_args(bed, work, "--slurm.nodes", "3", "--user-script", str(script)),
        tmp=tmp_path, api=prefect_api, wrap=bed.login_argv,
    )
    assert run.returncode == 0, run.output[-5000:]
    assert "HOSTS=node1,node2,node3" in run.output
    info = run.info
    assert info["scheduler"] == "slurm" and info["job_id"].isdigit()
    assert info["head_node"] in bed.node_names and info["head_ip"] == bed.node_ips[info["head_node"]]
    assert len(info["nodes"]) == 3
    assert f"-J " in info["tunnel_command"] or info["head_ip"] in info["tunnel_command"]
    assert live_jobs(bed) == []
    assert_nothing_left(work, cluster_id=info["cluster_id"])


def test_unknown_partition_is_a_clear_error_and_leaves_nothing(tmp_path, prefect_api, bed):
    work = tmp_path / "work"
    run = run_flow(
        slurm_args(bed, work, "--slurm.partition", "nosuchpartition", "--user-script", __file__),
        tmp=tmp_path, api=prefect_api, wrap=bed.login_argv,
    )
    assert run.returncode == 1
    assert "sbatch refused the job" in run.output and "partition" in run.output.lower()
    assert live_jobs(bed) == []
    assert_nothing_left(work)


def test_more_nodes_than_exist_is_a_clear_error(tmp_path, prefect_api, bed):
    work = tmp_path / "work"
    run = run_flow(
        slurm_args(bed, work, "--slurm.nodes", "5", "--user-script", __file__),
        tmp=tmp_path, api=prefect_api, wrap=bed.login_argv,
    )
    assert run.returncode == 1
    # Depending on EnforcePartLimits, sbatch refuses it or it pends forever: either way, said at once.
    assert "sbatch refused the job" in run.output or "can never start as asked" in run.output
    assert re.search(r"Partition(NodeLimit|Config)|node configuration is not available", run.output)
    assert "not ready after" not in run.output
    assert live_jobs(bed) == []
    assert_nothing_left(work)


def test_job_stuck_pending_is_cancelled_at_readiness_timeout(tmp_path, prefect_api, bed):
    """A hold keeps the job PENDING: the flow must say why, cancel it, and leave nothing."""
    work = tmp_path / "work"
    run = run_flow(
        slurm_args(bed, work, "--slurm.extra-directives", "#SBATCH --hold", "--user-script", __file__, readiness=8),
        tmp=tmp_path, api=prefect_api, wrap=bed.login_argv,
    )
    assert run.returncode == 1
    assert "PENDING" in run.output and "not ready after 8s" in run.output
    assert live_jobs(bed) == []
    assert_nothing_left(work)


def test_slurm_over_ssh_to_the_login_node(tmp_path, prefect_api, bed):
    """The flow reaches the site only through the login node's sshd, as from a laptop."""
    work = tmp_path / "work"
    script = tmp_path / "spread.py"
    script.write_text(SPREAD)
    run = run_flow(
        slurm_args(bed, work, "--host", f"root@{bed.login_ip}:22", "--python", sys.executable,
                   "--slurm.nodes", "2", "--user-script", str(script)),
        tmp=tmp_path, api=prefect_api, wrap=bed.login_argv,
    )
    assert run.returncode == 0, run.output[-5000:]
    assert re.search(r"HOSTS=node\d,node\d\n", run.output)
    info = run.info
    assert info["tunnel_command"] == (
        f"ssh -N -L 8265:127.0.0.1:{info['dashboard_port_on_head']} -J root@{bed.login_ip}:22 {info['head_ip']}"
    )
    assert live_jobs(bed) == []
    assert_nothing_left(work, cluster_id=info["cluster_id"])
