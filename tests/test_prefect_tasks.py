"""The hand-off to Prefect tasks (flows/ray_tasks.py, examples/prefect_tasks_on_ray.py):
a SLURM cluster started by a flow, a subflow whose tasks run on its nodes through
prefect-ray's RayTaskRunner (Ray Client through the flow's own SSH tunnel, with the
token), the task runs recorded by a Prefect server the nodes reach, nothing left."""

import re
import time

import pytest

from flows.ray_tasks import api_the_nodes_reach
from tasks.failures import InvalidInput
from tasks.settings import RayClusterSettings
from tests.helpers import REPO, assert_nothing_left, free_port


@pytest.mark.parametrize("api, scheduler, local, refused", [
    ("", "none", True, "set PREFECT_API_URL"),
    ("http://127.0.0.1:4200/api", "slurm", False, "on loopback"),
    ("http://localhost:4200/api", "none", False, "on loopback"),  # the tasks run on the SSH host
    ("http://127.0.0.1:4200/api", "none", True, None),  # the tasks run here
    ("http://10.1.2.3:4200/api", "slurm", False, None),
])
def test_the_tasks_need_a_prefect_api_the_nodes_reach(api, scheduler, local, refused):
    settings = RayClusterSettings(scheduler=scheduler, host="" if scheduler == "none" else "a@login")
    if refused:
        with pytest.raises(InvalidInput, match=refused):
            api_the_nodes_reach(settings, local, api)
    else:
        assert api_the_nodes_reach(settings, local, api) == api


@pytest.mark.bed
@pytest.mark.timeout(500)
def test_prefect_tasks_run_on_the_clusters_nodes(work, bed):
    port = free_port()
    api = f"http://{bed.login_ip}:{port}/api"
    home = work / "prefect-home"
    bed.run_login(["mkdir", "-m", "700", str(home)], user=bed.user, check=True)
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": str(bed.repo)}
    # the user's own server on the login node's address, where the compute nodes reach it
    server = bed.spawn("login", [str(bed.user_venv / "bin" / "prefect"), "server", "start", "--host", bed.login_ip,
                                 "--port", str(port)], "prefect-tasks-server.out", user=bed.user,
                       env={**env, "PREFECT_UI_API_URL": api})
    try:
        deadline = time.monotonic() + 180
        while not healthy(bed, api):
            assert time.monotonic() < deadline and server.poll() is None, "the Prefect server did not start"
            time.sleep(1)
        run = bed.run_login([bed.user_python, bed.in_repo(REPO / "examples" / "prefect_tasks_on_ray.py"),
                             "--host", f"{bed.user_name}@{bed.login_ip}", "--scheduler", "slurm", "--nodes", "2",
                             "--python", bed.user_python, "--work-dir", str(work / "w"), "--count", "8",
                             "--info-file", str(work / "info.json")],
                            user=bed.user, env=env, cwd=bed.repo, timeout=400)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-5000:]
        # Ray prefixes the lines of tasks on another node than the driver's with that node's address
        assert re.search(r"\(where pid=\d+, ip=10\.213\.0\.1\d\)", output), output[-3000:]
        started = re.search(r"cluster (ar-[0-9a-f]{32}) torn down", output)
        assert started, output[-3000:]
        runs = task_runs(bed, env)
        assert runs.count(("where", "Completed")) == 8, runs
        assert_nothing_left(bed, started.group(1), work / "w")
    finally:
        bed.stop_spawned(server)


def healthy(bed, api: str) -> bool:
    probe = bed.run_login([bed.user_python, "-c", f"import urllib.request; urllib.request.urlopen({api + '/health'!r}, timeout=2)"],
                          user=bed.user)
    return probe.returncode == 0


def task_runs(bed, env) -> list[tuple[str, str]]:
    """(task name, state) of every task run the server recorded."""
    script = (
        "import asyncio\nfrom prefect import get_client\n"
        "async def main():\n    async with get_client() as c:\n"
        "        for r in await c.read_task_runs():\n            print(r.name.rsplit('-', 1)[0], r.state_name)\n"
        "asyncio.run(main())\n"
    )
    done = bed.run_login([bed.user_python, "-c", script], user=bed.user, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return [tuple(line.split()) for line in done.stdout.splitlines() if line.strip()]

