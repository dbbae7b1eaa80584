"""Fast unit tests of RayClusterSettings and the command line (no Ray, no bed, no network).

Every validator with good and bad values; a hostile corpus applied to every
string input, checked end to end through `--dry-run`, `bash -n` on the rendered
job scripts and a real `source` of the rendered env file in a sandbox; the
environment mapping; `--help`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

import tasks.settings as settings_module
from flows.cli import RayClusterCli, main
from tasks.cluster import ClusterPlan, RayEnvironment
from tasks.schedulers import DirectScheduler, PbsScheduler, SlurmScheduler
from tasks.schedulers.options import NO_VALUE, OPTIONAL, VALUE
from tasks.schedulers.pbs import (
    PBS_ALLOWED,
    PBS_REFUSED,
    PBS_RESOURCE_REFUSED,
    PBS_W_ALLOWED,
    PBS_W_REFUSED,
    PbsOptions,
    pbs_select_chunks,
)
from tasks.schedulers.slurm import SLURM_ALLOWED, SLURM_REFUSED, SLURM_SHORT, SlurmOptions
from tasks.settings import NODE_TMP_MAX_LEN, RayClusterSettings

REPO = Path(__file__).resolve().parent.parent
BASH = shutil.which("bash") or "/bin/bash"


# --------------------------------------------------------------------------- helpers


def kwargs_for(field: str, value) -> dict:
    """`slurm.walltime` -> {"slurm": {"walltime": value}}; `host` -> {"host": value}."""
    if "." in field:
        group, sub = field.split(".", 1)
        return {group: {sub: value}}
    return {field: value}


def scheduler_for_field(field: str) -> str:
    return "pbs" if field.startswith("pbs.") else "slurm"


def flag_for(field: str) -> str:
    return "--" + field.replace("_", "-")


def cli_args(field: str, value: str) -> list[str]:
    # `--flag value` keeps newlines; a value starting with '-' must be glued with '='
    # or argparse takes it for a flag.
    if value.startswith("-"):
        return [f"{flag_for(field)}={value}"]
    return [flag_for(field), value]


def settings_of(**kwargs) -> RayClusterSettings:
    """Settings for a test of one group's fields: slurm or pbs options come with their scheduler
    (options of another scheduler are refused, tested on their own)."""
    for name in ("slurm", "pbs"):
        if name in kwargs and "scheduler" not in kwargs:
            kwargs["scheduler"] = name
    return RayClusterSettings(**kwargs)


def names_input(locations, name: str) -> bool:
    """A location names the input: by its flat name inside its group (cluster.num_cpus_per_node) too."""
    return any(loc == name or loc.endswith("." + name) for loc in locations)


def assert_rejected(kwargs: dict, name: str, *, in_message: bool = True) -> ValidationError:
    """The value is refused and the error names the input (its location, and its message)."""
    with pytest.raises(ValidationError) as info:
        settings_of(**kwargs)
    exc = info.value
    locations = [".".join(str(p) for p in e["loc"]) for e in exc.errors()]
    messages = [e["msg"] for e in exc.errors()]
    if in_message:
        assert any(name in m for m in messages), (name, messages)
    else:
        assert names_input(locations, name), (name, locations)
    assert name in str(exc)
    return exc


def run_main(capsys, args: list[str]) -> tuple[int, str, str]:
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def dry_run_sections(out: str) -> tuple[str, str]:
    """(env file, job script) as printed by --dry-run."""
    lines = out.splitlines()
    env_start = next(i for i, l in enumerate(lines) if l.startswith("export AR_CLUSTER_ID="))
    job_header = next(i for i, l in enumerate(lines) if l.startswith("# 3. job script"))
    job_start = next(i for i, l in enumerate(lines) if l == "#!/usr/bin/env bash")
    submit = next(i for i, l in enumerate(lines) if l == "# 4. submit:")
    assert env_start < job_header < job_start < submit
    env = "\n".join(lines[env_start:job_header]) + "\n"
    job = "\n".join(lines[job_start:submit]) + "\n"
    return env, job


class Sandbox:
    """A cwd and a fake $HOME for every shell the tests start: `touch CANARY`,
    `>x` or `rm -rf ~` could only ever land here."""

    def __init__(self, root: Path):
        self.root = root
        self.cwd = root / "cwd"
        self.home = root / "home"
        self.cwd.mkdir()
        self.home.mkdir()
        (self.home / "sentinel").write_text("still here")

    def env(self) -> dict:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home), "LC_ALL": "C.UTF-8"}

    def bash(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BASH, "--norc", "--noprofile", *args], check=False, cwd=self.cwd, env=self.env(), input=input,
            capture_output=True, timeout=20,
        )

    def syntax_ok(self, script: str) -> None:
        path = self.root / "script.sh"
        path.write_text(script)
        result = self.bash("-n", str(path))
        assert result.returncode == 0, result.stderr.decode()

    def source_env(self, env_text: str, names: list[str]) -> list[str]:
        """Source the env file for real; return the named variables exactly (NUL separated)."""
        path = self.root / "cluster.env"
        path.write_text(env_text)
        printed = " ".join(f'"${{{n}}}"' for n in names)
        result = self.bash("-c", f'set -eu; . "$1"; printf "%s\\0" {printed}', "_", str(path))
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode().split("\0")[:-1]

    def assert_untouched(self) -> None:
        for where in (self.cwd, self.root, Path.cwd(), REPO):
            assert not (where / "CANARY").exists(), f"a hostile value ran a command in {where}"
            assert not (where / "x").exists(), f"a hostile value redirected output in {where}"
        assert (self.home / "sentinel").read_text() == "still here"
        assert sorted(p.name for p in self.cwd.iterdir()) == []


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Sandbox:
    box = Sandbox(tmp_path)
    monkeypatch.chdir(box.cwd)
    monkeypatch.setenv("HOME", str(box.home))
    return box


# --------------------------------------------------------------------------- defaults


def test_defaults_are_valid_and_safe():
    s = RayClusterSettings()
    assert s.scheduler.value == "none"
    assert s.ray_version == "2.60.0"
    assert s.dashboard_host == "127.0.0.1"
    assert s.slurm.walltime == "01:00:00" and s.pbs.walltime == "01:00:00"
    assert s.nodes == 1
    assert settings_of(direct_workers=3).nodes == 4
    assert settings_of(scheduler="slurm", slurm={"nodes": 5}).nodes == 5
    assert settings_of(scheduler="pbs", pbs={"nodes": 7}).nodes == 7


def test_unknown_inputs_are_rejected():
    assert_rejected({"bogus": 1}, "bogus", in_message=False)
    assert_rejected({"slurm": {"bogus": 1}}, "slurm.bogus", in_message=False)
    assert_rejected({"pbs": {"partition": "x"}}, "pbs.partition", in_message=False)
    assert_rejected({"scheduler": "lsf"}, "scheduler", in_message=False)


# --------------------------------------------------------------------------- walltimes

SLURM_WALLTIME_OK = ["30", "30:00", "01:00:00", "1-12", "1-12:00", "1-12:00:00", "0", "120:00:00", "7-0"]
SLURM_WALLTIME_BAD = ["1:2:3:4", "abc", "-1", "", "01:00:00; rm -rf ~", "1:2", "01:00:0", "1-123", "1-", "-12",
                      "1h", "01:00:00 ", " 30", "1-12:00:00:00", "01:00:00\nrm -rf ~", "$(touch CANARY)",
                      "UNLIMITED", "30.5"]


@pytest.mark.parametrize("value", SLURM_WALLTIME_OK)
def test_slurm_walltime_ok(value):
    assert settings_of(slurm={"walltime": value}).slurm.walltime == value


@pytest.mark.parametrize("value", SLURM_WALLTIME_BAD)
def test_slurm_walltime_rejected(value):
    exc = assert_rejected({"slurm": {"walltime": value}}, "slurm.walltime")
    assert repr(value) in exc.errors()[0]["msg"]  # the offending value is shown, quoted


PBS_WALLTIME_OK = ["01:00:00", "30:00", "3600", "100:00:00", "0"]
PBS_WALLTIME_BAD = ["1-12:00:00", "1:2:3:4", "abc", "-1", "", "01:00:00; rm -rf ~", "1:2", "01:00:00\nid", "1h"]


@pytest.mark.parametrize("value", PBS_WALLTIME_OK)
def test_pbs_walltime_ok(value):
    assert settings_of(pbs={"walltime": value}).pbs.walltime == value


@pytest.mark.parametrize("value", PBS_WALLTIME_BAD)
def test_pbs_walltime_rejected(value):
    assert_rejected({"pbs": {"walltime": value}}, "pbs.walltime")


# --------------------------------------------------------------------------- counts and ranges


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"slurm": {"nodes": 0}}, "slurm.nodes"),
        ({"slurm": {"nodes": -1}}, "slurm.nodes"),
        ({"slurm": {"nodes": 10001}}, "slurm.nodes"),
        ({"pbs": {"nodes": 0}}, "pbs.nodes"),
        ({"pbs": {"nodes": 10001}}, "pbs.nodes"),
        ({"num_cpus_per_node": 0}, "num_cpus_per_node"),
        ({"num_cpus_per_node": 4097}, "num_cpus_per_node"),
        ({"num_gpus_per_node": -1}, "num_gpus_per_node"),
        ({"num_gpus_per_node": 65}, "num_gpus_per_node"),
        ({"direct_workers": -1}, "direct_workers"),
        ({"direct_workers": 65}, "direct_workers"),
        ({"ray_memory_gb": 0}, "ray_memory_gb"),
        ({"ray_memory_gb": -1.5}, "ray_memory_gb"),
        ({"object_store_memory_gb": 0}, "object_store_memory_gb"),
        ({"dashboard_port": 1023}, "dashboard_port"),
        ({"dashboard_port": 1}, "dashboard_port"),
        ({"dashboard_port": 65536}, "dashboard_port"),
        ({"readiness_timeout": 4}, "readiness_timeout"),
        ({"heartbeat_timeout": 9}, "heartbeat_timeout"),
        ({"cluster_idle_timeout": 0}, "cluster_idle_timeout"),
        ({"num_cpus_per_node": "four"}, "num_cpus_per_node"),
        ({"num_cpus_per_node": 1.5}, "num_cpus_per_node"),
        ({"dashboard_port": "8265; id"}, "dashboard_port"),
    ],
)
def test_counts_rejected(kwargs, name):
    assert_rejected(kwargs, name, in_message=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_gpus_per_node": 0},
        {"num_gpus_per_node": 64},
        {"num_cpus_per_node": 1},
        {"num_cpus_per_node": 4096},
        {"slurm": {"nodes": 1}},
        {"slurm": {"nodes": 10000}},
        {"pbs": {"nodes": 1}},
        {"direct_workers": 0},
        {"direct_workers": 64},
        {"dashboard_port": 1024},
        {"dashboard_port": 0},
        {"dashboard_port": 65535},
        {"ray_memory_gb": 0.25},
        {"readiness_timeout": 5},
        {"heartbeat_timeout": 10},
    ],
)
def test_counts_ok(kwargs):
    settings_of(**kwargs)


# --------------------------------------------------------------------------- ray_version, host, paths, bind


@pytest.mark.parametrize("value", ["2.60.0", "2.9.3", "3.0.0rc1", "2.10.0a1", "2.10.0b2"])
def test_ray_version_ok(value):
    assert settings_of(ray_version=value).ray_version == value


@pytest.mark.parametrize("value", ["latest", "2.60", "2.60.0; x", "", "v2.60.0", "2.60.0.dev0", ">=2.60.0",
                                   "2.60.0 ", "2.60.0\nid", "2.60.0rc", "ray==2.60.0"])
def test_ray_version_rejected(value):
    assert_rejected({"ray_version": value}, "ray_version")


@pytest.mark.parametrize("value", ["", "login1", "alice@login1", "alice@login1.example.org:2222", "cluster-a",
                                   "my_block", "10.0.0.5", "a.b@h:1", "h:65535"])
def test_host_ok(value):
    assert settings_of(host=value).host == value


@pytest.mark.parametrize("value", ["h:0", "h:65536", "h:99999", "-oProxyCommand=x", "a b", "@h", "u@", "h:", "h:x",
                                   "u@v@h", "host;id", "[::1]", "h:-1", "-h"])
def test_host_rejected(value):
    assert_rejected({"host": value}, "host")


@pytest.mark.parametrize("field", ["python", "work_dir", "node_tmp"])
@pytest.mark.parametrize("value", ["/opt/conda/ray", "~/venvs/ray-2.6", "relative/dir", "/a+b@c~e-f_g.h"])
def test_target_paths_ok(field, value):
    assert getattr(settings_of(**{field: value}), field) == value


@pytest.mark.parametrize("field", ["python", "work_dir", "node_tmp"])
@pytest.mark.parametrize("value", ["/a b", "/a;b", "/a'b", '/a"b', "/a$b", "/a`b`", "/a\\b", "/a*", "/a=b",
                                   "/a\nb", "/a|b", "/a&b", "/a(b)"])
def test_target_paths_rejected(field, value):
    assert_rejected({field: value}, field)


def test_node_tmp_length_limit_is_the_socket_paths_check():
    """What Ray's 107-byte unix socket paths leave for it, below the private temp dir: a row of
    `check` (and of the run, before it submits), in the words every node uses too."""
    from tasks.checks import socket_paths_row

    assert len("/local/scratch") <= NODE_TMP_MAX_LEN
    assert socket_paths_row("/" + "a" * (NODE_TMP_MAX_LEN - 1)).status == "pass"
    settings_of(node_tmp="/" + "a" * NODE_TMP_MAX_LEN)  # accepted as input: the check says it
    row = socket_paths_row("/" + "a" * NODE_TMP_MAX_LEN)
    assert row.status == "fail" and "over the 107-byte AF_UNIX limit" in row.found
    assert f"at most {NODE_TMP_MAX_LEN} characters" in row.fix


@pytest.mark.parametrize("value", ["127.0.0.1", "0.0.0.0", "10.1.2.3", "255.255.255.255"])
def test_dashboard_host_ok(value):
    assert settings_of(dashboard_host=value).dashboard_host == value


@pytest.mark.parametrize("value", ["localhost", "256.0.0.1", "1.2.3", "1.2.3.4.5", "", "::1", "127.0.0.1;id",
                                   "1.2.3.1000"])
def test_dashboard_host_rejected(value):
    assert_rejected({"dashboard_host": value}, "dashboard_host")


# --------------------------------------------------------------------------- scheduler names

NAME_FIELDS = ["slurm.account", "slurm.partition", "slurm.qos", "pbs.account", "pbs.queue"]


@pytest.mark.parametrize("field", NAME_FIELDS)
@pytest.mark.parametrize("value", ["", "gpu", "debug-q", "proj_123", "a.b", "A" * 64, "9queue"])
def test_names_ok(field, value):
    group, sub = field.split(".")
    assert getattr(getattr(settings_of(**kwargs_for(field, value)), group), sub) == value


@pytest.mark.parametrize("field", NAME_FIELDS)
@pytest.mark.parametrize("value", ["gpu;id", "-gpu", ".gpu", "_gpu", "a b", "A" * 65, "gpü", "a/b", "a,b", "a=b",
                                   "a@b", "gpu\nid"])
def test_names_rejected(field, value):
    assert_rejected(kwargs_for(field, value), field)


def test_name_validators_live_on_the_groups_too():
    with pytest.raises(ValidationError, match="slurm.partition"):
        SlurmOptions(partition="a b")
    with pytest.raises(ValidationError, match="pbs.queue"):
        PbsOptions(queue="a b")


# --------------------------------------------------------------------------- select and directives


@pytest.mark.parametrize("value", ["", "2:ncpus=4", "2:ncpus=4:mem=8gb:ngpus=1", "1:ncpus=2+3:ncpus=8:mem=16gb",
                                   "1:host=node-1.local:ncpus=4", "ncpus=4", "ncpus=4:mem=8gb+2:ncpus=8"])
def test_pbs_select_ok(value):
    assert settings_of(pbs={"select": value}).pbs.select == value


@pytest.mark.parametrize("value", ["2", "2+ncpus=4", "ncpus=4:2", "2:ncpus=4;id", "2:ncpus=$(id)", "2:ncpus=4 -l x",
                                   "2:ncpus=", "2:=4", "2:ncpus=4+", "+ncpus=4", "2:ncpus=4\n-l walltime=1",
                                   "-l select=2", "0:ncpus=4", "ncpus=4+00:ncpus=1", "10001:ncpus=1",
                                   "9999:ncpus=1+2:ncpus=1"])
def test_pbs_select_rejected(value):
    assert_rejected({"pbs": {"select": value}}, "pbs.select")


# --------------------------------------------------------------------------- PBS node count from select

SELECT_CHUNKS = [
    ("3:ncpus=1", 3),
    ("1:ncpus=4", 1),
    ("ncpus=4", 1),  # no count: one chunk, as in PBS
    ("ncpus=4:mem=8gb:ngpus=1", 1),
    ("2:ncpus=4+1:ncpus=8:ngpus=1", 3),
    ("ncpus=4+2:ncpus=8", 3),
    ("1:ncpus=2+3:ncpus=8:mem=16gb+ncpus=1+10:ncpus=1", 15),
    ("1:host=node-1.local:ncpus=4+1:host=node-2.local:ncpus=4", 2),
    ("10000:ncpus=1", 10000),
]


@pytest.mark.parametrize("select,chunks", SELECT_CHUNKS, ids=[v for v, _ in SELECT_CHUNKS])
def test_pbs_nodes_come_from_the_select_statement(select, chunks):
    assert pbs_select_chunks(select) == chunks
    s = settings_of(scheduler="pbs", pbs={"select": select})
    assert s.nodes == chunks
    assert s.pbs.nodes == chunks  # normalised, so every reader of pbs.nodes agrees
    assert "nodes" not in s.pbs.model_fields_set  # still "not given"
    # the CLI and Prefect paths re-validate a full dump: the count survives it
    again = RayClusterSettings.model_validate(s.model_dump())
    assert (again.nodes, again.pbs.nodes) == (chunks, chunks)
    assert RayClusterSettings.model_validate_json(s.model_dump_json()).nodes == chunks


def test_pbs_nodes_without_select_are_the_nodes():
    assert settings_of(scheduler="pbs").nodes == 1
    assert settings_of(scheduler="pbs", pbs={"nodes": 4}).nodes == 4


@pytest.mark.parametrize(
    "nodes,select,chunks",
    [(2, "3:ncpus=1", 3), (1, "3:ncpus=1", 3), (5, "2:ncpus=4+1:ncpus=8:ngpus=1", 3), (2, "ncpus=4", 1)],
)
def test_pbs_nodes_disagreeing_with_select_are_refused(nodes, select, chunks):
    exc = assert_rejected({"scheduler": "pbs", "pbs": {"nodes": nodes, "select": select}},
                          f"pbs.nodes={nodes} but pbs.select asks for {chunks} chunks")
    assert [e["loc"] for e in exc.errors()] == [("pbs",)]
    with pytest.raises(ValidationError, match=f"pbs.nodes={nodes} but pbs.select asks for {chunks} chunks"):
        PbsOptions(nodes=nodes, select=select)


def test_pbs_nodes_agreeing_with_select_are_accepted():
    s = settings_of(scheduler="pbs", pbs={"nodes": 3, "select": "2:ncpus=4+1:ncpus=8:ngpus=1"})
    assert s.nodes == 3 == s.pbs.nodes


def from_environment() -> RayClusterSettings:
    """What the command line makes of the environment alone (only the CLI reads it)."""
    return RayClusterSettings.model_validate(RayClusterCli().model_dump(exclude={"dry_run"}))


def test_pbs_nodes_disagreeing_with_select_are_refused_from_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_CLUSTER_SCHEDULER", "pbs")
    monkeypatch.setenv("RAY_CLUSTER_PBS__SELECT", "2:ncpus=4+1:ncpus=8")
    assert from_environment().nodes == 3
    monkeypatch.setenv("RAY_CLUSTER_PBS__NODES", "2")
    with pytest.raises(ValidationError, match="pbs.nodes=2 but pbs.select asks for 3 chunks"):
        from_environment()


@pytest.mark.parametrize("line", ["#PBS -l place=pack", "#PBS -l place=free", "#PBS -l place=excl",
                                  "#PBS -lplace=vscatter", "#PBS -l walltime=1:00:00,place=pack:excl",
                                  "#PBS -l select=5:ncpus=2", "#PBS -m abe -l select=5:ncpus=2"])
def test_pbs_directives_that_change_the_node_count_are_refused(line):
    exc = assert_rejected({"pbs": {"extra_directives": line}}, "extra directive line 1")
    assert [e["loc"] for e in exc.errors()] == [("pbs", "extra_directives")]


@pytest.mark.parametrize("line", ["#PBS -l place=scatter:excl", "#PBS -l place=excl:scatter",
                                  "#PBS -l place=scatter:group=switch", "#PBS -l filesystems=home:eagle"])
def test_pbs_directives_keeping_one_chunk_per_host_are_accepted(line):
    assert settings_of(pbs={"extra_directives": line}).pbs.extra_directives == line


@pytest.mark.parametrize(
    "group,lines",
    [("slurm", ["#SBATCH -x node7", "#SBATCH --mail-type=END,FAIL", "#SBATCH --gres=gpu:a100:4"]),
     ("pbs", ["#PBS -m abe", "#PBS -M alice@example.org", "#PBS -l filesystems=home:eagle"])],
)
def test_extra_directives_normalised(group, lines):
    value = f"  {lines[0]}\n\n{lines[1]}  \r\n{lines[2]}\n"
    got = getattr(settings_of(**{group: {"extra_directives": value}}), group).extra_directives
    assert got == "\n".join(lines)


@pytest.mark.parametrize("group,prefix", [("slurm", "#SBATCH"), ("pbs", "#PBS")])
@pytest.mark.parametrize(
    "line",
    [
        "{p} --comment=$(touch CANARY)",
        "{p} --comment=`touch CANARY`",
        "{p} --comment=a;touch CANARY",
        "{p} --comment=a|b",
        "{p} --comment='quoted'",
        "{p} --mail-user=a\ntouch CANARY",
        "{p}  comment",
        "{p}--time=1",
        "#SBATCH_X --time=1",
        "touch CANARY",
        "{p} --comment=" + "a" * 300,
        "{p} --comment=gpü",
        "{p} --comment=\u202egpu",
        "{p} --comment=a>x",
    ],
)
def test_extra_directives_rejected(group, prefix, line):
    exc = assert_rejected({group: {"extra_directives": line.format(p=prefix)}}, "extra directive line")
    assert [e["loc"] for e in exc.errors()] == [(group, "extra_directives")]


@pytest.mark.parametrize("line", ["#SBATCH --wrap=touch CANARY", "#SBATCH -W", "#SBATCH --wait",
                                  "#SBATCH -W --time=1", "#SBATCH --wait=1", "#SBATCH -wrap=x"])
def test_slurm_blocking_and_wrap_directives_rejected(line):
    exc = assert_rejected({"slurm": {"extra_directives": line}}, "extra directive line")
    assert "not allowed" in str(exc)


@pytest.mark.parametrize("line", ["#SBATCH --comment=x -W", "#SBATCH --time=10 --wait",
                                  "#SBATCH --comment=a --wrap=touch"])
def test_slurm_blocking_option_later_on_the_line_rejected(line):
    assert_rejected({"slurm": {"extra_directives": line}}, "extra directive line")


def test_pbs_prefix_is_not_slurm_prefix():
    assert_rejected({"pbs": {"extra_directives": "#SBATCH --time=1"}}, "extra directive line")
    assert_rejected({"slurm": {"extra_directives": "#PBS -l walltime=1"}}, "extra directive line")


# --------------------------------------------------------------------------- directive allowlist
#
SET_BY_FLOW = "set by activate-ray"
NOT_LISTED = "not in the allowlist"
# Hostile or refused directives, by a piece of the reason the error gives: (line, the option
# as the error names it). A line says its group: #SBATCH (slurm) or #PBS (pbs).
REFUSED_BY_REASON = {
    # where the job writes or reads
    "changes where the job writes its output": [
        ("#SBATCH --output=/tmp/x", "'--output'"),
        ("#SBATCH --output /tmp/x", "'--output'"),
        ("#SBATCH -o /tmp/x", "'-o' (--output)"),
        ("#SBATCH -o/tmp/x", "'-o' (--output)"),
        ("#SBATCH --error=/tmp/e", "'--error'"),
        ("#SBATCH -e /tmp/e", "'-e' (--error)"),
        ("#PBS -o /tmp/x", "'-o'"),
        ("#PBS -o/tmp/x", "'-o'"),
        ("#PBS -e /tmp/x", "'-e'"),
        ("#PBS -j n", "'-j'"),
        # smuggled past the parser
        ("#SBATCH -sC a100 -o/tmp/x", "'-o' (--output)"),
        ("#SBATCH -so/tmp/x", "'-o' (--output)"),
        ("#SBATCH --comment=ok --output=/tmp/x", "'--output'"),
        ("#PBS -m abe -o /tmp/x", "'-o'"),
    ],
    "standard input": [
        ("#SBATCH --input=/etc/shadow", "'--input'"),
        ("#SBATCH -i /etc/shadow", "'-i' (--input)"),
    ],
    "log files": [
        ("#SBATCH --open-mode=append", "'--open-mode'"),
    ],
    "working directory": [
        ("#SBATCH --chdir=/tmp", "'--chdir'"),
        ("#SBATCH -D /tmp", "'-D' (--chdir)"),
        ("#PBS -d /tmp", "'-d'"),
        ("#PBS -w /tmp", "'-w'"),
        ("#PBS -W sandbox=PRIVATE", "'-W sandbox='"),
        # smuggled past the parser
        ("#SBATCH -Hs -D/tmp", "'-D' (--chdir)"),
    ],
    "home directory": [
        ("#PBS -k oe", "'-k'"),
    ],
    "root directory": [
        ("#PBS -D /srv/root", "'-D'"),
    ],
    "copies files": [
        ("#PBS -W stageout=/x@host:/y", "'-W stageout='"),
        ("#PBS -W stagein=/x@host:/y", "'-W stagein='"),
    ],
    "permissions": [
        ("#PBS -W umask=000", "'-W umask='"),
        ("#PBS -W depend=afterok:1,umask=000", "'-W umask='"),
        ("#PBS -Wumask=000", "'-W umask='"),
    ],
    # its environment, interpreter, identity
    "environment": [
        ("#SBATCH --export=ALL,LD_PRELOAD=/tmp/x.so", "'--export'"),
        ("#SBATCH --export-file=/tmp/env", "'--export-file'"),
        ("#SBATCH --get-user-env", "'--get-user-env'"),
        ("#SBATCH --propagate=ALL", "'--propagate'"),
        ("#PBS -v LD_PRELOAD=/tmp/x.so", "'-v'"),
        ("#PBS -V", "'-V'"),
        # smuggled past the parser
        ("#SBATCH --exclusive --export=NONE", "'--export'"),
        ("#PBS -hV", "'-V'"),
        ("#PBS -mabe -V", "'-V'"),
    ],
    "container": [
        ("#SBATCH --container=/tmp/bundle", "'--container'"),
    ],
    "shell": [
        ("#PBS -S /bin/sh", "'-S'"),
    ],
    "directive prefix": [
        ("#PBS -C XPBS", "'-C'"),
    ],
    "another user": [
        ("#SBATCH --uid=0", "'--uid'"),
        ("#PBS -u root", "'-u'"),
    ],
    "another group": [
        ("#SBATCH --gid=0", "'--gid'"),
    ],
    "replaces the job script": [
        ("#SBATCH --wrap=id", "'--wrap'"),
    ],
    "prologue": [
        ("#PBS -T mine", "'-T'"),
    ],
    "arguments": [
        ("#PBS -F arg1", "'-F'"),
    ],
    "checkpoint": [
        ("#PBS -c dir=/tmp", "'-c'"),
    ],
    "burst buffer": [
        ("#SBATCH --bbf=/tmp/bb", "'--bbf'"),
    ],
    # many copies, or a job the flow can not follow
    "many copies": [
        ("#SBATCH --array=1-100", "'--array'"),
        ("#SBATCH -a 1-100", "'-a' (--array)"),
        ("#SBATCH -a1-100%5", "'-a' (--array)"),
        ("#PBS -J 1-10", "'-J'"),
        ("#PBS -t 1-10", "'-t'"),
    ],
    "interactive": [
        ("#PBS -I", "'-I'"),
        ("#PBS -X", "'-X'"),
    ],
    "job id at once": [
        ("#SBATCH --wait", "'--wait'"),
        ("#SBATCH -W", "'-W' (--wait)"),
        ("#PBS -W block=true", "'-W block='"),
    ],
    "job id": [
        ("#PBS -z", "'-z'"),
    ],
    "not submit": [
        ("#SBATCH --test-only", "'--test-only'"),
    ],
    "another cluster": [
        ("#SBATCH --clusters=other", "'--clusters'"),
        ("#SBATCH -M other", "'-M' (--clusters)"),
    ],
    # set by the flow
    SET_BY_FLOW: [
        ("#SBATCH --job-name=x", "'--job-name'"),
        ("#SBATCH -J x", "'-J' (--job-name)"),
        ("#SBATCH --time-min=5", "'--time-min'"),
        ("#SBATCH --distribution=arbitrary", "'--distribution'"),
        ("#SBATCH --nodefile=/tmp/hosts", "'--nodefile'"),
        ("#PBS -N other", "'-N'"),
    ],
    "use slurm.nodes": [
        ("#SBATCH --nodes=4", "'--nodes'"),
        ("#SBATCH -N 4", "'-N' (--nodes)"),
    ],
    "one task per node": [
        ("#SBATCH --ntasks=8", "'--ntasks'"),
        ("#SBATCH -n8", "'-n' (--ntasks)"),
        ("#SBATCH --ntasks-per-node=4", "'--ntasks-per-node'"),
    ],
    "use num_cpus_per_node": [
        ("#SBATCH --cpus-per-task=8", "'--cpus-per-task'"),
        ("#SBATCH -c 8", "'-c' (--cpus-per-task)"),
    ],
    "num_cpus_per_node": [
        ("#PBS -l ncpus=64", "'-l ncpus='"),
    ],
    "use slurm.walltime": [
        ("#SBATCH --time=10", "'--time'"),
        ("#SBATCH -t 10", "'-t' (--time)"),
    ],
    "use walltime_margin": [
        ("#SBATCH --signal=B:TERM@10", "'--signal'"),
    ],
    "use pbs.walltime": [
        ("#PBS -l walltime=100:00:00", "'-l walltime='"),
        ("#PBS -l filesystems=home,walltime=99:00:00", "'-l walltime='"),
        ("#PBS -l max_walltime=99:00:00", "'-l max_walltime='"),
    ],
    "use pbs.select": [
        ("#PBS -l select=4:ncpus=1", "'-l select='"),
        ("#PBS -lselect=4", "'-l select='"),
    ],
    "place=scatter": [
        ("#PBS -l place=pack", "-l place=pack"),
    ],
    "use pbs.nodes or pbs.select": [
        ("#PBS -l nodes=4:ppn=2", "'-l nodes='"),
    ],
    "script of your choice": [
        ("#PBS -l epilogue=/tmp/x.sh", "'-l epilogue='"),
        ("#PBS -l prologue=/tmp/x.sh", "'-l prologue='"),
    ],
    # what the parser finds as sbatch's and qsub's getopt read the line: not an option, not on the
    # allowlist, a value missing or one too many
    NOT_LISTED: [
        ("#SBATCH --out=/tmp/x", "'--out'"),  # sbatch would take the abbreviation
        ("#SBATCH --exp=ALL", "'--exp'"),
        ("#SBATCH --OUTPUT=/tmp/x", "'--OUTPUT'"),
        ("#SBATCH --nice -5", "'-5'"),  # optional value: only --nice=-5
        ("#SBATCH --verbose", "'--verbose'"),
        ("#SBATCH -Q", "'-Q'"),
        ("#SBATCH -h", "'-h'"),
        ("#SBATCH --reboot", "'--reboot'"),
        ("#SBATCH --ignore-pbs", "'--ignore-pbs'"),
        ("#PBS -W x=NODESET:ONEOF", "'-W x='"),
        ("#PBS -Z", "'-Z'"),
    ],
    "--wrap is not allowed": [
        ("#SBATCH -wrap=id", "'-wrap=id'"),  # sbatch: -w rap=id
    ],
    "--output is not allowed": [
        ("#SBATCH -output=/tmp/x", "'-output=/tmp/x'"),
    ],
    "is not an option": [
        ("#SBATCH --exclusive /tmp/x", "'/tmp/x'"),
        ("#SBATCH -- --output=/tmp/x", "'--'"),
        ("#PBS -l mem=1gb extra", "'extra'"),
    ],
    "heterogeneous job": [
        ("#SBATCH --comment hetjob --comment -o/tmp/x", "'hetjob'"),
        ("#SBATCH --gres=gpu:1 PACKJOB", "'PACKJOB'"),
    ],
    "needs a value on the same line": [
        ("#SBATCH --comment", "'--comment'"),
        ("#SBATCH -C", "'-C' (--constraint)"),
        ("#PBS -l", "'-l'"),
    ],
    "takes no value": [
        ("#SBATCH --hold=yes", "'--hold'"),
    ],
    "not a resource": [
        ("#PBS -l filesystems", "-l 'filesystems'"),
        ("#PBS -l bad-name=1", "-l 'bad-name=1'"),
    ],
    "single letters": [
        ("#PBS --version", "'--version'"),
    ],
}
REFUSED_DIRECTIVES = [
    ("slurm" if line.startswith("#SBATCH") else "pbs", line, option, reason)
    for reason, cases in REFUSED_BY_REASON.items() for line, option in cases
]


@pytest.mark.parametrize("group,line,option,reason", REFUSED_DIRECTIVES, ids=[c[1] for c in REFUSED_DIRECTIVES])
def test_refused_directive_names_the_option_and_the_reason(group, line, option, reason):
    exc = assert_rejected({group: {"extra_directives": line}}, "extra directive line 1")
    assert [e["loc"] for e in exc.errors()] == [(group, "extra_directives")]
    message = exc.errors()[0]["msg"]
    assert option in message, message
    assert reason in message, message
    # also on a later line, after an allowed one: the line number is the offending one
    prefix = "#SBATCH" if group == "slurm" else "#PBS"
    exc = assert_rejected({group: {"extra_directives": f"{prefix} {'--comment=ok' if group == 'slurm' else '-m n'}\n{line}"}},
                          "extra directive line 2")
    assert option in exc.errors()[0]["msg"]


def test_refused_corpus_is_large_and_covers_every_refused_option():
    assert len(REFUSED_DIRECTIVES) >= 30
    lines = " ".join(line for _, line, _, _ in REFUSED_DIRECTIVES)
    for name in SLURM_REFUSED:
        letters = [letter for letter, long in SLURM_SHORT.items() if long == name]
        spelled = [f"--{name}"] + [f"-{letter}" for letter in letters]
        if not any(re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", lines) for s in spelled):
            # every refused option is refused (the corpus above names the main ones)
            exc = assert_rejected({"slurm": {"extra_directives": f"#SBATCH --{name}=1"}}, f"'--{name}'")
            assert "is not allowed: " + SLURM_REFUSED[name] in str(exc)
    for letter, reason in PBS_REFUSED.items():
        exc = assert_rejected({"pbs": {"extra_directives": f"#PBS -{letter} x"}}, f"'-{letter}'")
        assert "is not allowed: " + reason in str(exc)
    for name, reason in PBS_W_REFUSED.items():
        exc = assert_rejected({"pbs": {"extra_directives": f"#PBS -W {name}=x"}}, f"'-W {name}='")
        assert reason in str(exc)
    for name, reason in PBS_RESOURCE_REFUSED.items():
        exc = assert_rejected({"pbs": {"extra_directives": f"#PBS -l {name}=1"}}, f"'-l {name}='")
        assert reason in str(exc)


def test_allowlists_are_disjoint_and_short_options_are_known():
    assert not SLURM_ALLOWED.keys() & SLURM_REFUSED.keys()
    assert not PBS_ALLOWED.keys() & PBS_REFUSED.keys()
    assert not PBS_W_ALLOWED & PBS_W_REFUSED.keys()
    assert set(SLURM_SHORT.values()) <= SLURM_ALLOWED.keys() | SLURM_REFUSED.keys()
    assert all(len(letter) == 1 for letter in [*SLURM_SHORT, *PBS_ALLOWED, *PBS_REFUSED])
    assert set(SLURM_ALLOWED.values()) | set(PBS_ALLOWED.values()) <= {VALUE, OPTIONAL, NO_VALUE}


def slurm_spellings() -> list[str]:
    """Every allowed SLURM option, in every spelling sbatch reads the same way."""
    lines = []
    for name, takes in SLURM_ALLOWED.items():
        if takes == VALUE:
            lines += [f"--{name}=v1", f"--{name} v1"]
        elif takes == OPTIONAL:
            lines += [f"--{name}", f"--{name}=v1"]
        else:
            lines.append(f"--{name}")
    for letter, name in SLURM_SHORT.items():
        if name in SLURM_ALLOWED:
            lines += [f"-{letter} v1", f"-{letter}v1"] if SLURM_ALLOWED[name] == VALUE else [f"-{letter}"]
    return lines


def pbs_spellings() -> list[str]:
    samples = {"l": "filesystems=home:eagle", "W": "depend=afterok:123"}
    lines = []
    for letter, takes in PBS_ALLOWED.items():
        if takes == VALUE:
            value = samples.get(letter, "v1")
            lines += [f"-{letter} {value}", f"-{letter}{value}"]
        else:
            lines.append(f"-{letter}")
    return lines


@pytest.mark.parametrize("line", slurm_spellings())
def test_allowed_slurm_directive_accepted(line):
    value = f"#SBATCH {line}"
    assert settings_of(slurm={"extra_directives": value}).slurm.extra_directives == value
    assert SlurmOptions(extra_directives=value).extra_directives == value


@pytest.mark.parametrize("line", pbs_spellings())
def test_allowed_pbs_directive_accepted(line):
    value = f"#PBS {line}"
    assert settings_of(pbs={"extra_directives": value}).pbs.extra_directives == value
    assert PbsOptions(extra_directives=value).extra_directives == value


@pytest.mark.parametrize(
    "group,line",
    [
        # a required value is the next word, also when it starts with '-' (as getopt reads it)
        ("slurm", "#SBATCH --comment -W"),
        ("slurm", "#SBATCH --comment -o/tmp/x"),
        ("slurm", "#SBATCH -C -o"),
        ("slurm", "#SBATCH --nice=-5"),
        ("slurm", "#SBATCH --exclusive=user"),
        ("slurm", "#SBATCH --requeue"),
        ("slurm", "#SBATCH -sHC a100 --exclusive"),  # clustered flags, then a value
        ("slurm", "#SBATCH --partition=gpu,gpu-long --qos=high"),
        ("slurm", "#SBATCH --nodelist=node[1-4] --exclude=node7"),
        ("slurm", "#SBATCH --dependency=afterok:123:124"),
        ("slurm", "#SBATCH --mail-user=alice@example.org --mail-type=END,FAIL"),
        ("slurm", "#SBATCH --gpus-per-node=4 --cpus-per-gpu=8 --mem-per-gpu=40G"),
        ("slurm", "#SBATCH --hold"),  # the bed's stuck-pending test
        ("pbs", "#PBS -p -5"),
        ("pbs", "#PBS -l place=scatter:excl,filesystems=home:eagle"),
        ("pbs", "#PBS -W group_list=g1@host1,g2@host2"),
        ("pbs", "#PBS -W depend=afterok:123.server:124.server"),
        ("pbs", "#PBS -hm abe"),
        ("pbs", "#PBS -r n -a 202612312359 -P proj -A acct -q workq"),
    ],
)
def test_allowed_directive_spellings(group, line):
    assert getattr(settings_of(**{group: {"extra_directives": line}}), group).extra_directives == line


def test_unknown_option_error_lists_the_allowlist():
    exc = assert_rejected({"slurm": {"extra_directives": "#SBATCH --bogus=1"}}, "'--bogus'")
    assert NOT_LISTED in str(exc) and "--constraint" in str(exc) and "--gres" in str(exc)
    exc = assert_rejected({"pbs": {"extra_directives": "#PBS -Z"}}, "'-Z'")
    assert NOT_LISTED in str(exc) and "-l" in exc.errors()[0]["msg"]


@pytest.mark.parametrize("group,line,option,reason", REFUSED_DIRECTIVES[::7], ids=[c[1] for c in REFUSED_DIRECTIVES[::7]])
def test_refused_directive_cli_exit_2(group, line, option, reason, capsys, sandbox):
    rc, out, err = run_main(capsys, ["--scheduler", group, f"--{group}.extra-directives", line, "--dry-run"])
    assert rc == 2 and out == ""
    assert f"invalid input {group}.extra_directives" in err and option in err and reason in err
    sandbox.assert_untouched()


# --------------------------------------------------------------------------- local files


@pytest.mark.parametrize("field", ["user_script", "requirements", "ssh_key_file", "known_hosts"])
def test_local_files_must_exist(field, tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("x")
    assert getattr(settings_of(**{field: str(real)}), field) == str(real)
    assert_rejected({field: str(tmp_path / "missing.txt")}, field)
    assert_rejected({field: str(tmp_path)}, field)  # a directory is not a file


def test_local_files_expand_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "job.py").write_text("print(1)")
    assert settings_of(user_script="~/job.py").user_script == "~/job.py"


# Local files the flow reads: pseudo-files, devices and anything but a regular file you can
# read are refused, by name, and no error ever shows a file's contents.
FILE_FIELD_NAMES = ["user_script", "requirements", "ssh_key_file", "known_hosts"]
SECRET = "AR-SECRET-7f3a9c"  # in the environment of the test process, and in files below
HOSTILE_PATHS = {
    "proc-environ": ("/proc/self/environ", "under /proc"),
    "proc-cmdline": ("/proc/self/cmdline", "under /proc"),
    "proc-pid1-environ": ("/proc/1/environ", "under /proc"),
    "proc-fd": ("/proc/self/fd/0", "under /proc"),
    "proc-mem": ("/proc/self/mem", "under /proc"),
    "proc-dir": ("/proc", "under /proc"),
    "proc-double-slash": ("//proc/self/environ", "under /proc"),
    "proc-dotdot": ("/proc/../proc/self/environ", "under /proc"),
    "proc-dot": ("/./proc/self/status", "under /proc"),
    "proc-via-etc": ("/etc/../proc/self/environ", "under /proc"),
    "dev-stdin": ("/dev/stdin", "under /dev"),  # a symlink into /proc
    "dev-zero": ("/dev/zero", "under /dev"),
    "dev-null": ("/dev/null", "under /dev"),
    "dev-urandom": ("/dev/urandom", "under /dev"),
    "dev-tty": ("/dev/tty", "under /dev"),
    "dev-shm": ("/dev/shm/ar-does-not-matter", "under /dev"),
    "sys-dir": ("/sys", "under /sys"),
    "sys-file": ("/sys/kernel/uevent_seqnum", "under /sys"),
    "missing": ("/nonexistent/ar/job.py", "No such file"),
    "directory": ("/etc", "a directory, device, pipe or socket"),
    "nul-byte": ("job\0.py", "invalid name"),
    "too-long": ("a" * 5000, "too long"),
}


@pytest.mark.parametrize("field", FILE_FIELD_NAMES)
@pytest.mark.parametrize("label", HOSTILE_PATHS)
def test_hostile_local_path_refused(field, label, monkeypatch):
    monkeypatch.setenv("AR_TEST_SECRET", SECRET)
    value, reason = HOSTILE_PATHS[label]
    exc = assert_rejected({field: value}, field)
    message = exc.errors()[0]["msg"]
    assert "is not a readable regular file" in message and reason in message, message
    assert SECRET not in str(exc)


@pytest.fixture
def odd_files(tmp_path, monkeypatch) -> dict[str, tuple[Path, str]]:
    """Local paths that look like files: (path, what the error says)."""
    import socket

    monkeypatch.setenv("AR_TEST_SECRET", SECRET)
    found = {}
    for name, target, reason in [("environ", "/proc/self/environ", "under /proc"), ("zero", "/dev/zero", "under /dev"),
                                 ("stdin", "/dev/stdin", "under /"), ("kernel", "/sys/kernel/uevent_seqnum", "under /sys")]:
        link = tmp_path / f"link-to-{name}.py"
        link.symlink_to(target)
        found[f"symlink-to-{name}"] = (link, reason)
    chain = tmp_path / "chain.py"
    chain.symlink_to(found["symlink-to-environ"][0])
    found["symlink-chain-to-environ"] = (chain, "under /proc")
    loop = tmp_path / "loop.py"
    loop.symlink_to(loop)
    found["symlink-loop"] = (loop, "symbolic links")
    dangling = tmp_path / "dangling.py"
    dangling.symlink_to(tmp_path / "gone.py")
    found["dangling-symlink"] = (dangling, "No such file")
    fifo = tmp_path / "fifo.py"
    os.mkfifo(fifo)
    found["fifo"] = (fifo, "a directory, device, pipe or socket")
    sock_path = tmp_path / "sock.py"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    found["unix-socket"] = (sock_path, "a directory, device, pipe or socket")
    (tmp_path / "dir.py").mkdir()
    found["directory"] = (tmp_path / "dir.py", "a directory, device, pipe or socket")
    yield found
    sock.close()


ODD_FILE_LABELS = ["symlink-to-environ", "symlink-to-zero", "symlink-to-stdin", "symlink-to-kernel",
                   "symlink-chain-to-environ", "symlink-loop", "dangling-symlink", "fifo", "unix-socket", "directory"]


@pytest.mark.parametrize("field", FILE_FIELD_NAMES)
@pytest.mark.parametrize("label", ODD_FILE_LABELS)
def test_local_path_that_is_no_regular_file_refused(field, label, odd_files):
    path, reason = odd_files[label]
    exc = assert_rejected({field: str(path)}, field)
    message = exc.errors()[0]["msg"]
    assert reason in message, message
    assert SECRET not in str(exc)


def test_symlink_under_home_to_proc_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AR_TEST_SECRET", SECRET)
    (tmp_path / "job.py").symlink_to("/proc/self/environ")
    exc = assert_rejected({"user_script": "~/job.py"}, "user_script")
    assert "under /proc" in str(exc) and SECRET not in str(exc)


def test_a_symlink_to_a_regular_file_is_fine(tmp_path):
    real = tmp_path / "real.py"
    real.write_text("print(1)\n")
    (tmp_path / "link.py").symlink_to(real)
    assert settings_of(user_script=str(tmp_path / "link.py")).user_script == str(tmp_path / "link.py")


def test_another_mount_of_proc_is_refused(tmp_path, monkeypatch):
    """A file on the file system of /proc (procfs mounted elsewhere, a bind mount) is refused
    by its device, not only by its name."""
    real = tmp_path / "looks-fine.py"
    real.write_text("print(1)\n")
    proc_dev = os.stat("/proc").st_dev
    real_stat = os.stat

    def stat_on_procfs(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if str(path) == str(real):
            return os.stat_result((result.st_mode, result.st_ino, proc_dev, *tuple(result)[3:]))
        return result

    monkeypatch.setattr(settings_module.os, "stat", stat_on_procfs)
    exc = assert_rejected({"user_script": str(real)}, "user_script")
    assert "on the file system of /proc" in str(exc)


@pytest.mark.parametrize("field", FILE_FIELD_NAMES)
def test_unreadable_file_refused_without_its_contents(field, tmp_path, monkeypatch):
    secret = tmp_path / "secret.py"
    secret.write_text(f"{SECRET}\n")
    real_access = os.access
    monkeypatch.setattr(settings_module.os, "access",
                        lambda path, mode, **kw: False if str(path) == str(secret) else real_access(path, mode, **kw))
    exc = assert_rejected({field: str(secret)}, field)
    assert "no read permission" in str(exc)
    assert SECRET not in str(exc)


@contextlib.contextmanager
def as_unprivileged_user():
    """Root reads every file: as root, the check runs with real and effective ids of
    `nobody` (the saved id stays root, to switch back)."""
    if os.geteuid() != 0:
        yield
        return
    nobody = 65534
    os.setresgid(nobody, nobody, 0)
    os.setresuid(nobody, nobody, 0)
    try:
        yield
    finally:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)


def test_unreadable_file_refused_for_real():
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o711)  # others may pass through, as to a user's file on a shared system
        secret = Path(folder) / "secret.py"
        secret.write_text(f"{SECRET}\n")
        secret.chmod(0)
        with as_unprivileged_user():
            exc = assert_rejected({"user_script": str(secret)}, "user_script")
    assert "no read permission" in str(exc) and SECRET not in str(exc)


def test_local_file_check_never_reads_the_file(tmp_path, monkeypatch):
    import builtins
    import io

    script = tmp_path / "job.py"
    script.write_text(f"{SECRET}\n")

    def no_open(*args, **kwargs):
        raise AssertionError("the settings read a local file")

    monkeypatch.setattr(builtins, "open", no_open)
    monkeypatch.setattr(io, "open", no_open)
    monkeypatch.setattr(os, "open", no_open)
    assert settings_of(user_script=str(script)).user_script == str(script)


@pytest.mark.parametrize("value", ["/proc/self/environ", "/dev/stdin", "/proc/self/fd/0"])
def test_hostile_local_path_cli_exit_2_without_contents(value, capsys, monkeypatch, sandbox):
    monkeypatch.setenv("AR_TEST_SECRET", SECRET)
    rc, out, err = run_main(capsys, ["--user-script", value, "--dry-run"])
    assert rc == 2 and out == ""
    assert "user_script" in err and "not a readable regular file" in err
    assert SECRET not in err
    sandbox.assert_untouched()


# --------------------------------------------------------------------------- known validator gaps (bugs)



@pytest.mark.parametrize("field", ["user_script", "requirements", "ssh_key_file", "known_hosts"])
def test_overlong_file_name_is_a_validation_error(field):
    assert_rejected({field: "a" * 300}, field)


def test_overlong_file_name_cli_exit_2(capsys):
    rc, _, err = run_main(capsys, ["--user-script", "a" * 300, "--dry-run"])
    assert rc == 2 and "user_script" in err

# Fields whose validator is a `^...$` regex. Python's `$` also matches just before a
# final "\n", so a value with ONE trailing newline passes every one of them.
TRAILING_NEWLINE_CASES = [
    ("host", "login1\n"),
    ("ray_version", "2.60.0\n"),
    ("python", "/opt/py\n"),
    ("work_dir", "/scratch/ar\n"),
    ("node_tmp", "/tmp\n"),
    ("dashboard_host", "127.0.0.1\n"),
    ("slurm.account", "proj\n"),
    ("slurm.partition", "gpu\n"),
    ("slurm.qos", "normal\n"),
    ("slurm.walltime", "01:00:00\n"),
    ("pbs.account", "proj\n"),
    ("pbs.queue", "workq\n"),
    ("pbs.walltime", "01:00:00\n"),
    ("pbs.select", "2:ncpus=4\n"),
]

# Digits of other scripts, which `\d` matches unless the regex is re.ASCII.
NON_ASCII_DIGIT_CASES = [
    ("slurm.walltime", "\u0663\u0660"),  # Arabic-Indic "30"
    ("pbs.walltime", "\u0661:\u0660\u0660:\u0660\u0660"),
    ("ray_version", "\u0662.\u0666\u0660.\u0660"),
    ("dashboard_host", "\u0661\u0662\u0667.0.0.1"),
    ("host", "login1:\u0662\u0662"),
    ("pbs.select", "\u0662:ncpus=4"),
]


@pytest.mark.parametrize(
    "field,value",
    [pytest.param(f, v, id=f"trailing-newline-{f}") for f, v in TRAILING_NEWLINE_CASES]
    + [pytest.param(f, v, id=f"non-ascii-digits-{f}") for f, v in NON_ASCII_DIGIT_CASES],
)
def test_value_a_loose_regex_would_pass_is_rejected(field, value):
    assert_rejected(kwargs_for(field, value), field)


# --------------------------------------------------------------------------- hostile corpus on every string input

STRING_FIELDS = [
    "host", "ray_version", "python", "work_dir", "node_tmp", "dashboard_host",
    "slurm.account", "slurm.partition", "slurm.qos", "slurm.walltime", "slurm.extra_directives",
    "pbs.account", "pbs.queue", "pbs.walltime", "pbs.select", "pbs.extra_directives",
    "user_script", "requirements", "ssh_key_file", "known_hosts", "info_file",
]
FILE_FIELDS = {"user_script", "requirements", "ssh_key_file", "known_hosts"}

HOSTILE = {
    "semicolon": "gpu; rm -rf ~",
    "semicolon-tight": "gpu;touch${IFS}CANARY",
    "pipe": "a|b",
    "and": "a&&b",
    "or": "a||touch CANARY",
    "background": "a&touch CANARY",
    "subst": "$(touch CANARY)",
    "subst-in-path": "/tmp/$(touch CANARY)",
    "backticks": "`touch CANARY`",
    "redirect": ">x",
    "redirect-append": "a>>x",
    "newline": "gpu\ntouch CANARY",
    "trailing-newline": "gpu\n",
    "leading-newline": "\ntouch CANARY",
    "carriage-return": "gpu\rtouch CANARY",
    "wrap": "--wrap=touch CANARY",
    "proxycommand": "-o ProxyCommand=touch CANARY",
    "proxycommand-glued": "-oProxyCommand=touch${IFS}CANARY",
    "dash": "-x",
    "quotes": "a'b\"c",
    "quote-break": "'; touch CANARY; '",
    "dollar-var": "$HOME",
    "glob": "*",
    "tilde-user": "~root/x",
    "long": "a" * 5000,
    "umlaut": "gpü",
    "rtl-override": "gpu\u202eyrt",
    "zero-width": "gpu\u200b",
    "tab": "gpu\ttouch CANARY",
}

# Directive-shaped hostile values: they pass the "starts with #SBATCH/#PBS" test
# and try to smuggle shell or a second command through.
HOSTILE_DIRECTIVES = {
    "d-subst": "{p} --comment=$(touch CANARY)",
    "d-backticks": "{p} --comment=`touch CANARY`",
    "d-semicolon": "{p} --comment=a;touch CANARY",
    "d-newline-cmd": "{p} --comment=a\ntouch CANARY",
    "d-cr-cmd": "{p} --comment=a\rtouch CANARY",
    "d-wrap": "{p} --wrap=touch CANARY",
    "d-redirect": "{p} --comment=a>x",
    "d-quote": "{p} --comment='a'",
}
HOSTILE_SELECT = {
    "s-semicolon": "2:ncpus=4;touch CANARY",
    "s-subst": "2:ncpus=$(touch CANARY)",
    "s-space": "2:ncpus=4 -l walltime=9999:00:00",
    "s-newline": "2:ncpus=4\ntouch CANARY",
}
HOSTILE_WALLTIME = {"w-semicolon": "01:00:00; rm -rf ~", "w-subst": "01:00:00$(touch CANARY)"}


def hostile_cases():
    for field in STRING_FIELDS:
        corpus = dict(HOSTILE)
        if field.endswith("extra_directives"):
            prefix = "#SBATCH" if field.startswith("slurm") else "#PBS"
            corpus.update({k: v.format(p=prefix) for k, v in HOSTILE_DIRECTIVES.items()})
        if field == "pbs.select":
            corpus.update(HOSTILE_SELECT)
        if field.endswith("walltime"):
            corpus.update(HOSTILE_WALLTIME)
        for label, value in corpus.items():
            marks = []
            yield pytest.param(field, value, id=f"{field}-{label}", marks=marks)


def render_all(settings: RayClusterSettings, plan: ClusterPlan) -> list[str]:
    return [cls(settings).render(plan.cluster_id, plan.cluster_dir)
            for cls in (SlurmScheduler, PbsScheduler, DirectScheduler)]


def check_accepted(settings: RayClusterSettings, sandbox: Sandbox) -> None:
    """An accepted value: every job script parses, the env file sources without side
    effects, and every variable the env file carries comes back exactly."""
    plan = ClusterPlan.new(settings, settings.work_dir)
    plan.environment = RayEnvironment(python=settings.python or "python3", ray="/opt/ray/bin/ray", source="reused")
    for script in render_all(settings, plan):
        sandbox.syntax_ok(script)
    names = ["AR_CLUSTER_ID", "AR_CLUSTER_DIR", "AR_NODE_TMP", "AR_PYTHON", "AR_DASHBOARD_HOST", "RAY_AUTH_TOKEN_PATH"]
    got = sandbox.source_env(plan.env_file() + plan.environment_file(), names)
    assert got == [plan.cluster_id, f"{settings.work_dir}/clusters/{plan.cluster_id}", settings.node_tmp,
                   settings.python or "python3", settings.dashboard_host, plan.token_path]
    sandbox.assert_untouched()


@pytest.mark.parametrize("field,value", list(hostile_cases()))
def test_hostile_value(field, value, sandbox, capsys):
    scheduler = scheduler_for_field(field)
    # 1. the model: rejected with an error that names the input, or accepted and harmless
    try:
        settings = settings_of(scheduler=scheduler, **kwargs_for(field, value))
    except ValidationError as exc:
        accepted = False
        locations = {".".join(str(p) for p in e["loc"]) for e in exc.errors()}
        assert names_input(locations, field) or any(field in e["msg"] for e in exc.errors()), exc
    else:
        accepted = True
        group, _, sub = field.rpartition(".")
        if "directives" not in field:  # directives are normalised (stripped lines)
            assert getattr(getattr(settings, group) if group else settings, sub) == value
        check_accepted(settings, sandbox)

    # 2. the command line, as a user would type it
    rc, out, err = run_main(capsys, ["--scheduler", scheduler, *cli_args(field, value), "--dry-run"])
    assert (rc == 0) == accepted, f"the CLI and the model disagree on {value!r}: {err}"
    if rc == 2:
        assert f"invalid input {field}" in err, err
        assert out == ""
    else:
        assert rc == 0, err
        env_text, job = dry_run_sections(out)
        sandbox.syntax_ok(job)
        sandbox.source_env(env_text, ["AR_CLUSTER_DIR", "AR_NODE_TMP"])
        assert job.startswith("#!/usr/bin/env bash\n")
    sandbox.assert_untouched()


HOSTILE_FILE_NAMES = {
    "semicolon": "gpu; rm -rf ~",
    "subst": "$(touch CANARY)",
    "backticks": "`touch CANARY`",
    "redirect": ">x",
    "pipe": "a|b",
    "and": "a&&b",
    "newline": "job\ntouch CANARY",
    "dash": "-o ProxyCommand=touch CANARY",
    "quotes": "a'b\"c",
    "umlaut": "gpü.py",
    "rtl": "gpu\u202eyp.exe",
}


# a user_script with a line break is the script's text (the form's editor), never a path
EXISTING_HOSTILE_FILES = [(label, field) for label, name in HOSTILE_FILE_NAMES.items() for field in sorted(FILE_FIELDS)
                          if not (field == "user_script" and "\n" in name)]


@pytest.mark.parametrize(("label", "field"), EXISTING_HOSTILE_FILES)
def test_hostile_file_names_that_exist(field, label, sandbox, capsys):
    """A real local file with a hostile name is accepted, and a dry run stays inert."""
    files = sandbox.root / "files"
    files.mkdir()
    path = files / HOSTILE_FILE_NAMES[label]
    path.write_text("print('hi')\n")
    settings = settings_of(scheduler="slurm", **{field: str(path)})
    assert getattr(settings, field) == str(path)
    check_accepted(settings, sandbox)
    rc, out, err = run_main(capsys, ["--scheduler", "slurm", flag_for(field), str(path), "--dry-run"])
    assert rc == 0, err
    env_text, job = dry_run_sections(out)
    sandbox.syntax_ok(job)
    sandbox.source_env(env_text, ["AR_CLUSTER_DIR"])
    assert str(path) not in job  # local files never reach the job script
    sandbox.assert_untouched()


@pytest.mark.parametrize("field", sorted(FILE_FIELDS))
@pytest.mark.parametrize("label", HOSTILE_FILE_NAMES)
def test_hostile_file_names_that_do_not_exist(field, label, sandbox):
    assert_rejected({field: HOSTILE_FILE_NAMES[label]}, field)
    assert_rejected({field: str(sandbox.root / HOSTILE_FILE_NAMES[label])}, field)
    sandbox.assert_untouched()


# --------------------------------------------------------------------------- environment mapping


def test_environment_is_read(monkeypatch):
    monkeypatch.setenv("RAY_CLUSTER_NUM_CPUS_PER_NODE", "4")
    monkeypatch.setenv("RAY_CLUSTER_SLURM__PARTITION", "debug")
    monkeypatch.setenv("RAY_CLUSTER_SCHEDULER", "slurm")
    s = from_environment()
    assert s.num_cpus_per_node == 4
    assert s.slurm.partition == "debug"
    assert s.scheduler.value == "slurm"
    assert s.slurm.walltime == "01:00:00"  # the rest of the group keeps its defaults


def test_environment_reaches_the_dry_run(monkeypatch, capsys):
    monkeypatch.setenv("RAY_CLUSTER_NUM_CPUS_PER_NODE", "4")
    monkeypatch.setenv("RAY_CLUSTER_SLURM__PARTITION", "debug")
    rc, out, err = run_main(capsys, ["--scheduler", "slurm", "--dry-run"])
    assert rc == 0, err
    assert "#SBATCH --cpus-per-task=4\n" in out
    assert "#SBATCH --partition=debug\n" in out


def test_arguments_beat_environment(monkeypatch):
    monkeypatch.setenv("RAY_CLUSTER_NUM_CPUS_PER_NODE", "4")
    assert RayClusterCli(num_cpus_per_node=8).num_cpus_per_node == 8


def test_only_the_command_line_reads_the_environment(monkeypatch):
    """A flow run's parameters (a deployment run on a worker) are what was submitted, whatever
    RAY_CLUSTER_* the worker's environment holds."""
    for name, value in {"RAY_CLUSTER_NUM_CPUS_PER_NODE": "4", "RAY_CLUSTER_CLUSTER__NUM_CPUS_PER_NODE": "4",
                        "RAY_CLUSTER_SCHEDULER": "slurm", "RAY_CLUSTER_HOST": "elsewhere"}.items():
        monkeypatch.setenv(name, value)
    s = RayClusterSettings()
    assert (s.num_cpus_per_node, s.scheduler.value, s.host) == (None, "none", "")
    assert from_environment().num_cpus_per_node == 4


@pytest.mark.parametrize(
    "name,value,where",
    [
        ("RAY_CLUSTER_SLURM__PARTITION", "gpu; rm -rf ~", "slurm.partition"),
        ("RAY_CLUSTER_NUM_CPUS_PER_NODE", "0", "num_cpus_per_node"),
        ("RAY_CLUSTER_HOST", "$(touch CANARY)", "host"),
    ],
)
def test_bad_environment_is_rejected(monkeypatch, name, value, where, sandbox, capsys):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=re.escape(where)):
        from_environment()
    rc, out, err = run_main(capsys, ["--dry-run"])
    assert rc == 2 and where in err and out == ""
    sandbox.assert_untouched()


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def help_text() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "flows.ray_cluster", "--help"], check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.upper().startswith("RAY_CLUSTER_")},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def expected_flags() -> list[str]:
    flags = []
    for name, info in RayClusterCli.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and annotation in (SlurmOptions, PbsOptions):
            flags.append(f"--{name}")
            flags += [f"--{name}.{sub.replace('_', '-')}" for sub in annotation.model_fields]
        else:
            flags.append("--" + name.replace("_", "-"))
    return flags


@pytest.mark.bed  # a real process or server: seconds, not milliseconds
def test_help_lists_every_field(help_text):
    flags = expected_flags()
    assert len(flags) == len(set(flags)) >= 35
    listed = set(re.findall(r"(--[a-z][a-z0-9.\-]*)", help_text))
    missing = [f for f in flags if f not in listed]
    assert missing == []
    for flag in ["--slurm.partition", "--pbs.select", "--user-script", "--num-cpus-per-node", "--dry-run",
                 "--slurm.extra-directives", "--pbs.extra-directives", "--no-token-auth"]:
        assert flag in listed
    assert "--num_cpus_per_node" not in help_text  # kebab case only


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--slurm.walltime", "abc"),
        ("--slurm.walltime", "01:00:00; rm -rf ~"),
        ("--pbs.walltime", "1-00:00:00"),
        ("--slurm.partition", "gpu; rm -rf ~"),
        ("--pbs.select", "2:ncpus=$(touch CANARY)"),
        ("--num-cpus-per-node", "0"),
        ("--num-cpus-per-node", "four"),
        ("--slurm.nodes", "0"),
        ("--dashboard-port", "80"),
        ("--ray-version", "latest"),
        ("--host", "-o ProxyCommand=touch CANARY"),
        ("--user-script", "/nonexistent/job.py"),
        ("--scheduler", "lsf"),
    ],
)
def test_cli_invalid_value_exit_2(flag, value, capsys, sandbox):
    rc, out, err = run_main(capsys, [flag, value, "--dry-run"])
    assert rc == 2
    # the error names the setting the flag sets: --num-cpus-per-node is num_cpus_per_node
    where = flag.removeprefix("--").replace("-", "_")
    assert where in err
    assert out == ""
    sandbox.assert_untouched()


def test_cli_unknown_flag_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--bogus", "--dry-run"])
    assert info.value.code == 2
    assert "--bogus" in capsys.readouterr().err


def test_cli_dry_run_starts_nothing(monkeypatch, capsys, sandbox):
    import asyncio

    import flows.cli as cli_module
    import flows.ray_cluster as flows_module
    import flows.target as target_module
    from tasks import local_transport, ssh_transport

    def forbidden(*a, **k):
        raise AssertionError("--dry-run started something")

    monkeypatch.setattr(cli_module, "ThreadPoolExecutor", forbidden)
    for module in (flows_module, target_module):
        monkeypatch.setattr(module, "open_target", forbidden)
    monkeypatch.setattr(cli_module, "ray_cluster", forbidden)
    monkeypatch.setattr(flows_module, "run_cluster", forbidden)
    monkeypatch.setattr(asyncio, "run", forbidden)
    monkeypatch.setattr(local_transport.asyncio, "create_subprocess_exec", forbidden)
    monkeypatch.setattr(ssh_transport, "connect_ssh", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    for scheduler in ("none", "slurm", "pbs"):
        rc, out, err = run_main(capsys, ["--scheduler", scheduler, "--host", "alice@login1:2222", "--dry-run"])
        assert rc == 0, err
        assert f"scheduler: {scheduler}" in out
        assert "# 4. submit:" in out and "# 7. teardown" in out
    sandbox.assert_untouched()
    assert list(sandbox.home.iterdir()) == [sandbox.home / "sentinel"]  # no ~/.activate-ray created


def test_cli_dry_run_plan_contents(capsys):
    rc, out, err = run_main(capsys, ["--scheduler", "pbs", "--pbs.nodes", "3", "--num-cpus-per-node", "8",
                                     "--pbs.queue", "workq", "--work-dir", "/scratch/ar", "--dry-run"])
    assert rc == 0, err
    env_text, job = dry_run_sections(out)
    assert "export AR_NUM_CPUS=8\n" in env_text
    assert re.search(r"^export AR_CLUSTER_DIR=/scratch/ar/clusters/ar-[0-9a-f]{32}$", env_text, re.MULTILINE)
    assert "#PBS -q workq\n" in job
    assert "#PBS -l select=3:ncpus=8\n" in job  # no memory asked for: none was set
    assert re.search(r"^cd /scratch/ar/clusters/ar-[0-9a-f]{32} && if qstat --version .*then qsub -f bin/job\.sh; "
                     r"else qsub bin/job\.sh; fi$", out, re.MULTILINE)
    assert "nodes: 3" in out
    assert "token" not in env_text.replace("RAY_AUTH_MODE=token", "").replace("RAY_AUTH_TOKEN_PATH", "").replace(
        "/token\n", "\n")  # the token's path, never the token


@pytest.mark.parametrize(
    "select,nodes",
    [("3:ncpus=1", 3), ("2:ncpus=4+1:ncpus=8:ngpus=1", 3), ("ncpus=4+4:ncpus=2", 5)],
)
def test_cli_dry_run_node_count_from_select(select, nodes, capsys):
    rc, out, err = run_main(capsys, ["--scheduler", "pbs", "--pbs.select", select, "--dry-run"])
    assert rc == 0, err
    _, job = dry_run_sections(out)
    assert f"scheduler: pbs; nodes: {nodes}\n" in out
    assert f"# 5. wait for {nodes} node(s) alive" in out
    assert f"#PBS -l select={select}\n" in job and "#PBS -l place=scatter\n" in job
    assert f"export AR_EXPECTED_NODES={nodes}\n" in out  # the job's worker launch expects the same count


def test_cli_dry_run_refuses_nodes_beside_a_select_that_says_otherwise(capsys, sandbox):
    rc, out, err = run_main(capsys, ["--scheduler", "pbs", "--pbs.select", "3:ncpus=1", "--pbs.nodes", "2",
                                     "--dry-run"])
    assert rc == 2 and out == ""
    assert "invalid input pbs:" in err and "pbs.nodes=2 but pbs.select asks for 3 chunks" in err
    sandbox.assert_untouched()
    rc, out, err = run_main(capsys, ["--scheduler", "pbs", "--pbs.select", "3:ncpus=1", "--pbs.nodes", "3",
                                     "--dry-run"])
    assert rc == 0 and "nodes: 3" in out, err


def test_cli_flags_match_model_values():
    cli = __import__("pydantic_settings").CliApp.run(
        RayClusterCli,
        cli_args=["--scheduler", "slurm", "--slurm.partition", "gpu", "--num-cpus-per-node", "4",
                  "--no-token-auth", "--slurm.extra-directives", "#SBATCH --exclusive\n#SBATCH --constraint=a100"],
    )
    s = RayClusterSettings.model_validate(cli.model_dump(exclude={"dry_run"}))
    assert (s.slurm.partition, s.cluster.num_cpus_per_node, s.advanced.token_auth) == ("gpu", 4, False)
    assert s.slurm.extra_directives == "#SBATCH --exclusive\n#SBATCH --constraint=a100"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"slurm": {"nodes": 4}}, "slurm options are set but the scheduler is none"),
        ({"scheduler": "pbs", "slurm": {"partition": "gpu"}}, "slurm options are set but the scheduler is pbs"),
        ({"scheduler": "slurm", "pbs": {"select": "2:ncpus=1"}}, "pbs options are set but the scheduler is slurm"),
        ({"scheduler": "slurm", "direct_workers": 2}, "direct_workers=2 applies without a scheduler only"),
        ({"scheduler": "pbs", "pbs": {"nodes": 2, "select": "3:ncpus=1"}}, "pbs.nodes=2 but pbs.select asks for 3"),
    ],
)
def test_options_that_cannot_apply_are_refused_not_ignored(values, message, capsys, sandbox):
    with pytest.raises(ValidationError, match=re.escape(message)):
        RayClusterSettings(**values)
    argv = [f"--{key.replace('_', '-')}={value}" for key, value in values.items() if not isinstance(value, dict)]
    argv += [f"--{group}.{key}={value}" for group, sub in values.items() if isinstance(sub, dict)
             for key, value in sub.items()]
    rc, out, err = run_main(capsys, [*argv, "--dry-run"])
    assert rc == 2 and message in err and out == ""
    sandbox.assert_untouched()


def test_groups_and_flat_names_are_one_definition():
    """Every field of a group is read flat too, and the command line has a flag for it."""
    from tasks.settings import GROUPS

    s = RayClusterSettings(cluster={"num_cpus_per_node": 3}, ray_version="2.60.0", advanced={"metrics": True})
    assert s.num_cpus_per_node == s.cluster.num_cpus_per_node == 3
    assert s.environment.ray_version == "2.60.0" and s.metrics is True
    for group, model in GROUPS.items():
        for name, info in model.model_fields.items():
            cli = RayClusterCli.model_fields[name]
            assert (cli.title, cli.description, cli.metadata) == (info.title, info.description, info.metadata), name
            if isinstance(info.annotation, type) and issubclass(info.annotation, Enum):  # by value: --node-failure continue
                assert get_args(cli.annotation) == tuple(m.value for m in info.annotation) and cli.default == info.default.value
            else:
                assert (cli.annotation, cli.default) == (info.annotation, info.default), f"{group}.{name}"


def test_this_machine_needs_no_asyncssh():
    """asyncssh costs about half a second to import: the flow's modules load it only when a
    target or a node is reached over SSH."""
    code = "import sys, flows.ray_cluster, tasks.transport; print('asyncssh' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "False"
