"""PBS (OpenPBS, PBS Pro, Torque): its options (the form's "PBS" group), the #PBS
directives and select statement, the launcher scripts/launch_workers_pbs.sh, and
qsub/qstat/qselect/qdel with their output (OpenPBS JSON and Torque text)."""

from __future__ import annotations

import json
import re
import shlex
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.schedulers.base import JobPhase, JobState, Scheduler, mem_mb
from tasks.schedulers.options import (
    MAKES_AN_ARRAY,
    NO_VALUE,
    SET_BY_US,
    VALUE,
    DirectivePolicy,
    DirectiveRefused,
    check_directives,
    check_name,
    name_field,
    positioned,
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


@positioned
class PbsOptions(BaseModel):
    """Where and how long the PBS job runs."""

    model_config = ConfigDict(extra="forbid", title="PBS")

    account: str = name_field("Account", "-A account (empty: your default)")
    queue: str = name_field("Queue", "-q queue (empty: the server default)")
    walltime: str = Field(
        "01:00:00",
        title="Walltime",
        description="-l walltime=: HH:MM:SS, MM:SS or seconds, e.g. 01:00:00",
        json_schema_extra={"pattern": PBS_WALLTIME_RE.pattern},
    )
    nodes: int = Field(
        1, ge=1, le=10000, title="Nodes",
        description="Chunks (nodes): one Ray node on each (with a select statement: its chunk count, leave this out)",
    )
    select: str = Field(
        "",
        title="Select",
        description="Your own -l select= statement, e.g. 2:ncpus=8:mem=32gb; its chunks are the nodes "
        "(empty: built from nodes, CPUs, memory, GPUs)",
        json_schema_extra={"pattern": "^$|" + PBS_SELECT_RE.pattern},
    )
    extra_directives: str = Field(
        "", title="Extra directives", description="More '#PBS -option value' lines, one per line: resources and placement "
        "(-l name=value, -q, -A, -P, -m, -M, -W depend=, ...); others are refused with the reason"
    )

    @field_validator("account", "queue")
    @classmethod
    def _names(cls, value: str, info) -> str:
        return check_name(value, f"pbs.{info.field_name}")

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str) -> str:
        if not PBS_WALLTIME_RE.fullmatch(value):
            raise ValueError(f"pbs.walltime {value!r} is not a PBS walltime: use HH:MM:SS, MM:SS or seconds")
        return value

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

    @field_validator("extra_directives")
    @classmethod
    def _directives(cls, value: str) -> str:
        # Also: -l select= and a place= without scatter are refused (one chunk per host,
        # one Ray node per chunk; see PBS_RESOURCE_REFUSED).
        return check_directives(value, PBS_DIRECTIVES)

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

    def find_job_command(self, job_name: str) -> str:
        # qselect is OpenPBS/Torque's; where it is missing (some wrappers), nobody can tell
        return f'command -v qselect >/dev/null || exit 3; qselect -u "$(id -un)" -N {shlex.quote(job_name)}'

    async def allocated_nodes(self, target: Transport, job_id: str) -> list[str]:
        shown = await target.query(f"qstat -f {shlex.quote(job_id)} 2>/dev/null")
        match = re.search(r"^\s*exec_host\s*=\s*(\S+)", shown.stdout, re.M)
        hosts = [part.split("/")[0] for part in match.group(1).split("+")] if match else []
        return list(dict.fromkeys(hosts))

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


# OpenPBS/Torque job_state letters.
PBS_PHASES = {
    "Q": JobPhase.pending, "H": JobPhase.pending, "W": JobPhase.pending, "T": JobPhase.pending,
    "S": JobPhase.pending, "U": JobPhase.pending, "B": JobPhase.running, "R": JobPhase.running,
    "E": JobPhase.running, "C": JobPhase.ended, "F": JobPhase.ended, "X": JobPhase.ended, "M": JobPhase.ended,
}


def parse_qstat_json(text: str, job_id: str) -> JobState:
    jobs = json.loads(text).get("Jobs", {})
    job = jobs.get(job_id) or next((v for k, v in jobs.items() if k.split(".")[0] == job_id.split(".")[0]), None)
    if job is None:
        return JobState(JobPhase.ended, "unknown job")
    letter = job.get("job_state", "?")
    phase = PBS_PHASES.get(letter, JobPhase.ended)
    detail = f"job_state = {letter}"
    if "comment" in job:
        detail += f", {job['comment']}"
    if "Exit_status" in job:
        detail += f", exit {job['Exit_status']}"
    return JobState(phase, detail)


def parse_qstat_text(text: str) -> JobState:
    match = re.search(r"^\s*job_state\s*=\s*(\w)", text, re.M)
    if not match:
        # "Unknown Job Id" (Torque, OpenPBS without -x) once the job is gone.
        return JobState(JobPhase.ended, "unknown job")
    letter = match.group(1)
    detail = f"job_state = {letter}"
    if comment := re.search(r"^\s*comment\s*=\s*(.+)$", text, re.M):
        detail += f", {comment.group(1).strip()}"
    return JobState(PBS_PHASES.get(letter, JobPhase.ended), detail)
