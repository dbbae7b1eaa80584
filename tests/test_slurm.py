"""SLURM (tasks/schedulers/slurm.py), no Slurm needed: the #SBATCH directives for every input
and every allowed extra directive, the launcher run for real with a fake srun, squeue/scontrol
output parsing against fixtures, state(), submission and its idempotent retries over a
scripted transport. The real Slurm runs in the bed tests (test_batch_e2e, test_retries)."""

from __future__ import annotations

import asyncio
import re

import pytest

from tasks.schedulers import (
    JobPhase,
    SchedulerRejected,
    SlurmScheduler,
    parse_scontrol,
    parse_squeue,
)
from tasks.schedulers.slurm import SLURM_ALLOWED, SLURM_SHORT
from tasks.transport import CommandResult
from tests.scheduler_helpers import (
    CLUSTER_DIR,
    CLUSTER_ID,
    TIMED_OUT,
    FakeTransport,
    ScriptedTransport,
    assert_bash_syntax,
    assert_extra_directives_follow_ours,
    assert_well_formed_job_script,
    cluster_dir_in,
    directive_lines,
    failed,
    fixture,
    launch_function,
    make_fake_bin,
    mem_mb,
    ok,
    render,
    run_launch,
    settings,
    slurm,
)


def test_slurm_defaults(tmp_path):
    script = render(settings(scheduler="slurm"))
    assert directive_lines(script, "#SBATCH") == [
        f"--job-name={CLUSTER_ID}",
        "--nodes=1",
        "--ntasks-per-node=1",
        # no CPUs, memory or GPUs asked for unless set: the node takes what the allocation gives
        "--time=01:00:00",
        f"--output={CLUSTER_DIR}/logs/job-%j.out",
        "--signal=B:USR1@300",
    ]
    assert_well_formed_job_script(script, "#SBATCH", tmp_path)
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
    assert "--signal=B:USR1@300" in lines
    assert "--account=proj42" in lines
    assert "--partition=gpu" in lines
    assert "--qos=high" in lines
    # each extra directive is its own line, in order, after ours (so it can override)
    assert lines[-3:] == ["--constraint=a100", "--exclusive", "--mail-type=END,FAIL"]
    assert len(lines) == len(set(lines)) == 15
    assert_well_formed_job_script(script, "#SBATCH", tmp_path)


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
    assert len(re.findall(r"^\s*srun\s", body, re.MULTILINE)) == 1
    assert "srun" not in script  # the job script sources its launcher
    launch = body[:body.index("srun --nodes")]  # (a loop after it only reports a failed launch)
    assert not re.search(r"^\s*(for|while|until)\b", launch, re.MULTILINE), "workers must start in one step, not a loop"
    assert '--ntasks-per-node=1' in body and '--exclude="$SLURMD_NODENAME"' in body
    assert_bash_syntax(script, tmp_path)


def test_a_failed_srun_says_so_in_the_status_with_its_own_words(tmp_path):
    """srun refuses before any worker began: the status names srun, each node and srun's words,
    so the flow fails at once instead of at the readiness timeout, and does not retry."""
    cluster = cluster_dir_in(tmp_path)
    fake_bin = make_fake_bin(tmp_path, {
        "srun": 'echo "srun: error: Unable to create step for job 42: Requested node configuration is not available" >&2; exit 1',
        "scontrol": 'printf "node1\\nnode2\\nnode3\\n"'})
    script = render(settings(scheduler="slurm", slurm={"nodes": 3}), str(cluster))
    env = {"AR_CLUSTER_DIR": str(cluster), "AR_NUM_CPUS": "4", "SLURM_JOB_NUM_NODES": "3", "SLURMD_NODENAME": "node1",
           "SLURM_JOB_NODELIST": "node[1-3]"}
    result = run_launch(script, tmp_path, fake_bin, env)
    assert result.returncode == 0, result.stderr
    status = (cluster / "status").read_text().splitlines()
    assert [line.split(" before the worker on ")[1].split()[0] for line in status] == ["node2", "node3"], status
    assert all(line.startswith("RAY_FAILED=launcher: srun exited 1") and "Unable to create step" in line
               for line in status), status


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
    assert SlurmScheduler(settings(scheduler="slurm", slurm={"walltime": walltime}, walltime_margin=60)).walltime_seconds == seconds


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
    assert_extra_directives_follow_ours("slurm", "#SBATCH", SLURM_SAMPLE, tmp_path, nodes=2)


# What Slurm prints of a job, read by each parser: {phase: {what it prints: detail}}.
SQUEUE_LINES = {  # squeue -o '%T|%r'
    JobPhase.pending: {
        "PENDING|Resources": "PENDING, Resources",
        "PENDING|Priority": "PENDING, Priority",
        "CONFIGURING|None": "CONFIGURING",
        "SUSPENDED|None": "SUSPENDED",
    },
    JobPhase.running: {
        "RUNNING|None": "RUNNING",
        "COMPLETING|None": "COMPLETING",
        "RUNNING": "RUNNING",
    },
    JobPhase.ended: {
        "COMPLETED|None": "COMPLETED",
        "CANCELLED|None": "CANCELLED",
        "FAILED|NonZeroExitCode": "FAILED, NonZeroExitCode",
        "TIMEOUT|TimeLimit": "TIMEOUT, TimeLimit",
        "OUT_OF_MEMORY|None": "OUT_OF_MEMORY",
    },
}
SCONTROL_TEXTS = {  # scontrol show job, the fields that count
    JobPhase.pending: {
        "JobState=PENDING Reason=Priority": "PENDING, Priority",
        "JobState=PENDING Reason=(null)": "PENDING",
    },
    JobPhase.running: {
        "JobState=RUNNING Reason=None": "RUNNING",
        "JobState=COMPLETING Reason=None": "COMPLETING",  # as squeue: not gone yet
    },
    JobPhase.ended: {
        "JobState=COMPLETED": "COMPLETED",
        "JobState=CANCELLED": "CANCELLED",
        "": "UNKNOWN",
    },
}
SCONTROL_FILES = {  # scontrol show job, whole, in tests/fixtures
    JobPhase.pending: {"slurm/scontrol_pending.txt": "PENDING, Priority"},
    JobPhase.running: {"slurm/scontrol_running.txt": "RUNNING"},
    JobPhase.ended: {
        "slurm/scontrol_completed.txt": "COMPLETED",
        "slurm/scontrol_cancelled.txt": "CANCELLED",
        "slurm/scontrol_invalid_job.txt": "UNKNOWN",
    },
}
PARSERS = {"squeue": (parse_squeue, SQUEUE_LINES), "scontrol": (parse_scontrol, SCONTROL_TEXTS),
           "scontrol-file": (lambda name: parse_scontrol(fixture(name)), SCONTROL_FILES)}


@pytest.mark.parametrize("reader,given,phase,detail",
                         [(reader, given, phase, detail) for reader, (_, by_phase) in PARSERS.items()
                          for phase, details in by_phase.items() for given, detail in details.items()],
                         ids=lambda value: value if isinstance(value, str) else None)
def test_job_state_read(reader, given, phase, detail):
    state = PARSERS[reader][0](given)
    assert (state.phase, state.detail) == (phase, detail)


# Slurm's job_reason_codes page: Partition*/Invalid*/*Max*PerJob* mean the request itself can never be
# met; Resources, Priority, BeginTime, Dependency ... clear by waiting.
@pytest.mark.parametrize(
    "reason",
    ["PartitionNodeLimit", "PartitionTimeLimit", "PartitionConfig", "BadConstraints", "InvalidAccount", "InvalidQOS",
     "QOSMaxNodePerJobLimit", "AssocMaxCpuPerJobLimit", "QOSMaxWallDurationPerJobLimit", "DependencyNeverSatisfied"],
)
def test_squeue_hopeless_reasons(reason):
    state = parse_squeue(f"PENDING|{reason}")
    assert state.phase is JobPhase.pending and state.hopeless
    assert state.detail == f"PENDING, {reason}"


@pytest.mark.parametrize("reason", ["Resources", "Priority", "BeginTime", "Dependency", "None", "(null)", "",
                                    "JobHeldUser", "ReqNodeNotAvail"])
def test_squeue_waitable_reasons(reason):
    assert not parse_squeue(f"PENDING|{reason}").hopeless


def test_hopeless_only_when_pending():
    assert not parse_squeue("FAILED|PartitionNodeLimit").hopeless
    assert not parse_squeue("RUNNING|InvalidAccount").hopeless
    assert parse_scontrol("JobState=PENDING Reason=PartitionNodeLimit Dependency=(null)").hopeless


@pytest.mark.parametrize("reason", ["AssocGrpCpuLimit", "AssocGrpNodeLimit", "AssocGrpJobsLimit"])
def test_squeue_group_limits_are_waitable(reason):
    assert not parse_squeue(f"PENDING|{reason}").hopeless


def test_slurm_state_squeue_first():
    target = FakeTransport([("squeue ", ok("PENDING|Resources\n"))])
    state = asyncio.run(slurm().state(target, "4242"))
    assert (state.phase, state.detail) == (JobPhase.pending, "PENDING, Resources")
    assert target.commands == ["squeue -h -j 4242 -o '%T|%r' 2>/dev/null"]


@pytest.mark.parametrize(
    "name,phase", [("slurm/scontrol_completed.txt", JobPhase.ended), ("slurm/scontrol_cancelled.txt", JobPhase.ended)]
)
def test_slurm_state_falls_back_to_scontrol(name, phase):
    target = FakeTransport([("squeue ", ok("")), ("scontrol show job 4242", ok(fixture(name)))])
    assert asyncio.run(slurm().state(target, "4242")).phase is phase


def test_slurm_state_gone_everywhere():
    """No accounting (sacct fails, as on the bed): a vanished job has ended, never 'running'."""
    target = FakeTransport([("squeue ", failed(1)), ("scontrol ", failed(1, fixture("slurm/scontrol_invalid_job.txt"))),
                            ("sacct ", failed(1, "sacct: error: Slurm accounting storage is disabled\n"))])
    state = asyncio.run(slurm().state(target, "4242"))
    assert (state.phase, state.detail) == (JobPhase.ended, "not in queue")


def test_slurm_state_from_accounting_once_the_job_left_the_controller():
    target = FakeTransport([("squeue ", failed(1)), ("scontrol ", failed(1, fixture("slurm/scontrol_invalid_job.txt"))),
                            ("sacct ", ok("CANCELLED by 0|None\n"))])
    state = asyncio.run(slurm().state(target, "4242"))
    assert (state.phase, state.detail) == (JobPhase.ended, "CANCELLED")


@pytest.mark.parametrize("stdout,job_id", [("4242\n", "4242"), ("4242;cluster-a\n", "4242")])
def test_slurm_submit_parsable(stdout, job_id):
    target = FakeTransport([("cd /home/alice/c && sbatch ", ok(stdout))])
    assert asyncio.run(slurm().submit(target, "/home/alice/c")) == job_id
    assert target.commands == ["cd /home/alice/c && sbatch --parsable bin/job.sh"]


def test_slurm_submit_refused():
    target = FakeTransport([("cd /home/alice/c && sbatch ", CommandResult(1, "", "sbatch: error: invalid partition specified: gpu\n"))])
    with pytest.raises(SchedulerRejected, match="invalid partition"):
        asyncio.run(slurm().submit(target, "/home/alice/c"))


def test_slurm_submit_that_timed_out_but_was_taken_is_not_submitted_again(no_backoff):
    target = ScriptedTransport([("cd /home/alice/c && sbatch ", TIMED_OUT), ("squeue -h ", ok("4242\n"))])
    assert asyncio.run(slurm().submit(target, "/home/alice/c")) == "4242"
    assert [c for c in target.commands if "sbatch" in c] == ["cd /home/alice/c && sbatch --parsable bin/job.sh"]
    assert target.commands[1] == "squeue -h -u \"$(id -un)\" --name=c -o %i"


def test_slurm_submit_retried_when_the_job_was_not_taken(no_backoff):
    target = ScriptedTransport([("cd /home/alice/c && sbatch ", TIMED_OUT), ("squeue -h ", ok("")),
                                ("cd /home/alice/c && sbatch ", ok("4243\n"))])
    assert asyncio.run(slurm().submit(target, "/home/alice/c")) == "4243"


def test_slurm_submit_gives_up_after_its_attempts(no_backoff):
    target = ScriptedTransport([("cd /home/alice/c && sbatch ", TIMED_OUT), ("squeue -h ", ok(""))] * 3
                               + [("cd /home/alice/c && sbatch ", TIMED_OUT)])
    with pytest.raises(SchedulerRejected, match="Socket timed out"):
        asyncio.run(slurm().submit(target, "/home/alice/c"))
    assert len([c for c in target.commands if "sbatch" in c]) == 4


def test_slurm_excluded_nodes_become_a_directive():
    scheduler = slurm()
    scheduler.exclude_nodes = ["node2", "node5"]
    assert "#SBATCH --exclude=node2,node5" in scheduler.render("ar-x", "/home/alice/c")


@pytest.mark.parametrize(("seconds", "words"), [(125, ["--time=0-00:02:05"]), (90061, ["--time=1-01:01:01"])])
def test_a_walltime_given_on_the_command_line_is_days_hours_minutes_seconds(seconds, words):
    from tasks.schedulers.slurm import SlurmScheduler
    from tasks.settings import RayClusterSettings

    scheduler = SlurmScheduler(RayClusterSettings(scheduler="slurm"))
    assert scheduler.walltime_option(seconds) == words
    command = scheduler.submit_command("/w/clusters/ar-x", "bin/worker_job.sh", walltime=seconds)
    assert command.endswith(f"{words[0]} bin/worker_job.sh"), command  # after the script's #SBATCH --time: it wins
    assert "--time" not in scheduler.submit_command("/w/clusters/ar-x", "bin/worker_job.sh")
