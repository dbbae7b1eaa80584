"""SLURM and PBS on the site bed: the bed's user runs the flow on the login node, the
head and workers run on node1..3 (each its own PID space and /tmp), host keys checked
from /etc/ssh/ssh_known_hosts, and teardown touches each host only from that host."""

import re
import signal

import pytest

from tests.helpers import (
    SPREAD,
    BackgroundFlow,
    assert_nothing_left,
    batch_args,
    never_runs,
    run_flow,
)

pytestmark = [pytest.mark.bed, pytest.mark.timeout(400)]

# "pbs" here: the Torque flavour, Debian's slurm-wlm-torque wrappers (qsub/qstat/qdel,
# workers started over ssh from the head: no pbsdsh, PBS_NODEFILE from the bed's TaskProlog).
# "openpbs": the bed's real OpenPBS (tests/test_openpbs.py has the rest of its tests).
THREE_NODES = {
    "slurm": ["--slurm.nodes", "3"],
    "pbs": ["--pbs.select", "3:ncpus=1"],
}
JOB_ID_RE = re.compile(r"submitted to (?:slurm|pbs): job (\d+)")



def job_id_of(output: str) -> str:
    match = JOB_ID_RE.search(output)
    assert match, output[-3000:]
    return match.group(1)


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_three_node_cluster_spreads_over_three_hosts(work, prefect_api, bed, scheduler):
    script = work / "spread.py"
    script.write_text(SPREAD)
    run = run_flow(bed, batch_args(work / "w", *THREE_NODES[scheduler], "--user-script", script,
                                   scheduler=scheduler), work=work, api=prefect_api)
    assert run.returncode == 0, run.output[-5000:]
    assert "HOSTS=node1,node2,node3" in run.output
    info = run.info
    assert info["scheduler"] == scheduler and info["job_id"].isdigit()
    assert info["head_node"] in bed.node_names and info["head_ip"] == bed.node_ips[info["head_node"]]
    assert len(info["nodes"]) == 3
    assert "ready (3 nodes" in run.output or "3 node(s)" in run.output
    assert_nothing_left(bed, run.cluster_id, work / "w")
    # the job ended because the flow asked: the scheduler records success
    fields = bed.job_fields(info["job_id"])
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", fields


# A Python run as root inside the login host: makes the user's own process groups
# there, each numbered exactly like a Ray group recorded on a compute node (via
# ns_last_pid), and a few hundred more, then leaves them running.
DECOYS = r"""
import os, sys
uid, gid, wanted, extra = int(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",") if p], int(sys.argv[4])

def decoy():
    pid = os.fork()
    if pid == 0:
        os.setsid()
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.setgid(gid)
        os.setuid(uid)
        os.execvp("sleep", ["sleep", "900"])
    return pid

made = []
for target in wanted:
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(target - 1))
    made.append(decoy())
made += [decoy() for _ in range(extra)]
print(",".join(map(str, made)))
"""


@pytest.mark.parametrize("scheduler", ["slurm", "openpbs"])
def test_teardown_never_signals_a_compute_nodes_pid_on_the_login_node(work, prefect_api, bed, scheduler, request):
    """Hundreds of the user's own process groups on the login node, numbered like the
    compute nodes' Ray groups, all survive the teardown (of a keep-alive cluster)."""
    env = request.getfixturevalue("openpbs").env() if scheduler == "openpbs" else None
    scheduler = "pbs" if scheduler == "openpbs" else scheduler
    flow = BackgroundFlow(bed, batch_args(work / "w", *THREE_NODES[scheduler], "--keep-alive",
                                          scheduler=scheduler), work, prefect_api, env=env)
    decoys: list[str] = []
    try:
        info = flow.wait_ready()
        nodes_dir = work / "w" / "clusters" / info["cluster_id"] / "nodes"
        recorded = {}
        for path in nodes_dir.glob("*.pgid"):
            host, pgid = path.read_text().split()
            recorded[path.stem] = (host, int(pgid))
        assert len(recorded) == 3 and {h for h, _ in recorded.values()} == set(bed.node_names), recorded
        wanted = sorted({pgid for _, pgid in recorded.values()})
        made = bed.run_login(["/usr/bin/python3", "-c", DECOYS, str(bed.user.uid), str(bed.user.gid),
                              ",".join(map(str, wanted)), "300"], check=True)
        decoys = made.stdout.strip().split(",")
        assert len(decoys) == len(wanted) + 300
        # the numbers really collide (unless the login node already used one of them)
        collided = set(map(str, wanted)) & set(decoys)
        assert len(collided) >= len(wanted) - 1, (wanted, decoys[:10])
        flow.send_signal(signal.SIGTERM)
        assert flow.wait(90) == 143, flow.output[-3000:]
        assert "torn down" in flow.output
        assert_nothing_left(bed, info["cluster_id"], work / "w")
        survivors = alive_on_login(bed, decoys)
        assert len(survivors) == len(decoys), f"decoys killed: {sorted(set(decoys) - set(survivors))[:20]}"
    finally:
        flow.stop()
        bed.run_login(["pkill", "-KILL", "-u", bed.user_name, "-x", "sleep"])


def alive_on_login(bed, pids) -> list[str]:
    pids = list(pids)
    script = 'for p in "$@"; do kill -0 "$p" 2>/dev/null && echo "$p"; done; true'
    out = bed.run_login(["sh", "-c", script, "sh", *pids], user=bed.user).stdout
    return out.split()


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_a_cluster_whose_head_cannot_start_fails_and_the_job_record_says_so(work, prefect_api, bed, scheduler):
    """The head's temp dir cannot be made (node_tmp is not writable by the user): the
    job script exits non-zero, the flow fails, and the scheduler records a failure."""
    run = run_flow(bed, batch_args(work / "w", "--node-tmp", "/root", "--user-script", never_runs(work),
                                   scheduler=scheduler, readiness=60), work=work, api=prefect_api)
    assert run.returncode == 1, run.output[-3000:]
    job = job_id_of(run.output)
    fields = bed.job_fields(job)
    # PBS via the torque wrappers: qstat has no exit status, the Slurm record under it does
    assert fields.get("JobState") == "FAILED" and fields.get("ExitCode", "").startswith("1:"), fields
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_unknown_partition_is_a_clear_error_and_leaves_nothing(work, prefect_api, bed):
    run = run_flow(bed, batch_args(work / "w", "--slurm.partition", "nosuchpartition", "--user-script",
                                   never_runs(work)), work=work, api=prefect_api)
    assert run.returncode == 1
    assert "sbatch refused the job" in run.output and "partition" in run.output.lower()
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_more_nodes_than_exist_is_a_clear_error(work, prefect_api, bed):
    run = run_flow(bed, batch_args(work / "w", "--slurm.nodes", "5", "--user-script", never_runs(work)),
                   work=work, api=prefect_api)
    assert run.returncode == 1
    # Depending on EnforcePartLimits, sbatch refuses it or it pends forever: either way, said at once.
    assert "sbatch refused the job" in run.output or "can never start as asked" in run.output
    assert re.search(r"Partition(NodeLimit|Config)|node configuration is not available", run.output)
    assert "not ready after" not in run.output
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_job_stuck_pending_is_cancelled_at_readiness_timeout(work, prefect_api, bed):
    """A hold keeps the job PENDING: the flow must say why, cancel it, and leave nothing."""
    run = run_flow(bed, batch_args(work / "w", "--slurm.extra-directives", "#SBATCH --hold", "--user-script",
                                   never_runs(work), readiness=8), work=work, api=prefect_api)
    assert run.returncode == 1
    assert "PENDING" in run.output and "not ready after 8s" in run.output
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_slurm_over_ssh_to_the_login_node(work, prefect_api, bed):
    """The flow reaches the site only through the login node's sshd, as from a laptop;
    host keys from /etc/ssh/ssh_known_hosts for the login node and the hop."""
    script = work / "spread.py"
    script.write_text(SPREAD)
    run = run_flow(bed, batch_args(work / "w", "--host", f"{bed.user_name}@{bed.login_ip}:22", "--python",
                                   bed.user_python, "--slurm.nodes", "2", "--user-script", script),
                   work=work, api=prefect_api)
    assert run.returncode == 0, run.output[-5000:]
    assert re.search(r"HOSTS=node\d,node\d\n", run.output)
    info = run.info
    assert info["tunnel_command"] == (
        f"ssh -N -o ExitOnForwardFailure=yes -L 8265:127.0.0.1:{info['dashboard_port_on_head']} -L 10001:127.0.0.1:{info['ray_client_port_on_head']} -J {bed.user_name}@{bed.login_ip}:22 {info['head_node']}"
    )
    assert_nothing_left(bed, run.cluster_id, work / "w")
