"""setup_commands and network_interface without a bed: validation, the job script's
order, scripts/site_setup.sh and scripts/node_ip.py run for real on this machine."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from tasks.schedulers import SlurmScheduler
from tasks.settings import RayClusterSettings
from tests.helpers import REPO

SITE_SETUP = REPO / "scripts" / "site_setup.sh"
NODE_IP = REPO / "scripts" / "node_ip.py"


@pytest.mark.parametrize("text", [
    "module load python/3.11 cuda/12.4",
    "source /opt/conda/etc/profile.d/conda.sh && conda activate ray",
    "if [ -d /opt/site ]; then\n  export PATH=/opt/site/bin:$PATH\nfi",
])
def test_setup_commands_that_parse_are_kept_as_lines(text):
    assert RayClusterSettings(setup_commands=text).setup_commands == text + "\n"


@pytest.mark.parametrize("text, says", [
    ("if true; then", "not valid shell"),
    ("echo 'unterminated", "not valid shell"),
    ("echo a\x1b[31m", "control characters"),
    ("x" * 20000, "longer than"),
])
def test_setup_commands_that_bash_cannot_run_are_refused(text, says):
    with pytest.raises(ValidationError, match=says):
        RayClusterSettings(setup_commands=text)


def test_blank_setup_commands_are_none():
    assert RayClusterSettings(setup_commands="\n  \n").setup_commands == ""


@pytest.mark.parametrize("value, kept", [
    ("ib0", "ib0"), ("hsn0", "hsn0"), ("enp65s0f1", "enp65s0f1"), ("bond0.100", "bond0.100"),
    ("10.20.3.4/16", "10.20.0.0/16"), (" 192.168.0.0/24 ", "192.168.0.0/24"), ("", ""),
])
def test_network_interface_names_and_subnets(value, kept):
    assert RayClusterSettings(network_interface=value).network_interface == kept


@pytest.mark.parametrize("value, says", [
    ("10.1.1.1", "is an address"), ("10.1.1.1/40", "not an IPv4 subnet"), ("eth0; rm -rf ~", "neither"),
    ("averylonginterfacename", "neither"), ("-eth0", "neither"),
])
def test_network_interface_refused(value, says):
    with pytest.raises(ValidationError, match=says):
        RayClusterSettings(network_interface=value)


def test_job_script_runs_setup_commands_after_the_env_and_before_ray():
    settings = RayClusterSettings(scheduler="slurm", host="a@login", setup_commands="module load ray\n")
    lines = SlurmScheduler(settings).render("ar-0123abcd", "/w/clusters/ar-0123abcd").splitlines()
    setup = next(i for i, line in enumerate(lines) if "site_setup.sh" in line)
    assert lines[setup - 1] == '. "$AR_CLUSTER_DIR/cluster.env"'
    assert lines[setup + 1].endswith('launch_workers_slurm.sh"') and lines[-1].endswith('cluster_main.sh"')
    without = SlurmScheduler(RayClusterSettings(scheduler="slurm", host="a@login")).render("ar-0123abcd", "/w/c")
    assert "site_setup" not in without


def run_site_setup(tmp_path, lines: str, after: str = 'echo "FOO=${FOO-unset}"'):
    (tmp_path / "setup.sh").write_text(lines)
    script = f'set -euo pipefail\n. {SITE_SETUP} "$1" "$2"\n{after}\n'
    return subprocess.run(["bash", "-c", script, "_", str(tmp_path / "setup.sh"), str(tmp_path / "status")],
                          capture_output=True, text=True, timeout=30)


def test_site_setup_sets_the_callers_environment_and_tolerates_unset_variables(tmp_path):
    done = run_site_setup(tmp_path, 'export FOO="bar${MODULEPATH_NOT_SET}"\n')
    assert done.returncode == 0, done.stderr
    assert "FOO=bar" in done.stdout
    assert not (tmp_path / "status").exists()
    # nounset is on again for the caller afterwards
    strict = run_site_setup(tmp_path, "true\n", after="echo $NOT_SET_AFTER")
    assert strict.returncode != 0 and "unbound variable" in strict.stderr


def test_a_failing_setup_line_stops_the_caller_named_with_the_host(tmp_path):
    failed = run_site_setup(tmp_path, "export FOO=1\nmodule_not_here load ray\necho NOT_REACHED\n")
    assert failed.returncode != 0
    assert "NOT_REACHED" not in failed.stdout and "FOO=" not in failed.stdout
    assert "setup_commands failed on" in failed.stderr and "'module_not_here load ray' exited 127" in failed.stderr
    assert (tmp_path / "status").read_text().startswith("RAY_FAILED=setup_commands failed on ")


def node_ip(selector: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(NODE_IP), selector], capture_output=True, text=True, timeout=30)


def test_node_ip_by_interface_name_and_by_subnet():
    assert node_ip("lo").stdout.strip() == "127.0.0.1"
    assert node_ip("127.0.0.0/8").stdout.strip() == "127.0.0.1"


def test_node_ip_names_the_node_and_what_it_has_when_there_is_none():
    missing = node_ip("ib9")
    assert missing.returncode == 1 and missing.stdout == ""
    assert "no IPv4 address on interface ib9 (this node has: lo 127.0.0.1" in missing.stderr
    assert "no address in 203.0.113.0/24" in node_ip("203.0.113.0/24").stderr


def test_a_site_block_carries_setup_commands_and_network_interface_into_every_run():
    from blocks.site import HpcSite

    site = HpcSite(host="alice@login.hpc", setup_commands="module load python/3.11", network_interface="10.20.0.0/16")
    settings = site.to_settings(slurm={"nodes": 2})
    assert settings.setup_commands == "module load python/3.11\n" and settings.network_interface == "10.20.0.0/16"
    assert site.parameters()["environment"]["setup_commands"] == "module load python/3.11\n"
    with pytest.raises(ValidationError, match="not valid shell"):
        HpcSite(host="alice@login.hpc", setup_commands="if then")
