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

from flows.settings import NODE_TMP_MAX_LEN
from tests.helpers import REPO, assert_nothing_left, flow_env

pytestmark = pytest.mark.timeout(120)  # the whole file runs in about 40 s

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


def test_deploy_all_creates_the_four_deployments(http):
    for name, scheduler in DEPLOYMENTS.items():
        d = deployment(http, name)
        assert d["entrypoint"] == "flows/ray_cluster.py:ray_cluster"
        assert d["work_pool_name"] == POOL
        assert d["enforce_parameter_schema"] is True
        assert d["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ], "a process worker on this machine runs the flow from this repo"
        assert d["parameters"]["settings"]["scheduler"] == scheduler, name
        assert d["description"], name
    assert deployment(http, "slurm")["parameters"]["settings"]["slurm"]["nodes"] == 2
    assert deployment(http, "pbs")["parameters"]["settings"]["pbs"]["nodes"] == 2
    assert deployment(http, "local")["parameters"]["settings"]["user_script"] == "examples/hello_ray.py"


def test_the_parameter_schema_is_a_clean_form(http):
    schema = deployment(http, "local")["parameter_openapi_schema"]
    assert schema["required"] == ["settings"]
    assert schema["properties"]["settings"]["$ref"] == "#/definitions/RayClusterSettings"
    untitled = []
    for where, prop in walk_properties(schema):
        if "$ref" in prop:  # the title is the referenced model's or enum's
            target = schema["definitions"][prop["$ref"].rsplit("/", 1)[1]]
            has_title = bool(target.get("title"))
        else:
            has_title = bool(prop.get("title"))
        if not (has_title and prop.get("description")):
            untitled.append(where)
    assert untitled == [], f"fields without a title and a description: {untitled}"
    definitions = schema["definitions"]
    assert definitions["Scheduler"]["enum"] == ["none", "slurm", "pbs"]  # a dropdown in the UI
    settings = definitions["RayClusterSettings"]["properties"]
    assert settings["scheduler"]["$ref"] == "#/definitions/Scheduler"
    assert settings["num_cpus_per_node"]["minimum"] == 1
    assert settings["dashboard_port"]["minimum"] == 0 and settings["dashboard_port"]["maximum"] == 65535
    assert settings["node_tmp"]["maxLength"] == NODE_TMP_MAX_LEN
    assert "pattern" in definitions["SlurmOptions"]["properties"]["walltime"]
    assert "pattern" in definitions["PbsOptions"]["properties"]["walltime"]


@pytest.mark.parametrize(
    ("name", "settings", "field", "reason"),
    [
        ("slurm", {"scheduler": "slurm", "slurm": {"walltime": "abc"}}, "settings.slurm.walltime", "does not match"),
        ("local", {"num_cpus_per_node": 0}, "settings.num_cpus_per_node", "less than the minimum of 1"),
        ("local", {"scheduler": "lsf"}, "settings.scheduler", "is not one of"),
        ("pbs", {"scheduler": "pbs", "pbs": {"queue": "a queue; rm -rf ~"}}, "settings.pbs.queue", "does not match"),
        ("local", {"node_tmp": "/" + "x" * 60}, "settings.node_tmp", "is too long"),
        ("local", {"num_cpus": 4}, "settings", "Additional properties are not allowed"),
    ],
)
def test_a_bad_parameter_is_refused_with_the_field_named(http, name, settings, field, reason):
    d = deployment(http, name)
    response = http.post(f"/deployments/{d['id']}/create_flow_run", json={"parameters": {"settings": settings}})
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert f"Validation failed for field '{field}'" in detail or (field == "settings" and "'settings'" in detail)
    assert reason in detail, detail
    assert flow_runs(http, d["id"]) == [], "a refused run must not exist"


def test_the_cli_refuses_a_bad_parameter_with_the_field_named(api, http):
    result = prefect(
        api, "deployment", "run", "ray-cluster/slurm", "--param", 'settings={"slurm": {"walltime": "abc"}}'
    )
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert "Validation failed for field 'settings.slurm.walltime'" in output, output
    assert flow_runs(http, deployment(http, "slurm")["id"]) == []


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
    assert site_schema["definitions"]["Scheduler"]["enum"] == ["none", "slurm", "pbs"]

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
    settings = parameters["settings"]
    assert settings["host"] == "alice@login.hpc.example" and settings["scheduler"] == "slurm"
    assert settings["slurm"]["account"] == "proj1" and settings["slurm"]["partition"] == "gpu"
    assert settings["slurm"]["nodes"] == 3 and settings["work_dir"] == "/scratch/alice/ar"

    run = http.get(f"/flow_runs/{created['id']}").json()
    assert run["deployment_id"] == deployment(http, "slurm")["id"]
    # only the server's check was wanted: no worker must pick this run up
    assert http.delete(f"/flow_runs/{created['id']}").status_code == 204


# --------------------------------------------------------------------------- a real run through a worker


@pytest.mark.bed
def test_the_local_deployment_runs_through_a_process_worker(api, http, bed, work):
    """The bed's user runs a process worker on the login node; the run starts a local
    cluster there, as that user, and leaves nothing."""
    work_dir = work / "w"
    info_file = work / "info.json"
    settings = {
        "user_script": str(bed.repo / "examples/hello_ray.py"),
        "ray_memory_gb": 0.5,
        "object_store_memory_gb": 0.25,
        "work_dir": str(work_dir),
        "info_file": str(info_file),
    }
    # deployed again from the bed's copy of the checkout: its pull step is a dir the bed's user can enter
    deployed = prefect(api, "deploy", "--name", "local", timeout=90, cwd=bed.repo)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    d = deployment(http, "local")
    response = http.post(f"/deployments/{d['id']}/create_flow_run", json={"parameters": {"settings": settings}})
    assert response.status_code == 201, response.text
    run = response.json()
    # Prefect merges a run's parameters into the deployment's by top-level name:
    # this run's settings replace the deployment's default settings as a whole.
    assert run["parameters"] == {"settings": settings}

    worker_prefect = str(Path(bed.user_python).parent / "prefect")
    worker = bed.run_login(
        [worker_prefect, "worker", "start", "--pool", POOL, "--type", "process", "--run-once", "--limit", "1"],
        user=bed.user, env=flow_env(api, repo=bed.repo), cwd=bed.repo, timeout=150,
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
    assert "HELLO_RAY_OK" in worker.stdout + worker.stderr, logs
    info = json.loads(info_file.read_text())
    assert info["scheduler"] == "none" and len(info["nodes"]) == 1  # the deployment's direct_workers: 1 was replaced
    assert_nothing_left(bed, info["cluster_id"], work_dir)
