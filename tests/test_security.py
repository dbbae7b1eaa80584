"""Secure by default, checked on a running cluster: loopback-only dashboard, token
auth everywhere, and no secret in any log, artifact or file the flow writes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import PYTHON, REPO, assert_nothing_left, live_jobs, run_flow
from tests.test_faults import BackgroundFlow
from tests.test_slurm_e2e import slurm_args

pytestmark = pytest.mark.timeout(300)
SMALL = ["--ray-memory-gb", "0.5", "--object-store-memory-gb", "0.25"]


def test_job_api_refuses_requests_without_the_token(tmp_path, prefect_api):
    work = tmp_path / "work"
    flow = BackgroundFlow(["--keep-alive", "--work-dir", str(work), *SMALL], tmp_path, prefect_api)
    try:
        info = flow.wait_ready()
        token_file = info["token_file"]
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        token = open(token_file).read().strip()
        port = info["dashboard_port_on_head"]
        url = f"http://127.0.0.1:{port}/api/jobs/"
        assert httpx.get(url, timeout=5).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer " + "0" * 64}, timeout=5).status_code == 403
        assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200
        submit = httpx.post(url, json={"entrypoint": "touch /tmp/ar-canary-unauth"}, timeout=5)
        assert submit.status_code == 401
        # Every node was started with RAY_AUTH_MODE=token explicitly.
        env_file = open(os.path.join(os.path.dirname(token_file), "cluster.env")).read()
        assert "export RAY_AUTH_MODE=token" in env_file
        flow.process.send_signal(signal.SIGTERM)
        assert flow.wait(60) == 143
        assert not os.path.exists("/tmp/ar-canary-unauth")
        assert_nothing_left(work, cluster_id=info["cluster_id"])
    finally:
        flow.kill()


def test_dashboard_is_loopback_only_on_the_head_and_reachable_through_the_tunnel(tmp_path, prefect_api, bed):
    work = tmp_path / "work"
    flow = BackgroundFlow(
        slurm_args(bed, work, "--keep-alive", "--slurm.nodes", "2"), tmp_path, prefect_api, bed.login_argv
    )
    probe = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        "    urllib.request.urlopen(sys.argv[1], timeout=3)\n"
        "    print('OPEN')\n"
        "except urllib.error.HTTPError as e:\n"
        "    print('HTTP', e.code)\n"
        "except OSError as e:\n"
        "    print('CLOSED', e)\n"
    )
    try:
        info = flow.wait_ready()
        head_url = f"http://{info['head_ip']}:{info['dashboard_port_on_head']}/api/version"
        other = next(n for n in bed.node_names if n != info["head_node"])
        for where in (bed.node_argv(other, [PYTHON, "-c", probe, head_url]), bed.login_argv([PYTHON, "-c", probe, head_url])):
            out = subprocess.run(where, capture_output=True, text=True, timeout=30).stdout
            assert out.startswith("CLOSED"), out
        # Through the flow's own tunnel (its loopback, in the login namespace): reachable, and it wants the token.
        tunnel = bed.login_argv([PYTHON, "-c", probe, info["dashboard_url"] + "/api/version"])
        assert subprocess.run(tunnel, capture_output=True, text=True, timeout=30).stdout.strip() == "HTTP 401"
        flow.process.send_signal(signal.SIGTERM)
        assert flow.wait(60) == 143
        assert live_jobs(bed) == []
        assert_nothing_left(work, cluster_id=info["cluster_id"])
    finally:
        flow.kill()


def test_no_secret_in_logs_artifacts_or_files(tmp_path, prefect_api, loopback_sshd):
    """SSH through a saved block (private key as a Secret); afterwards search everything."""
    key_text = loopback_sshd.key.read_text()
    block = f"sec-{os.getpid()}"
    save = (
        "import sys; from blocks.ssh import SshConnection\n"
        "SshConnection(host='127.0.0.1', port=int(sys.argv[1]), username='root', private_key=open(sys.argv[2]).read(),"
        " known_hosts=open(sys.argv[3]).read()).save(sys.argv[4], overwrite=True)\n"
    )
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    subprocess.run([PYTHON, "-c", save, str(loopback_sshd.port), str(loopback_sshd.key), str(loopback_sshd.known_hosts),
                    block], cwd=REPO, env=env, check=True, timeout=60)
    work = tmp_path / "work"
    script = tmp_path / "job.py"
    script.write_text("import os, ray\nray.init()\nprint('JOB_SEES_TOKEN_FILE', os.path.exists(os.environ['RAY_AUTH_TOKEN_PATH']))\n")
    flow = BackgroundFlow(["--host", block, "--python", sys.executable, "--work-dir", str(work), "--keep-alive",
                           "--cluster-idle-timeout", "0.1", "--user-script", str(script), *SMALL],
                          tmp_path, prefect_api)
    try:
        info = flow.wait_ready()
        token = open(info["token_file"]).read().strip()
        assert len(token) >= 32
        assert flow.wait(120) == 0, flow.output[-3000:]
    finally:
        flow.kill()
    assert "JOB_SEES_TOKEN_FILE True" in flow.output
    run_id = next(line.split("/flow-run/")[1].split()[0] for line in flow.output.splitlines() if "/flow-run/" in line)
    with httpx.Client(base_url=prefect_api, timeout=10) as api:
        logs = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}).json()
        artifacts = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
        run = api.get(f"/flow_runs/{run_id}").json()
        blocks = api.post("/block_documents/filter", json={}).json()
    assert logs and artifacts, "the checks below must look at real logs and artifacts"
    everything = "\n".join([
        flow.output, (tmp_path / "info.json").read_text(), json.dumps(logs), json.dumps(artifacts), json.dumps(run),
        json.dumps(blocks),
    ])
    key_body = "".join(key_text.strip().splitlines()[1:-1])
    assert key_body[:40] not in everything.replace("\n", "")
    assert token not in everything
    # The token block lived while the cluster did, and is gone with it.
    assert info["token_block"] and info["token_block"] not in json.dumps(blocks)
    assert_nothing_left(work, cluster_id=info["cluster_id"])
