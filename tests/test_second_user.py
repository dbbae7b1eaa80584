"""A second user of the same machine gets nothing from a cluster: not the token (Prefect
API, files, command lines, environments), no dir of the cluster's to write into, no
port beyond loopback that answers without the token, and 401 from the job API.

Run on the site bed: the owner is the bed's user, the stranger its second user
(`arother`), who can log in to the login node and to every compute node. Each
attack is tried as that user, from where a stranger would try it."""

from __future__ import annotations

import json
import shutil
import signal
import textwrap
from pathlib import Path

import pytest

from tasks.settings import node_tmp_name
from tests.helpers import SMALL, BackgroundFlow, assert_nothing_left, batch_args, run_flow

pytestmark = [pytest.mark.bed, pytest.mark.timeout(400)]

# Every TCP listener beyond loopback, asked plain HTTP questions without a token. A
# port "answers" when one of these returns 2xx/3xx. Ray's liveness endpoints
# (/api/local_raylet_healthz, /api/gcs_healthz) answer 200 without the token by
# Ray's design and carry no data: they are not asked here (README, ports table).
PORT_PROBE = textwrap.dedent(
    """
    import http.client, json, sys
    answered = {}
    for address in sys.argv[1:]:
        ip, port = address.rsplit(":", 1)
        for path in ("/", "/metrics", "/api/version", "/api/jobs/", "/api/v0/nodes", "/api/cluster_status"):
            try:
                connection = http.client.HTTPConnection(ip, int(port), timeout=3)
                connection.request("GET", path)
                status = connection.getresponse().status
            except Exception:
                continue
            if 200 <= status < 400:
                answered.setdefault(address, []).append(f"{path} {status}")
    print(json.dumps(answered))
    """
)

# As the stranger: every given dir in which a file can be created.
WRITE_PROBE = textwrap.dedent(
    """
    import json, os, sys
    writable = []
    for directory in sys.argv[1:]:
        try:
            fd = os.open(os.path.join(directory, ".stranger-was-here"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError:
            continue
        os.close(fd)
        writable.append(directory)
    print(json.dumps(writable))
    """
)

# As the stranger: where the token shows up among what that user can read: every process's
# command line and environment, and every file the product could have written, never a
# whole shared tree (one with other users' virtual environments took more than 90 s):
# argv[1] is {"trees": dirs walked whole (the test's own work dir, the owner's product
# dirs in its home), "owned_in": shared dirs (/tmp, /var/tmp, /dev/shm) of which only the
# entries the owner made are walked, at any depth, "owner": the owner's uid}.
TOKEN_SEARCH = textwrap.dedent(
    """
    import json, os, sys
    token = sys.stdin.readline().strip().encode()  # not in argv: this probe's own cmdline would hold it
    scope = json.loads(sys.argv[1])


    def holds(path, limit=-1):  # the token in the file's first `limit` bytes (-1: all of it)
        try:
            with open(path, "rb") as handle:
                return token in handle.read(limit)
        except OSError:
            return False

    found = [f"/proc/{pid}/{part}" for pid in filter(str.isdigit, os.listdir("/proc"))
             for part in ("cmdline", "environ") if holds(f"/proc/{pid}/{part}")]
    roots = list(scope["trees"])
    for shared in scope["owned_in"]:
        try:
            entries = list(os.scandir(shared))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid == scope["owner"]:
                    roots.append(entry.path)
            except OSError:
                pass
    for root in roots:
        if os.path.isfile(root) and not os.path.islink(root):
            found += [root] if holds(root, 1 << 20) else []
            continue
        for directory, dirs, files in os.walk(root):
            found += [path for path in (os.path.join(directory, name) for name in files) if holds(path, 1 << 20)]
    print(json.dumps(found))
    """
)

PREFECT_SECRETS = textwrap.dedent(
    """
    import sys, urllib.request
    request = urllib.request.Request(sys.argv[1] + "/block_documents/filter", method="POST",
                                     data=b'{"include_secrets": true}', headers={"Content-Type": "application/json"})
    print(urllib.request.urlopen(request, timeout=10).read().decode())
    """
)

JOB_API = textwrap.dedent(
    """
    import sys, urllib.request, urllib.error
    request = urllib.request.Request(sys.argv[1], data=b'{"entrypoint": "touch /tmp/stranger-ran-this"}',
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=5)
        print("ACCEPTED")
    except urllib.error.HTTPError as error:
        print("HTTP", error.code)
    """
)


def as_stranger(bed, host: str, code: str, *args: str, stdin: str = "") -> str:
    result = bed.run_on(host, [bed.user_python, "-c", code, *args], user=bed.other, timeout=90, input=stdin)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def listeners_beyond_loopback(bed, host: str) -> list[str]:
    """ip:port of every TCP listener on the host that is not on loopback (the host's own view)."""
    out = bed.run_on(host, ["ss", "-ltnH"]).stdout
    addresses = []
    for line in out.splitlines():
        local = line.split()[3]
        ip, port = local.rsplit(":", 1)
        ip = ip.strip("[]").removeprefix("::ffff:")
        if ip.startswith("127.") or ip == "::1":
            continue
        addresses.append(f"{bed.ips[host] if ip in ('*', '0.0.0.0', '::') else ip}:{port}")
    return sorted(set(addresses))


def cluster_dirs(bed, info: dict, work) -> dict[str, list[str]]:
    """Every dir of the cluster, per host, as that host sees it: its cluster dir tree on
    the shared home (seen from the login node) and each node temp dir tree."""
    dirs = {"login": [str(p) for p in [work / "clusters" / info["cluster_id"],
                                        *(work / "clusters" / info["cluster_id"]).rglob("*")] if p.is_dir()]}
    for host in bed.hosts:
        tmp = bed.node_tmp(host)
        for root in tmp.glob(node_tmp_name(info["cluster_id"]) + "*"):
            dirs.setdefault(host, [])
            dirs[host] += ["/tmp/" + str(p.relative_to(tmp)) for p in [root, *root.rglob("*")] if p.is_dir()]
    return dirs


def assert_stranger_gets_nothing(bed, info: dict, work, prefect_api: str, head_host: str) -> None:
    token = Path(info["token_file"]).read_text().strip()
    assert len(token) == 64
    # 1. the Prefect server (the test's own, configured one): no block holds the token
    blocks = as_stranger(bed, "login", PREFECT_SECRETS, prefect_api)
    assert token not in blocks
    # 2. files, command lines and environments the stranger can read, on every host: each file
    # the product could have written (the run's work dir, the owner's product dirs in its home,
    # what the owner made in each host's shared temp dirs), never a whole tree of other users'
    # (work is the product's work dir, inside the test's own dir: that whole dir, the flow's kept output included)
    scope = {"trees": [str(work.parent), *(str(bed.user.home / name) for name in (".activate-ray", ".ray", ".prefect"))],
             "owned_in": ["/tmp", "/var/tmp", "/dev/shm"], "owner": bed.user.uid}
    for host in bed.hosts:
        found = json.loads(as_stranger(bed, host, TOKEN_SEARCH, json.dumps(scope), stdin=token + "\n"))
        assert found == [], f"the stranger finds the token on {host}: {found}"
    # 3. no dir of the cluster's takes a file from the stranger (Ray's own 0777 dirs included)
    dirs = cluster_dirs(bed, info, work)
    assert head_host in dirs and any("/sockets" in d for d in dirs[head_host]), dirs
    for host, paths in dirs.items():
        assert json.loads(as_stranger(bed, host, WRITE_PROBE, *paths)) == [], f"writable by the stranger on {host}"
    # 4. no port beyond loopback answers without the token, seen from the head itself and from the login node
    listeners = listeners_beyond_loopback(bed, head_host)
    assert len(listeners) >= 5, listeners  # Ray's GCS, raylet, agents, client server at least
    for host in {head_host, "login"}:
        answered = json.loads(as_stranger(bed, host, PORT_PROBE, *listeners))
        assert answered == {}, f"answers without the token, probed from {host}: {answered}"
    # 5. the job API on the head's loopback, where the stranger can reach it on a shared node: 401
    url = f"http://127.0.0.1:{info['dashboard_port_on_head']}/api/jobs/"
    assert as_stranger(bed, head_host, JOB_API, url) == "HTTP 401"


def test_stranger_gets_nothing_from_a_local_cluster(work, prefect_api, bed):
    flow = BackgroundFlow(bed, ["--keep-alive", "--work-dir", work / "w", *SMALL], work, prefect_api)
    try:
        info = flow.wait_ready()
        assert info["token_block"] == ""  # never published unless asked for
        assert_stranger_gets_nothing(bed, info, work / "w", prefect_api, "login")
        flow.send_signal(signal.SIGTERM)
        assert flow.wait(60) == 143
    finally:
        flow.stop()
    assert not (bed.node_tmp("login") / "stranger-ran-this").exists()
    assert_nothing_left(bed, info["cluster_id"], work / "w")


def test_stranger_gets_nothing_from_a_slurm_clusters_head_node(work, prefect_api, bed):
    flow = BackgroundFlow(bed, batch_args(work / "w", "--keep-alive", "--slurm.nodes", "2"), work, prefect_api)
    try:
        info = flow.wait_ready()
        assert_stranger_gets_nothing(bed, info, work / "w", prefect_api, info["head_node"])
        flow.send_signal(signal.SIGTERM)
        assert flow.wait(60) == 143
    finally:
        flow.stop()
    assert_nothing_left(bed, info["cluster_id"], work / "w")


def test_the_port_probe_finds_metrics_ports_once_metrics_are_asked_for(work, prefect_api, bed):
    """The check above can fail: with --metrics, Ray's Prometheus servers answer without the token."""
    flow = BackgroundFlow(bed, ["--keep-alive", "--metrics", "--work-dir", work / "w", *SMALL], work, prefect_api)
    try:
        flow.wait_ready()
        answered = json.loads(as_stranger(bed, "login", PORT_PROBE, *listeners_beyond_loopback(bed, "login")))
        assert len(answered) >= 2, answered  # the dashboard's and the autoscaler's metrics at least
        flow.send_signal(signal.SIGTERM)
        assert flow.wait(60) == 143
    finally:
        flow.stop()


def test_a_token_block_is_refused_with_prefects_temporary_server(work, bed):
    run = run_flow(bed, ["--publish-token-block", "--work-dir", work / "w", *SMALL], work=work, api="")
    assert run.returncode == 2, run.output[-3000:]
    assert "publish_token_block needs a configured Prefect server" in run.output
    assert not (work / "w").exists()  # refused before anything started


def test_two_clusters_on_one_head_node_are_both_up_and_run_a_job(work, prefect_api, bed):
    """Each cluster has its own ports (dashboard, metrics included): nothing collides."""
    script = work / "wait_then_report.py"
    gate = work / "gate"
    script.write_text(textwrap.dedent(f"""
        import os, socket, time, ray
        ray.init()
        deadline = time.time() + 120
        while not os.path.exists({str(gate)!r}) and time.time() < deadline:
            time.sleep(0.2)
        hostname = ray.remote(lambda: socket.gethostname())
        print("JOB_RAN_ON=" + ray.get(hostname.remote()))
    """))
    flows = []
    for name in ("a", "b"):
        home = bed.home_dir(f"{name}-{work.name}")
        flows.append((home, BackgroundFlow(bed, batch_args(
            work / "w", "--slurm.nodes", "1", "--slurm.extra-directives", "#SBATCH --nodelist=node1",
            "--user-script", script), home, prefect_api)))
    try:
        infos = [flow.wait_ready(200) for _, flow in flows]
        assert [info["head_node"] for info in infos] == ["node1", "node1"]
        assert infos[0]["cluster_id"] != infos[1]["cluster_id"]
        assert infos[0]["dashboard_port_on_head"] != infos[1]["dashboard_port_on_head"]
        gate.write_text("go")
        for _, flow in flows:
            assert flow.wait(150) == 0, flow.output[-4000:]
            assert "JOB_RAN_ON=node1" in flow.output
    finally:
        for home, flow in flows:
            flow.kill()
            shutil.rmtree(home, ignore_errors=True)
    for info in infos:
        assert_nothing_left(bed, info["cluster_id"], work / "w")
