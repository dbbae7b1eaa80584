"""`make server` (scripts/prefect_server.sh) and the default server, as the bed's
unprivileged user on the login node: a lasting server of the user's on loopback with a
secret, set in the user's Prefect profile; without one, the CLI starts the user's own
default server (flows/user_server.py), says so once, and does not fail when it is slow
to start on a busy machine (tests/test_default_server.py: what a neighbour gets from it)."""

import time

import pytest

from tests.helpers import REPO, SMALL, BackgroundFlow, assert_nothing_left, default_server_env, run_flow

pytestmark = [pytest.mark.bed, pytest.mark.timeout(500)]
HELLO = REPO / "examples/hello_ray.py"
NOTE = "Prefect: started your own server"


def own_prefect(bed, work) -> dict:
    """A fresh Prefect home of the user's: no profile, no server configured."""
    home = work / "prefect-home"
    bed.run_login(["mkdir", "-m", "700", str(home)], user=bed.user, check=True)  # the user's, as at a site
    return {"PREFECT_HOME": str(home), "PREFECT_BIN": str(bed.user_venv / "bin" / "prefect"),
            "AR_SERVER_DIR": str(work / "server-state"), **default_server_env(bed, work)}


def server(bed, env, action):
    return bed.run_login(["bash", bed.in_repo(REPO / "scripts" / "prefect_server.sh"), action], user=bed.user,
                         env=env, timeout=240)


def api_status(bed, env, url: str, path: str, auth: str | None) -> int:
    probe = (
        "import base64, sys, urllib.request, urllib.error\n"
        "headers = {'Content-Type': 'application/json'}\n"
        "if sys.argv[2]: headers['Authorization'] = 'Basic ' + base64.b64encode(sys.argv[2].encode()).decode()\n"
        "request = urllib.request.Request(sys.argv[1], data=b'{}', headers=headers, method='POST')\n"
        "try:\n    print(urllib.request.urlopen(request, timeout=10).status)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code)\n"
    )
    done = bed.run_login([bed.user_python, "-c", probe, url + path, auth or ""], user=bed.user, env=env)
    return int(done.stdout.strip())


def test_make_server_starts_a_private_server_that_later_runs_use(work, bed):
    env = own_prefect(bed, work)
    url = ""
    try:
        started = server(bed, env, "start")
        assert started.returncode == 0, started.stdout + started.stderr
        url = (work / "server-state" / "url").read_text().strip()
        assert url.startswith("http://127.0.0.1:") and "4200" not in url
        auth = (work / "server-state" / "auth").read_text().strip()
        profiles = (work / "prefect-home" / "profiles.toml")
        assert f'PREFECT_API_URL = "{url}"' in profiles.read_text()
        assert oct(profiles.stat().st_mode & 0o777) == "0o600" and oct((work / "server-state").stat().st_mode & 0o777) == "0o700"
        # another user of the machine reaches loopback too: without the secret, nothing
        assert api_status(bed, env, url, "/flow_runs/filter", None) == 401
        assert api_status(bed, env, url, "/flow_runs/filter", auth) == 200
        # the secret is in no process's command line
        assert auth.split(":")[1] not in bed.run_login(["ps", "-eo", "args"]).stdout
        again = server(bed, env, "start")
        assert "already running" in again.stdout and (work / "server-state" / "url").read_text().strip() == url

        run = run_flow(bed, ["--user-script", HELLO, "--work-dir", work / "w", *SMALL], work=work, api="", env=env)
        assert run.returncode == 0, run.output[-4000:]
        assert "HELLO_RAY_OK" in run.output and NOTE not in run.output
        assert url.rsplit("/api", 1)[0] in run.output  # "View at <server>/runs/flow-run/..."
        lookup = bed.run_login([bed.user_python, "-c", (
            "import asyncio\nfrom prefect import get_client\n"
            "async def main():\n    async with get_client() as c:\n"
            "        print([r.state_name for r in await c.read_flow_runs()])\nasyncio.run(main())")],
            user=bed.user, env=env)
        assert "'Completed'" in lookup.stdout, lookup.stdout + lookup.stderr
        assert_nothing_left(bed, run.cluster_id, work / "w")
    finally:
        stopped = server(bed, env, "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "PREFECT_API_URL" not in (work / "prefect-home" / "profiles.toml").read_text()
    port = url.rsplit(":", 1)[1].split("/")[0]
    assert f"--port {port}" not in bed.run_login(["ps", "-u", bed.user_name, "-o", "args"]).stdout


def test_without_a_server_the_cli_says_so_once_and_copes_with_a_busy_machine(work, bed):
    """Both CPUs kept busy by other work while the user's default server starts, until the
    flow run begins on it (the rest of the run is not what is under test here)."""
    env = own_prefect(bed, work)
    burners = [bed.spawn("login", ["/usr/bin/python3", "-c", "while True: pass"], f"burn{i}.out") for i in range(2)]
    flow = None
    try:
        flow = BackgroundFlow(bed, ["--user-script", HELLO, "--work-dir", work / "w", *SMALL], work, api="", env=env)
        deadline = time.monotonic() + 300
        while flow.cluster_id is None and flow.process.poll() is None:  # its first log line, from the server
            assert time.monotonic() < deadline, "the flow run never began:\n" + flow.output[-4000:]
            time.sleep(0.5)
        for burner in burners:
            bed.stop_spawned(burner)
        burners = []
        assert flow.wait(300) == 0, flow.output[-4000:]
    finally:  # a failed check leaves neither the burners nor the flow (and its cluster) running
        for burner in burners:
            bed.stop_spawned(burner)
        if flow is not None:
            flow.kill()
    assert flow.output.count(NOTE) == 1 and "make server" in flow.output
    assert "HELLO_RAY_OK" in flow.output
    assert_nothing_left(bed, flow.cluster_id, work / "w")
