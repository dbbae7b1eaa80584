"""SSH-direct mode on the site bed: the user's flow on the login node reaches node1 over
its real sshd with the site's defaults (key in ~/.ssh, host keys published in
/etc/ssh/ssh_known_hosts), asyncssh transport, Ray on node1."""

import subprocess
import time

import pytest

from tests.helpers import REPO, SMALL, assert_nothing_left, free_port, run_flow

pytestmark = [pytest.mark.bed, pytest.mark.timeout(300)]
HELLO = REPO / "examples/hello_ray.py"


def ssh_args(bed, work, host="node1"):
    return ["--host", f"{bed.user_name}@{host}", "--python", bed.user_python, "--work-dir", work / "w", *SMALL]


def test_ssh_direct_runs_hello_ray_through_tunnel(work, prefect_api, bed):
    run = run_flow(bed, [*ssh_args(bed, work), "--user-script", HELLO], work=work, api=prefect_api)
    assert run.returncode == 0, run.output[-4000:]
    assert "HELLO_RAY_OK" in run.output
    info = run.info
    assert info["head_node"] == "node1"
    # The dashboard is reached through the flow's asyncssh forward, never directly.
    assert info["dashboard_url"].startswith("http://127.0.0.1:")
    assert info["tunnel_command"] == (
        f"ssh -N -o ExitOnForwardFailure=yes -L 8265:127.0.0.1:{info['dashboard_port_on_head']} -L 10001:127.0.0.1:{info['ray_client_port_on_head']} {bed.user_name}@node1"
    )
    assert_nothing_left(bed, run.cluster_id, work / "w")


def test_a_changed_host_key_is_refused_before_anything_starts(work, prefect_api, bed):
    """node1 answers with a key other than the published one: refused, with or
    without trust-on-first-use, and nothing is started."""
    with bed.host_key_changed("node1"):
        for extra in ([], ["--accept-new-host-key"]):
            run = run_flow(bed, [*ssh_args(bed, work), *extra, "--user-script", HELLO], work=work, api=prefect_api)
            assert run.returncode == 1, run.output[-3000:]
            assert "host key for node1 changed" in run.output.lower() or "changed" in run.output, run.output[-3000:]
            assert not (work / "w").exists()
    assert bed.cluster_processes("ar-") == []


def test_an_unknown_host_is_refused_and_trusted_on_first_use_only_when_asked(work, prefect_api, bed):
    """A host key nobody published (a second sshd on the login node's loopback, with a
    key of its own): refused by default; with --accept-new-host-key its key is recorded
    in ~/.activate-ray/known_hosts and used from then on."""
    port = free_port()
    sdir = bed.root / "ssh" / "login-extra"
    sdir.mkdir(exist_ok=True)
    key = sdir / "ssh_host_ed25519_key"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = sdir / "sshd_config"
    config.write_text(bed._sshd_config("login", "127.0.0.1", key, port=port))
    sshd = bed.spawn("login", ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], "sshd-login-extra.out")
    try:
        time.sleep(0.5)
        target = ["--host", f"{bed.user_name}@127.0.0.1:{port}", "--python", bed.user_python, "--work-dir", work / "w",
                  *SMALL, "--user-script", HELLO]
        refused = run_flow(bed, target, work=work, api=prefect_api)
        assert refused.returncode == 1, refused.output[-3000:]
        assert "Host key is not trusted" in refused.output
        assert not (work / "w").exists()
        trusted = run_flow(bed, [*target, "--accept-new-host-key"], work=work, api=prefect_api)
        assert trusted.returncode == 0, trusted.output[-3000:]
        recorded = (bed.user.home / ".activate-ray" / "known_hosts").read_text()
        assert f"[127.0.0.1]:{port}" in recorded
        assert_nothing_left(bed, trusted.cluster_id, work / "w")
    finally:
        bed.stop_spawned(sshd)


def test_auth_failure_is_permanent_and_fails_at_once(work, prefect_api, bed):
    """A key the server does not know: no retries, a clear message, nothing started."""
    stranger = work / "stranger"
    bed.run_login(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger], user=bed.user, check=True)
    start = time.monotonic()
    run = run_flow(bed, [*ssh_args(bed, work), "--ssh-key-file", stranger, "--user-script", HELLO],
                   work=work, api=prefect_api)
    assert run.returncode == 1
    assert "Permission denied" in run.output
    assert "retrying" not in run.output
    assert time.monotonic() - start < 40
    assert not (work / "w").exists()


def test_connection_refused_is_retried_then_reported(work, prefect_api, bed):
    """Nobody listens: a transient fault, retried with backoff, then a clear error."""
    run = run_flow(bed, ["--host", f"{bed.user_name}@127.0.0.1:{free_port()}", "--python", bed.user_python,
                         "--work-dir", work / "w", "--user-script", HELLO], work=work, api=prefect_api)
    assert run.returncode == 1
    assert run.output.count("retrying in") >= 3
    assert "cannot reach 127.0.0.1 over SSH after 5 tries" in run.output
    assert not (work / "w").exists()
