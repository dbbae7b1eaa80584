"""Secure by default, checked on a running cluster on the site bed: loopback-only
dashboard, token auth everywhere, and no secret in any log, artifact or file the flow
writes. Probes run as the bed's second user where a stranger would run them."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import PYTHON
from tests.helpers import REPO, SMALL, BackgroundFlow, assert_nothing_left, batch_args

pytestmark = [pytest.mark.bed, pytest.mark.timeout(300)]

PROBE = (
    "import sys, urllib.request, urllib.error\n"
    "headers = {'Authorization': 'Bearer ' + sys.argv[3]} if len(sys.argv) > 3 else {}\n"
    "request = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode() or None, headers=headers)\n"
    "try:\n"
    "    urllib.request.urlopen(request, timeout=3)\n"
    "    print('OPEN')\n"
    "except urllib.error.HTTPError as e:\n"
    "    print('HTTP', e.code)\n"
    "except OSError as e:\n"
    "    print('CLOSED', e)\n"
)


def probe(bed, host, url, body="", token=None, user=None) -> str:
    argv = [bed.user_python, "-c", PROBE, url, body, *([token] if token else [])]
    return bed.run_on(host, argv, user=user or bed.other, timeout=30).stdout.strip()


def test_job_api_refuses_requests_without_the_token(work, prefect_api, bed):
    flow = BackgroundFlow(bed, ["--keep-alive", "--work-dir", work / "w", *SMALL], work, prefect_api)
    try:
        info = flow.wait_ready()
        token_file = info["token_file"]
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        token = Path(token_file).read_text().strip()
        url = f"http://127.0.0.1:{info['dashboard_port_on_head']}/api/jobs/"
        # another user of the login node, on the same loopback
        assert probe(bed, "login", url) == "HTTP 401"
        assert probe(bed, "login", url, token="0" * 64) == "HTTP 403"
        assert probe(bed, "login", url, token=token, user=bed.user) == "OPEN"
        submit = probe(bed, "login", url, body=json.dumps({"entrypoint": "touch /tmp/ar-canary-unauth"}))
        assert submit == "HTTP 401"
        env_file = Path(token_file).with_name("cluster.env").read_text()
        assert "export RAY_AUTH_MODE=token" in env_file
        flow.send_signal(signal.SIGTERM)
        assert flow.wait(15) == 143
        assert not (bed.node_tmp("login") / "ar-canary-unauth").exists()
        assert_nothing_left(bed, info["cluster_id"], work / "w")
    finally:
        flow.stop()


def test_dashboard_is_loopback_only_on_the_head_and_reachable_through_the_tunnel(work, prefect_api, bed):
    flow = BackgroundFlow(bed, batch_args(work / "w", "--keep-alive", "--slurm.nodes", "2"), work, prefect_api)
    try:
        info = flow.wait_ready()
        head_url = f"http://{info['head_ip']}:{info['dashboard_port_on_head']}/api/version"
        other = next(n for n in bed.node_names if n != info["head_node"])
        for host in (other, "login"):
            assert probe(bed, host, head_url).startswith("CLOSED")
        # Through the flow's own tunnel (its loopback, on the login node): reachable, and it wants the token.
        assert probe(bed, "login", info["dashboard_url"] + "/api/version") == "HTTP 401"
        flow.send_signal(signal.SIGTERM)
        assert flow.wait(15) == 143
        assert_nothing_left(bed, info["cluster_id"], work / "w")
    finally:
        flow.stop()


def test_no_secret_in_logs_artifacts_or_files(work, prefect_api, bed):
    """SSH through a saved block (private key as a Secret); afterwards search everything."""
    key_text = bed.ssh_key.read_text()
    block = f"sec-{os.getpid()}"
    save = (
        "import sys; from blocks.ssh import SshConnection\n"
        "SshConnection(host='node1', username=sys.argv[1], private_key=open(sys.argv[2]).read())"
        ".save(sys.argv[3], overwrite=True)\n"
    )
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    subprocess.run([PYTHON, "-c", save, bed.user_name, str(bed.ssh_key), block], cwd=REPO, env=env, check=True,
                   timeout=60)
    script = work / "job.py"
    script.write_text("import os, ray\nray.init()\nprint('JOB_SEES_TOKEN_FILE', os.path.exists(os.environ['RAY_AUTH_TOKEN_PATH']))\n")
    flow = BackgroundFlow(bed, ["--host", block, "--python", bed.user_python, "--work-dir", work / "w", "--keep-alive",
                                "--publish-token-block",
                                "--cluster-idle-timeout", "0.1", "--user-script", script, *SMALL], work, prefect_api)
    try:
        info = flow.wait_ready()
        token = Path(info["token_file"]).read_text().strip()
        assert len(token) >= 32
        assert flow.wait(120) == 0, flow.output[-3000:]
    finally:
        flow.stop()
    assert "JOB_SEES_TOKEN_FILE True" in flow.output
    run_id = next(line.split("/flow-run/")[1].split()[0] for line in flow.output.splitlines() if "/flow-run/" in line)
    with httpx.Client(base_url=prefect_api, timeout=10) as api:
        logs = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}).json()
        artifacts = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
        run = api.get(f"/flow_runs/{run_id}").json()
        blocks = api.post("/block_documents/filter", json={}).json()
    assert logs and artifacts, "the checks below must look at real logs and artifacts"
    everything = "\n".join([
        flow.output, (work / "info.json").read_text(), json.dumps(logs), json.dumps(artifacts), json.dumps(run),
        json.dumps(blocks),
    ])
    key_body = "".join(key_text.strip().splitlines()[1:-1])
    assert key_body[:40] not in everything.replace("\n", "")
    assert token not in everything
    # Published on request (a configured server): the block lived while the cluster did, and is gone with it.
    assert info["token_block"] and info["token_block"] not in json.dumps(blocks)
    assert_nothing_left(bed, info["cluster_id"], work / "w")
