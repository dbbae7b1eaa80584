"""`check`: what would break a cluster on this site, found before the queue (issue 36).

On the login host: the scheduler's commands answer, the job script is accepted without
running (sbatch --test-only; PBS: a held job, deleted at once), host keys known, the
setup_commands run cleanly, the environment is found (or would be built), the Prefect API
answers, Ray's socket paths fit. With on_nodes, a short small job (1-2 nodes, 5 minutes)
on the compute nodes runs what every node of a real cluster runs before `ray start`
(scripts/node_check.sh, through ar_run_node) plus a node-to-node reach (peer_check.py).
Every result is a row: pass / warn / fail, what was found, the fix in one line.

A run does the fast login rows (FAST_CHECKS) before it submits: a failure costs seconds.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from dataclasses import asdict, dataclass

from prefect.settings import get_current_settings

from tasks.cluster import (
    CLUSTER_SCRIPTS,
    ENVIRONMENT_FILE,
    SETUP_COMMANDS_FILE,
    ClusterPlan,
    RayEnvironment,
    make_private_work_dir,
    prepare_environment,
    teardown_cluster,
)
from tasks.schedulers import JobPhase, Scheduler, scheduler_for
from tasks.settings import NODE_TMP_MAX_LEN, RayClusterSettings, SchedulerKind
from tasks.shipped import SCRIPTS_DIR
from tasks.transport import Transport

PASS, WARN, FAIL = "pass", "warn", "fail"
# The check job: small and short, whatever the run would ask for.
CHECK_JOB_NODES = 2
CHECK_JOB_WALLTIME = {SchedulerKind.slurm: "00:05:00", SchedulerKind.pbs: "00:05:00"}


@dataclass
class CheckRow:
    check: str
    status: str  # pass | warn | fail
    found: str
    fix: str = ""
    where: str = "login"  # login, or the node's name in the check job


def rows_in(text: str, where: str) -> list[CheckRow]:
    """The AR_CHECK rows node_check.sh and peer_check.py print."""
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 5 and parts[0] == "AR_CHECK" and parts[2] in (PASS, WARN, FAIL):
            rows.append(CheckRow(parts[1], parts[2], parts[3], parts[4], where))
    return rows


def failed(rows: list[CheckRow]) -> list[CheckRow]:
    return [row for row in rows if row.status == FAIL]


def socket_paths_row(node_tmp: str) -> CheckRow:
    """Ray's socket paths below node_tmp against AF_UNIX's 107 bytes: node_check.sh's words."""
    longest = len(node_tmp) + 107 - NODE_TMP_MAX_LEN
    if len(node_tmp) > NODE_TMP_MAX_LEN:
        return CheckRow("socket paths", FAIL,
                        f"Ray's socket paths under node temp root {node_tmp} ({len(node_tmp)} characters) would be up to "
                        f"{longest} bytes, over the 107-byte AF_UNIX limit",
                        f"`--node-tmp /tmp` (a node-local dir of at most {NODE_TMP_MAX_LEN} characters)")
    return CheckRow("socket paths", PASS, f"node temp root {node_tmp}: socket paths up to {longest} of 107 bytes")


# --- the login host ---------------------------------------------------------------------------

SCHEDULER_ANSWERS = {
    SchedulerKind.slurm: 'sbatch --version && squeue -h -u "$(id -un)" -o %i >/dev/null',
    SchedulerKind.pbs: 'command -v qsub >/dev/null && command -v qdel >/dev/null && qstat >/dev/null',
}


async def scheduler_row(target: Transport, settings: RayClusterSettings) -> CheckRow:
    command = SCHEDULER_ANSWERS.get(settings.scheduler)
    if command is None:
        return CheckRow("scheduler", PASS, "none: the cluster runs on the host itself")
    said = await target.run(f"{{ {command}; }} 2>&1", check=False, timeout=60)
    words = " ".join(said.stdout.split())[-300:]
    if said.returncode != 0:
        return CheckRow("scheduler", FAIL, f"{settings.scheduler.value} commands do not answer on {target.label}: "
                        f"{words or f'exit {said.returncode}'}",
                        "run the check on the site's login host (where sbatch/qsub work), or fix PATH in setup_commands")
    return CheckRow("scheduler", PASS, f"{settings.scheduler.value} answers on {target.label}"
                    + (f" ({words.splitlines()[0][:80]})" if words else ""))


async def job_script_row(target: Transport, settings: RayClusterSettings, work_dir: str) -> CheckRow:
    """The run's own job script (its nodes, walltime, account, partition or queue, extra
    directives), accepted without running: sbatch --test-only; PBS: qsub -h, then qdel."""
    if settings.scheduler is SchedulerKind.none:
        return CheckRow("job script", PASS, "no scheduler: nothing to submit")
    scheduler = scheduler_for(settings)
    plan = ClusterPlan.new(settings, work_dir)
    quoted = shlex.quote(plan.cluster_dir)
    await target.run(f"mkdir -p {shlex.quote(work_dir)}/clusters && mkdir -m 700 {quoted} && mkdir {quoted}/bin {quoted}/logs")
    try:
        await target.write_text(f"{plan.cluster_dir}/bin/job.sh", scheduler.render(plan.cluster_id, plan.cluster_dir), 0o700)
        if settings.scheduler is SchedulerKind.slurm:
            said = await target.run(f"cd {quoted} && sbatch --test-only bin/job.sh 2>&1", check=False, timeout=60)
            accepted = said.returncode == 0
        else:
            # held (-h): it never runs, and is deleted at once; -f on OpenPBS (no background qsub left)
            submit = scheduler.submit_command(plan.cluster_dir).replace("qsub -f ", "qsub -f -h ").replace(
                "qsub bin/job.sh", "qsub -h bin/job.sh")
            said = await target.run(f"{{ {submit}; }} 2>&1", check=False, timeout=60)
            job_id = said.stdout.strip().splitlines()[-1].strip() if said.stdout.strip() else ""
            accepted = said.returncode == 0 and bool(scheduler.job_id_re.match(job_id))
            if accepted:
                await target.query(f"qdel {shlex.quote(job_id)}")
                await _wait_gone(target, scheduler, job_id)
    finally:
        await target.run(f"rm -rf {quoted}", check=False)
    words = " ".join(said.stdout.split())[-400:]
    if not accepted:
        program = "sbatch" if settings.scheduler is SchedulerKind.slurm else "qsub"
        return CheckRow("job script", FAIL, f"{program} refuses the job: {words}",
                        f"fix what {program} names (--{settings.scheduler.value}.partition/queue, .account, "
                        ".extra-directives, the node count or walltime)")
    return CheckRow("job script", PASS, f"accepted without running ({words[:120] or 'held, then deleted'})")


async def _wait_gone(target: Transport, scheduler: Scheduler, job_id: str, seconds: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline and (await scheduler.state(target, job_id)).phase is not JobPhase.ended:
        await asyncio.sleep(0.5)


async def setup_commands_row(target: Transport, settings: RayClusterSettings, work_dir: str) -> CheckRow:
    if not settings.setup_commands:
        return CheckRow("setup_commands", PASS, "none")
    await target.put_file(SCRIPTS_DIR / "site_setup.sh", f"{work_dir}/bin/site_setup.sh", 0o700)
    path = f"{work_dir}/setup/check.sh"
    await target.run(f"mkdir -p {shlex.quote(work_dir)}/setup")
    await target.write_text(path, settings.setup_commands, 0o600)
    command = f"set -e; . {shlex.quote(work_dir + '/bin/site_setup.sh')} {shlex.quote(path)}"
    said = await target.run(f"bash -c {shlex.quote(command)} 2>&1", check=False, timeout=300)
    await target.run(f"rm -f {shlex.quote(path)}", check=False)
    words = " ".join(line for line in said.stdout.splitlines() if "running setup_commands" not in line)[-300:]
    if said.returncode != 0:
        return CheckRow("setup_commands", FAIL, f"setup_commands fail on {target.label}: {words or f'exit {said.returncode}'}",
                        "fix the line named (it runs on the login host and on every node)")
    return CheckRow("setup_commands", PASS, f"ran cleanly on {target.label}")


async def environment_row(target: Transport, settings: RayClusterSettings, work_dir: str
                          ) -> tuple[CheckRow, RayEnvironment | None]:
    if settings.container_image:
        environment = await prepare_environment.fn(target, settings, work_dir)
        return CheckRow("environment", PASS, f"the python3 and ray of image {settings.container_image}"), environment
    try:
        environment = await prepare_environment.fn(target, settings, work_dir, find_only=True)
    except Exception as exc:
        return CheckRow("environment", FAIL, f"looking for a Python with ray {settings.ray_version} failed: "
                        f"{' '.join(str(exc).split())[-300:]}", "fix setup_commands or --python"), None
    if environment is None:
        return CheckRow("environment", WARN,
                        f"no Python with ray {settings.ray_version} found on {target.label}"
                        + (f" (--python {settings.python} has another or none)" if settings.python else "")
                        + f": the run builds a venv in {work_dir}/venvs (minutes, once; needs the package index)",
                        "`--python` an interpreter with ray==" + settings.ray_version + ", or let the run build it"), None
    return CheckRow("environment", PASS, f"ray {settings.ray_version} in {environment.python}"), environment


async def prefect_row() -> CheckRow:
    url = get_current_settings().api.url
    if not url:
        return CheckRow("prefect api", PASS, "no Prefect server configured (PREFECT_API_URL): runs use your own "
                        "default server on this host (started on first need, authenticated, reused)", "")
    from prefect.client.orchestration import get_client

    try:
        async with get_client() as client:
            problem = await client.api_healthcheck()
            if problem is None:
                await client.read_flows(limit=1)  # an API that takes this one is authenticated
    except Exception as exc:
        problem = exc
    if problem is not None:
        return CheckRow("prefect api", FAIL, f"{url} does not answer: {type(problem).__name__}: {str(problem)[:200]}",
                        "start the server (`make server`), or set PREFECT_API_URL / PREFECT_API_KEY to one that answers")
    return CheckRow("prefect api", PASS, f"{url} answers")


async def fast_login_rows(target: Transport, settings: RayClusterSettings) -> list[CheckRow]:
    """What a run checks before it submits: seconds, nothing left behind."""
    return [await scheduler_row(target, settings), socket_paths_row(settings.node_tmp)]


# --- the compute nodes ------------------------------------------------------------------------

def check_job_settings(settings: RayClusterSettings) -> RayClusterSettings:
    """The run's settings for a check job: at most 2 nodes, 5 minutes, no worker jobs; the
    account, partition/queue and directives the run would use."""
    nodes = min(CHECK_JOB_NODES, settings.nodes)
    update: dict = {"scale": type(settings.scale)()}
    if settings.scheduler is SchedulerKind.slurm:
        update["slurm"] = settings.slurm.model_copy(update={"nodes": nodes, "walltime": CHECK_JOB_WALLTIME[settings.scheduler]})
    elif settings.scheduler is SchedulerKind.pbs:
        pbs = settings.pbs
        select = pbs.select
        if select:  # the first chunk's resources, on at most 2 chunks
            first = select.split("+")[0]
            spec = first.split(":", 1)[1] if first.split(":", 1)[0].isdigit() else first
            select = f"{nodes}:{spec}"
        update["pbs"] = pbs.model_copy(update={"nodes": nodes, "select": select, "walltime": CHECK_JOB_WALLTIME[settings.scheduler]})
    else:
        update["cluster"] = settings.cluster.model_copy(update={"direct_workers": 0})
    return settings.model_copy(update=update)


async def node_rows(target: Transport, settings: RayClusterSettings, work_dir: str,
                    environment: RayEnvironment | None, timeout: float) -> list[CheckRow]:
    """The check job: every node runs node_check.sh and the node-to-node reach; its rows."""
    small = check_job_settings(settings)
    scheduler = scheduler_for(small)
    plan = ClusterPlan.new(small, work_dir)
    # without an environment found, the nodes check the Python the user named (or python3)
    plan.environment = environment or RayEnvironment(
        f"{settings.python.rstrip('/')}/bin/python" if settings.python.endswith(("/", "venv")) else (settings.python or "python3"),
        "ray", "named")
    rows: list[CheckRow] = []
    try:
        bin_dir = f"{plan.cluster_dir}/bin"
        quoted = shlex.quote(plan.cluster_dir)
        await target.run(f"mkdir -p {shlex.quote(work_dir)}/clusters && mkdir -m 700 {quoted} && "
                         + shlex.join(["mkdir", bin_dir, f"{plan.cluster_dir}/logs", f"{plan.cluster_dir}/nodes",
                                       f"{plan.cluster_dir}/checks"]))
        await asyncio.gather(*(target.put_file(SCRIPTS_DIR / name, f"{bin_dir}/{name}", 0o700) for name in CLUSTER_SCRIPTS))
        await target.write_text(f"{plan.cluster_dir}/cluster.env", plan.env_file() + "export AR_CHECK_ONLY=1\n", 0o600)
        if small.setup_commands:
            await target.write_text(f"{plan.cluster_dir}/{SETUP_COMMANDS_FILE}", small.setup_commands, 0o600)
        await target.write_text(f"{plan.cluster_dir}/{ENVIRONMENT_FILE}", plan.environment_file(), 0o600)
        await target.write_text(f"{bin_dir}/job.sh", scheduler.render(plan.cluster_id, plan.cluster_dir, "check_main.sh"), 0o700)
        await target.run(f"touch {quoted}/heartbeat")
        if small.scheduler is SchedulerKind.none:
            said = await target.run(f"bash {quoted}/bin/job.sh >{quoted}/logs/job.out 2>&1", check=False, timeout=timeout)
            ended = True
        else:
            plan.job_id = await scheduler.submit(target, plan.cluster_dir)
            ended, said = await _wait_job(target, scheduler, plan, rows, timeout), None
        rows += await _collected_rows(target, plan)
        if ended and not any(row.where != "login" for row in rows):
            tail = (await target.run(f"tail -n 5 {quoted}/logs/* 2>/dev/null", check=False)).stdout
            rows.append(CheckRow("check job", FAIL, "the check job ended without a node's checks: "
                                 + " ".join(((said.stdout if said else "") + tail).split())[-300:],
                                 "see the job's output above; fix what it names"))
    finally:
        await teardown_cluster.fn(target, scheduler, plan)
    return rows


async def _wait_job(target: Transport, scheduler: Scheduler, plan: ClusterPlan, rows: list[CheckRow], timeout: float) -> bool:
    """Until the check job ended (True); a job that can never run or is still queued at the
    timeout is a row (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        state = await scheduler.state(target, plan.job_id)
        if state.phase is JobPhase.ended:
            return True
        if state.hopeless:
            rows.append(CheckRow("check job", FAIL, f"job {plan.job_id} can never run as asked: {state}",
                                 "fix the node count, sizes or partition/queue the scheduler names"))
            return False
        if loop.time() > deadline:
            rows.append(CheckRow("check job", WARN if state.phase is JobPhase.pending else FAIL,
                                 f"job {plan.job_id} still {state} after {timeout:.0f}s: nodes not (all) checked",
                                 "run the check again when the queue is shorter (--readiness-timeout: how long it waits)"))
            return False
        await asyncio.sleep(1.0)


async def _collected_rows(target: Transport, plan: ClusterPlan) -> list[CheckRow]:
    listing = await target.run(f"cd {shlex.quote(plan.cluster_dir)}/checks 2>/dev/null && "
                               "for f in *.rows; do [ -e \"$f\" ] && printf '== %s\\n' \"$f\" && cat \"$f\"; done",
                               check=False)
    rows, where = [], "node"
    for line in listing.stdout.splitlines():
        if line.startswith("== "):
            where = line[3:].removesuffix(".rows")
            continue
        rows += rows_in(line, where)
    # the head's file is named head: its rows say which host that was (" on HOST")
    hosts = [m.group(1) for row in rows if row.where == "head" and (m := re.search(r" on ([A-Za-z0-9_.-]+)", row.found))]
    for row in rows:
        if row.where == "head" and hosts:
            row.where = f"head ({hosts[0]})"
    return rows


# --- the whole check --------------------------------------------------------------------------

async def run_checks(target: Transport, settings: RayClusterSettings, work_dir: str, on_nodes: bool) -> list[CheckRow]:
    """Every login row, then (on_nodes) the check job's rows. Nothing is left behind."""
    await make_private_work_dir(target, work_dir)
    rows = [await scheduler_row(target, settings)]
    rows.append(socket_paths_row(settings.node_tmp))
    if rows[0].status != FAIL:
        rows.append(await job_script_row(target, settings, work_dir))
    setup = await setup_commands_row(target, settings, work_dir)
    rows.append(setup)
    environment = None
    if setup.status != FAIL:
        row, environment = await environment_row(target, settings, work_dir)
        rows.append(row)
    rows.append(await prefect_row())
    if on_nodes and not failed(rows[:1]) and not any(r.check == "job script" and r.status == FAIL for r in rows):
        rows += await node_rows(target, settings, work_dir, environment, settings.readiness_timeout + 360)
    return rows


def host_key_row(settings: RayClusterSettings, exc: BaseException) -> CheckRow:
    """The target could not be opened: an unknown or changed host key, or no connection."""
    text = " ".join(str(exc).split())[:300]
    if "host key" in text.lower() or "HostKey" in type(exc).__name__:
        return CheckRow("host key", FAIL, f"{settings.host}: {text}",
                        "`--accept-new-host-key` (trust on first use), or add the host's key to ~/.ssh/known_hosts after checking it")
    return CheckRow("host key", FAIL, f"cannot reach {settings.host}: {type(exc).__name__}: {text}",
                    "check --host, the SSH key (--ssh-key-file) and that the host answers")


def render_table(rows: list[CheckRow]) -> str:
    """A plain-text table: status, check, where, found; the fix under a failing or warning row."""
    width = max([len(r.check) for r in rows] + [5])
    where_width = max([len(r.where) for r in rows] + [5])
    lines = [f"{'':4}  {'check':{width}}  {'where':{where_width}}  found"]
    for r in rows:
        lines.append(f"{r.status.upper():4}  {r.check:{width}}  {r.where:{where_width}}  {r.found}")
        if r.fix and r.status != PASS:
            lines.append(f"{'':4}  {'':{width}}  {'':{where_width}}  fix: {r.fix}")
    fails, warns = len(failed(rows)), sum(r.status == WARN for r in rows)
    lines.append(f"{len(rows)} checks: {fails} failed, {warns} warnings" + ("" if fails else ": nothing fails"))
    return "\n".join(lines)


def render_markdown(rows: list[CheckRow]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["# Site check", "", "| | check | where | found | fix |", "|---|---|---|---|---|"]
    lines += [f"| {r.status} | {cell(r.check)} | {cell(r.where)} | {cell(r.found)} | {cell(r.fix)} |" for r in rows]
    return "\n".join(lines) + "\n"


def rows_json(rows: list[CheckRow]) -> str:
    return json.dumps({"ok": not failed(rows), "rows": [asdict(r) for r in rows]}, indent=2)
