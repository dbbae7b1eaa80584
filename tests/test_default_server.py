"""The default path (no PREFECT_API_URL): the user's own Prefect server (flows/user_server.py),
as the bed's user on the login node, with the second user (`arother`) beside it.

(b) the second user finds the server's port (ss shows it to everyone) and asks its API for
    everything a run has: 401 each, nothing read, nothing changed;
(c) a secret given in runtime_env.env_vars is in none of the run's parameters, logs or
    artifacts (read with the credential), in no file or process the second user can read,
    and the job sees it (it prints its hash);
(d) Ctrl-C (SIGINT) and SIGTERM to the whole process group, as a terminal and `timeout`
    send them, on the default path and with a configured server: nothing of the cluster left
    within 5 s, the command gone within 10 s, the run's final state recorded. Each 3 times;
    AR_SIGNAL_STRESS_RUNS=20 runs it 20 times (the issue's bar)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import textwrap
import time

import pytest

from tests.helpers import (
    SMALL,
    BackgroundFlow,
    cluster_leftovers,
    default_server,
    default_server_env,
    prefect_get,
    stop_default_server,
    wait_for,
)
from tests.test_second_user import TOKEN_SEARCH, as_stranger

pytestmark = [pytest.mark.bed, pytest.mark.timeout(1800)]
RUNS = int(os.environ.get("AR_SIGNAL_STRESS_RUNS", "1"))

# As the stranger, on loopback: every question of a run's data, and every change, without
# credentials. Prints {request: status}.
API_PROBE = textwrap.dedent(
    """
    import json, sys, urllib.error, urllib.request
    api, run = sys.argv[1], sys.argv[2]
    asks = [("GET", "/health", None), ("GET", f"/flow_runs/{run}", None), ("POST", "/flow_runs/filter", {}),
            ("POST", "/logs/filter", {}), ("POST", "/artifacts/filter", {}), ("POST", "/block_documents/filter", {}),
            ("POST", "/variables/filter", {}), ("POST", "/task_runs/filter", {}),
            ("POST", f"/flow_runs/{run}/set_state", {"state": {"type": "CANCELLING"}, "force": True}),
            ("PATCH", f"/flow_runs/{run}", {"name": "taken"}), ("DELETE", f"/flow_runs/{run}", None)]
    seen = {}
    for method, path, body in asks:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(api + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                seen[f"{method} {path}"] = [response.status, response.read(300).decode(errors="replace")]
        except urllib.error.HTTPError as error:
            seen[f"{method} {path}"] = [error.code, ""]
    print(json.dumps(seen))
    """
)

# The user's script: the secret's hash, never the secret; then it waits for the test.
SHOW_HASH = textwrap.dedent(
    """
    import hashlib, os, time
    print("SECRET_SHA=" + hashlib.sha256(os.environ["AR_TEST_SECRET"].encode()).hexdigest(), flush=True)
    time.sleep(600)
    """
)


def test_the_default_server_shows_a_neighbour_nothing_and_holds_the_secret_masked(work, bed):
    secret = "wandb-" + secrets.token_hex(16)
    script = work / "show_hash.py"
    script.write_text(SHOW_HASH)
    env = {**default_server_env(bed, work),
           "RAY_CLUSTER_RUNTIME_ENV": json.dumps({"env_vars": {"AR_TEST_SECRET": secret}})}  # not argv: `ps`
    flow = BackgroundFlow(bed, ["--user-script", str(script), "--work-dir", str(work / "w"), *SMALL], work, api="", env=env)
    try:
        wait_for(lambda: "SECRET_SHA=" in flow.output or flow.exited(), 240, "the job's hash line")
        assert f"SECRET_SHA={hashlib.sha256(secret.encode()).hexdigest()}" in flow.output, flow.output[-3000:]
        api, auth = default_server(work)
        port = api.split(":")[2].split("/")[0]
        # the port is any user's to see; the process behind it is not
        listening = bed.run_login(["ss", "-ltnH"], user=bed.other).stdout
        assert f"127.0.0.1:{port} " in listening
        seen = json.loads(as_stranger(bed, "login", API_PROBE, api, flow.run_id))
        # Prefect answers /health to anyone ("true": no data); everything else asks the secret
        assert seen.pop("GET /health") == [200, "true"]
        assert {ask: status for ask, (status, _) in seen.items()} == dict.fromkeys(seen, 401), seen
        # with the credential: the run is there, its secret masked everywhere
        run = prefect_get(f"{api}/flow_runs/{flow.run_id}", auth, bed=bed)
        assert run["state"]["type"] == "RUNNING" and run["name"] != "taken"  # nothing changed
        assert "**********" in json.dumps(run["parameters"]["runtime_env"])
        stored = [run, prefect_get(f"{api}/logs/filter", auth, {}, bed=bed), prefect_get(f"{api}/artifacts/filter", auth, {}, bed=bed)]
        assert secret not in json.dumps(stored)
        # every file and process environment the neighbour can read (the server's own dir included)
        scope = {"trees": [str(work), *(str(bed.user.home / name) for name in (".activate-ray", ".ray", ".prefect"))],
                 "owned_in": ["/tmp", "/var/tmp", "/dev/shm"], "owner": bed.user.uid}
        found = json.loads(as_stranger(bed, "login", TOKEN_SEARCH, json.dumps(scope), stdin=secret + "\n"))
        assert found == [], f"the neighbour finds the secret: {found}"
        flow.signal_group(signal.SIGINT)
        wait_for(flow.exited, 10, "the flow's exit after Ctrl-C")
        wait_for(lambda: prefect_get(f"{api}/flow_runs/{flow.run_id}", auth, bed=bed)["state"]["type"] == "CANCELLED", 10,
                 "the Cancelled state")
        assert secret not in json.dumps(prefect_get(f"{api}/logs/filter", auth, {}, bed=bed))
    finally:
        flow.stop()
        stop_default_server(bed, work)


@pytest.mark.parametrize("path", ["default", "configured"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_process_group_tears_down_at_once(work, prefect_api, bed, path, sig):
    took = []
    try:
        for attempt in range(RUNS):
            took.append(one_signalled_run(bed, work, work / f"run{attempt}", path, prefect_api, sig, attempt % 3))
        print(f"{path} {sig.name}: {RUNS} of {RUNS} torn down; exits after {took} s")
    finally:
        stop_default_server(bed, work)


def one_signalled_run(bed, work, run_work, path: str, prefect_api: str, sig: int, delay: float) -> float:
    """A keep-alive local cluster, signalled `delay` s after ready: the seconds to its exit."""
    bed.run_on("login", ["mkdir", str(run_work)], user=bed.user, check=True)  # the user's, as the product writes in it
    env = default_server_env(bed, work) if path == "default" else {}
    flow = BackgroundFlow(bed, ["--keep-alive", "--work-dir", str(run_work / "w"), *SMALL], run_work,
                          api="" if path == "default" else prefect_api, env=env)
    try:
        info = flow.wait_ready(240)
        time.sleep(delay)  # a varied point of the hold
        flow.signal_group(sig)
        signalled = time.monotonic()
        wait_for(flow.exited, 10, f"the command's exit after {sig.name}")
        exited = time.monotonic() - signalled
        wait_for(lambda: not cluster_leftovers(bed, info["cluster_id"], run_work / "w"), max(0.0, 5 - exited),
                 "nothing left 5 s after the signal")
        api, auth = default_server(work) if path == "default" else (prefect_api, "")
        state = flow.run_state(api, auth)
        assert state["type"] == "CANCELLED" and f"stopped by {sig.name}" in state["message"], state
        return round(exited, 1)
    finally:
        flow.stop()
