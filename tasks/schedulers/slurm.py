"""SLURM: its options (the form's "SLURM" group), the #SBATCH directives, the launcher
scripts/launch_workers_slurm.sh, and sbatch/squeue/scontrol/sacct/scancel with their output."""

from __future__ import annotations

import re
import shlex
import signal
from typing import TYPE_CHECKING

from pydantic import ConfigDict

from tasks.schedulers.base import JobPhase, JobState, Scheduler, mem_mb
from tasks.schedulers.options import (
    MAKES_AN_ARRAY,
    NO_VALUE,
    OPTIONAL,
    SET_BY_US,
    VALUE,
    DirectivePolicy,
    JobOptions,
    directives_field,
    name_field,
    nodes_field,
    walltime_field,
)

if TYPE_CHECKING:
    from tasks.transport import Transport

_SET, _ARRAY = SET_BY_US, MAKES_AN_ARRAY
_LAYOUT = _SET + "one task per node, one Ray node on each; use slurm.nodes"
_OUTPUT = "changes where the job writes its output (activate-ray writes it to <cluster dir>/logs)"
_ENVIRONMENT = "changes the environment the job runs with"
_OTHER_CLUSTER = ("submits to another cluster, where the flow's squeue, scontrol and scancel "
                  "can neither follow nor cancel the job")

# Slurm --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
SLURM_WALLTIME_RE = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{2}|\d+-\d{1,2}:\d{2}:\d{2})$", re.ASCII)

# '#SBATCH' long options (sbatch's own names, in full: abbreviations are refused) -> what they take.
SLURM_ALLOWED: dict[str, str] = {
    # accounting and scheduling
    "account": VALUE, "partition": VALUE, "qos": VALUE, "reservation": VALUE, "licenses": VALUE,
    "comment": VALUE, "wckey": VALUE, "mail-type": VALUE, "mail-user": VALUE,
    "begin": VALUE, "deadline": VALUE, "dependency": VALUE, "priority": VALUE, "nice": OPTIONAL,
    "hold": NO_VALUE, "requeue": OPTIONAL, "no-requeue": NO_VALUE,
    # node features and placement
    "constraint": VALUE, "cluster-constraint": VALUE, "prefer": VALUE, "nodelist": VALUE, "exclude": VALUE,
    "switches": VALUE, "exclusive": OPTIONAL, "oversubscribe": NO_VALUE, "contiguous": NO_VALUE,
    "spread-job": NO_VALUE, "network": VALUE, "hint": VALUE, "core-spec": VALUE, "thread-spec": VALUE,
    "threads-per-core": VALUE, "cores-per-socket": VALUE, "sockets-per-node": VALUE,
    "extra-node-info": VALUE, "mincpus": VALUE,
    # memory, disk, GPUs and other generic resources
    "mem": VALUE, "mem-per-cpu": VALUE, "mem-per-gpu": VALUE, "tmp": VALUE,
    "gres": VALUE, "gres-flags": VALUE, "gpus": VALUE, "gpus-per-node": VALUE, "gpus-per-socket": VALUE,
    "gpus-per-task": VALUE, "cpus-per-gpu": VALUE,
}
# '#SBATCH' long options refused with the reason (the rest: "not in the allowlist").
SLURM_REFUSED: dict[str, str] = {
    # what the flow sets and relies on
    "job-name": _SET + "the job is named after the cluster id",
    "nodes": _SET + "use slurm.nodes (one Ray node on each node)",
    "ntasks": _LAYOUT, "ntasks-per-node": _LAYOUT, "tasks-per-node": _LAYOUT, "ntasks-per-core": _LAYOUT,
    "ntasks-per-socket": _LAYOUT, "ntasks-per-gpu": _LAYOUT, "ntasks-per-tres": _LAYOUT,
    "nodefile": _SET + "use slurm.nodes, and --nodelist to pick the nodes",
    "cpus-per-task": _SET + "use num_cpus_per_node",
    "time": _SET + "use slurm.walltime (the flow plans the cluster's end on it)",
    "time-min": _SET + "Slurm could cut the time limit below slurm.walltime, which the flow plans the cluster's end on",
    "signal": _SET + "--signal=B:USR1@<walltime_margin> warns the cluster before the time limit (use walltime_margin)",
    "distribution": _SET + "one srun step starts one worker on each node; another distribution breaks that",
    # where the job writes or reads, its environment and interpreter, other users
    "output": _OUTPUT, "error": _OUTPUT,
    "input": "connects the job's standard input to a file of your choice",
    "open-mode": "changes how the job writes its log files",
    "chdir": "changes the job's working directory (it runs in the cluster dir)",
    "export": _ENVIRONMENT, "export-file": _ENVIRONMENT, "get-user-env": _ENVIRONMENT,
    "propagate": _ENVIRONMENT + " (its resource limits)",
    "container": "runs the job in a container: another environment and interpreter",
    "container-id": "runs the job in a container: another environment and interpreter",
    "uid": "runs the job as another user", "gid": "runs the job as another group",
    "bb": "burst buffer directives stage files in and out", "bbf": "burst buffer directives stage files in and out",
    "wrap": "replaces the job script with a command of your choice",
    # many copies, or a job the flow can not follow
    "array": _ARRAY,
    "wait": "sbatch would wait for the job to end; the flow needs the job id at once",
    "test-only": "sbatch would only test the job, not submit it",
    "clusters": _OTHER_CLUSTER, "cluster": _OTHER_CLUSTER,
}
# '#SBATCH' short options -> their long names (in one of the two tables above).
SLURM_SHORT: dict[str, str] = {
    "A": "account", "p": "partition", "q": "qos", "L": "licenses", "b": "begin", "d": "dependency", "H": "hold",
    "C": "constraint", "w": "nodelist", "x": "exclude", "s": "oversubscribe", "S": "core-spec",
    "B": "extra-node-info", "G": "gpus",
    "J": "job-name", "N": "nodes", "n": "ntasks", "F": "nodefile", "c": "cpus-per-task", "t": "time",
    "m": "distribution", "o": "output", "e": "error", "i": "input", "D": "chdir", "a": "array", "W": "wait",
    "M": "clusters",
}
# Words sbatch blanks out wherever they are: they split the script into heterogeneous jobs.
SLURM_HETJOB_WORDS = frozenset({"hetjob", "packjob"})



SLURM_DIRECTIVES = DirectivePolicy(
    "#SBATCH", SLURM_ALLOWED, SLURM_REFUSED, short=SLURM_SHORT, long_options=True, split_words=SLURM_HETJOB_WORDS
)


class SlurmOptions(JobOptions):
    """Where and how long the SLURM job runs."""

    model_config = ConfigDict(title="SLURM")
    group = "slurm"

    account: str = name_field("Account", "--account to charge (empty: your default)")
    partition: str = name_field("Partition", "--partition (empty: the cluster default)")
    qos: str = name_field("QOS", "--qos (empty: the default)")
    walltime_re = SLURM_WALLTIME_RE
    walltime_is = "a Slurm time: use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
    walltime: str = walltime_field(
        "--time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, e.g. 30, 01:00:00 or 1-12:00:00", walltime_re)
    nodes: int = nodes_field("Nodes in the allocation: one Ray node on each")
    directive_policy = SLURM_DIRECTIVES
    extra_directives: str = directives_field(
        "More '#SBATCH --option=value' lines, one per line: resource and placement options "
        "(--constraint, --gres, --exclusive, --mail-type, ...); others are refused with the reason")



def slurm_seconds(walltime: str) -> int:
    """Slurm --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (a bare number is minutes)."""
    days, dash, clock = walltime.partition("-") if "-" in walltime else ("0", "", walltime)
    parts = [int(p) for p in clock.split(":")]
    if dash:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return int(days) * 86400 + hours * 3600 + minutes * 60 + seconds


class SlurmScheduler(Scheduler):
    name = "slurm"
    launch_script = "launch_workers_slurm.sh"
    submit_program = "sbatch"
    submit_flags = ("--parsable",)
    can_exclude_nodes = True
    directive_prefix = "#SBATCH"
    job_id_re = re.compile(r"^[0-9]{1,12}$")

    def directives(self, cluster_id: str, cluster_dir: str) -> list[str]:
        s, slurm = self.settings, self.settings.slurm
        lines = [
            f"--job-name={cluster_id}",
            f"--nodes={slurm.nodes}",
            "--ntasks-per-node=1",
            *([f"--cpus-per-task={s.num_cpus_per_node}"] if s.num_cpus_per_node is not None else []),
            *([f"--mem={mem_mb(s)}M"] if mem_mb(s) is not None else []),
            f"--time={slurm.walltime}",
            f"--output={cluster_dir}/logs/job-%j.out",
            # SIGUSR1 to the batch shell walltime_margin before the limit: the scheduler's own
            # warning (the flow stops the job then; the job script stops the cluster just before the end)
            f"--signal=B:USR1@{s.margin_seconds}",
        ]
        if s.num_gpus_per_node:
            lines.append(f"--gpus-per-node={s.num_gpus_per_node}")
        if self.exclude_nodes:
            lines.append(f"--exclude={','.join(self.exclude_nodes)}")
        for option in ("account", "partition", "qos"):
            if value := getattr(slurm, option):
                lines.append(f"--{option}={value}")
        lines += [line.split(" ", 1)[1] for line in slurm.extra_directives.splitlines() if line]
        return lines

    def worker_directives(self, cluster_id: str, cluster_dir: str) -> list[str]:
        s, slurm, scale = self.settings, self.settings.slurm, self.settings.scale
        cpus, gpus = self.worker_sizes()
        lines = [
            f"--job-name={cluster_id}",
            "--nodes=1",
            "--ntasks-per-node=1",
            *([f"--cpus-per-task={cpus}"] if cpus is not None else []),
            *([f"--mem={mem_mb(s)}M"] if mem_mb(s) is not None else []),
            f"--time={scale.worker_walltime or slurm.walltime}",
            f"--output={cluster_dir}/logs/wjob-%j.out",
            "--signal=B:USR1@60",
            *([f"--gpus-per-node={gpus}"] if gpus else []),
        ]
        for option, value in (("account", slurm.account), ("partition", scale.worker_partition or slurm.partition),
                              ("qos", slurm.qos)):
            if value:
                lines.append(f"--{option}={value}")
        return lines

    @property
    def walltime_seconds(self) -> int | None:
        return slurm_seconds(self.settings.slurm.walltime)

    @property
    def worker_walltime_seconds(self) -> int | None:
        return slurm_seconds(self.settings.scale.worker_walltime or self.settings.slurm.walltime)

    def walltime_option(self, seconds: int) -> list[str]:
        # D-HH:MM:SS, over the script's --time (sbatch's rule: the command line wins)
        return [f"--time={seconds // 86400}-{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"]

    def job_id_in(self, stdout: str) -> str:
        return stdout.strip().split(";")[0]  # --parsable: id[;cluster]

    def dependency_option(self, job_id: str) -> list[str]:
        # on the command line, over any --dependency of extra_directives (sbatch's rule)
        return [f"--dependency=afterany:{job_id}"]

    def find_job_command(self, job_name: str) -> str:
        return f'squeue -h -u "$(id -un)" --name={shlex.quote(job_name)} -o %i'

    async def allocated_nodes(self, target: Transport, job_id: str) -> list[str]:
        shown = await target.query(f"scontrol show job {shlex.quote(job_id)} 2>/dev/null")
        fields = dict(re.findall(r"(\w+)=(\S*)", shown.stdout))
        nodelist = fields.get("NodeList", "")
        if shown.returncode != 0 or nodelist in ("", "(null)"):
            return []
        names = await target.query(f"scontrol show hostnames {shlex.quote(nodelist)}")
        hosts = names.stdout.split() if names.returncode == 0 else []
        batch = fields.get("BatchHost", "")
        return sorted(hosts, key=lambda host: host != batch)  # the head (batch host) first

    async def state(self, target: Transport, job_id: str) -> JobState:
        quoted = shlex.quote(job_id)
        result = await target.query(f"squeue -h -j {quoted} -o '%T|%r' 2>/dev/null")
        line = result.stdout.strip()
        if result.returncode == 0 and line:
            return parse_squeue(line)
        shown = await target.query(f"scontrol show job {quoted} 2>/dev/null")
        if shown.returncode == 0:
            return parse_scontrol(shown.stdout)
        # Gone from slurmctld's memory: accounting (where the site has it) knows how it ended.
        accounted = await target.query(f"sacct -n -X -P -j {quoted} -o State,Reason 2>/dev/null")
        if accounted.returncode == 0 and accounted.stdout.strip():
            state, _, reason = accounted.stdout.strip().splitlines()[0].partition("|")
            return _slurm_state(state.split()[0], reason)
        return JobState(JobPhase.ended, "not in queue")

    async def cancel(self, target: Transport, job_id: str, cluster_dir: str = "") -> None:
        await target.query(f"scancel {shlex.quote(job_id)}")

    def wake_command(self, job_id: str) -> str:
        # --full: the batch shell (the head's supervisor) and every step's tasks (the workers).
        # By number: scancel knows no name WINCH (28 on every Linux a site runs: x86, ARM, POWER)
        return f"scancel --full --signal={int(signal.SIGWINCH)} {shlex.quote(job_id)}"


SLURM_PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


def _slurm_phase(state: str) -> JobPhase:
    if state in SLURM_PENDING:
        return JobPhase.pending
    if state in SLURM_RUNNING:
        return JobPhase.running
    return JobPhase.ended


# Pending reasons that never clear by waiting: the job can not run as asked.
SLURM_HOPELESS = re.compile(
    r"^(PartitionNodeLimit|PartitionTimeLimit|PartitionConfig|BadConstraints|InvalidAccount|InvalidQOS"
    r"|ReqNodeNotAvail, UnavailableNodes|.*MaxNodePerJobLimit|.*MaxCpuPerJobLimit|.*MaxWallDurationPerJobLimit"
    r"|Nodes_required_for_job_are_DOWN.*|DependencyNeverSatisfied)"
)


def _slurm_state(state: str, reason: str) -> JobState:
    reason = "" if reason in ("None", "(null)") else reason
    phase = _slurm_phase(state)
    hopeless = phase is JobPhase.pending and bool(reason) and bool(SLURM_HOPELESS.match(reason))
    return JobState(phase, f"{state}, {reason}" if reason else state, hopeless)


def parse_squeue(line: str) -> JobState:
    state, _, reason = line.partition("|")
    return _slurm_state(state, reason)


def parse_scontrol(text: str) -> JobState:
    fields = dict(re.findall(r"(\w+)=(\S*)", text))
    return _slurm_state(fields.get("JobState", "UNKNOWN"), fields.get("Reason", "None"))
