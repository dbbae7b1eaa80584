"""prefect.yaml and the blocks against a real Prefect server (the `prefect_api` fixture).

- `prefect deploy --all` creates ray-cluster/{local,ssh,slurm,pbs} on the
  process pool, code pulled from this repo;
- their parameter schema is a clean form: titles and descriptions on every
  field, the scheduler an enum, constraints the server checks;
- with enforce_parameter_schema the server refuses a bad run with the field
  named, before any worker sees it;
- `prefect block register -m blocks` registers both blocks; a saved HPC site
  turns into parameters the server accepts;
- ray-cluster/local runs end to end through a real process worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tasks.settings import NODE_TMP_MAX_LEN
from tests.helpers import REPO, assert_nothing_left, flow_env

pytestmark = [pytest.mark.bed, pytest.mark.timeout(120)]  # a real Prefect server; the file runs in about 2 min

PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "activate-ray-pool"
DEPLOYMENTS = {"local": "none", "ssh": "none", "slurm": "slurm", "pbs": "pbs"}


def cli_env(api: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("RAY_CLUSTER_")}
    # the repo on the path, as `make setup`'s editable install has it (`-m blocks`, `import flows`)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def prefect(api: str, *args: str, timeout: int = 60, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PREFECT, *args], cwd=cwd, env=cli_env(api), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def api(prefect_api):
    """The test server with the work pool and every deployment of prefect.yaml."""
    created = prefect(prefect_api, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect(prefect_api, "deploy", "--all", timeout=90)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    return prefect_api


@pytest.fixture(scope="module")
def http(api):
    with httpx.Client(base_url=api, timeout=30) as client:
        yield client


def deployment(http: httpx.Client, name: str) -> dict:
    response = http.get(f"/deployments/name/ray-cluster/{name}")
    response.raise_for_status()
    return response.json()


def flow_runs(http: httpx.Client, deployment_id: str) -> list[dict]:
    response = http.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}})
    response.raise_for_status()
    return response.json()


def walk_properties(schema: dict):
    """(where, property schema) for every property of every model in the schema."""
    for model, definition in schema.get("definitions", {}).items():
        for name, prop in definition.get("properties", {}).items():
            yield f"{model}.{name}", prop


# --------------------------------------------------------------------------- deploy


ENTRYPOINTS = {"local": "ray_cluster_direct", "ssh": "ray_cluster_direct", "slurm": "ray_cluster_slurm",
               "pbs": "ray_cluster_pbs"}
# The parameters of each kind of deployment: the workflow's input groups that apply to it, in form order.
PARAMETERS = {
    "local": ["user_script", "script_args", "runtime_env", "host", "cluster", "environment", "advanced"],
    "slurm": ["user_script", "script_args", "runtime_env", "host", "cluster", "slurm", "scale", "environment", "advanced"],
    "pbs": ["user_script", "script_args", "runtime_env", "host", "cluster", "pbs", "scale", "environment", "advanced"],
}


def test_deploy_all_creates_the_four_deployments(http):
    for name in DEPLOYMENTS:
        d = deployment(http, name)
        assert d["entrypoint"] == f"flows/ray_cluster.py:{ENTRYPOINTS[name]}"
        assert d["work_pool_name"] == POOL
        assert d["enforce_parameter_schema"] is True
        assert d["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ], "a process worker on this machine runs the flow from this repo"
        assert d["description"], name
    # only what differs from the defaults
    assert deployment(http, "slurm")["parameters"] == {"host": "hpc-login", "slurm": {"nodes": 2}}
    assert deployment(http, "pbs")["parameters"] == {"host": "hpc-login", "pbs": {"nodes": 2}}
    assert deployment(http, "local")["parameters"] == {"user_script": "examples/hello_ray.py",
                                                       "cluster": {"direct_workers": 1}}


def test_the_scale_deployment_takes_a_cluster_id_and_a_change(http):
    """ray-cluster/scale: the scale command as a run form; the server refuses a cluster id
    that is not one, before any worker sees it."""
    d = deployment(http, "scale")
    assert d["entrypoint"] == "flows/ray_cluster.py:ray_cluster_scale" and d["enforce_parameter_schema"] is True
    properties = d["parameter_openapi_schema"]["properties"]
    assert list(properties) == ["cluster_id", "add", "remove", "host", "work_dir", "timeout"]
    assert properties["add"]["maximum"] == 1000 and "pattern" in properties["cluster_id"]
    refused = http.post(f"/deployments/{d['id']}/create_flow_run", json={"parameters": {"cluster_id": "ar-; rm -rf ~"}})
    assert refused.status_code == 409, refused.text


@pytest.mark.parametrize("name", PARAMETERS)
def test_each_form_shows_what_applies_with_titles_descriptions_and_positions(http, name):
    schema = deployment(http, name)["parameter_openapi_schema"]
    properties = schema["properties"]
    assert sorted(properties, key=lambda p: properties[p]["position"]) == PARAMETERS[name]
    # the login node is required where there is one; empty (this machine) is a choice only without a scheduler
    assert schema.get("required", []) == ([] if name == "local" else ["host"])
    missing = [where for where, prop in [*properties.items(), *walk_properties(schema)]
               if not (prop.get("title") and prop.get("description") and "position" in prop)]
    assert missing == [], f"fields without a title, a description or a position: {missing}"
    definitions = schema["definitions"]
    cluster = definitions["ClusterOptions" if name == "local" else "BatchClusterOptions"]["properties"]
    assert ("direct_workers" in cluster) == (name == "local")  # extra workers beside the head: no scheduler only
    # optional (empty: what the allocation gives), with its bounds
    assert {"type": "integer", "minimum": 1, "maximum": 4096} in cluster["num_cpus_per_node"]["anyOf"]
    assert cluster["node_failure"]["$ref"] == "#/definitions/NodeFailure"  # a dropdown
    advanced = definitions["AdvancedOptions"]["properties"]
    assert advanced["dashboard_port"]["minimum"] == 0 and advanced["dashboard_port"]["maximum"] == 65535
    assert advanced["node_tmp"]["maxLength"] == NODE_TMP_MAX_LEN
    if name == "slurm":
        assert "pattern" in definitions["SlurmOptions"]["properties"]["walltime"]
        assert "PbsOptions" not in definitions
    if name == "pbs":
        assert "pattern" in definitions["PbsOptions"]["properties"]["walltime"]
        assert "SlurmOptions" not in definitions


@pytest.mark.parametrize(
    ("name", "parameters", "field", "reason"),
    [
        ("slurm", {"slurm": {"walltime": "abc"}}, "slurm.walltime", "does not match"),
        ("local", {"cluster": {"num_cpus_per_node": 0}}, "cluster.num_cpus_per_node", "less than the minimum of 1"),
        ("local", {"cluster": {"node_failure": "explode"}}, "cluster.node_failure", "is not one of"),
        ("pbs", {"pbs": {"queue": "a queue; rm -rf ~"}}, "pbs.queue", "does not match"),
        ("local", {"advanced": {"node_tmp": "/" + "x" * 60}}, "advanced.node_tmp", "is too long"),
        ("local", {"cluster": {"num_cpus": 4}}, "cluster", "Additional properties are not allowed"),
    ],
)
def test_a_bad_parameter_is_refused_with_the_field_named(http, name, parameters, field, reason):
    d = deployment(http, name)
    response = http.post(f"/deployments/{d['id']}/create_flow_run", json={"parameters": parameters})
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert f"Validation failed for field '{field}'" in detail or f"'{field}'" in detail, detail
    assert reason in detail, detail
    assert flow_runs(http, d["id"]) == [], "a refused run must not exist"


def test_the_cli_refuses_a_bad_parameter_with_the_field_named(api, http):
    result = prefect(api, "deployment", "run", "ray-cluster/slurm", "--param", 'slurm={"walltime": "abc"}')
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert "Validation failed for field 'slurm.walltime'" in output, output
    assert flow_runs(http, deployment(http, "slurm")["id"]) == []


def test_a_run_overrides_one_field_and_one_group_and_keeps_the_deployments_others(api, http):
    result = prefect(api, "deployment", "run", "ray-cluster/slurm", "-p", "user_script=/abs/train.py",
                     "-p", 'slurm={"nodes": 4}')
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = flow_runs(http, deployment(http, "slurm")["id"])
    try:
        assert run["parameters"] == {"host": "hpc-login", "user_script": "/abs/train.py", "slurm": {"nodes": 4}}
    finally:
        assert http.delete(f"/flow_runs/{run['id']}").status_code == 204  # no worker must pick it up


# --------------------------------------------------------------------------- blocks


def test_blocks_register_and_a_saved_site_makes_parameters_the_server_accepts(api, http, tmp_path):
    registered = prefect(api, "block", "register", "-m", "blocks")
    assert registered.returncode == 0, registered.stdout + registered.stderr
    for slug in ("activate-ray-ssh-connection", "activate-ray-hpc-site"):
        assert http.get(f"/block_types/slug/{slug}").status_code == 200, slug
    site_type = http.get("/block_types/slug/activate-ray-hpc-site").json()
    schemas = http.post("/block_schemas/filter", json={"block_schemas": {"block_type_id": {"any_": [site_type["id"]]}}})
    site_schema = schemas.json()[0]["fields"]
    assert site_schema["title"] == "HpcSite"
    for name, prop in site_schema["properties"].items():
        assert (prop.get("title") or prop.get("$ref")) and prop.get("description"), name
    assert site_schema["definitions"]["SchedulerKind"]["enum"] == ["none", "slurm", "pbs"]

    script = f"""
import json
from blocks import HpcSite
HpcSite(host="alice@login.hpc.example", account="proj1", partition="gpu", work_dir="/scratch/alice/ar").save(
    "test-site", overwrite=True)
site = HpcSite.load("test-site")
run = site.run_deployment(user_script={str(REPO / 'examples/hello_ray.py')!r}, slurm={{"nodes": "3"}})
print(json.dumps({{"id": str(run.id), "parameters": run.parameters}}))
try:
    HpcSite(host="alice@login.hpc.example", account="bad account")
except ValueError as exc:
    print("REFUSED", exc.errors()[0]["loc"])
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=cli_env(api), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    created = json.loads(lines[0])  # run_deployment: ray-cluster/slurm, accepted by the server's schema check
    parameters = created["parameters"]
    assert lines[1] == "REFUSED ('slurm', 'account')"  # checked as the flow's own setting
    assert sorted(parameters) == sorted(PARAMETERS["slurm"])  # the slurm flow's own parameters
    assert parameters["host"] == "alice@login.hpc.example"
    assert parameters["slurm"]["account"] == "proj1" and parameters["slurm"]["partition"] == "gpu"
    assert parameters["slurm"]["nodes"] == 3 and parameters["environment"]["work_dir"] == "/scratch/alice/ar"

    run = http.get(f"/flow_runs/{created['id']}").json()
    assert run["deployment_id"] == deployment(http, "slurm")["id"]
    # only the server's check was wanted: no worker must pick this run up
    assert http.delete(f"/flow_runs/{created['id']}").status_code == 204


# --------------------------------------------------------------------------- a real run through a worker


@pytest.mark.bed
def test_the_local_deployment_runs_through_a_process_worker(api, http, bed, work):
    """The bed's user runs a process worker on the login node; a run that overrides some
    inputs with `-p` starts a local cluster there with the deployment's others, as that
    user, and leaves nothing. The worker's RAY_CLUSTER_* environment changes nothing."""
    work_dir = work / "w"
    info_file = work / "info.json"
    # deployed again from the bed's copy of the checkout: its pull step is a dir the bed's user can enter
    deployed = prefect(api, "deploy", "--name", "local", timeout=90, cwd=bed.repo)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    d = deployment(http, "local")
    started = prefect(api, "deployment", "run", "ray-cluster/local",
                      "-p", f"user_script={bed.repo / 'examples/hello_ray.py'}",
                      "-p", "advanced=" + json.dumps({"info_file": str(info_file)}),
                      "-p", "environment=" + json.dumps({"work_dir": str(work_dir)}))
    assert started.returncode == 0, started.stdout + started.stderr
    (run,) = flow_runs(http, d["id"])
    assert run["parameters"] == {
        "user_script": str(bed.repo / "examples/hello_ray.py"),
        "cluster": {"direct_workers": 1},  # the deployment's, kept
        "advanced": {"info_file": str(info_file)},
        "environment": {"work_dir": str(work_dir)},
    }

    worker_prefect = str(Path(bed.user_python).parent / "prefect")
    leak = {"RAY_CLUSTER_NUM_CPUS_PER_NODE": "7", "RAY_CLUSTER_CLUSTER__NUM_CPUS_PER_NODE": "7",
            "RAY_CLUSTER_SCHEDULER": "slurm", "RAY_CLUSTER_KEEP_ALIVE": "true"}
    worker = bed.run_login(
        [worker_prefect, "worker", "start", "--pool", POOL, "--type", "process", "--run-once", "--limit", "1"],
        user=bed.user, env=flow_env(api, leak, repo=bed.repo), cwd=bed.repo, timeout=150,
    )
    (work / "worker.log").write_text(worker.stdout + worker.stderr)
    deadline = time.monotonic() + 15
    while True:
        state = http.get(f"/flow_runs/{run['id']}").json()["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    logs = worker.stdout[-4000:] + worker.stderr[-4000:]
    assert state["type"] == "COMPLETED", f"{state['type']}: {state.get('message')}\n{logs}"
    assert http.get(f"/flow_runs/{run['id']}").json()["name"] == "ray-none-local-2n"  # named once it started
    assert "HELLO_RAY_OK" in worker.stdout + worker.stderr, logs
    info = json.loads(info_file.read_text())
    assert info["scheduler"] == "none" and len(info["nodes"]) == 2  # the deployment's direct_workers: 1
    assert 7 not in [node["CPU"] for node in info["nodes"]], "the worker's RAY_CLUSTER_* leaked into the run"
    assert_nothing_left(bed, info["cluster_id"], work_dir)
    assert_progress_artifact_reached_all_nodes(http, run["id"], info["cluster_id"])
    assert_cluster_events(http, info, run["id"])


@pytest.mark.bed
def test_a_run_cancelled_from_the_ui_tears_its_cluster_down(api, http, bed, work):
    """The UI's Cancel on a running keep-alive cluster (the API call the button makes: the
    run set to Cancelling): the process worker ends the run, the run ends Cancelled, and
    the cluster is torn down on its host, leaving nothing."""
    work_dir = work / "w"
    info_file = work / "info.json"
    deployed = prefect(api, "deploy", "--name", "local", timeout=90, cwd=bed.repo)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    d = deployment(http, "local")
    started = prefect(api, "deployment", "run", "ray-cluster/local", "-p", "user_script=",
                      "-p", "cluster=" + json.dumps({"keep_alive": True, "direct_workers": 1}),
                      "-p", "advanced=" + json.dumps({"info_file": str(info_file)}),
                      "-p", "environment=" + json.dumps({"work_dir": str(work_dir)}))
    assert started.returncode == 0, started.stdout + started.stderr
    (run,) = [r for r in flow_runs(http, d["id"]) if r["state"]["type"] == "SCHEDULED"]
    worker_prefect = str(Path(bed.user_python).parent / "prefect")
    worker = bed.spawn("login", [worker_prefect, "worker", "start", "--pool", POOL, "--type", "process",
                                 "--run-once", "--limit", "1"],
                       "cancel-worker.log", user=bed.user, env=flow_env(api, repo=bed.repo), cwd=bed.repo)
    try:
        deadline = time.monotonic() + 150
        while not info_file.exists():
            assert worker.poll() is None and time.monotonic() < deadline, \
                (bed.log_dir / "cancel-worker.log").read_text()[-4000:]
            time.sleep(0.5)
        cluster_id = json.loads(info_file.read_text())["cluster_id"]
        assert bed.cluster_processes(cluster_id), "the cluster runs before the cancel"
        cancelled = http.post(f"/flow_runs/{run['id']}/set_state",
                              json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})
        assert cancelled.status_code in (200, 201), cancelled.text
        deadline = time.monotonic() + 90
        while (state := http.get(f"/flow_runs/{run['id']}").json()["state"])["type"] != "CANCELLED":
            assert time.monotonic() < deadline, f"{state}\n" + (bed.log_dir / "cancel-worker.log").read_text()[-4000:]
            time.sleep(0.5)
    finally:
        bed.stop_spawned(worker, timeout=60)
    assert_nothing_left(bed, cluster_id, work_dir, settle=30)


def assert_progress_artifact_reached_all_nodes(http: httpx.Client, run_id: str, cluster_id: str) -> None:
    response = http.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]},
                                                                  "type": {"any_": ["progress"]}}})
    response.raise_for_status()
    (progress,) = response.json()
    assert progress["key"] == f"ray-progress-{cluster_id}"
    assert progress["data"] == 100.0 and "2 of 2 nodes alive" in progress["description"], progress


def assert_cluster_events(http: httpx.Client, info: dict, run_id: str) -> None:
    """ready, job-finished and torn-down, each about this cluster and related to its flow run."""
    resource = f"activate-ray.cluster.{info['cluster_id']}"
    deadline = time.monotonic() + 20  # the server files events asynchronously
    while True:
        response = http.post("/events/filter", json={
            "filter": {"any_resource": {"id": [resource]}, "occurred": {"since": "2000-01-01T00:00:00Z"}},
            "limit": 50})
        response.raise_for_status()
        events = {event["event"]: event for event in response.json()["events"]}
        names = sorted(events)
        if names == ["activate-ray.cluster.job-finished", "activate-ray.cluster.ready",
                     "activate-ray.cluster.torn-down"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert names == ["activate-ray.cluster.job-finished", "activate-ray.cluster.ready",
                     "activate-ray.cluster.torn-down"], names
    ready = events["activate-ray.cluster.ready"]
    assert ready["resource"]["prefect.resource.id"] == resource
    assert ready["payload"]["scheduler"] == "none" and len(ready["payload"]["nodes"]) == 2
    assert ready["payload"]["ray_address"] == info["ray_address"]
    assert events["activate-ray.cluster.job-finished"]["payload"]["status"] == "SUCCEEDED"
    assert events["activate-ray.cluster.torn-down"]["payload"]["nodes"] == ready["payload"]["nodes"]
    assert f"prefect.flow-run.{run_id}" in [r["prefect.resource.id"] for r in ready["related"]]
    token = Path(info["token_file"]) if info["token_file"] else None
    assert token is None or not token.exists(), "the token outlived its cluster"


@pytest.mark.parametrize("kind", ["slurm", "pbs", "direct"])
def test_the_check_deployments_take_the_runs_parameter_form_and_on_nodes(http, kind):
    """ray-cluster/check-<kind>: the run's form of its kind, in its order, then on_nodes."""
    d = deployment(http, f"check-{kind}")
    run = deployment(http, {"direct": "local"}.get(kind, kind))
    assert d["entrypoint"] == f"flows/ray_cluster.py:ray_cluster_check_{kind}" and d["enforce_parameter_schema"] is True
    assert list(d["parameter_openapi_schema"]["properties"]) == [
        *run["parameter_openapi_schema"]["properties"], "on_nodes"]
