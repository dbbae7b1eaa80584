"""SSH-direct mode against a real sshd on 127.0.0.1: same flow, asyncssh transport."""

import sys

import pytest

from tests.conftest import REPO, assert_nothing_left, run_flow

pytestmark = pytest.mark.timeout(300)


def ssh_args(sshd, work):
    return [
        "--host", sshd.target, "--ssh-key-file", str(sshd.key), "--known-hosts", str(sshd.known_hosts),
        "--python", sys.executable, "--work-dir", str(work),
    ]


def test_ssh_direct_runs_hello_ray_through_tunnel(tmp_path, prefect_api, loopback_sshd):
    work = tmp_path / "work"
    run = run_flow(
        [*ssh_args(loopback_sshd, work), "--user-script", str(REPO / "examples/hello_ray.py")],
        tmp=tmp_path, api=prefect_api,
    )
    assert run.returncode == 0, run.output[-4000:]
    assert "HELLO_RAY_OK" in run.output
    info = run.info
    # The dashboard is reached through the flow's asyncssh forward, never directly.
    assert info["dashboard_url"].startswith("http://127.0.0.1:")
    assert int(info["dashboard_url"].rsplit(":", 1)[1]) != info["dashboard_port_on_head"]
    assert info["tunnel_command"] == (
        f"ssh -N -L 8265:127.0.0.1:{info['dashboard_port_on_head']} -p {loopback_sshd.port} root@127.0.0.1"
    )
    assert_nothing_left(work, cluster_id=info["cluster_id"])


def test_ssh_unknown_host_key_is_refused_before_anything_starts(tmp_path, prefect_api, loopback_sshd):
    work = tmp_path / "work"
    empty_known_hosts = tmp_path / "known_hosts"
    empty_known_hosts.write_text("")
    args = ssh_args(loopback_sshd, work)
    args[args.index("--known-hosts") + 1] = str(empty_known_hosts)
    run = run_flow([*args, "--user-script", str(REPO / "examples/hello_ray.py")], tmp=tmp_path, api=prefect_api)
    assert run.returncode == 1
    assert "Host key is not trusted" in run.output or "host key" in run.output.lower()
    assert not work.exists()
    assert_nothing_left(work)


def test_auth_failure_is_permanent_and_fails_at_once(tmp_path, prefect_api, loopback_sshd):
    """A key the server does not know: no retries, a clear message, nothing started."""
    import subprocess
    import time

    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    work = tmp_path / "work"
    args = ssh_args(loopback_sshd, work)
    args[args.index("--ssh-key-file") + 1] = str(stranger)
    start = time.monotonic()
    run = run_flow([*args, "--user-script", str(REPO / "examples/hello_ray.py")], tmp=tmp_path, api=prefect_api)
    assert run.returncode == 1
    assert "Permission denied" in run.output
    assert "retrying" not in run.output
    assert time.monotonic() - start < 30
    assert not work.exists()


def test_connection_refused_is_retried_then_reported(tmp_path, prefect_api):
    """Nobody listens: a transient fault, retried with backoff, then a clear error."""
    from tests.sshd import free_port

    work = tmp_path / "work"
    run = run_flow(["--host", f"root@127.0.0.1:{free_port()}", "--python", sys.executable, "--work-dir", str(work),
                    "--user-script", str(REPO / "examples/hello_ray.py")], tmp=tmp_path, api=prefect_api)
    assert run.returncode == 1
    assert run.output.count("retrying in") >= 3
    assert "cannot reach 127.0.0.1 over SSH after 5 tries" in run.output
    assert not work.exists()
