"""PBS (OpenPBS, PBS Pro, Torque): its options (the form's "PBS" group), the #PBS
directives and select statement, the launcher scripts/launch_workers_pbs.sh, and
qsub/qstat/qselect/qdel with their output (OpenPBS JSON and Torque text)."""

from __future__ import annotations

import json
import re
import shlex
import signal
from typing import TYPE_CHECKING

from pydantic import ConfigDict, field_validator, model_validator

from tasks.schedulers.base import JOB_SCRIPT, JobPhase, JobState, Scheduler, mem_mb
from tasks.schedulers.options import (
    MAKES_AN_ARRAY,
    NO_VALUE,
    SET_BY_US,
    VALUE,
    DirectivePolicy,
    DirectiveRefused,
    JobOptions,
    directives_field,
    name_field,
    nodes_field,
    pattern_field,
    walltime_field,
)

if TYPE_CHECKING:
    from tasks.transport import Transport

_SET, _ARRAY = SET_BY_US, MAKES_AN_ARRAY

# PBS walltime: [[HH:]MM:]SS, or plain seconds.
PBS_WALLTIME_RE = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2})$", re.ASCII)
# A PBS select statement: chunks like 2:ncpus=4:mem=8gb:ngpus=1 joined by '+'; a
# chunk without a leading count (ncpus=4:mem=8gb) is one chunk, as in PBS.
_PBS_RESOURCE = r"[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9_.\-]+"
_PBS_CHUNK = r"(\d+(:" + _PBS_RESOURCE + r")+|" + _PBS_RESOURCE + r"(:" + _PBS_RESOURCE + r")*)"
PBS_SELECT_RE = re.compile(r"^" + _PBS_CHUNK + r"(\+" + _PBS_CHUNK + r")*$", re.ASCII)


def pbs_select_chunks(select: str) -> int:
    """Chunks a select statement asks for: the sum of its chunk counts, 1 for a chunk without one.

    With `-l place=scatter` (always in the job script) every chunk is on its own
    host: this is also the number of nodes, and of Ray nodes."""
    total = 0
    for chunk in select.split("+"):
        count = chunk.split(":", 1)[0]
        total += int(count) if count.isascii() and count.isdigit() else 1
    return total


# '#PBS' options (single letters) -> what they take. -l and -W are checked further below.
PBS_ALLOWED: dict[str, str] = {
    "l": VALUE, "W": VALUE, "q": VALUE, "A": VALUE, "P": VALUE, "m": VALUE, "M": VALUE, "p": VALUE,
    "r": VALUE, "a": VALUE, "h": NO_VALUE,
}
_PBS_OUTPUT = "changes where the job writes its output (activate-ray writes it to <cluster dir>/logs/job.out)"
_PBS_INTERACTIVE = "makes an interactive job; the flow submits a batch job"
PBS_REFUSED: dict[str, str] = {
    "N": _SET + "the job is named after the cluster id",
    "o": _PBS_OUTPUT, "e": _PBS_OUTPUT, "j": _PBS_OUTPUT,
    "k": "keeps the job's output and error files in your home directory",
    "v": "passes environment variables into the job", "V": "passes your whole environment into the job",
    "S": "sets the shell that interprets the job script",
    "C": "changes the directive prefix: the lines after it would be read with another one",
    "d": "changes the job's working directory", "w": "changes the job's working directory",
    "D": "changes the job's root directory",
    "J": _ARRAY, "t": _ARRAY,
    "I": _PBS_INTERACTIVE, "X": _PBS_INTERACTIVE, "G": _PBS_INTERACTIVE,
    "u": "runs the job as another user",
    "T": "runs a prologue and epilogue of your choice",
    "F": "passes arguments to the job script",
    "c": "checkpoints the job, into a directory of your choice",
    "z": "qsub would not print the job id the flow follows",
}
# '-W name=value' attributes.
PBS_W_ALLOWED = frozenset({"depend", "group_list"})
PBS_W_REFUSED: dict[str, str] = {
    "stagein": "copies files of your choice in before the job",
    "stageout": "copies files out to places of your choice after the job",
    "umask": "changes the permissions of the files the job writes",
    "block": "qsub would wait for the job to end; the flow needs the job id at once",
    "sandbox": "changes the job's working directory (a private staging directory)",
    "interactive": _PBS_INTERACTIVE,
}
# '-l name=value' resources: sites define their own (filesystems=, gpu_type=), so any
# name is accepted except these. place= is accepted only with scatter (see _check_pbs_resource).
_PBS_WALLTIME = _SET + "use pbs.walltime (the flow plans the cluster's end on it)"
_PBS_NODES = _SET + "the select statement's chunks are the nodes, one Ray node each; use pbs.nodes or pbs.select"
_PBS_CHUNK = (_SET + "per chunk in the select statement, from num_cpus_per_node, ray_memory_gb and "
              "num_gpus_per_node; for other chunks use pbs.select")
PBS_RESOURCE_REFUSED: dict[str, str] = {
    "select": _SET + "use pbs.select for -l select=, not a directive",
    "walltime": _PBS_WALLTIME, "min_walltime": _PBS_WALLTIME, "max_walltime": _PBS_WALLTIME,
    "nodes": _PBS_NODES, "nodect": _PBS_NODES, "procs": _PBS_NODES, "tpn": _PBS_NODES,
    "ncpus": _PBS_CHUNK, "ngpus": _PBS_CHUNK, "mem": _PBS_CHUNK, "mpiprocs": _PBS_CHUNK,
    "ompthreads": _PBS_CHUNK, "host": _PBS_CHUNK, "vnode": _PBS_CHUNK,
    "prologue": "runs a script of your choice before the job", "epilogue": "runs a script of your choice after the job",
}
PBS_RESOURCE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$", re.ASCII)



def _check_pbs_resource(item: str) -> None:
    name, equals, setting = item.partition("=")
    if not equals or not setting or not PBS_RESOURCE_NAME_RE.fullmatch(name):
        raise DirectiveRefused(f"-l {item[:60]!r} is not a resource: expected -l name=value[,name=value]")
    if name == "place":
        # The job asks for place=scatter: one chunk per host, one Ray node per chunk.
        if "scatter" not in setting.split(":"):
            raise DirectiveRefused(
                f"-l place={setting} can put several chunks on one host; the cluster needs place=scatter "
                "(one Ray node per chunk), e.g. -l place=scatter:excl"
            )
    elif name in PBS_RESOURCE_REFUSED:
        raise DirectiveRefused(f"'-l {name}=' is not allowed: {PBS_RESOURCE_REFUSED[name]}")


def _check_pbs_attributes(value: str) -> None:
    # name=value[,name=value]; a comma-separated word without '=' belongs to the value before
    # it (group_list=g1@h1,g2@h2), as qsub reads it.
    items = value.split(",")
    if "=" not in items[0]:
        raise DirectiveRefused(f"-W {value[:60]!r} is not an attribute: expected -W name=value")
    for item in items:
        name, equals, setting = item.partition("=")
        if not equals:
            continue
        if name in PBS_W_REFUSED:
            raise DirectiveRefused(f"'-W {name}=' is not allowed: {PBS_W_REFUSED[name]}")
        if name not in PBS_W_ALLOWED or not setting:
            raise DirectiveRefused(
                f"'-W {name[:40]}=' is not in the allowlist of -W attributes ({', '.join(sorted(PBS_W_ALLOWED))})"
            )





def _check_pbs_option(name: str, setting: str | None) -> None:
    if name == "l":
        for item in (setting or "").split(","):
            _check_pbs_resource(item)
    elif name == "W":
        _check_pbs_attributes(setting or "")


PBS_DIRECTIVES = DirectivePolicy(
    "#PBS", PBS_ALLOWED, PBS_REFUSED, not_an_option_hint=" (#PBS options are single letters, e.g. -l)",
    check_option=_check_pbs_option,
)


class PbsOptions(JobOptions):
    """Where and how long the PBS job runs."""

    model_config = ConfigDict(title="PBS")
    group = "pbs"

    account: str = name_field("Account", "-A account (empty: your default)")
    queue: str = name_field("Queue", "-q queue (empty: the server default)")
    walltime_re = PBS_WALLTIME_RE
    walltime_is = "a PBS walltime: use HH:MM:SS, MM:SS or seconds"
    walltime: str = walltime_field("-l walltime=: HH:MM:SS, MM:SS or seconds, e.g. 01:00:00", walltime_re)
    nodes: int = nodes_field(
        "Chunks (nodes): one Ray node on each (with a select statement: its chunk count, leave this out)")
    select: str = pattern_field(
        "", "Select", "Your own -l select= statement, e.g. 2:ncpus=8:mem=32gb; its chunks are the nodes "
        "(empty: built from nodes, CPUs, memory, GPUs)", "^$|" + PBS_SELECT_RE.pattern)
    # Also refused: -l select= and a place= without scatter (one chunk per host, one Ray
    # node per chunk; see PBS_RESOURCE_REFUSED).
    directive_policy = PBS_DIRECTIVES
    extra_directives: str = directives_field(
        "More '#PBS -option value' lines, one per line: resources and placement "
        "(-l name=value, -q, -A, -P, -m, -M, -W depend=, ...); others are refused with the reason")

    @field_validator("select")
    @classmethod
    def _select(cls, value: str) -> str:
        if value and not PBS_SELECT_RE.fullmatch(value):
            raise ValueError(
                f"pbs.select {value!r} is not a select statement: expected [N:]res=value[:res=value]...[+[N:]...]"
            )
        if value:
            for chunk in value.split("+"):
                count = chunk.split(":", 1)[0]
                if count.isdigit() and int(count) == 0:
                    raise ValueError(f"pbs.select {value!r}: chunk {chunk!r} asks for 0 chunks")
            if pbs_select_chunks(value) > 10000:
                raise ValueError(f"pbs.select {value!r} asks for {pbs_select_chunks(value)} chunks: at most 10000")
        return value

    @model_validator(mode="after")
    def _nodes_from_select(self) -> PbsOptions:
        """With a select statement, its chunks are the nodes: nodes given beside it must agree."""
        if not self.select:
            return self
        chunks = pbs_select_chunks(self.select)
        if "nodes" in self.model_fields_set and self.nodes != chunks:
            raise ValueError(
                f"pbs.nodes={self.nodes} but pbs.select asks for {chunks} chunks ({self.select}): "
                "leave pbs.nodes out (the select statement sets it) or make them agree"
            )
        # Not an assignment through pydantic: nodes stays "not given" in model_fields_set.
        object.__setattr__(self, "nodes", chunks)
        return self


def pbs_seconds(walltime: str) -> int:
    """PBS walltime: [[HH:]MM:]SS (a bare number is seconds)."""
    return sum(int(value) * 60**index for index, value in enumerate(reversed(walltime.split(":"))))


# 1234, 1234.server, 1234[].server (an array: never ours, but a valid id)
PBS_JOB_ID_RE = re.compile(r"^\d+(\[\d*\])?(\.[A-Za-z0-9_.\-]+)?$")


class PbsScheduler(Scheduler):
    name = "pbs"
    launch_script = "launch_workers_pbs.sh"
    submit_program = "qsub"
    directive_prefix = "#PBS"
    job_id_re = PBS_JOB_ID_RE

    @property
    def chunks(self) -> int:
        """Chunks of the job: with place=scatter one host each, one Ray node each (= settings.nodes)."""
        pbs = self.settings.pbs
        return pbs_select_chunks(pbs.select) if pbs.select else pbs.nodes

    def select(self) -> str:
        s, pbs = self.settings, self.settings.pbs
        if pbs.select:
            return pbs.select
        # only what the user set; a chunk asks for at least one CPU (PBS's own default)
        chunk = f"{self.chunks}:ncpus={s.num_cpus_per_node or 1}"
        if mem_mb(s) is not None:
            chunk += f":mem={mem_mb(s)}mb"
        return chunk + (f":ngpus={s.num_gpus_per_node}" if s.num_gpus_per_node else "")

    def directives(self, cluster_id: str, cluster_dir: str) -> list[str]:
        pbs = self.settings.pbs
        lines = [f"-N {cluster_id}"]
        if pbs.account:
            lines.append(f"-A {pbs.account}")
        if pbs.queue:
            lines.append(f"-q {pbs.queue}")
        lines += [
            f"-l walltime={pbs.walltime}",
            f"-l select={self.select()}",
            "-l place=scatter",
            "-j oe",
            f"-o {cluster_dir}/logs/job.out",
        ]
        lines += [line.split(" ", 1)[1] for line in pbs.extra_directives.splitlines() if line]
        return lines

    def worker_directives(self, cluster_id: str, cluster_dir: str) -> list[str]:
        s, pbs, scale = self.settings, self.settings.pbs, self.settings.scale
        cpus, gpus = self.worker_sizes()
        chunk = f"1:ncpus={cpus or 1}" + (f":mem={mem_mb(s)}mb" if mem_mb(s) is not None else "")
        chunk += f":ngpus={gpus}" if gpus else ""
        queue = scale.worker_partition or pbs.queue
        return [
            f"-N {cluster_id}",
            *([f"-A {pbs.account}"] if pbs.account else []),
            *([f"-q {queue}"] if queue else []),
            f"-l walltime={scale.worker_walltime or pbs.walltime}",
            f"-l select={chunk}",
            "-j oe",
            # the scheduler's copy of the output; worker_main.sh writes each job's own log
            f"-o {cluster_dir}/logs/wjob.pbs.out",
        ]

    @property
    def walltime_seconds(self) -> int | None:
        return pbs_seconds(self.settings.pbs.walltime)

    @property
    def worker_walltime_seconds(self) -> int | None:
        return pbs_seconds(self.settings.scale.worker_walltime or self.settings.pbs.walltime)

    def walltime_option(self, seconds: int) -> list[str]:
        return ["-l", f"walltime={seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"]

    def submit_command(self, cluster_dir: str, script: str = JOB_SCRIPT, after: str = "",
                       walltime: int | None = None) -> str:
        # OpenPBS/PBS Pro's qsub leaves a background qsub of the user's running on the login
        # host (a submission cache) unless given -f; Torque's qsub wrappers refuse -f. OpenPBS
        # is told by its qstat --version ("pbs_version = 23.06.06").
        depend = [*self.waiting_for(after), *self.walltime_words(walltime)]
        plain = shlex.join([self.submit_program, *depend, script])
        foreground = shlex.join([self.submit_program, "-f", *depend, script])
        return (f"cd {shlex.quote(cluster_dir)} && if qstat --version 2>/dev/null | grep -q '^pbs_version'; "
                f"then {foreground}; else {plain}; fi")

    def dependency_option(self, job_id: str) -> list[str]:
        # OpenPBS, PBS Pro and Torque alike (Slurm's qsub wrapper turns it into --dependency)
        return ["-W", f"depend=afterany:{job_id}"]

    def find_job_command(self, job_name: str) -> str:
        # qselect is OpenPBS/Torque's; where it is missing (some wrappers), nobody can tell
        return f'command -v qselect >/dev/null || exit 3; qselect -u "$(id -un)" -N {shlex.quote(job_name)}'

    async def allocated_nodes(self, target: Transport, job_id: str) -> list[str]:
        exec_host = ""
        shown = await target.query(f"qstat -f -F json -x {shlex.quote(job_id)} 2>/dev/null")
        if shown.returncode == 0 and shown.stdout.lstrip().startswith("{"):
            try:
                exec_host = str((_json_job(shown.stdout, job_id) or {}).get("exec_host", ""))
            except ValueError:
                pass
        if not exec_host:
            shown = await target.query(f"qstat -f {shlex.quote(job_id)} 2>/dev/null")
            exec_host = qstat_text_fields(shown.stdout).get("exec_host", "")
        return exec_host_names(exec_host)

    async def state(self, target: Transport, job_id: str) -> JobState:
        quoted = shlex.quote(job_id)
        result = await target.query(f"qstat -f -F json -x {quoted} 2>/dev/null")
        if result.returncode == 0 and result.stdout.lstrip().startswith("{"):
            try:
                return parse_qstat_json(result.stdout, job_id)
            except ValueError:  # OpenPBS can print invalid JSON (unquoted all-digit values)
                pass
        result = await target.query(f"qstat -f {quoted} 2>&1")
        return parse_qstat_text(result.stdout)

    async def cancel(self, target: Transport, job_id: str, cluster_dir: str = "") -> None:
        await target.query(f"qdel {shlex.quote(job_id)}")

    def wake_command(self, job_id: str) -> str:
        # qsig signals every process of the job on its first host (the head's supervisor, and
        # the user's login shell that MoM runs the job script under: WINCH, ignored by default,
        # leaves it alone where USR2 killed it, Exit_status 268); not the sister hosts' tasks,
        # which see the stop at their next glance. Slurm's Torque wrappers have no qsig: exit
        # 127, and the nodes glance.
        return f"command -v qsig >/dev/null && qsig -s WINCH {shlex.quote(job_id)}"


# OpenPBS/Torque job_state letters.
PBS_PHASES = {
    "Q": JobPhase.pending, "H": JobPhase.pending, "W": JobPhase.pending, "T": JobPhase.pending,
    "S": JobPhase.pending, "U": JobPhase.pending, "B": JobPhase.running, "R": JobPhase.running,
    "E": JobPhase.running, "C": JobPhase.ended, "F": JobPhase.ended, "X": JobPhase.ended, "M": JobPhase.ended,
}


def _json_job(text: str, job_id: str) -> dict | None:
    """One job of `qstat -f -F json`: by its full id, else by its number (a server may
    answer with another name for itself than the one qsub printed)."""
    jobs = json.loads(text).get("Jobs", {})
    return jobs.get(job_id) or next((v for k, v in jobs.items() if k.split(".")[0] == job_id.split(".")[0]), None)


def exec_host_names(exec_host: str) -> list[str]:
    """Hosts of an exec_host value (node1/0*2+node2/0+...), each once, in order."""
    hosts = [part.split("/")[0].strip() for part in exec_host.split("+") if part.strip()]
    return list(dict.fromkeys(h for h in hosts if h))


# OpenPBS job substates that say how a job ended (src/include/job.h).
PBS_SUBSTATE_DELETED = "91"
PBS_SUBSTATE_KILLED_FOR_LIMIT = "93"
# Negative Exit_status: PBS ended the job itself (JOB_EXEC_* in src/include/job.h).
PBS_EXEC_REASONS = {
    -1: "the job could not start on its nodes (JOB_EXEC_FAIL1)",
    -2: "the job could not start on its nodes (JOB_EXEC_FAIL2)",
    -3: "the job was requeued and could not start (JOB_EXEC_RETRY)",
    -4: "the job's nodes could not be set up (JOB_EXEC_INITABT)",
    -7: "the job's nodes could not be set up (JOB_EXEC_INITRST)",
    -8: "the job's resources could not be set up (JOB_EXEC_INITRMG)",
    -9: "the job script could not be read (JOB_EXEC_BADRESRT)",
    -10: "a file could not be staged in (JOB_EXEC_FAILUID)",
    -11: "the job was requeued by its node (JOB_EXEC_RERUN)",
    -12: "the job's checkpoint failed (JOB_EXEC_CHKP)",
    -13: "the job's node was lost (JOB_EXEC_FAIL_PASSWORD)",
    -15: "a node of the job failed (JOB_EXEC_HOOKERROR)",
    -20: "a node of the job could not be reached (JOB_EXEC_JOINJOB)",
    -23: "a MoM hook rejected the job (JOB_EXEC_HOOK_REJECT)",
    -25: "the job exceeded its cpu time limit (JOB_EXEC_KILL_NCPUS_SUM)",
    -26: "the job exceeded its cpu count (JOB_EXEC_KILL_NCPUS_BURST)",
    -27: "the job exceeded its memory limit (JOB_EXEC_KILL_MEM)",
    -28: "the job exceeded its virtual memory limit (JOB_EXEC_KILL_VMEM)",
    -29: "walltime exceeded: PBS killed the job (JOB_EXEC_KILL_WALLTIME)",
    -30: "the job exceeded its cput limit (JOB_EXEC_KILL_CPUT)",
}


def describe_pbs_end(exit_status: str | int | None, substate: str | int | None = None, comment: str = "") -> str:
    """How a PBS job ended, in words, from its Exit_status, substate and comment: its own
    exit code (>= 0), killed by a signal (256 + N), or a reason of PBS's own (negative).
    A deletion (qdel) is told by substate 91 / "terminated by USER@HOST" (its Exit_status
    is usually 271, sometimes 143 when the job's shell exited 128+15 itself)."""
    substate = str(substate) if substate is not None else ""
    deleted = substate == PBS_SUBSTATE_DELETED or "terminated by" in comment
    try:
        code = int(exit_status) if exit_status is not None else None
    except (TypeError, ValueError):
        code = None
    if code is None:
        return "deleted (qdel)" if deleted else "ended (no exit status)"
    if code < 0:
        reason = PBS_EXEC_REASONS.get(code, "PBS ended the job")
        if substate == PBS_SUBSTATE_KILLED_FOR_LIMIT and code != -29:
            reason += ", a resource limit was exceeded"
        return f"{reason}, Exit_status {code}"
    if deleted:
        return f"deleted (qdel), Exit_status {code}"
    if code >= 256:
        return f"killed by signal {code - 256}, Exit_status {code}"
    if 128 < code < 128 + 65:
        # the MoM's shell says a job script killed by a signal as 128 + N (SIGKILL: 137)
        return f"exit code {code} (128 + {_signal_name(code - 128)}: the job script was killed)"
    return f"exit code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def parse_qstat_json(text: str, job_id: str) -> JobState:
    job = _json_job(text, job_id)
    if job is None:
        return JobState(JobPhase.ended, "unknown job")
    letter = job.get("job_state", "?")
    return _pbs_job_state(letter, job.get("comment", ""), job.get("Exit_status"), job.get("substate"))


def _pbs_job_state(letter: str, comment: str, exit_status, substate) -> JobState:
    phase = PBS_PHASES.get(letter, JobPhase.ended)
    detail = f"job_state = {letter}"
    if comment:
        detail += f", {comment}"
    if exit_status is not None and phase is JobPhase.ended:
        detail += f": {describe_pbs_end(exit_status, substate, comment)}"
    elif exit_status is not None:
        detail += f", exit {exit_status}"
    # "Can Never Run": the scheduler will never start it as asked (OpenPBS's sched comment)
    hopeless = phase is JobPhase.pending and "can never run" in comment.lower()
    return JobState(phase, detail, hopeless=hopeless)


_QSTAT_ATTRIBUTE_RE = re.compile(r"^\s+[A-Za-z_][A-Za-z0-9_.]* = ")


def qstat_text_fields(text: str) -> dict[str, str]:
    """`qstat -f` text as name -> value. OpenPBS wraps long values (exec_host, exec_vnode,
    comment once a job has many nodes): a continuation line starts with a tab and goes on
    the value before it."""
    fields: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        # (Slurm's Torque wrappers indent every attribute with a tab: that is not a continuation)
        if line.startswith("\t") and last is not None and not _QSTAT_ATTRIBUTE_RE.match(line):
            fields[last] += line[1:].rstrip("\n")
            continue
        name, equals, value = line.strip().partition(" = ")
        if equals and name:
            fields[name] = value.strip() if not value.endswith(" ") else value.lstrip()
            last = name
        else:
            last = None
    return fields


def parse_qstat_text(text: str) -> JobState:
    fields = qstat_text_fields(text)
    letter = fields.get("job_state", "")[:1]
    if not letter:
        # "Unknown Job Id" (Torque, OpenPBS without -x) once the job is gone.
        return JobState(JobPhase.ended, "unknown job")
    return _pbs_job_state(letter, fields.get("comment", "").strip(), fields.get("Exit_status"), fields.get("substate"))
