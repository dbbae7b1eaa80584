"""Fast unit tests of the rendered job scripts (no Ray, no scheduler, no network).

SLURM and PBS directives for every input; the directive block comes before the
first command (sbatch and qsub stop reading directives there); every script is
syntax-checked with `bash -n`; and each scheduler's ar_launch_workers is
executed for real in bash with fake srun/ssh/pbsdsh/hostname on PATH.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.cluster import SCRIPTS_DIR, ClusterPlan
from tasks.schedulers import (
    DirectScheduler,
    PbsScheduler,
    SlurmScheduler,
    scheduler_for,
)
from tasks.schedulers.pbs import PBS_ALLOWED, PBS_W_ALLOWED
from tasks.schedulers.slurm import SLURM_ALLOWED, SLURM_SHORT
from tasks.settings import RayClusterSettings

CLUSTER_ID = "ar-0123abcd"
CLUSTER_DIR = "/home/alice/.activate-ray/clusters/ar-0123abcd"
BASH = shutil.which("bash") or "/bin/bash"


# --------------------------------------------------------------------------- helpers


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


def launch_function(script: str) -> str:
    """The ar_launch_workers definition the job script sources: its scheduler's scripts/launch_workers_*.sh."""
    (name,) = re.findall(r'^\. "\$AR_CLUSTER_DIR/bin/(launch_workers_\w+\.sh)"$', script, re.M)
    return (SCRIPTS_DIR / name).read_text()


def mem_mb(ray_gb: float, store_gb: float) -> int:
    return math.ceil((ray_gb + store_gb) * 1024) + 512


# --------------------------------------------------------------------------- SLURM


def test_slurm_defaults(tmp_path):
    script = render(settings(scheduler="slurm"))
    assert directive_lines(script, "#SBATCH") == [
        f"--job-name={CLUSTER_ID}",
        "--nodes=1",
        "--ntasks-per-node=1",
        # no CPUs, memory or GPUs asked for unless set: the node takes what the allocation gives
        "--time=01:00:00",
        f"--output={CLUSTER_DIR}/logs/job-%j.out",
        "--signal=B:USR1@60",
    ]
    assert_directive_block_first(script, "#SBATCH")
    assert_bash_syntax(script, tmp_path)
    assert "#PBS" not in script


def test_slurm_every_input(tmp_path):
    s = settings(
        scheduler="slurm", num_cpus_per_node=16, num_gpus_per_node=4, ray_memory_gb=60, object_store_memory_gb=20.5,
        slurm={"nodes": 8, "walltime": "1-12:00:00", "account": "proj42", "partition": "gpu", "qos": "high",
               "extra_directives": "#SBATCH --constraint=a100\n\n  #SBATCH --exclusive  \n#SBATCH --mail-type=END,FAIL"},
    )
    script = render(s)
    lines = directive_lines(script, "#SBATCH")
    assert f"--job-name={CLUSTER_ID}" in lines
    assert "--nodes=8" in lines
    assert "--ntasks-per-node=1" in lines
    assert "--cpus-per-task=16" in lines
    assert f"--mem={mem_mb(60, 20.5)}M" in lines
    assert "--gpus-per-node=4" in lines
    assert "--time=1-12:00:00" in lines
    assert f"--output={CLUSTER_DIR}/logs/job-%j.out" in lines
    assert "--signal=B:USR1@60" in lines
    assert "--account=proj42" in lines
    assert "--partition=gpu" in lines
    assert "--qos=high" in lines
    # each extra directive is its own line, in order, after ours (so it can override)
    assert lines[-3:] == ["--constraint=a100", "--exclusive", "--mail-type=END,FAIL"]
    assert len(lines) == len(set(lines)) == 15
    assert_directive_block_first(script, "#SBATCH")
    assert_bash_syntax(script, tmp_path)


@pytest.mark.parametrize("gpus", [0, 1, 8])
def test_slurm_gpus_only_when_asked(gpus):
    lines = directive_lines(render(settings(scheduler="slurm", num_gpus_per_node=gpus)), "#SBATCH")
    gpu_lines = [l for l in lines if "gpu" in l]
    assert gpu_lines == ([f"--gpus-per-node={gpus}"] if gpus else [])


@pytest.mark.parametrize("option", ["account", "partition", "qos"])
def test_slurm_names_only_when_set(option):
    unset = directive_lines(render(settings(scheduler="slurm")), "#SBATCH")
    assert not any(l.startswith(f"--{option}") for l in unset)
    lines = directive_lines(render(settings(scheduler="slurm", slurm={option: "val-1"})), "#SBATCH")
    assert [l for l in lines if l.startswith(f"--{option}")] == [f"--{option}=val-1"]


@pytest.mark.parametrize("walltime", ["30", "30:00", "01:00:00", "1-12", "1-12:00", "1-12:00:00"])
def test_slurm_walltime_verbatim(walltime):
    lines = directive_lines(render(settings(scheduler="slurm", slurm={"walltime": walltime})), "#SBATCH")
    assert f"--time={walltime}" in lines


@pytest.mark.parametrize("nodes", [1, 2, 64])
def test_slurm_one_srun_for_all_workers(nodes, tmp_path):
    script = render(settings(scheduler="slurm", slurm={"nodes": nodes}))
    body = launch_function(script)
    assert len(re.findall(r"\bsrun\b", body)) == 1
    assert "srun" not in script  # the job script sources its launcher
    assert not re.search(r"^\s*(for|while|until)\b", body, re.MULTILINE), "workers must start in one step, not a loop"
    assert '--ntasks-per-node=1' in body and '--exclude="$SLURMD_NODENAME"' in body
    assert_bash_syntax(script, tmp_path)


def make_fake_bin(tmp_path: Path, fakes: dict[str, str], real: tuple[str, ...] = ("bash", "awk", "seq")) -> Path:
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
    driver.write_text("set -euo pipefail\n" + prelude + launch_function(script) + "ar_launch_workers\nwait\n")
    full_env = {"PATH": str(fake_bin), "HOME": str(tmp_path), **env}
    return subprocess.run([BASH, "--norc", "--noprofile", str(driver)], check=False, cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=20)


def cluster_dir_in(tmp_path: Path) -> Path:
    cluster = tmp_path / "clusters" / CLUSTER_ID
    (cluster / "logs").mkdir(parents=True)
    (cluster / "bin").mkdir()
    return cluster


def test_slurm_launch_runs_srun_once(tmp_path):
    cluster = cluster_dir_in(tmp_path)
    calls = tmp_path / "srun.calls"
    fake_bin = make_fake_bin(tmp_path, {"srun": f'printf "%s\\n" "$*" >>{calls}'})
    script = render(settings(scheduler="slurm", slurm={"nodes": 3}), str(cluster))
    env = {"AR_CLUSTER_DIR": str(cluster), "AR_NUM_CPUS": "4", "SLURM_JOB_NUM_NODES": "3", "SLURMD_NODENAME": "node1"}
    result = run_launch(script, tmp_path, fake_bin, env)
    assert result.returncode == 0, result.stderr
    recorded = calls.read_text().splitlines()
    assert len(recorded) == 1
    args = recorded[0].split()
    assert "--nodes=2" in args and "--ntasks=2" in args and "--ntasks-per-node=1" in args
    assert "--exclude=node1" in args and "--cpus-per-task=4" in args
    assert args[-2:] == ["bash", f"{cluster}/bin/ray_worker.sh"]


def test_slurm_launch_single_node_starts_no_step(tmp_path):
    cluster = cluster_dir_in(tmp_path)
    calls = tmp_path / "srun.calls"
    fake_bin = make_fake_bin(tmp_path, {"srun": f'echo called >>{calls}'})
    script = render(settings(scheduler="slurm"), str(cluster))
    env = {"AR_CLUSTER_DIR": str(cluster), "AR_NUM_CPUS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURMD_NODENAME": "n1"}
    result = run_launch(script, tmp_path, fake_bin, env)
    assert result.returncode == 0, result.stderr
    assert not calls.exists()


@pytest.mark.parametrize(
    "walltime,seconds",
    [("30:00", 1800), ("45:30", 2730), ("01:00:00", 3600), ("1-12", 129600), ("1-12:30", 131400),
     ("1-12:00:00", 129600), ("2-00:00:01", 172801)],
)
def test_slurm_walltime_seconds(walltime, seconds):
    assert SlurmScheduler(settings(scheduler="slurm", slurm={"walltime": walltime})).walltime_seconds == seconds


@pytest.mark.parametrize("walltime,seconds", [("30", 1800), ("5", 300)])
def test_slurm_walltime_seconds_minutes_only(walltime, seconds):
    assert SlurmScheduler(settings(scheduler="slurm", slurm={"walltime": walltime})).walltime_seconds == seconds


@pytest.mark.parametrize("work_dir", ["/scratch/ar\n", "/scratch/%u/ray"])
def test_work_dir_that_would_break_directives_is_refused(work_dir):
    """A newline would split '#SBATCH --output=' in two (sbatch then ignores every later
    directive); '%' would be expanded by sbatch as a filename pattern."""
    with pytest.raises(ValidationError, match="work_dir"):
        settings(scheduler="slurm", work_dir=work_dir)


def test_slurm_output_path_has_no_pattern_but_the_job_id():
    s = settings(scheduler="slurm", work_dir="/scratch/ray")
    (output,) = [l for l in directive_lines(render(s, f"{s.work_dir}/clusters/{CLUSTER_ID}"), "#SBATCH")
                 if l.startswith("--output=")]
    assert re.findall(r"%.", output) == ["%j"]


# Every allowed '#SBATCH' option, as a site would write it (short spellings included).
SLURM_SAMPLE = [
    "--account=proj42", "-A proj42", "--partition=gpu,gpu-long", "-p gpu", "--qos=high", "-q high",
    "--reservation=maint-2026", "--licenses=fluent:2", "-L fluent:2", "--comment=ray-run", "--wckey=ml",
    "--mail-type=END,FAIL", "--mail-user=alice@example.org", "--begin=now+60", "-b now+60",
    "--deadline=2026-12-31T23:59:00", "--dependency=afterok:123:124", "-d afterok:123", "--priority=10",
    "--nice=-5", "--hold", "-H", "--requeue", "--no-requeue",
    "--constraint=a100", "-C a100", "-Ca100", "--cluster-constraint=east", "--prefer=hbm",
    "--nodelist=node[1-4]", "-w node1", "--exclude=node7", "-x node7", "--switches=1@10:00", "--exclusive",
    "--exclusive=user", "--oversubscribe", "-s", "--contiguous", "--spread-job", "--network=sn_single",
    "--hint=nomultithread", "--core-spec=2", "-S 2", "--thread-spec=1", "--threads-per-core=1",
    "--cores-per-socket=32", "--sockets-per-node=2", "--extra-node-info=2:32:1", "-B 2:32:1", "--mincpus=64",
    "--mem=0", "--mem-per-cpu=4G", "--mem-per-gpu=40G", "--tmp=100G", "--gres=gpu:a100:4",
    "--gres-flags=enforce-binding", "--gpus=8", "-G 8", "--gpus-per-node=a100:4", "--gpus-per-socket=2",
    "--gpus-per-task=1", "--cpus-per-gpu=8", "--comment -dash-value",
]


def test_slurm_sample_covers_the_allowlist():
    named = set()
    for line in SLURM_SAMPLE:
        word = line.split()[0]
        named.add(word[2:].split("=")[0] if word.startswith("--") else SLURM_SHORT[word[1]])
    assert named == set(SLURM_ALLOWED)


def test_every_allowed_slurm_directive_reaches_the_job_script(tmp_path):
    s = settings(scheduler="slurm", slurm={"nodes": 2, "extra_directives": "\n".join(f"#SBATCH {l}" for l in SLURM_SAMPLE)})
    script = render(s)
    lines = directive_lines(script, "#SBATCH")
    ours = directive_lines(render(settings(scheduler="slurm", slurm={"nodes": 2})), "#SBATCH")
    # the flow's directives first, then every extra one verbatim, in order, each on its own line
    assert lines == ours + SLURM_SAMPLE
    assert_directive_block_first(script, "#SBATCH")
    assert_bash_syntax(script, tmp_path)


# --------------------------------------------------------------------------- PBS


def test_pbs_defaults(tmp_path):
    script = render(settings(scheduler="pbs"))
    assert directive_lines(script, "#PBS") == [
        f"-N {CLUSTER_ID}",
        "-l walltime=01:00:00",
        "-l select=1:ncpus=1",  # PBS's own default chunk: nothing more unless set
        "-l place=scatter",
        "-j oe",
        f"-o {CLUSTER_DIR}/logs/job.out",
    ]
    assert_directive_block_first(script, "#PBS")
    assert_bash_syntax(script, tmp_path)
    assert "#SBATCH" not in script


@pytest.mark.parametrize(("memory", "store", "mb"), [(1.0, None, 1024 + 512), (2.0, 0.5, 2048 + 512 + 512)])
def test_memory_is_requested_only_when_ray_memory_is_set(memory, store, mb):
    """--ray-memory-gb 1 alone asks for 1.5 GB (a 2000 MB node can give it), not heap + a default store."""
    kw = {"ray_memory_gb": memory, **({"object_store_memory_gb": store} if store else {})}
    assert f"--mem={mb}M" in directive_lines(render(settings(scheduler="slurm", **kw)), "#SBATCH")
    assert f"-l select=1:ncpus=1:mem={mb}mb" in directive_lines(render(settings(scheduler="pbs", **kw)), "#PBS")
    only_store = render(settings(scheduler="slurm", object_store_memory_gb=4))
    assert not any(line.startswith("--mem") for line in directive_lines(only_store, "#SBATCH"))


def test_pbs_every_input(tmp_path):
    s = settings(
        scheduler="pbs", num_cpus_per_node=32, num_gpus_per_node=2, ray_memory_gb=100, object_store_memory_gb=28,
        pbs={"nodes": 4, "walltime": "12:00:00", "account": "proj42", "queue": "gpuq",
             "extra_directives": "#PBS -m abe\n#PBS -M alice@example.org\n\n#PBS -l filesystems=home:eagle"},
    )
    script = render(s)
    assert directive_lines(script, "#PBS") == [
        f"-N {CLUSTER_ID}",
        "-A proj42",
        "-q gpuq",
        "-l walltime=12:00:00",
        f"-l select=4:ncpus=32:mem={mem_mb(100, 28)}mb:ngpus=2",
        "-l place=scatter",
        "-j oe",
        f"-o {CLUSTER_DIR}/logs/job.out",
        "-m abe",
        "-M alice@example.org",
        "-l filesystems=home:eagle",
    ]
    assert_directive_block_first(script, "#PBS")
    assert_bash_syntax(script, tmp_path)


@pytest.mark.parametrize("gpus,suffix", [(0, ""), (1, ":ngpus=1"), (4, ":ngpus=4")])
def test_pbs_select_built_from_inputs(gpus, suffix):
    s = settings(scheduler="pbs", num_cpus_per_node=8, num_gpus_per_node=gpus, ray_memory_gb=4,
                 object_store_memory_gb=1.5, pbs={"nodes": 3})
    assert PbsScheduler(s).select() == f"3:ncpus=8:mem=6144mb{suffix}"
    assert f"-l select=3:ncpus=8:mem=6144mb{suffix}" in directive_lines(render(s), "#PBS")


@pytest.mark.parametrize(
    "select,chunks",
    [("2:ncpus=16:mem=64gb:ngpus=4", 2), ("1:ncpus=2+3:ncpus=8:mem=16gb", 4), ("ncpus=8+ncpus=4:ngpus=1", 2)],
)
def test_pbs_user_select_verbatim(select, chunks):
    s = settings(scheduler="pbs", num_cpus_per_node=8, num_gpus_per_node=1, pbs={"select": select})
    assert PbsScheduler(s).select() == select
    script = render(s)
    lines = directive_lines(script, "#PBS")
    assert [l for l in lines if l.startswith("-l select=")] == [f"-l select={select}"]
    assert "-l place=scatter" in lines  # one chunk per host: chunks == hosts == Ray nodes
    # the flow waits for, and the job's worker launch checks, the same count
    assert PbsScheduler(s).chunks == s.nodes == s.pbs.nodes == chunks
    assert f"export AR_EXPECTED_NODES={chunks}\n" in ClusterPlan.new(s, "/w").env_file()


def test_pbs_user_select_with_disagreeing_nodes_is_refused():
    with pytest.raises(ValidationError, match="pbs.nodes=5 but pbs.select asks for 2 chunks"):
        settings(scheduler="pbs", pbs={"select": "2:ncpus=16", "nodes": 5})


@pytest.mark.parametrize("option,flag", [("account", "-A"), ("queue", "-q")])
def test_pbs_names_only_when_set(option, flag):
    assert not any(l.startswith(flag + " ") for l in directive_lines(render(settings(scheduler="pbs")), "#PBS"))
    lines = directive_lines(render(settings(scheduler="pbs", pbs={option: "val-1"})), "#PBS")
    assert [l for l in lines if l.startswith(flag + " ")] == [f"{flag} val-1"]


@pytest.mark.parametrize(
    "walltime,seconds", [("30", 30), ("10:00", 600), ("01:00:00", 3600), ("100:00:00", 360000)]
)
def test_pbs_walltime_seconds(walltime, seconds):
    assert PbsScheduler(settings(scheduler="pbs", pbs={"walltime": walltime})).walltime_seconds == seconds


# Every allowed '#PBS' option, as a site would write it (glued spellings included).
PBS_SAMPLE = [
    "-l filesystems=home:eagle", "-lfilesystems=home", "-l place=scatter:excl", "-l place=scatter:group=switch",
    "-l gpu_type=a100,software=ansys", "-W depend=afterok:123.server", "-W group_list=g1@host1,g2@host2",
    "-q workq", "-q gpuq@server2", "-A proj42", "-P project7", "-m abe", "-mn", "-M alice@example.org",
    "-p -5", "-p10", "-r n", "-a 202612312359", "-h",
]


def test_pbs_sample_covers_the_allowlist():
    assert {line[1] for line in PBS_SAMPLE} == set(PBS_ALLOWED)
    assert {line.split()[1].split("=")[0] for line in PBS_SAMPLE if line.startswith("-W ")} == PBS_W_ALLOWED


def test_every_allowed_pbs_directive_reaches_the_job_script(tmp_path):
    s = settings(scheduler="pbs", pbs={"nodes": 3, "extra_directives": "\n".join(f"#PBS {l}" for l in PBS_SAMPLE)})
    script = render(s)
    lines = directive_lines(script, "#PBS")
    ours = directive_lines(render(settings(scheduler="pbs", pbs={"nodes": 3})), "#PBS")
    assert lines == ours + PBS_SAMPLE
    # the flow's own node layout stays: its select and place=scatter are the only ones it wrote
    assert [l for l in ours if l.startswith("-l ")] == ["-l walltime=01:00:00", f"-l select={PbsScheduler(s).select()}",
                                                       "-l place=scatter"]
    assert_directive_block_first(script, "#PBS")
    assert_bash_syntax(script, tmp_path)


@pytest.mark.parametrize("scheduler,line", [
    ("slurm", "#SBATCH --output=/tmp/x"), ("slurm", "#SBATCH -so/tmp/x"), ("slurm", "#SBATCH --export=ALL"),
    ("slurm", "#SBATCH --array=1-4"), ("pbs", "#PBS -o /tmp/x"), ("pbs", "#PBS -V"), ("pbs", "#PBS -W stageout=a@b:c"),
])
def test_refused_directive_never_reaches_a_job_script(scheduler, line):
    with pytest.raises(ValidationError, match="is not allowed"):
        settings(scheduler=scheduler, **{scheduler: {"extra_directives": line}})


def test_pbs_launch_dedups_nodefile_in_order():
    body = launch_function(render(settings(scheduler="pbs")))
    assert "awk '!seen[$0]++' \"$PBS_NODEFILE\"" in body
    assert '"${nodes[@]:1}"' in body  # the head (first node) is skipped
    assert "pbsdsh" in body and "ssh -o BatchMode=yes" in body


FAKE_HOSTNAME = 'echo "${FAKE_HOST:-node1}"'
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
FAKE_PBS_ATTACH = r'''
printf '%s\n' "$*" >>"$CALLS/pbs_attach"
shift 2
exec "$@"
'''
FAKE_WORKER = 'printf "%s %s\\n" "$(hostname -s)" "$AR_CLUSTER_DIR" >>"$CALLS/workers"\n'


def pbs_launch(tmp_path: Path, fakes: dict[str, str]) -> tuple[subprocess.CompletedProcess, Path, Path]:
    cluster = cluster_dir_in(tmp_path)
    calls = tmp_path / "calls"
    calls.mkdir()
    worker = cluster / "bin" / "ray_worker.sh"
    worker.write_text(FAKE_WORKER)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("".join(f"{node}\n" for node in ("node1", "node2", "node3") for _ in range(4)))
    fake_bin = make_fake_bin(tmp_path, {"hostname": FAKE_HOSTNAME, **fakes})
    script = render(settings(scheduler="pbs", pbs={"nodes": 3}, num_cpus_per_node=4), str(cluster))
    env = {"AR_CLUSTER_DIR": str(cluster), "PBS_NODEFILE": str(nodefile), "PBS_JOBID": "123.pbs-server",
           "CALLS": str(calls), "AR_EXPECTED_NODES": "3"}
    return run_launch(script, tmp_path, fake_bin, env), calls, cluster


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_pbs_launch_ssh_fanout_skips_head_and_duplicates(tmp_path):
    result, calls, cluster = pbs_launch(tmp_path, {"ssh": FAKE_SSH})
    assert result.returncode == 0, result.stderr
    ssh_calls = read_lines(calls / "ssh")
    hosts = sorted(line.split("\t")[0] for line in ssh_calls)
    assert hosts == ["node2", "node3"], ssh_calls  # each once, never the head node1
    for line in ssh_calls:
        assert "ray_worker.sh" in line and "pbs_attach" not in line
    # the remote command really starts the worker on that node, with the cluster dir intact
    assert sorted(read_lines(calls / "workers")) == [f"node2 {cluster}", f"node3 {cluster}"]
    assert read_lines(calls / "pbsdsh") == []


def test_pbs_launch_ssh_uses_pbs_attach_when_present(tmp_path):
    result, calls, cluster = pbs_launch(tmp_path, {"ssh": FAKE_SSH, "pbs_attach": FAKE_PBS_ATTACH})
    assert result.returncode == 0, result.stderr
    assert sorted(l.split("\t")[0] for l in read_lines(calls / "ssh")) == ["node2", "node3"]
    attach = read_lines(calls / "pbs_attach")
    assert len(attach) == 2 and all(l.startswith("-j 123.pbs-server bash ") for l in attach)
    assert sorted(read_lines(calls / "workers")) == [f"node2 {cluster}", f"node3 {cluster}"]


def test_pbs_launch_prefers_pbsdsh(tmp_path):
    result, calls, cluster = pbs_launch(tmp_path, {"ssh": FAKE_SSH, "pbsdsh": FAKE_PBSDSH})
    assert result.returncode == 0, result.stderr
    pbsdsh_calls = read_lines(calls / "pbsdsh")
    assert len(pbsdsh_calls) == 1
    assert pbsdsh_calls[0].startswith("-u -- bash -c ")
    assert read_lines(calls / "ssh") == []
    # one task per distinct node; the head (node1, where `hostname -s` says we are) skips itself
    assert sorted(read_lines(calls / "workers")) == [f"node2 {cluster}", f"node3 {cluster}"]


@pytest.mark.parametrize("select,hosts,warned", [
    ("3:ncpus=1", ("node1", "node2", "node3"), False),
    ("2:ncpus=4+1:ncpus=8", ("node1", "node2", "node3"), False),
    ("3:ncpus=1", ("node1", "node2"), True),  # fewer hosts than chunks (a site hook changed place=)
])
def test_pbs_launch_starts_one_worker_per_chunk_host(select, hosts, warned, tmp_path):
    cluster = cluster_dir_in(tmp_path)
    calls = tmp_path / "calls"
    calls.mkdir()
    (cluster / "bin" / "ray_worker.sh").write_text(FAKE_WORKER)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("".join(f"{node}\n" for node in hosts for _ in range(2)))
    fake_bin = make_fake_bin(tmp_path, {"hostname": FAKE_HOSTNAME, "pbsdsh": FAKE_PBSDSH})
    script = render(settings(scheduler="pbs", pbs={"select": select}), str(cluster))
    env = {"AR_CLUSTER_DIR": str(cluster), "PBS_NODEFILE": str(nodefile), "CALLS": str(calls), "AR_EXPECTED_NODES": "3"}
    result = run_launch(script, tmp_path, fake_bin, env)
    assert result.returncode == 0, result.stderr
    assert sorted(read_lines(calls / "workers")) == [f"{h} {cluster}" for h in hosts[1:]]
    if warned:
        assert f"names {len(hosts)} distinct host(s) for 3 chunk(s)" in result.stderr
    else:
        assert "distinct host" not in result.stderr


def test_pbs_launch_single_node_contacts_nobody(tmp_path):
    cluster = cluster_dir_in(tmp_path)
    calls = tmp_path / "calls"
    calls.mkdir()
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("node1\n" * 8)
    fake_bin = make_fake_bin(tmp_path, {"hostname": FAKE_HOSTNAME, "ssh": FAKE_SSH, "pbsdsh": FAKE_PBSDSH})
    script = render(settings(scheduler="pbs"), str(cluster))
    env = {"AR_CLUSTER_DIR": str(cluster), "PBS_NODEFILE": str(nodefile), "CALLS": str(calls), "AR_EXPECTED_NODES": "1"}
    result = run_launch(script, tmp_path, fake_bin, env)
    assert result.returncode == 0, result.stderr
    assert list(calls.iterdir()) == []


# --------------------------------------------------------------------------- direct (no scheduler)


def test_direct_script(tmp_path):
    script = render(settings(direct_workers=2))
    assert script.startswith("#!/usr/bin/env bash\n# activate-ray cluster ar-0123abcd (none)\n")
    assert "#SBATCH" not in script and "#PBS" not in script
    assert f"export AR_CLUSTER_DIR={CLUSTER_DIR}\n" in script
    assert script.rstrip().endswith('. "$AR_CLUSTER_DIR/bin/cluster_main.sh"')
    assert_bash_syntax(script, tmp_path)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_direct_launch_starts_each_worker(workers, tmp_path):
    calls = tmp_path / "nodes"
    script = DirectScheduler(settings(direct_workers=workers)).render(CLUSTER_ID, CLUSTER_DIR)
    fake_bin = make_fake_bin(tmp_path, {})
    prelude = f'ar_run_node() {{ printf "%s %s\\n" "$1" "$2" >>{calls}; }}\n'
    result = run_launch(script, tmp_path, fake_bin, {"AR_DIRECT_WORKERS": str(workers)}, prelude)
    assert result.returncode == 0, result.stderr
    assert sorted(read_lines(calls)) == [f"worker worker{i}" for i in range(1, workers + 1)]


# --------------------------------------------------------------------------- all schedulers


@pytest.mark.parametrize("cls", [SlurmScheduler, PbsScheduler, DirectScheduler])
def test_common_body(cls, tmp_path):
    s = settings(scheduler=cls.name if cls.name != "none" else "none")
    script = cls(s).render(CLUSTER_ID, CLUSTER_DIR)
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    env_at = lines.index('. "$AR_CLUSTER_DIR/cluster.env"')
    fn_at = lines.index(f'. "$AR_CLUSTER_DIR/bin/{cls.launch_script}"')
    main_at = lines.index('. "$AR_CLUSTER_DIR/bin/cluster_main.sh"')
    assert lines.index("set -euo pipefail") < env_at < fn_at < main_at == len(lines) - 1
    assert_bash_syntax(script, tmp_path)


@pytest.mark.parametrize("cls", [SlurmScheduler, PbsScheduler, DirectScheduler])
def test_cluster_dir_is_quoted(cls, tmp_path):
    # work_dir is validated, but the export quotes anyway: a path with odd (allowed) characters stays one word
    odd = "/scratch/a+b@c%d~e/clusters/ar-0123abcd"
    script = cls(settings()).render(CLUSTER_ID, odd)
    assert_bash_syntax(script, tmp_path)
    export = next(l for l in script.splitlines() if l.startswith("export AR_CLUSTER_DIR="))
    result = subprocess.run([BASH, "-c", f'{export}; printf %s "$AR_CLUSTER_DIR"'], check=False, capture_output=True, text=True)
    assert result.stdout == odd


# --------------------------------------------------------------------------- golden job scripts

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_SETTINGS = {
    "slurm": dict(scheduler="slurm", num_cpus_per_node=8, num_gpus_per_node=1, ray_memory_gb=16,
                  slurm={"nodes": 4, "account": "proj-1", "partition": "gpu", "walltime": "02:00:00",
                         "extra_directives": "#SBATCH --constraint=a100"}),
    "pbs": dict(scheduler="pbs", num_cpus_per_node=8, pbs={"nodes": 3, "queue": "workq", "account": "proj-1"}),
    "direct": dict(direct_workers=2),
}


@pytest.mark.parametrize("name", GOLDEN_SETTINGS)
def test_job_script_is_the_reviewed_one(name):
    """A change to a generated job script shows as one diff of tests/golden/ (UPDATE_GOLDEN=1 rewrites them)."""
    s = settings(**GOLDEN_SETTINGS[name])
    script = scheduler_for(s).render(CLUSTER_ID, "/scratch/alice/activate-ray/clusters/" + CLUSTER_ID)
    golden = GOLDEN / f"job_{name}.sh"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(script)
    assert script == golden.read_text(), f"job script changed: review, then UPDATE_GOLDEN=1 pytest {__file__}"
