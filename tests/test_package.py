"""The installable package: what the wheel holds (tests/golden/wheel_files.txt, one reviewed
diff per change to what ships) and that an installed wheel works outside the checkout (its
scripts and examples found, the command line, the deployments' flows)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tasks.settings import RayClusterSettings
from tasks.shipped import EXAMPLES_DIR, SCRIPTS_DIR, shipped_example
from tests.helpers import REPO

GOLDEN_WHEEL_FILES = REPO / "tests" / "golden" / "wheel_files.txt"
UV = Path(sys.executable).parent / "uv"  # make setup installs it (the test extra)
# What a build copies from the checkout: its sources, not what running it left behind.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                     ".bench", "ray-cluster.json")


def _env() -> dict:
    """The environment of a command that must see the installed package only, not the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("RAY_CLUSTER_")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel as `uv build` (and make wheel-demo) builds it, through its sdist, from a copy of
    the checkout: a build in place reads what earlier builds left (build/, *.egg-info), and
    their stale files would ship."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_SOURCES)
    built = subprocess.run([str(UV), "build", "--out-dir", str(root / "dist"), str(source)],
                           capture_output=True, text=True, check=False, timeout=300, env=_env())
    assert built.returncode == 0, built.stderr[-3000:]
    [found] = (root / "dist").glob("*.whl")
    return found


def wheel_files(wheel: Path) -> list[str]:
    """The wheel's file names, the version left out of its dist-info dir's name (a release is
    not a change of what ships)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    return sorted(re.sub(r"^activate_ray-[^/]+\.dist-info/", "activate_ray-VERSION.dist-info/", name) for name in names)


def test_the_wheel_holds_the_golden_file_list(wheel):
    """A change to what ships is one diff of tests/golden/wheel_files.txt (UPDATE_GOLDEN=1 rewrites it)."""
    files = "\n".join(wheel_files(wheel)) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN_WHEEL_FILES.write_text(files)
    golden = GOLDEN_WHEEL_FILES.read_text()
    added, gone = sorted(set(files.split()) - set(golden.split())), sorted(set(golden.split()) - set(files.split()))
    assert files == golden, (f"the wheel's files changed (added {added}, gone {gone}): "
                             "UPDATE_GOLDEN=1 rewrites tests/golden/wheel_files.txt, then review its diff")


def test_the_wheel_ships_every_script_and_example_and_no_tests(wheel):
    files = set(wheel_files(wheel))
    for shipped, checkout in (("tasks/scripts", REPO / "scripts"), ("tasks/examples", REPO / "examples")):
        # a new kind of file (not .sh or .py) would need its pattern in pyproject's package-data
        missing = [p.name for p in checkout.iterdir() if p.is_file() and f"{shipped}/{p.name}" not in files]
        assert not missing, f"{checkout.name}/ files missing from the wheel: {missing}"
    top_level = {name.split("/", 1)[0] for name in files if not name.startswith("activate_ray-")}
    assert top_level == {"flows", "tasks", "blocks"}


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The python of a fresh venv with the wheel installed (its dependencies from uv's cache,
    which make setup filled)."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    for command in ([str(UV), "venv", "--quiet", "--python", sys.executable, str(venv)],
                    [str(UV), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), str(wheel)]):
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600, env=_env())
        assert done.returncode == 0, done.stderr[-3000:]
    return venv / "bin" / "python"


def run_installed(python: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], capture_output=True, text=True, check=False, timeout=120,
                          cwd=cwd, env=_env())


def test_the_installed_wheel_finds_its_scripts_and_examples(installed, tmp_path):
    check = """
import flows.ray_cluster, flows.ray_tasks, flows.inputs_doc, blocks, tasks.schedulers.pbs
from tasks.cluster import CLUSTER_SCRIPTS
from tasks.shipped import EXAMPLES_DIR, SCRIPTS_DIR
assert "site-packages" in str(SCRIPTS_DIR), SCRIPTS_DIR
missing = [name for name in CLUSTER_SCRIPTS + ("setup_ray.sh", "prune_logs.sh", "show_logs.sh")
           if not (SCRIPTS_DIR / name).is_file()]
assert not missing, missing
assert (EXAMPLES_DIR / "hello_ray.py").is_file()
import importlib.util
assert importlib.util.find_spec("tests") is None and importlib.util.find_spec("bench") is None
"""
    done = run_installed(installed, tmp_path, "-c", check)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_installed_command_line_runs_from_any_directory(installed, tmp_path):
    """--dry-run from a directory without examples/: the shipped example is the user script."""
    done = run_installed(installed, tmp_path, "-m", "flows.ray_cluster", "--dry-run", "--scheduler", "slurm",
                         "--slurm.nodes", "2", "--user-script", "examples/hello_ray.py")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "#SBATCH --nodes=2" in done.stdout
    assert re.search(r"user job: \S+/site-packages/tasks/examples/hello_ray\.py$", done.stdout, re.M), done.stdout


def test_the_deployments_flows_load_from_the_installed_package(installed, tmp_path):
    """prefect.yaml's entry points are files of the checkout; their module form
    (flows.ray_cluster:ray_cluster_slurm) is what a worker without the checkout runs."""
    entrypoints = {d["entrypoint"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    modules = sorted(path.removesuffix(".py").replace("/", ".") + ":" + name
                     for path, name in (e.split(":") for e in entrypoints))
    check = ("import sys\nfrom prefect.flows import Flow, load_flow_from_entrypoint\n"
             "for entrypoint in sys.argv[1:]:\n    assert isinstance(load_flow_from_entrypoint(entrypoint), Flow), entrypoint\n")
    done = run_installed(installed, tmp_path, "-c", check, *modules)
    assert done.returncode == 0, done.stderr[-3000:]


# --- in the checkout: the same helper ------------------------------------------------------------

def test_the_checkout_ships_its_top_level_dirs():
    assert SCRIPTS_DIR.resolve() == (REPO / "scripts").resolve()
    assert EXAMPLES_DIR.resolve() == (REPO / "examples").resolve()


def test_a_missing_examples_path_is_the_shipped_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped_example("examples/hello_ray.py") == str(EXAMPLES_DIR / "hello_ray.py")
    assert RayClusterSettings(user_script="examples/hello_ray.py").user_script == str(EXAMPLES_DIR / "hello_ray.py")


def test_a_file_in_the_cwd_wins_over_the_shipped_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "hello_ray.py").write_text("print('mine')\n")
    assert shipped_example("examples/hello_ray.py") is None
    assert RayClusterSettings(user_script="examples/hello_ray.py").user_script == "examples/hello_ray.py"


@pytest.mark.parametrize("name", ["examples/nothing.py", "examples/../scripts/node_ip.py", "examples/", "examples/..",
                                  "hello_ray.py", "./examples/hello_ray.py", "/examples/hello_ray.py"])
def test_only_a_shipped_example_by_its_name_is_found(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped_example(name) is None
    with pytest.raises(ValueError, match="not a readable regular file"):
        RayClusterSettings(user_script=name)


def test_inputs_doc_writes_no_readme_where_there_is_none(tmp_path, monkeypatch, capsys):
    """Installed, flows/inputs_doc.py's README would be site-packages/README.md: --write refuses."""
    import flows.inputs_doc as inputs_doc

    monkeypatch.setattr(inputs_doc, "README", tmp_path / "README.md")
    assert inputs_doc.main(["--write"]) == 2
    assert "checkout's README.md" in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()
