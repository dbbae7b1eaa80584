"""What the scheduler tests share: rendering a job script, reading its directives, running a
launcher for real with fake srun/ssh/pbsdsh on PATH, and transports that answer with the
documented outputs of the schedulers' commands (tests/fixtures/)."""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from tasks.schedulers import (
    PbsScheduler,
    SlurmScheduler,
    scheduler_for,
)
from tasks.settings import RayClusterSettings
from tasks.shipped import SCRIPTS_DIR
from tasks.transport import CommandResult

CLUSTER_ID = "ar-0123abcd"


CLUSTER_DIR = "/home/alice/.activate-ray/clusters/ar-0123abcd"


BASH = shutil.which("bash") or "/bin/bash"


def settings(**kw) -> RayClusterSettings:
    return RayClusterSettings(**kw)


def render(s: RayClusterSettings, cluster_dir: str = CLUSTER_DIR) -> str:
    return scheduler_for(s).render(CLUSTER_ID, cluster_dir)


def directive_lines(script: str, prefix: str) -> list[str]:
    return [line[len(prefix) + 1 :] for line in script.splitlines() if line.startswith(prefix + " ")]


def header_directives(script: str, prefix: str) -> list[str]:
    """Directives as sbatch/qsub read them: only those before the first command line."""
    found = []
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        if line.startswith(prefix + " "):
            found.append(line[len(prefix) + 1 :])
    return found


def assert_directive_block_first(script: str, prefix: str) -> None:
    assert script.startswith("#!/usr/bin/env bash\n")
    every = directive_lines(script, prefix)
    assert every, "no directives at all"
    assert header_directives(script, prefix) == every, "a directive comes after the first command"


def assert_bash_syntax(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(script)
    result = subprocess.run([BASH, "-n", str(path)], check=False, capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr


def assert_well_formed_job_script(script: str, prefix: str, tmp_path: Path) -> None:
    """What sbatch or qsub, then bash, need of a job script: its directive block first, valid bash."""
    assert_directive_block_first(script, prefix)
    assert_bash_syntax(script, tmp_path)


def assert_extra_directives_follow_ours(scheduler: str, prefix: str, extra: list[str], tmp_path: Path,
                                        **group) -> tuple[RayClusterSettings, list[str]]:
    """Render a job script with every line of extra as an extra directive: the flow's own directives
    (those of the same settings without extra ones) come first, then every extra one verbatim, in
    order, each on its own line. Returns the settings and the flow's own directives."""
    with_extra = settings(scheduler=scheduler,
                          **{scheduler: {**group, "extra_directives": "\n".join(f"{prefix} {l}" for l in extra)}})
    script = render(with_extra)
    ours = directive_lines(render(settings(scheduler=scheduler, **{scheduler: group})), prefix)
    assert directive_lines(script, prefix) == ours + extra
    assert_well_formed_job_script(script, prefix, tmp_path)
    return with_extra, ours


def launch_function(script: str) -> str:
    """The ar_launch_workers definition the job script sources: its scheduler's scripts/launch_workers_*.sh."""
    (name,) = re.findall(r'^\. "\$AR_CLUSTER_DIR/bin/(launch_workers_\w+\.sh)"$', script, re.M)
    return (SCRIPTS_DIR / name).read_text()


def mem_mb(ray_gb: float, store_gb: float) -> int:
    return math.ceil((ray_gb + store_gb) * 1024) + 512


def make_fake_bin(tmp_path: Path, fakes: dict[str, str],
                  real: tuple[str, ...] = ("bash", "awk", "seq", "grep", "tail", "tr", "cp", "cat")) -> Path:
    """A PATH with only the named fakes and a few real tools: no real srun/ssh/pbsdsh can be reached."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in real:
        found = shutil.which(tool)
        assert found, tool
        (fake_bin / tool).symlink_to(os.path.realpath(found))
    for name, body in fakes.items():
        path = fake_bin / name
        path.write_text(f"#!{BASH}\n{body}\n")
        path.chmod(0o755)
    return fake_bin


def run_launch(script: str, tmp_path: Path, fake_bin: Path, env: dict[str, str], prelude: str = "") -> subprocess.CompletedProcess:
    """Run the script's own ar_launch_workers under the job's shell options, then wait for its children."""
    driver = tmp_path / "driver.sh"
    # ray_lib.sh first, as the job script has it: the launchers report through its ar_launcher_ended
    lib = f". {shlex.quote(str(SCRIPTS_DIR / 'ray_lib.sh'))}\n"
    driver.write_text("set -euo pipefail\n" + lib + prelude + launch_function(script) + "ar_launch_workers\nwait\n")
    full_env = {"PATH": str(fake_bin), "HOME": str(tmp_path), **env}
    return subprocess.run([BASH, "--norc", "--noprofile", str(driver)], check=False, cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=20)


def cluster_dir_in(tmp_path: Path) -> Path:
    cluster = tmp_path / "clusters" / CLUSTER_ID
    (cluster / "logs").mkdir(parents=True)
    (cluster / "bin").mkdir()
    return cluster


# `hostname -s`: the short name, as for a node whose scheduler names it fully qualified
FAKE_HOSTNAME = 'h="${FAKE_HOST:-node1}"; [ "${1:-}" != -s ] || h="${h%%.*}"; echo "$h"'


# Fake ssh: record the host and the remote command, then run that command the
# way sshd would (a shell on "that" node), so the quoting is exercised too.
FAKE_SSH = r'''
host=""
while [ $# -gt 0 ]; do
    case "$1" in
        -o) shift 2 ;;
        -*) shift ;;
        *) host="$1"; shift; break ;;
    esac
done
printf '%s\t%s\n' "$host" "$*" >>"$CALLS/ssh"
FAKE_HOST="$host" bash -c "$*"
'''


# Fake pbsdsh -u: one task on each distinct node of the job, all at once.
FAKE_PBSDSH = r'''
printf '%s\n' "$*" >>"$CALLS/pbsdsh"
[ "$1" = -u ] && shift
[ "$1" = -- ] && shift
for node in $(awk '!seen[$0]++' "$PBS_NODEFILE"); do
    FAKE_HOST="$node" "$@" &
done
wait
'''


# Fake pbs_tmrsh (OpenPBS, PBS Pro): one task on the named host, its argv run as is (no shell).
FAKE_PBS_TMRSH = r'''
printf '%s\t%s\n' "$1" "${*:2}" >>"$CALLS/pbs_tmrsh"
host="$1"; shift
FAKE_HOST="$host" exec "$@"
'''


FAKE_PBS_ATTACH = r'''
printf '%s\n' "$*" >>"$CALLS/pbs_attach"
shift 2
exec "$@"
'''


FAKE_WORKER = 'printf "%s %s\\n" "$(hostname -s)" "$AR_CLUSTER_DIR" >>"$CALLS/workers"\n'


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


class FakeTransport:
    """Answers each command by the first matching prefix; records what was run."""

    label = "fake"

    def __init__(self, answers: list[tuple[str, CommandResult]]):
        self.answers = answers
        self.commands: list[str] = []

    async def run(self, command: str, *, check: bool = True, timeout: float | None = 120) -> CommandResult:
        self.commands.append(command)
        for prefix, result in self.answers:
            if command.startswith(prefix):
                return result
        raise AssertionError(f"unexpected command {command!r}")

    async def query(self, command: str, attempts: int = 3, timeout: float = 30) -> CommandResult:
        return await self.run(command, check=False)


def ok(stdout: str) -> CommandResult:
    return CommandResult(0, stdout, "")


def failed(rc: int, text: str = "") -> CommandResult:
    return CommandResult(rc, text, "")


def pbs() -> PbsScheduler:
    return PbsScheduler(RayClusterSettings(scheduler="pbs"))


def slurm() -> SlurmScheduler:
    return SlurmScheduler(RayClusterSettings(scheduler="slurm"))


class ScriptedTransport(FakeTransport):
    """Like FakeTransport, but each answer is used once, in order, per prefix."""

    async def run(self, command: str, *, check: bool = True, timeout: float | None = 120) -> CommandResult:
        self.commands.append(command)
        for index, (prefix, result) in enumerate(self.answers):
            if command.startswith(prefix):
                del self.answers[index]
                return result
        raise AssertionError(f"unexpected command {command!r}")


TIMED_OUT = CommandResult(1, "", "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation\n")
