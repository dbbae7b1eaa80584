"""Scheduler output parsing against fixtures in the documented formats (no scheduler needed).

OpenPBS `qstat -f -F json -x`, OpenPBS/Torque `qstat -f` text, their
"Unknown Job Id" errors, Slurm `squeue -o '%T|%r'` lines and `scontrol show job`
text; PBS job ids; and the schedulers' state() over a fake transport that
answers with those fixtures.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tasks.schedulers import (
    PBS_JOB_ID_RE,
    JobPhase,
    PbsScheduler,
    SchedulerRejected,
    SlurmScheduler,
    parse_qstat_json,
    parse_qstat_text,
    parse_scontrol,
    parse_squeue,
)
from tasks.settings import RayClusterSettings
from tasks.transport import CommandResult

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --------------------------------------------------------------------------- OpenPBS JSON


@pytest.mark.parametrize(
    "name,job_id,phase,detail",
    [
        ("pbs/qstat_json_running.json", "123.pbs-server", JobPhase.running, "job_state = R, Job run at"),
        ("pbs/qstat_json_queued.json", "124.pbs-server", JobPhase.pending,
         "job_state = Q, Not Running: Insufficient amount of resource"),
        ("pbs/qstat_json_finished.json", "123.pbs-server", JobPhase.ended, "job_state = F, Job run at"),
        ("pbs/qstat_json_array.json", "125[].pbs-server", JobPhase.running, "job_state = B"),
    ],
)
def test_qstat_json(name, job_id, phase, detail):
    state = parse_qstat_json(fixture(name), job_id)
    assert state.phase is phase
    assert state.detail.startswith(detail)


def test_qstat_json_fixtures_are_the_documented_shape():
    for name in ("running", "queued", "finished", "array"):
        data = json.loads(fixture(f"pbs/qstat_json_{name}.json"))
        assert {"timestamp", "pbs_version", "pbs_server", "Jobs"} <= set(data)
        (job,) = data["Jobs"].values()
        assert "job_state" in job


def test_qstat_json_finished_shows_exit_status():
    state = parse_qstat_json(fixture("pbs/qstat_json_finished.json"), "123.pbs-server")
    assert state.detail.endswith(", exit 271")
    assert str(state).startswith("ended (job_state = F")


@pytest.mark.parametrize("job_id", ["123", "123.pbs-server", "123.other-name"])
def test_qstat_json_matches_by_number(job_id):
    # qsub may print a shorter or longer server name than qstat's key
    assert parse_qstat_json(fixture("pbs/qstat_json_running.json"), job_id).phase is JobPhase.running


def test_qstat_json_array_by_number():
    assert parse_qstat_json(fixture("pbs/qstat_json_array.json"), "125[]").phase is JobPhase.running


@pytest.mark.parametrize("job_id", ["999.pbs-server", "12.pbs-server", "1234"])
def test_qstat_json_other_job_is_unknown(job_id):
    state = parse_qstat_json(fixture("pbs/qstat_json_running.json"), job_id)
    assert (state.phase, state.detail) == (JobPhase.ended, "unknown job")


def test_qstat_json_without_jobs_key():
    state = parse_qstat_json(fixture("pbs/qstat_json_empty.json"), "123.pbs-server")
    assert (state.phase, state.detail) == (JobPhase.ended, "unknown job")


@pytest.mark.parametrize(
    "letter,phase",
    [("Q", JobPhase.pending), ("H", JobPhase.pending), ("W", JobPhase.pending), ("R", JobPhase.running),
     ("E", JobPhase.running), ("B", JobPhase.running), ("F", JobPhase.ended), ("C", JobPhase.ended),
     ("X", JobPhase.ended), ("Z", JobPhase.ended), ("?", JobPhase.ended), ("", JobPhase.ended)],
)
def test_qstat_json_state_letters(letter, phase):
    data = json.loads(fixture("pbs/qstat_json_running.json"))
    data["Jobs"]["123.pbs-server"]["job_state"] = letter
    assert parse_qstat_json(json.dumps(data), "123.pbs-server").phase is phase


def test_qstat_json_missing_state_is_ended():
    data = json.loads(fixture("pbs/qstat_json_running.json"))
    del data["Jobs"]["123.pbs-server"]["job_state"]
    assert parse_qstat_json(json.dumps(data), "123.pbs-server").phase is JobPhase.ended


# --------------------------------------------------------------------------- qstat -f text


@pytest.mark.parametrize(
    "name,phase,detail",
    [
        ("pbs/qstat_f_torque_running.txt", JobPhase.running, "job_state = R"),
        ("pbs/qstat_f_torque_completed.txt", JobPhase.ended, "job_state = C"),
        ("pbs/qstat_f_openpbs_queued.txt", JobPhase.pending,
         "job_state = Q, Not Running: Insufficient amount of resource: ncpus (R: 32 A: 12 T"),
        ("pbs/qstat_unknown_job.txt", JobPhase.ended, "unknown job"),
        ("pbs/qstat_job_finished_no_history.txt", JobPhase.ended, "unknown job"),
        ("pbs/qstat_torque_invalid_option.txt", JobPhase.ended, "unknown job"),
    ],
)
def test_qstat_text(name, phase, detail):
    state = parse_qstat_text(fixture(name))
    assert state.phase is phase
    assert state.detail == detail


@pytest.mark.parametrize(
    "letter,phase",
    [("Q", JobPhase.pending), ("R", JobPhase.running), ("E", JobPhase.running), ("F", JobPhase.ended),
     ("C", JobPhase.ended), ("Z", JobPhase.ended)],
)
def test_qstat_text_state_letters(letter, phase):
    text = f"Job Id: 42\n    Job_Name = x\n    job_state = {letter}\n    queue = batch\n"
    assert parse_qstat_text(text).phase is phase


def test_qstat_text_ignores_lookalike_names():
    # only the job_state attribute counts, not other attributes that end with it
    text = "Job Id: 42\n    Job_Name = job_state\n    Variable_List = X_job_state = R\n    job_state = Q\n"
    assert parse_qstat_text(text).phase is JobPhase.pending


# --------------------------------------------------------------------------- job ids


@pytest.mark.parametrize("job_id", ["123.pbs-server", "123", "123[].server", "123[7].server",
                                    "4567.pbs.example.org", "42.torque_server-1"])
def test_pbs_job_id_accepted(job_id):
    assert PBS_JOB_ID_RE.match(job_id)


@pytest.mark.parametrize("job_id", ["123; rm -rf", "123; rm -rf ~", "", "abc", "123 456", "$(id)", "-1",
                                    "123.server;id", "123.ser ver", "123.`id`", ".server", "123[x].server"])
def test_pbs_job_id_rejected(job_id):
    assert not PBS_JOB_ID_RE.match(job_id)


# --------------------------------------------------------------------------- Slurm


@pytest.mark.parametrize(
    "line,phase,detail",
    [
        ("PENDING|Resources", JobPhase.pending, "PENDING, Resources"),
        ("PENDING|Priority", JobPhase.pending, "PENDING, Priority"),
        ("RUNNING|None", JobPhase.running, "RUNNING"),
        ("COMPLETING|None", JobPhase.running, "COMPLETING"),
        ("CONFIGURING|None", JobPhase.pending, "CONFIGURING"),
        ("SUSPENDED|None", JobPhase.pending, "SUSPENDED"),
        ("COMPLETED|None", JobPhase.ended, "COMPLETED"),
        ("CANCELLED|None", JobPhase.ended, "CANCELLED"),
        ("FAILED|NonZeroExitCode", JobPhase.ended, "FAILED, NonZeroExitCode"),
        ("TIMEOUT|TimeLimit", JobPhase.ended, "TIMEOUT, TimeLimit"),
        ("OUT_OF_MEMORY|None", JobPhase.ended, "OUT_OF_MEMORY"),
        ("RUNNING", JobPhase.running, "RUNNING"),
    ],
)
def test_squeue_line(line, phase, detail):
    state = parse_squeue(line)
    assert (state.phase, state.detail) == (phase, detail)


@pytest.mark.parametrize(
    "text,phase,detail",
    [
        ("JobState=PENDING Reason=Priority", JobPhase.pending, "PENDING, Priority"),
        ("JobState=RUNNING Reason=None", JobPhase.running, "RUNNING"),
        ("JobState=COMPLETED", JobPhase.ended, "COMPLETED"),
        ("JobState=CANCELLED", JobPhase.ended, "CANCELLED"),
        ("JobState=COMPLETING Reason=None", JobPhase.running, "COMPLETING"),  # as squeue: not gone yet
        ("JobState=PENDING Reason=(null)", JobPhase.pending, "PENDING"),
        ("", JobPhase.ended, "UNKNOWN"),
    ],
)
def test_scontrol_text(text, phase, detail):
    state = parse_scontrol(text)
    assert (state.phase, state.detail) == (phase, detail)


@pytest.mark.parametrize(
    "name,phase,detail",
    [
        ("slurm/scontrol_pending.txt", JobPhase.pending, "PENDING, Priority"),
        ("slurm/scontrol_running.txt", JobPhase.running, "RUNNING"),
        ("slurm/scontrol_completed.txt", JobPhase.ended, "COMPLETED"),
        ("slurm/scontrol_cancelled.txt", JobPhase.ended, "CANCELLED"),
        ("slurm/scontrol_invalid_job.txt", JobPhase.ended, "UNKNOWN"),
    ],
)
def test_scontrol_full_output(name, phase, detail):
    state = parse_scontrol(fixture(name))
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


# --------------------------------------------------------------------------- state() over a fake transport


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


@pytest.mark.parametrize(
    "name,job_id,phase",
    [("pbs/qstat_json_running.json", "123.pbs-server", JobPhase.running),
     ("pbs/qstat_json_queued.json", "124.pbs-server", JobPhase.pending),
     ("pbs/qstat_json_finished.json", "123.pbs-server", JobPhase.ended)],
)
def test_pbs_state_json(name, job_id, phase):
    target = FakeTransport([("qstat -f -F json -x ", ok(fixture(name)))])
    assert asyncio.run(pbs().state(target, job_id)).phase is phase
    assert target.commands == [f"qstat -f -F json -x {job_id} 2>/dev/null"]


def test_pbs_state_falls_back_to_text_on_torque():
    target = FakeTransport([
        ("qstat -f -F json", failed(2, fixture("pbs/qstat_torque_invalid_option.txt"))),
        ("qstat -f 42", ok(fixture("pbs/qstat_f_torque_running.txt"))),
    ])
    assert asyncio.run(pbs().state(target, "42")).phase is JobPhase.running
    assert len(target.commands) == 2


def test_pbs_state_unknown_job_is_ended():
    target = FakeTransport([
        ("qstat -f -F json", failed(153)),
        ("qstat -f ", failed(153, fixture("pbs/qstat_unknown_job.txt"))),
    ])
    state = asyncio.run(pbs().state(target, "42.server"))
    assert (state.phase, state.detail) == (JobPhase.ended, "unknown job")


def test_pbs_state_quotes_job_id():
    target = FakeTransport([("qstat", failed(1)), ])
    asyncio.run(pbs().state(target, "42; touch CANARY"))
    assert all("'42; touch CANARY'" in c for c in target.commands)


def test_pbs_state_survives_invalid_openpbs_json():
    target = FakeTransport([
        ("qstat -f -F json", ok(fixture("pbs/qstat_json_numeric_env.json"))),
        ("qstat -f 126", ok("Job Id: 126.pbs-server\n    job_state = R\n")),
    ])
    assert asyncio.run(pbs().state(target, "126.pbs-server")).phase is JobPhase.running


@pytest.mark.parametrize(
    "stdout,rc",
    [("qsub: Unknown queue\n", 170), ("123.pbs-server; rm -rf ~\n", 0), ("", 0), ("Job submitted\n", 0)],
)
def test_pbs_submit_rejects_odd_answers(stdout, rc):
    target = FakeTransport([("cd /home/alice/c && qsub ", CommandResult(rc, stdout, ""))])
    with pytest.raises(SchedulerRejected):
        asyncio.run(pbs().submit(target, "/home/alice/c"))


@pytest.mark.parametrize("stdout", ["123.pbs-server\n", "123\n", "123[].pbs-server\n"])
def test_pbs_submit_returns_job_id(stdout):
    target = FakeTransport([("cd /home/alice/c && qsub ", ok(stdout))])
    assert asyncio.run(pbs().submit(target, "/home/alice/c")) == stdout.strip()
    assert target.commands == ["cd /home/alice/c && qsub bin/job.sh"]


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


class ScriptedTransport(FakeTransport):
    """Like FakeTransport, but each answer is used once, in order, per prefix."""

    async def run(self, command: str, *, check: bool = True, timeout: float | None = 120) -> CommandResult:
        self.commands.append(command)
        for index, (prefix, result) in enumerate(self.answers):
            if command.startswith(prefix):
                del self.answers[index]
                return result
        raise AssertionError(f"unexpected command {command!r}")


@pytest.fixture
def no_backoff(monkeypatch):
    from tasks.schedulers import Scheduler

    monkeypatch.setattr(Scheduler, "submit_backoff", 0.0)


TIMED_OUT = CommandResult(1, "", "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation\n")


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


def test_pbs_submit_not_retried_where_qselect_cannot_tell(no_backoff):
    target = ScriptedTransport([("cd /home/alice/c && qsub ", failed(1, "qsub: cannot connect to server pbs1\n")),
                                ("command -v qselect", failed(3))])
    with pytest.raises(SchedulerRejected, match="not submitting again"):
        asyncio.run(pbs().submit(target, "/home/alice/c"))


def test_slurm_excluded_nodes_become_a_directive():
    scheduler = slurm()
    scheduler.exclude_nodes = ["node2", "node5"]
    assert "#SBATCH --exclude=node2,node5" in scheduler.render("ar-x", "/home/alice/c")
