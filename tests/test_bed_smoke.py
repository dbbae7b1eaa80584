"""Smoke test of the real HPC test bed (tests/bed): Slurm, PBS wrappers, ssh.

Runs only as root with the Debian packages installed; otherwise it skips, or
fails when ACTIVATE_RAY_REQUIRE_BED=1 (CI).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import textwrap
import time

import pytest

pytestmark = pytest.mark.bed

try:
    from tests.bed import TestBed, skip_or_fail
except ImportError:  # tests/ itself on sys.path (rootdir-less pytest runs)
    from bed import TestBed, skip_or_fail  # type: ignore[no-redef]


@pytest.fixture(scope="module")
def smoke_bed():
    """The bed for this module: the one already up in this process, or our own."""
    active = TestBed.active()
    if active is not None:
        yield active, False
        return
    bed = TestBed()
    skip_or_fail(bed.requirements_missing())
    try:
        bed.up()
        yield bed, True
    finally:
        root = bed.root
        bed.down()
        bed.down()  # idempotent
        assert bed.leftovers(root) == []


@pytest.fixture(scope="module")
def bed(smoke_bed):
    return smoke_bed[0]


def _ok(cp: subprocess.CompletedProcess) -> str:
    assert cp.returncode == 0, f"rc={cp.returncode}\nstdout:\n{cp.stdout}\nstderr:\n{cp.stderr}"
    return cp.stdout


def test_bringup_fast(smoke_bed):
    bed, owned = smoke_bed
    if owned:
        assert bed.bringup_seconds is not None and bed.bringup_seconds < 60


def test_sinfo_three_idle_nodes(bed):
    out = _ok(bed.run_login(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t"]))
    states = dict(line.split() for line in out.splitlines())
    assert states == {n: "idle" for n in bed.node_names}
    small = _ok(bed.run_login(["sinfo", "-h", "-p", "small", "-o", "%N"])).split()
    assert small == ["node1"]


def test_hosts_and_isolation(bed):
    assert _ok(bed.run_login(["hostname"])).strip() == "login"
    assert _ok(bed.run_node("node3", ["hostname"])).strip() == "node3"
    assert _ok(bed.run_node("node3", ["getent", "hosts", "login"])).split()[0] == bed.login_ip
    # no default route anywhere, no bed address in the root namespace
    for host in ("login", "node1"):
        assert "default" not in _ok(bed.run_on(host, ["ip", "route"]))
    root_addrs = _ok(subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True))
    assert bed.subnet + "." not in root_addrs


def test_every_host_has_its_own_pid_space_and_tmp(bed):
    marker = f"bed-smoke-{os.getpid()}"
    _ok(bed.run_node("node1", ["touch", f"/tmp/{marker}"], user=bed.user))
    assert (bed.node_tmp("node1") / marker).exists()
    assert _ok(bed.run_node("node2", ["ls", "-a", "/tmp"])).split().count(marker) == 0
    assert not pathlib.Path(f"/tmp/{marker}").exists()
    (bed.node_tmp("node1") / marker).unlink()
    # PID 1 of every host is its holder's tini; a host sees only its own processes
    for host in bed.hosts:
        assert _ok(bed.run_on(host, ["cat", "/proc/1/comm"])).strip() == "tini"
        pids = _ok(bed.run_on(host, ["sh", "-c", "ls /proc | grep -c '^[0-9]'"]))
        assert int(pids) < 60, f"{host} sees {pids} processes"
    # the same user, the same shared home, everywhere
    assert _ok(bed.run_node("node2", ["id", "-un"], user=bed.user)).strip() == bed.user_name
    assert _ok(bed.run_node("node2", ["sh", "-c", "echo $HOME"], user=bed.user)).strip() == str(bed.user.home)


def test_sbatch_three_nodes_as_the_user(bed):
    workdir = bed.home_dir("smoke")
    script = workdir / "three.sh"
    script.write_text("#!/bin/sh\nsrun --ntasks-per-node=1 sh -c 'echo \"$(hostname) $(id -un) $(hostname -I)\"'\n")
    out_file = workdir / "three.out"
    jobid = _ok(bed.run_login(["sbatch", "--parsable", "-N3", "-t", "2", "-o", str(out_file), str(script)],
                              cwd=workdir, user=bed.user)).strip()
    assert jobid in bed.queue()
    assert bed.wait_job(jobid, timeout=60) == "COMPLETED", out_file.read_text()
    lines = [line.split() for line in out_file.read_text().splitlines() if line.strip()]
    assert len(lines) == 3, lines
    assert {words[0] for words in lines} == set(bed.node_names)
    assert {words[1] for words in lines} == {bed.user_name}
    # Each node has its own address, and the fabric's (ib0) where it has that network.
    addresses = {words[0]: set(words[2:]) for words in lines}
    assert addresses == {node: {bed.node_ips[node]} | ({bed.fabric_ips[node]} if node in bed.fabric_ips else set())
                         for node in bed.node_names}


def test_qsub_pbs_environment(bed):
    workdir = bed.home_dir("smoke-pbs")
    script = workdir / "pbs.sh"
    script.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "JOBID=$PBS_JOBID"
        echo "WORKDIR=$PBS_O_WORKDIR"
        echo "NODEFILE=$PBS_NODEFILE"
        sed 's/^/NODE=/' "$PBS_NODEFILE"
        """))
    jobid = _ok(bed.run_login(["qsub", "-l", "nodes=3,walltime=00:02:00", "-N", "pbssmoke", str(script)],
                              cwd=workdir, user=bed.user)).strip()
    assert jobid.isdigit(), jobid  # the Slurm wrapper prints a bare number
    out_file = workdir / f"pbssmoke.o{jobid}"
    deadline = time.monotonic() + 60
    while True:
        state = _ok(bed.run_login(["qstat", "-f", jobid], user=bed.user))
        if "job_state = C" in state:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    values: dict[str, list[str]] = {}
    for line in out_file.read_text().splitlines():
        key, _, value = line.partition("=")
        values.setdefault(key, []).append(value)
    assert values["JOBID"] == [jobid]
    assert values["WORKDIR"] == [str(workdir)]
    assert values["NODEFILE"][0].startswith(str(bed.root))
    assert set(values["NODE"]) == set(bed.node_names)


def test_ssh_between_hosts_with_site_defaults(bed):
    """The user's key in ~/.ssh, host keys only in /etc/ssh/ssh_known_hosts: plain `ssh node2` works."""
    assert not (bed.user.home / ".ssh" / "known_hosts").exists()
    assert _ok(bed.run_login(bed.ssh_argv("node2", ["hostname"]), user=bed.user, timeout=30)).strip() == "node2"
    assert _ok(bed.run_node("node1", bed.ssh_argv(bed.node_ips["node3"], ["hostname"]), user=bed.user,
                            timeout=30)).strip() == "node3"
    out = _ok(bed.run_node("node1", bed.ssh_argv("login", ["sh", "-c", "hostname; sinfo -h -p debug -o %D; qstat"]),
                           user=bed.user, timeout=30)).split("\n")
    assert out[:2] == ["login", str(len(bed.node_names))]
    # a key nobody published is refused
    with bed.host_key_changed("node2"):
        assert bed.run_login(bed.ssh_argv("node2", ["hostname"]), user=bed.user, timeout=30).returncode != 0
    # root cannot log in over ssh; the second user is not the first
    assert bed.run_login(["ssh", "-o", "BatchMode=yes", "-i", str(bed.ssh_key), f"{bed.other_name}@node1", "true"],
                         timeout=30).returncode != 0
