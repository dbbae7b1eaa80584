"""A small local runner of the Parallel Works ACTIVATE workflow format, for tests.

    python tests/workflow_runner.py workflow.yaml --inputs inputs.json --run-dir DIR --result result.json

It runs a workflow the way the platform documents it, as far as this project's
workflow.yaml needs, and refuses the rest (an unknown key, `uses:` or expression
is an error, never skipped):

- inputs: the `on.execute.inputs` form's defaults, overridden by the given ones
  (groups as nested objects, the resource as an object: ip, schedulerType, ...);
  an input whose `ignore` is true is left out (empty), as the platform leaves it out;
- `${{ ... }}`: inputs.x.y, needs.JOB.outputs.KEY (JOB must be in the job's
  needs, KEY must have been published), sessions.NAME, `.hidden` in the form,
  literals ('text', numbers, true, false) and `==` `!=` `!` `&&` `||` `( )`;
- jobs in `needs` order, those without mutual needs at the same time; a job's
  `if:` false skips it (and what needs it); a failed job's dependents do not run;
- a job's steps in order, each `run:` with `bash -c` in the job's own directory,
  with the workflow's, the job's and the step's `env:`, PW_PARENT_JOB_DIR (the
  run's directory, shared by the jobs) and OUTPUTS (a file whose KEY=VALUE lines
  become needs.JOB.outputs.KEY); `ignore-errors: true`;
- `early-cancel: any-job-failed`: the step is ended (its process group,
  SIGTERM then SIGKILL) as soon as any job failed;
- the job's `cleanup:` steps after its steps, whatever their result (also when
  the run is cancelled: SIGTERM/SIGINT to the runner);
- actions: `parallelworks/checkout` (`git clone --branch BRANCH REPO .` in the
  job's directory) and `parallelworks/update-session` (its inputs recorded in
  the result, and, for the user workspace, an HTTP request to remoteHost:remotePort
  that must be answered).

Not modelled (refused): `ssh:` (steps on a remote resource), subworkflows,
`working-directory`, `retry`, `timeout`, other actions.

No dependencies beyond the standard library and PyYAML (which Prefect brings);
it imports nothing of the project, so it runs with any Python that has PyYAML.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TOP_KEYS = {"jobs", "on", "sessions", "env", "permissions"}
JOB_KEYS = {"needs", "env", "steps", "cleanup", "if"}
STEP_KEYS = {"name", "id", "run", "uses", "with", "env", "early-cancel", "ignore-errors"}
SESSION_KEYS = {"redirect", "useTLS", "prompt-for-name"}
# The inputs each action documents (parallelworks.com/docs: Actions, Workflow Sessions).
ACTION_INPUTS = {
    "parallelworks/checkout": {"required": {"repo"}, "optional": {"branch"}},
    "parallelworks/update-session": {
        "required": {"name", "target", "remotePort"},
        "optional": {"remoteHost", "localPort", "slug", "status"},
    },
}
# How long a session's far end gets to answer before update-session fails.
SESSION_ANSWER_SECONDS = 30
USER_WORKSPACE = "user-workspace"  # update-session's target for the workspace itself
CANCEL_GRACE_S = 20  # SIGTERM, then SIGKILL: the flow tears its cluster down on SIGTERM
EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.S)


class WorkflowError(Exception):
    """The workflow uses something this runner does not model, or an expression does not resolve."""


# --------------------------------------------------------------------------- expressions

TOKEN = re.compile(r"\s*(?:(?P<str>'[^']*')|(?P<num>\d+(?:\.\d+)?)|(?P<op>==|!=|&&|\|\||!|\(|\))"
                   r"|(?P<ref>\.?[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*))")


def tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = TOKEN.match(text, pos)
        if not match:
            raise WorkflowError(f"cannot read the expression {text!r} at {text[pos:]!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


class Expression:
    """One `${{ ... }}`: parsed once, evaluated against a resolver of references."""

    def __init__(self, text: str):
        self.text = text.strip()
        self.tokens = tokenize(self.text)
        if not self.tokens:
            raise WorkflowError("an empty ${{ }}")
        self.tree, rest = self._or(0)
        if rest != len(self.tokens):
            raise WorkflowError(f"cannot read the expression {self.text!r}: unexpected {self.tokens[rest][1]!r}")

    def references(self) -> list[str]:
        return [value for kind, value in self.tokens if kind == "ref" and value not in ("true", "false", "null")]

    # recursive descent: or -> and ('||' and)*; and -> not ('&&' not)*; not -> '!' not | cmp;
    # cmp -> atom (('=='|'!=') atom)?; atom -> literal | reference | '(' or ')'
    def _peek(self, i: int) -> str | None:
        return self.tokens[i][1] if i < len(self.tokens) and self.tokens[i][0] == "op" else None

    def _left_assoc(self, i, op: str, operand):
        """operand (op operand)*, folded to the left."""
        left, i = operand(i)
        while self._peek(i) == op:
            right, i = operand(i + 1)
            left = (op, left, right)
        return left, i

    def _or(self, i):
        return self._left_assoc(i, "||", self._and)

    def _and(self, i):
        return self._left_assoc(i, "&&", self._not)

    def _not(self, i):
        if self._peek(i) == "!":
            operand, i = self._not(i + 1)
            return ("!", operand), i
        return self._cmp(i)

    def _cmp(self, i):
        left, i = self._atom(i)
        if self._peek(i) in ("==", "!="):
            op = self._peek(i)
            right, i = self._atom(i + 1)
            return (op, left, right), i
        return left, i

    def _atom(self, i):
        if i >= len(self.tokens):
            raise WorkflowError(f"the expression {self.text!r} ends too early")
        kind, value = self.tokens[i]
        if kind == "op" and value == "(":
            inner, i = self._or(i + 1)
            if self._peek(i) != ")":
                raise WorkflowError(f"a ')' is missing in {self.text!r}")
            return inner, i + 1
        if kind == "str":
            return ("lit", value[1:-1]), i + 1
        if kind == "num":
            return ("lit", float(value) if "." in value else int(value)), i + 1
        if kind == "ref":
            literals = {"true": True, "false": False, "null": None}
            return (("lit", literals[value]) if value in literals else ("ref", value)), i + 1
        raise WorkflowError(f"unexpected {value!r} in {self.text!r}")

    def evaluate(self, resolve) -> Any:
        def ev(node):
            op = node[0]
            if op == "lit":
                return node[1]
            if op == "ref":
                return resolve(node[1])
            if op == "!":
                return not truthy(ev(node[1]))
            if op == "&&":
                return truthy(ev(node[1])) and truthy(ev(node[2]))
            if op == "||":
                return truthy(ev(node[1])) or truthy(ev(node[2]))
            left, right = ev(node[1]), ev(node[2])
            return same(left, right) if op == "==" else not same(left, right)

        return ev(self.tree)


def truthy(value) -> bool:
    return value not in (None, False, "", 0, "false")


def same(left, right) -> bool:
    """`==` as the form means it: an empty (ignored) input equals ''."""
    if left is None:
        left = ""
    if right is None:
        right = ""
    if isinstance(left, bool) or isinstance(right, bool):
        return as_text(left) == as_text(right)
    return left == right


def as_text(value) -> str:
    """A value the way the platform substitutes it into text: true/false, 4 not 4.0."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        raise WorkflowError(f"an object ({value!r}) cannot be substituted into text")
    return str(value)


def expressions_in(text: str) -> list[Expression]:
    return [Expression(m.group(1)) for m in EXPRESSION.finditer(text)]


def substitute(value, resolve):
    """Every `${{ }}` in a value (strings in lists and dicts too); a string that is one
    whole expression keeps the expression's type."""
    if isinstance(value, dict):
        return {k: substitute(v, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, resolve) for v in value]
    if not isinstance(value, str):
        return value
    whole = EXPRESSION.fullmatch(value.strip())
    if whole and "}}" not in whole.group(1):  # one expression, not '${{ a }}-${{ b }}'
        return Expression(whole.group(1)).evaluate(resolve)
    return EXPRESSION.sub(lambda m: as_text(Expression(m.group(1)).evaluate(resolve)), value)


def walk(tree: dict, path: str, what: str):
    node = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise WorkflowError(f"{what}: no {path!r}")
        node = node[part]
    return node


# --------------------------------------------------------------------------- inputs


def resolve_inputs(form: dict, given: dict) -> dict:
    """The run's inputs: the form's defaults, the given values over them, ignored ones left out."""
    values = _merge(form, given, "")
    resolved: dict = {}

    def resolver_for(spec):
        def resolve(ref: str):
            if ref == ".hidden":
                return truthy(evaluate_flag(spec.get("hidden"), resolve))
            if ref.startswith("inputs."):
                return walk(values, ref.removeprefix("inputs."), "inputs")
            if ref == "inputs":
                return values
            raise WorkflowError(f"the form's expressions can name inputs only, not {ref!r}")
        return resolve

    def visit(spec_items: dict, vals: dict, out: dict, parent_ignored: bool):
        for name, spec in spec_items.items():
            resolve = resolver_for(spec)
            ignored = parent_ignored or truthy(evaluate_flag(spec.get("ignore"), resolve))
            if spec.get("type") == "group":
                out[name] = {}
                visit(spec["items"], vals[name], out[name], ignored)
            else:
                out[name] = None if ignored else vals[name]

    visit(form, values, resolved, False)
    return resolved


def evaluate_flag(value, resolve):
    if value is None or isinstance(value, bool):
        return bool(value)
    if not isinstance(value, str):
        raise WorkflowError(f"hidden/ignore must be a boolean or an expression, not {value!r}")
    return substitute(value, resolve)


def _merge(form: dict, given: dict, prefix: str) -> dict:
    unknown = sorted(set(given) - set(form))
    if unknown:
        raise WorkflowError(f"inputs not in the form: {[prefix + u for u in unknown]}")
    values = {}
    for name, spec in form.items():
        path = prefix + name
        if spec.get("type") == "group":
            sub = given.get(name, {})
            if not isinstance(sub, dict):
                raise WorkflowError(f"input group {path} takes an object, not {sub!r}")
            values[name] = _merge(spec["items"], sub, path + ".")
            continue
        if name in given:
            value = given[name]
        elif "default" in spec:
            value = spec["default"]
        elif spec.get("optional"):
            value = None
        else:
            raise WorkflowError(f"input {path} is required (no default)")
        values[name] = _check_input(path, spec, value)
    return values


def _check_input(path: str, spec: dict, value):
    kind = spec.get("type")
    if value is None:
        return None
    if kind == "number" and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise WorkflowError(f"input {path} is a number, not {value!r}")
    if kind == "boolean" and not isinstance(value, bool):
        raise WorkflowError(f"input {path} is a boolean, not {value!r}")
    if kind == "dropdown" and value not in [o["value"] for o in spec.get("options", [])]:
        raise WorkflowError(f"input {path}: {value!r} is not one of its options")
    if kind == "compute-clusters" and not isinstance(value, dict):
        raise WorkflowError(f"input {path} is a resource (an object with ip, schedulerType, ...), not {value!r}")
    if kind in ("string", "editor", "slurm-accounts", "slurm-partitions", "slurm-qos") and not isinstance(value, str):
        raise WorkflowError(f"input {path} is text, not {value!r}")
    return value


# --------------------------------------------------------------------------- the workflow's shape


def check_workflow(workflow: dict) -> None:
    """Refuse what this runner does not model, before anything runs."""
    if not isinstance(workflow, dict) or not isinstance(workflow.get("jobs"), dict) or not workflow["jobs"]:
        raise WorkflowError("a workflow needs at least one job under `jobs`")
    _only(workflow, TOP_KEYS, "the workflow")
    for name, session in (workflow.get("sessions") or {}).items():
        _only(session or {}, SESSION_KEYS, f"session {name}")
    redirects = [n for n, s in (workflow.get("sessions") or {}).items() if (s or {}).get("redirect")]
    if len(redirects) > 1:
        raise WorkflowError(f"only one session may set redirect: {redirects}")
    jobs = workflow["jobs"]
    for name, job in jobs.items():
        _only(job, JOB_KEYS, f"job {name}")
        if not job.get("steps"):
            raise WorkflowError(f"job {name} has no steps")
        for need in job.get("needs", []):
            if need not in jobs:
                raise WorkflowError(f"job {name} needs {need!r}, which is no job")
        for kind in ("steps", "cleanup"):
            for step in job.get(kind, []):
                _check_step(name, step)
    _job_order(jobs)  # no cycle


def _check_step(job: str, step: dict) -> None:
    where = f"job {job} step {step.get('name', '?')!r}"
    _only(step, STEP_KEYS, where)
    if ("run" in step) == ("uses" in step):
        raise WorkflowError(f"{where}: exactly one of run and uses")
    if "early-cancel" in step and step["early-cancel"] != "any-job-failed":
        raise WorkflowError(f"{where}: early-cancel takes any-job-failed only")
    if "uses" in step:
        action = ACTION_INPUTS.get(step["uses"])
        if action is None:
            raise WorkflowError(f"{where}: the action {step['uses']!r} is not modelled here")
        given = set(step.get("with") or {})
        missing, unknown = action["required"] - given, given - action["required"] - action["optional"]
        if missing or unknown:
            raise WorkflowError(f"{where}: {step['uses']} inputs missing {sorted(missing)}, unknown {sorted(unknown)}")
    elif not isinstance(step["run"], str):
        raise WorkflowError(f"{where}: run takes a script")


def _only(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise WorkflowError(f"{where}: {unknown} not modelled by this runner")


def _job_order(jobs: dict) -> list[str]:
    order, seen, visiting = [], set(), set()

    def visit(name):
        if name in seen:
            return
        if name in visiting:
            raise WorkflowError(f"jobs need each other in a cycle through {name}")
        visiting.add(name)
        for need in jobs[name].get("needs", []):
            visit(need)
        visiting.discard(name)
        seen.add(name)
        order.append(name)

    for name in jobs:
        visit(name)
    return order


def references(workflow: dict) -> list[tuple[str, str, str]]:
    """(job, where, reference) of every `${{ }}` in the jobs (form expressions excluded)."""
    found = []

    def collect(job, where, value):
        if isinstance(value, dict):
            for k, v in value.items():
                collect(job, f"{where}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                collect(job, f"{where}[{i}]", v)
        elif isinstance(value, str):
            for expression in expressions_in(value):
                found.extend((job, where, ref) for ref in expression.references())

    collect(None, "env", workflow.get("env") or {})
    for name, job in workflow["jobs"].items():
        collect(name, f"{name}", {k: v for k, v in job.items() if k != "needs"})
    return found


def check_references(workflow: dict) -> None:
    """Every reference of the jobs names a form input, a declared session, or an
    output of a job the referring job needs."""
    form = workflow.get("on", {}).get("execute", {}).get("inputs", {})
    sessions = workflow.get("sessions") or {}
    for job, where, ref in references(workflow):
        parts = ref.split(".")
        if parts[0] == "inputs":
            spec_items, spec = form, None
            for part in parts[1:]:
                if spec is not None and spec.get("type") == "compute-clusters":
                    break  # the resource's own attributes (ip, schedulerType, id, ...)
                if spec is not None:
                    if spec.get("type") != "group":
                        raise WorkflowError(f"{where}: {ref!r} goes into {part!r} of an input that is no group")
                    spec_items = spec["items"]
                if part not in spec_items:
                    raise WorkflowError(f"{where}: {ref!r} names no input")
                spec = spec_items[part]
        elif parts[0] == "needs":
            if len(parts) != 4 or parts[2] != "outputs":
                raise WorkflowError(f"{where}: {ref!r} is not needs.JOB.outputs.KEY")
            if job is None or parts[1] not in workflow["jobs"][job].get("needs", []):
                raise WorkflowError(f"{where}: {ref!r} names a job that {job} does not need")
        elif parts[0] == "sessions":
            if len(parts) != 2 or parts[1] not in sessions:
                raise WorkflowError(f"{where}: {ref!r} names no declared session")
        else:
            raise WorkflowError(f"{where}: {ref!r} is not something this runner resolves")


# --------------------------------------------------------------------------- running


@dataclass
class StepResult:
    name: str
    kind: str  # "steps" or "cleanup"
    status: str  # success, failure, cancelled
    returncode: int | None = None
    output: str = ""


@dataclass
class JobResult:
    status: str = "pending"  # pending, running, success, failure, cancelled, skipped
    outputs: dict[str, str] = field(default_factory=dict)
    steps: list[StepResult] = field(default_factory=list)
    started: float | None = None
    ended: float | None = None


class Run:
    """One run of a workflow: its inputs resolved, its jobs run, its results kept."""

    def __init__(self, workflow: dict, inputs: dict, run_dir: Path, env: dict | None = None,
                 run_name: str = "run"):
        check_workflow(workflow)
        check_references(workflow)
        self.workflow = workflow
        self.inputs = resolve_inputs(workflow.get("on", {}).get("execute", {}).get("inputs", {}), inputs)
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if any(self.run_dir.iterdir()):
            raise WorkflowError(f"the run dir {self.run_dir} is not empty")
        self.private = self.run_dir / ".runner"  # OUTPUTS files and step logs, not in any job's dir
        self.private.mkdir()
        self.base_env = dict(os.environ if env is None else env)
        self.sessions = {name: f"{run_name}-{name}" for name in (workflow.get("sessions") or {})}
        self.session_updates: list[dict] = []
        self.jobs = {name: JobResult() for name in workflow["jobs"]}
        self.lock = threading.Condition()
        self.job_failed = threading.Event()  # early-cancel: any-job-failed
        self.cancelled = threading.Event()  # the whole run is cancelled: every step ends, cleanups run
        self.processes: dict[int, subprocess.Popen] = {}  # the steps running now, by pid
        self.early_cancel: set[int] = set()  # which of them end when a job fails

    # --- references at run time

    def resolver(self, job: str | None):
        needs = set(self.workflow["jobs"][job].get("needs", [])) if job else set()

        def resolve(ref: str):
            parts = ref.split(".")
            if parts[0] == "inputs":
                return walk(self.inputs, ".".join(parts[1:]), "inputs")
            if parts[0] == "needs" and len(parts) == 4 and parts[2] == "outputs":
                if parts[1] not in needs:
                    raise WorkflowError(f"{ref}: job {job} does not need {parts[1]}")
                outputs = self.jobs[parts[1]].outputs
                if parts[3] not in outputs:
                    raise WorkflowError(f"{ref}: job {parts[1]} published no {parts[3]!r} (it has {sorted(outputs)})")
                return outputs[parts[3]]
            if parts[0] == "sessions" and len(parts) == 2 and parts[1] in self.sessions:
                return self.sessions[parts[1]]
            raise WorkflowError(f"cannot resolve {ref!r}")

        return resolve

    # --- scheduling

    def run(self) -> dict:
        jobs = self.workflow["jobs"]
        threads = []
        with self.lock:
            while True:
                for name in _job_order(jobs):
                    result = self.jobs[name]
                    if result.status != "pending":
                        continue
                    states = [self.jobs[n].status for n in jobs[name].get("needs", [])]
                    if any(s in ("failure", "cancelled", "skipped") for s in states) or self.cancelled.is_set():
                        result.status = "skipped"
                        self.lock.notify_all()
                    elif all(s == "success" for s in states):
                        result.status = "running"
                        thread = threading.Thread(target=self._run_job, args=(name,), daemon=True)
                        threads.append(thread)
                        thread.start()
                if all(r.status not in ("pending", "running") for r in self.jobs.values()):
                    break
                self.lock.wait(1)
        for thread in threads:
            thread.join()
        return self.result()

    def result(self) -> dict:
        failed = any(r.status in ("failure", "cancelled") for r in self.jobs.values())
        return {
            "status": "cancelled" if self.cancelled.is_set() else "failure" if failed else "success",
            "run_dir": str(self.run_dir),
            "jobs": {name: {"status": r.status, "outputs": r.outputs, "started": r.started, "ended": r.ended,
                            "steps": [vars(s) for s in r.steps]} for name, r in self.jobs.items()},
            "sessions": self.session_updates,
        }

    def cancel(self) -> None:
        """Cancel the run (the platform's Cancel): every step ends, the cleanups run."""
        self.cancelled.set()
        self.job_failed.set()
        for process in list(self.processes.values()):
            _terminate(process)

    def _run_job(self, name: str) -> None:
        job = self.workflow["jobs"][name]
        result = self.jobs[name]
        result.started = time.time()
        status = "success"
        try:
            condition = job.get("if")
            if condition is not None and not truthy(evaluate_flag(condition, self.resolver(name))):
                status = "skipped"
                return
            workdir = self.run_dir / name
            workdir.mkdir()
            outputs_file = self.private / f"{name}.outputs"
            outputs_file.touch()
            env = {**self.base_env,
                   **self._env(self.workflow.get("env"), None),
                   **self._env(job.get("env"), name),
                   "PW_PARENT_JOB_DIR": str(self.run_dir), "OUTPUTS": str(outputs_file)}
            for step in job["steps"]:
                if status != "success":
                    break
                step_result = self._run_step(name, step, "steps", env, workdir)
                result.outputs = _read_outputs(outputs_file)
                if step_result.status != "success" and not step.get("ignore-errors"):
                    status = "cancelled" if step_result.status == "cancelled" else "failure"
            for step in job.get("cleanup", []):
                step_result = self._run_step(name, step, "cleanup", env, workdir)
                result.outputs = _read_outputs(outputs_file)
                if step_result.status != "success" and status == "success":
                    status = "failure"
        except WorkflowError as exc:
            result.steps.append(StepResult(str(exc), "error", "failure", None, str(exc)))
            status = "failure"
        finally:
            with self.lock:
                result.status = status
                result.ended = time.time()
                if status == "failure":
                    self.job_failed.set()
                    for process_id, process in list(self.processes.items()):
                        if process_id in self.early_cancel:
                            _terminate(process)
                self.lock.notify_all()

    def _env(self, env: dict | None, job: str | None) -> dict:
        return {str(k): as_text(substitute(v, self.resolver(job))) for k, v in (env or {}).items()}

    def _run_step(self, job: str, step: dict, kind: str, env: dict, workdir: Path) -> StepResult:
        name = step.get("name") or step.get("uses") or "step"
        early_cancel = kind == "steps" and step.get("early-cancel") == "any-job-failed"
        if kind == "steps" and (self.cancelled.is_set() or (early_cancel and self.job_failed.is_set())):
            return self._record(job, StepResult(name, kind, "cancelled"))
        try:
            step_env = {**env, **self._env(step.get("env"), job)}
            if "uses" in step:
                inputs = {k: substitute(v, self.resolver(job)) for k, v in (step.get("with") or {}).items()}
                return self._record(job, self._action(job, name, kind, step["uses"], inputs, step_env, workdir))
            script = substitute(step["run"], self.resolver(job))
        except WorkflowError as exc:
            return self._record(job, StepResult(name, kind, "failure", None, f"{exc}\n"))
        log = self.private / f"{job}.{kind}.{len(self.jobs[job].steps)}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(["bash", "-c", script], env=step_env, cwd=workdir, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            with self.lock:
                self.processes[process.pid] = process
                if early_cancel:
                    self.early_cancel.add(process.pid)
                    if self.job_failed.is_set():
                        _terminate(process)
                if kind == "steps" and self.cancelled.is_set():
                    _terminate(process)
            returncode = process.wait()
            with self.lock:
                self.processes.pop(process.pid, None)
                self.early_cancel.discard(process.pid)
                ended_by_us = getattr(process, "terminated_by_runner", False)
        output = log.read_text(errors="replace")
        status = "cancelled" if ended_by_us else "success" if returncode == 0 else "failure"
        return self._record(job, StepResult(name, kind, status, returncode, output))

    def _record(self, job: str, step: StepResult) -> StepResult:
        with self.lock:
            self.jobs[job].steps.append(step)
        return step

    # --- actions

    def _action(self, job, name, kind, uses, inputs, env, workdir) -> StepResult:
        if uses == "parallelworks/checkout":
            argv = ["git", "clone", "--quiet"]
            if inputs.get("branch"):
                argv += ["--branch", as_text(inputs["branch"])]
            argv += ["--", as_text(inputs["repo"]), "."]
            cp = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
            return StepResult(name, kind, "success" if cp.returncode == 0 else "failure", cp.returncode,
                              f"$ {' '.join(argv)}\n{cp.stdout}{cp.stderr}")
        if uses == "parallelworks/update-session":
            return self._update_session(name, kind, inputs)
        raise WorkflowError(f"the action {uses!r} is not modelled here")  # check_workflow refused it already

    def _update_session(self, name, kind, inputs) -> StepResult:
        record = {"with": {k: as_text(v) for k, v in inputs.items()}, "recorded": time.time()}
        if record["with"]["name"] not in self.sessions.values():
            return self._session_failure(name, kind, record, f"{record['with']['name']!r} is no declared session")
        if record["with"]["target"] != USER_WORKSPACE:
            return self._session_failure(name, kind, record, "only the user workspace target is modelled "
                                         f"(the tunnel's far end is here), not {record['with']['target']!r}")
        host = record["with"].get("remoteHost") or "localhost"
        port = record["with"]["remotePort"]
        if not port.isdigit() or not 0 < int(port) < 65536:
            return self._session_failure(name, kind, record, f"remotePort {port!r} is not a port")
        url = f"http://{host}:{port}/{record['with'].get('slug', '').lstrip('/')}"
        deadline, error = time.monotonic() + SESSION_ANSWER_SECONDS, None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    record["probe"] = {"url": url, "status": response.status, "body": response.read(2000).decode(
                        "utf-8", "replace"), "at": time.time()}
                    break
            except urllib.error.HTTPError as exc:
                record["probe"] = {"url": url, "status": exc.code, "body": "", "at": time.time()}
                break
            except OSError as exc:
                error = exc
                time.sleep(1)
        else:
            return self._session_failure(name, kind, record, f"nothing answers at {url}: {error}")
        with self.lock:
            self.session_updates.append(record)
        return StepResult(name, kind, "success", 0, f"session {record['with']['name']} -> {url}: "
                          f"HTTP {record['probe']['status']}\n")

    def _session_failure(self, name, kind, record, why) -> StepResult:
        record["error"] = why
        with self.lock:
            self.session_updates.append(record)
        return StepResult(name, kind, "failure", None, f"update-session: {why}\n")


def _terminate(process: subprocess.Popen) -> None:
    """End a step's process group: SIGTERM, SIGKILL after a grace (in the background)."""
    if process.poll() is not None:
        return
    process.terminated_by_runner = True
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return

    def kill_later():
        try:
            process.wait(CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    threading.Thread(target=kill_later, daemon=True).start()


def _read_outputs(path: Path) -> dict[str, str]:
    outputs = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*", key):
            raise WorkflowError(f"{path.name}: {line!r} is not a KEY=VALUE line")
        outputs[key] = value
    return outputs


def run_workflow(workflow: dict | str | Path, inputs: dict, run_dir: Path, env: dict | None = None,
                 run_name: str = "run") -> dict:
    """Run a workflow (a dict, or the path of its YAML) to its end; the result as a dict."""
    if not isinstance(workflow, dict):
        workflow = yaml.safe_load(Path(workflow).read_text())
    return Run(workflow, inputs, run_dir, env, run_name).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path)
    parser.add_argument("--inputs", type=Path, help="JSON file of inputs over the form's defaults")
    parser.add_argument("--run-dir", type=Path, required=True, help="the run's directory (PW_PARENT_JOB_DIR); empty")
    parser.add_argument("--result", type=Path, help="write the run's result (jobs, steps, outputs, sessions) here")
    parser.add_argument("--name", default="run", help="the run's name (session names derive from it)")
    args = parser.parse_args(argv)
    inputs = json.loads(args.inputs.read_text()) if args.inputs else {}
    try:
        run = Run(yaml.safe_load(args.workflow.read_text()), inputs, args.run_dir, run_name=args.name)
    except WorkflowError as exc:
        print(f"workflow refused: {exc}", file=sys.stderr)
        return 2

    def write_result():
        if args.result:
            tmp = args.result.with_name(args.result.name + ".tmp")
            tmp.write_text(json.dumps(run.result(), indent=2) + "\n")
            tmp.replace(args.result)

    def on_signal(signum, frame):
        print(f"workflow runner: signal {signum}, cancelling the run", file=sys.stderr)
        run.cancel()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # the result file as it goes, so a test can follow the run (sessions, outputs)
    stop = threading.Event()

    def keep_writing():
        while not stop.wait(0.5):
            with run.lock:
                write_result()

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    result = run.run()
    stop.set()
    writer.join()
    write_result()
    for name, job in result["jobs"].items():
        print(f"{name}: {job['status']}")
        for step in job["steps"]:
            print(f"  [{step['kind']}] {step['name']}: {step['status']}")
    return 0 if result["status"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
