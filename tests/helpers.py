"""What the end-to-end tests share: run the flow on the site bed as its user, in the
foreground or as a process to signal, and check that a cluster left nothing behind.

Imported by test modules (never one test module from another)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tasks.settings import node_tmp_name

REPO = Path(__file__).resolve().parent.parent
CLUSTER_ID_RE = re.compile(r"\bcluster (ar-[0-9a-f]{8,32})\b")
# "cluster <id> on <target>": the flow says it once per attempt, as each cluster is planned
CLUSTER_STARTED_RE = re.compile(r"cluster (ar-[0-9a-f]{32}) on ")

# Sizes for the bed's 2-CPU, 2000 MB nodes.
SMALL = ["--ray-memory-gb", "0.5", "--object-store-memory-gb", "0.25"]

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(home: Path, api: str | None = None) -> dict:
    """This process's environment with a Prefect home of its own: no PREFECT_* or
    RAY_CLUSTER_* setting of the caller's leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_CLUSTER_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if api:
        env["PREFECT_API_URL"] = api
    return env


class PrefectServer:
    """`prefect server start` on loopback with a PREFECT_HOME of its own: the tests'
    server, the benchmark's and the signal stress run's."""

    def __init__(self, home: Path, prefect: Path = Path(sys.executable).parent / "prefect"):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.prefect = prefect
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log = self.home / "server.log"
        self.process: subprocess.Popen | None = None
        self.start_s: float | None = None  # from launch to a healthy API

    def start(self, timeout: float = 120) -> PrefectServer:
        t0 = time.monotonic()
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(self.prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                # the UI is told its own API (else it looks for one on port 4200)
                env={**prefect_env(self.home), "PREFECT_SERVER_API_HOST": "127.0.0.1",
                     "PREFECT_SERVER_API_PORT": str(self.port), "PREFECT_UI_API_URL": self.url},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        while time.monotonic() - t0 < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(self.log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                    if response.status == 200:
                        self.start_s = time.monotonic() - t0
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prefect server did not start within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def flow_env(api: str, env: dict | None = None, repo: Path = REPO) -> dict:
    # the flow runs from the checkout, as `python -m flows.ray_cluster` in it would
    # api "": no PREFECT_API_URL, so the flow runs on the user's own default server
    # (flows/user_server.py; give AR_DEFAULT_SERVER_DIR, see default_server_env)
    return {**({"PREFECT_API_URL": api} if api else {}), "PYTHONPATH": str(repo),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}


def flow_argv(bed, args: list[str], info_file: Path) -> list[str]:
    """The flow's command line on the bed: paths into the checkout become paths into
    the bed's copy of it (the one its users can read)."""
    return [bed.user_python, "-m", "flows.ray_cluster", "--info-file", str(info_file), *map(bed.in_repo, args)]


@dataclass
class FlowRun:
    returncode: int
    output: str
    info: dict | None

    @property
    def cluster_id(self) -> str | None:
        if self.info:
            return self.info["cluster_id"]
        match = CLUSTER_ID_RE.search(self.output)
        return match.group(1) if match else None


def run_flow(bed, args: list[str], *, work: Path, api: str, host: str = "login", timeout: int = 300,
             env: dict | None = None) -> FlowRun:
    """Run `python -m flows.ray_cluster` for real, as the bed's user on a bed host."""
    info_file = work / "info.json"
    result = bed.run_on(host, flow_argv(bed, args, info_file), user=bed.user, env=flow_env(api, env, bed.repo),
                        cwd=bed.repo, timeout=timeout)
    output = result.stdout + result.stderr
    (work / "flow.log").write_text(output)
    info = json.loads(info_file.read_text()) if info_file.exists() else None
    return FlowRun(result.returncode, output, info)


class BackgroundFlow:
    """`python -m flows.ray_cluster` as the bed's user, as a process we can signal."""

    def __init__(self, bed, args: list[str], work: Path, api: str, host: str = "login", env: dict | None = None):
        self.bed = bed
        self.info_file = work / "info.json"
        self.log = work / "flow.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                bed.host_argv(host, flow_argv(bed, args, self.info_file), user=bed.user,
                              env=flow_env(api, env, bed.repo), cwd=bed.repo),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        # nsenter does not pass signals on: signal the flow's own process
        self.pid = bed.entered_pid(self.process.pid)

    def wait_ready(self, timeout: float = 150) -> dict:
        deadline = time.monotonic() + timeout
        while not self.info_file.exists():
            assert self.process.poll() is None, f"flow ended early:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"not ready:\n{self.output[-4000:]}"
            time.sleep(0.2)
        return json.loads(self.info_file.read_text())

    @property
    def run_id(self) -> str:
        return next(line.split("/flow-run/")[1].split()[0] for line in self.output.splitlines() if "/flow-run/" in line)

    def run_state(self, api: str, auth: str = "") -> dict:
        """The Prefect state of this flow's run (the run's id is in its log). With a secret: the
        user's default server, on the login host's loopback; without: the session's, relayed here."""
        return prefect_get(f"{api}/flow_runs/{self.run_id}", auth, bed=self.bed if auth else None)["state"]

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        """As a terminal's Ctrl-C and `timeout` do: to the whole process group of the command
        (here the group the bed's nsenter leads, the flow in it)."""
        os.killpg(self.process.pid, sig)

    def exited(self) -> bool:
        """The flow's own process is gone (nsenter, its parent, may be gone first)."""
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
        except OSError:
            return True

    def wait(self, timeout: float = 120) -> int:
        return self.process.wait(timeout)

    @property
    def output(self) -> str:
        return self.log.read_text()

    @property
    def cluster_id(self) -> str | None:
        match = CLUSTER_ID_RE.search(self.output)
        return match.group(1) if match else None

    def stop(self) -> None:
        """After a failed check: as a user stops it (SIGTERM, its teardown), so one failure
        leaves nothing behind to fail the session-end check too; SIGKILL if that hangs."""
        if self.process.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.process.wait(90)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(30)


# prefect_get's request, run in a bed host's network namespace (its loopback is not this one's)
_PREFECT_GET = """
import json, sys, urllib.request
url, headers, body = sys.argv[1], json.loads(sys.argv[2]), sys.stdin.buffer.read() or None
request = urllib.request.Request(url, data=body, headers=headers, method="GET" if body is None else "POST")
with urllib.request.urlopen(request, timeout=10) as response:
    sys.stdout.buffer.write(response.read())
"""


def prefect_get(url: str, auth: str = "", data: dict | None = None, bed=None):
    """A Prefect API call (GET, or POST with data), with the server's basic-auth secret if given.
    bed: the server listens on the bed's login host's loopback (a user's default server), so
    the request is made from there (as root: nothing of the user's environment)."""
    if bed is not None:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        done = subprocess.run(["nsenter", f"--net=/run/netns/{bed.netns[bed.login_host]}", sys.executable, "-c",
                               _PREFECT_GET, url, json.dumps(headers)],
                              input=b"" if data is None else json.dumps(data).encode(), capture_output=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"{url}: {done.stderr.decode(errors='replace')[-1000:]}")
        return json.loads(done.stdout)
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers=headers, method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def default_server_env(bed, work: Path) -> dict:
    """For runs with no server configured: the user's own default server, its state in the
    test's dir (so that the test can stop it: nothing of the user's may outlive the session)."""
    return {"AR_DEFAULT_SERVER_DIR": str(work / "default-server"), "AR_SERVER_IDLE_SECONDS": "600"}


def default_server(work: Path) -> tuple[str, str]:
    """(api url, secret) of the default server the test's runs use (read as root)."""
    state = work / "default-server"
    return (state / "url").read_text().strip(), (state / "auth").read_text().strip()


def stop_default_server(bed, work: Path) -> None:
    if (work / "default-server" / "pid").exists():
        bed.run_login([bed.user_python, "-m", "flows.user_server", "stop"], user=bed.user, cwd=bed.repo,
                      env={**default_server_env(bed, work), "PYTHONPATH": str(bed.repo)}, timeout=60)


def wait_for(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} not within {timeout}s"
        time.sleep(0.2)
    return time.monotonic() - start


def cluster_leftovers(bed, cluster_id: str, work: Path | None = None) -> list[str]:
    """Everything of one cluster that still exists, on any host of the bed."""
    left = [f"process on {line}" for line in bed.cluster_processes(cluster_id)]
    left += [f"job {line}" for line in bed.live_jobs(name=cluster_id)]
    if getattr(bed, "openpbs", None) is not None:
        left += [f"OpenPBS job {line}" for line in bed.openpbs.live_jobs() if f" {cluster_id} " in line]
    left += [f"temp dir {path}" for path in bed.temp_dirs(node_tmp_name(cluster_id) + "*")]
    if work is not None and (work / "clusters" / cluster_id).exists():
        left.append(f"cluster dir {work / 'clusters' / cluster_id}")
    state = bed.user.home / ".activate-ray" / "runs" / f"{cluster_id}.json"
    if state.exists():
        left.append(f"state file {state}")
    return left


def assert_nothing_left(bed, cluster_id: str | None, work: Path | None = None, settle: float = 15) -> None:
    """No process, job, temp dir, cluster dir or state file of this cluster remains
    anywhere (a short grace for processes that are being reaped)."""
    assert cluster_id, "the run must name its cluster (ids come from the info file or the log)"
    deadline = time.monotonic() + settle
    while (left := cluster_leftovers(bed, cluster_id, work)) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert left == [], f"cluster {cluster_id} left behind:\n" + "\n".join(left)
    assert not (bed.user.home / ".ray" / "auth_token").exists(), \
        "a stray ~/.ray/auth_token would turn auth on for the user's other clusters"


def never_runs(work: Path) -> str:
    """A user script for runs that must fail before any job runs."""
    script = work / "never.py"
    script.write_text("print('NEVER_RUNS')\n")
    return str(script)


# "cluster ar-... submitted to ...": one per cluster a run made (a retry makes a fresh one)
SUBMITTED_CLUSTER_RE = re.compile(r"\bcluster (ar-[0-9a-f]{8,32}) submitted to ")


def clusters_submitted(output: str) -> set[str]:
    return set(SUBMITTED_CLUSTER_RE.findall(output))


# More CPUs than the cluster's one node has: it runs only once a worker job of 2 CPUs joined.
BIG_TASK = textwrap.dedent(
    """
    import socket
    import ray
    ray.init()

    @ray.remote(num_cpus=2)
    def big():
        return socket.gethostname()

    print("BIG_ON=" + ray.get(big.remote()))
    """
)


def batch_args(work: Path, *extra, scheduler: str = "slurm", readiness: int = 120) -> list[str]:
    """Flow arguments for a SLURM or PBS cluster on the bed: small nodes, site SSH defaults."""
    return [
        "--scheduler", scheduler, "--work-dir", str(work), f"--{scheduler}.walltime", "00:10:00",
        "--readiness-timeout", str(readiness), *SMALL, *extra,
    ]


class KeepKilling(threading.Thread):
    """Kills the bed user's raylet on one node, again and again, until stopped: a node
    that dies while the cluster starts (and would again, as a broken node does)."""

    def __init__(self, bed, node: str):
        super().__init__(daemon=True)
        self.bed, self.node, self.done, self.kills = bed, node, threading.Event(), 0

    def run(self):
        while not self.done.wait(0.3):
            try:
                result = self.bed.run_node(self.node, ["pkill", "-KILL", "-u", self.bed.user.name, "-f", "raylet"],
                                           timeout=30)
            except subprocess.TimeoutExpired:  # a busy machine: try again, never end the fault quietly
                continue
            self.kills += result.returncode == 0

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(35)


def supervisor_metadata_ops(bed, node: str, cluster_dir: str, seconds: float, out: Path) -> list[str]:
    """The calls naming the cluster dir (stat, open, access...) by the first worker supervisor on
    `node` and everything it runs (strace -f), over `seconds` of a running cluster (issue 34)."""
    found = [pid for host, pid, _, cmd in bed.processes(user=bed.user)
             if host == node and "ray_worker.sh" in cmd and cmd.split(" ", 1)[0].endswith("bash")]
    if not found:
        raise RuntimeError(f"no worker supervisor on {node}")
    # the first: the supervisor, not a subshell of it
    subprocess.run(["timeout", "-s", "INT", str(seconds), "strace", "-f", "-qq", "-e", "trace=%file,%stat",
                    "-o", str(out), "-p", str(min(found))], capture_output=True)
    lines = out.read_text(errors="replace").splitlines() if out.exists() else []
    out.unlink(missing_ok=True)
    return [line for line in lines if cluster_dir in line]
