"""tests/workflow_runner.py on small synthetic workflows: what it runs, in which order,
what it refuses. (workflow.yaml itself: tests/test_workflow_yaml.py; end to end on
the bed: tests/test_workflow_run.py.)"""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.workflow_runner import Run, WorkflowError, resolve_inputs, run_workflow

pytestmark = pytest.mark.timeout(120)


def statuses(result: dict) -> dict[str, str]:
    return {name: job["status"] for name, job in result["jobs"].items()}


def outputs_of(result: dict, job: str, kind: str = "steps") -> list[str]:
    return [s["output"] for s in result["jobs"][job]["steps"] if s["kind"] == kind]


@pytest.fixture
def http_server():
    """A real HTTP server on loopback: what update-session's target must answer like."""

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<title>hello dashboard</title>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- order, outputs, env


def test_jobs_run_in_needs_order_and_outputs_flow_to_the_jobs_that_need_them(tmp_path):
    workflow = {"jobs": {
        "second": {"needs": ["first"], "env": {"GOT": "${{ needs.first.outputs.word }}-${{ inputs.n }}"},
                   "steps": [{"run": 'echo "twice=$GOT$GOT" >> "$OUTPUTS"'}]},
        "first": {"steps": [{"run": 'echo "word=hi" >> "$OUTPUTS"; echo "ignored line has no equals" > /dev/null'},
                            {"run": 'echo "more=yes" >> "$OUTPUTS"'}]},
    }, "on": {"execute": {"inputs": {"n": {"type": "number", "default": 4}}}}}
    result = run_workflow(workflow, {}, tmp_path / "run")
    assert result["status"] == "success"
    assert result["jobs"]["first"]["outputs"] == {"word": "hi", "more": "yes"}
    assert result["jobs"]["second"]["outputs"] == {"twice": "hi-4hi-4"}
    assert result["jobs"]["first"]["ended"] <= result["jobs"]["second"]["started"]


def test_jobs_without_mutual_needs_run_at_the_same_time(tmp_path):
    """Each waits for a file the other writes: only together can both succeed (as
    connection_info runs next to ray_cluster)."""
    wait_for = 'for _ in $(seq 100); do [ -e "$PW_PARENT_JOB_DIR/{0}" ] && exit 0; sleep 0.1; done; exit 1'
    workflow = {"jobs": {
        "left": {"steps": [{"run": 'touch "$PW_PARENT_JOB_DIR/left"; ' + wait_for.format("right")}]},
        "right": {"steps": [{"run": 'touch "$PW_PARENT_JOB_DIR/right"; ' + wait_for.format("left")}]},
    }}
    assert statuses(run_workflow(workflow, {}, tmp_path / "run")) == {"left": "success", "right": "success"}


def test_each_job_has_its_own_dir_and_shares_the_run_dir(tmp_path):
    workflow = {"env": {"LEVEL": "workflow"}, "jobs": {"one": {"env": {"JOB": "one"}, "steps": [
        {"env": {"STEP": "s"}, "run": 'echo "$PWD|$PW_PARENT_JOB_DIR|$LEVEL|$JOB|$STEP" > "$PW_PARENT_JOB_DIR/seen"'}]}}}
    run_workflow(workflow, {}, tmp_path / "run")
    run_dir = (tmp_path / "run").resolve()
    assert (run_dir / "seen").read_text().strip() == f"{run_dir / 'one'}|{run_dir}|workflow|one|s"


# --------------------------------------------------------------------------- failure, cleanup, early-cancel


def test_cleanup_runs_after_a_failed_step_and_the_jobs_that_need_it_do_not_run(tmp_path):
    workflow = {"jobs": {
        "main": {"steps": [{"run": "echo working; exit 3"}, {"run": "touch \"$PW_PARENT_JOB_DIR/after\""}],
                 "cleanup": [{"name": "tidy", "run": "echo tidy ran"}]},
        "later": {"needs": ["main"], "steps": [{"run": "touch \"$PW_PARENT_JOB_DIR/later\""}]},
    }}
    result = run_workflow(workflow, {}, tmp_path / "run")
    assert result["status"] == "failure"
    assert statuses(result) == {"main": "failure", "later": "skipped"}
    steps = result["jobs"]["main"]["steps"]
    assert [(s["kind"], s["status"], s["returncode"]) for s in steps] == [("steps", "failure", 3), ("cleanup", "success", 0)]
    assert steps[1]["output"] == "tidy ran\n"
    assert not (tmp_path / "run" / "after").exists() and not (tmp_path / "run" / "later").exists()


def test_cleanup_runs_after_success_too_and_a_failing_cleanup_fails_the_job(tmp_path):
    workflow = {"jobs": {"main": {"steps": [{"run": "true"}], "cleanup": [{"run": "echo bad; exit 1"}]}}}
    result = run_workflow(workflow, {}, tmp_path / "run")
    assert statuses(result) == {"main": "failure"}
    assert outputs_of(result, "main", "cleanup") == ["bad\n"]


def test_early_cancel_ends_a_waiting_step_when_another_job_fails(tmp_path):
    workflow = {"jobs": {
        "waiter": {"steps": [{"early-cancel": "any-job-failed", "run": "sleep 60"}],
                   "cleanup": [{"run": "echo waiter cleaned"}]},
        "patient": {"steps": [{"run": "sleep 2; echo still here"}]},
        "breaks": {"steps": [{"run": "sleep 0.5; exit 1"}]},
    }}
    start = time.monotonic()
    result = run_workflow(workflow, {}, tmp_path / "run")
    assert time.monotonic() - start < 30
    assert statuses(result) == {"waiter": "cancelled", "patient": "success", "breaks": "failure"}
    assert outputs_of(result, "waiter", "cleanup") == ["waiter cleaned\n"]
    assert outputs_of(result, "patient") == ["still here\n"]


def test_ignore_errors_lets_the_job_go_on(tmp_path):
    workflow = {"jobs": {"main": {"steps": [{"ignore-errors": True, "run": "exit 4"}, {"run": "echo next"}]}}}
    result = run_workflow(workflow, {}, tmp_path / "run")
    assert statuses(result) == {"main": "success"} and outputs_of(result, "main")[1] == "next\n"


def test_a_cancelled_run_ends_its_steps_and_still_runs_the_cleanups(tmp_path):
    workflow = {"jobs": {"main": {"steps": [{"run": "trap 'echo got TERM; exit 143' TERM; sleep 60 & wait"}],
                                  "cleanup": [{"run": "echo cleaned after cancel"}]},
                         "never": {"needs": ["main"], "steps": [{"run": "true"}]}}}
    run = Run(workflow, {}, tmp_path / "run")
    thread = threading.Thread(target=run.run)
    thread.start()
    time.sleep(1)
    run.cancel()
    thread.join(40)
    result = run.result()
    assert result["status"] == "cancelled"
    assert statuses(result) == {"main": "cancelled", "never": "skipped"}
    assert "got TERM" in outputs_of(result, "main")[0]
    assert outputs_of(result, "main", "cleanup") == ["cleaned after cancel\n"]


def test_a_job_if_false_skips_it_and_its_dependents(tmp_path):
    workflow = {"jobs": {
        "probe": {"steps": [{"run": 'echo "port=" >> "$OUTPUTS"'}]},
        "session": {"needs": ["probe"], "if": "${{ needs.probe.outputs.port != '' }}", "steps": [{"run": "exit 1"}]},
        "after": {"needs": ["session"], "steps": [{"run": "exit 1"}]},
    }}
    result = run_workflow(workflow, {}, tmp_path / "run")
    assert result["status"] == "success"
    assert statuses(result) == {"probe": "success", "session": "skipped", "after": "skipped"}


# --------------------------------------------------------------------------- strictness


@pytest.mark.parametrize(("workflow", "message"), [
    ({"jobs": {"a": {"steps": [{"uses": "parallelworks/nothing"}]}}}, "not modelled"),
    ({"jobs": {"a": {"steps": [{"uses": "marketplace/job_runner/v4.0", "with": {}}]}}}, "not modelled"),
    ({"jobs": {"a": {"ssh": {"remoteHost": "x"}, "steps": [{"run": "true"}]}}}, "ssh"),
    ({"jobs": {"a": {"steps": [{"run": "true", "retry": {"max-retries": 2}}]}}}, "retry"),
    ({"jobs": {"a": {"steps": [{"run": "true", "uses": "parallelworks/checkout"}]}}}, "exactly one"),
    ({"jobs": {"a": {"steps": [{"run": "true", "early-cancel": "always"}]}}}, "any-job-failed"),
    ({"jobs": {"a": {"needs": ["b"], "steps": [{"run": "true"}]}}}, "no job"),
    ({"jobs": {"a": {"needs": ["b"], "steps": [{"run": "true"}]}, "b": {"needs": ["a"], "steps": [{"run": "true"}]}}},
     "cycle"),
    ({"jobs": {"a": {"env": {"X": "${{ inputs.nope }}"}, "steps": [{"run": "true"}]}}}, "names no input"),
    ({"jobs": {"a": {"steps": [{"run": "echo ${{ needs.b.outputs.x }}"}]}, "b": {"steps": [{"run": "true"}]}}},
     "does not need"),
    ({"jobs": {"a": {"steps": [{"run": "echo ${{ sessions.web }}"}]}}}, "no declared session"),
    ({"jobs": {"a": {"steps": [{"run": "echo ${{ github.sha }}"}]}}}, "not something"),
    ({"jobs": {"a": {"steps": [{"run": "echo ${{ inputs.x == }}"}]}}}, "ends too early"),
    ({"jobs": {"a": {"steps": [{"uses": "parallelworks/update-session", "with": {
        "name": "x", "target": "user-workspace", "remotePort": "1", "remote_port": "1"}}]}}}, "unknown ['remote_port']"),
    ({"jobs": {"a": {"steps": [{"uses": "parallelworks/checkout", "with": {"branch": "main"}}]}}}, "missing ['repo']"),
])
def test_what_is_not_modelled_is_refused_before_anything_runs(tmp_path, workflow, message):
    workflow.setdefault("on", {"execute": {"inputs": {"x": {"type": "string", "default": ""}}}})
    with pytest.raises(WorkflowError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_workflow(workflow, {}, tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_an_output_that_was_never_published_fails_the_step_that_reads_it(tmp_path):
    workflow = {"jobs": {"a": {"steps": [{"run": "true"}]},
                         "b": {"needs": ["a"], "steps": [{"run": "echo ${{ needs.a.outputs.missing }}"}]}}}
    result = run_workflow(workflow, {}, tmp_path / "run")
    assert statuses(result) == {"a": "success", "b": "failure"}
    assert "published no 'missing'" in outputs_of(result, "b")[0]


def test_a_malformed_outputs_line_fails_the_job(tmp_path):
    workflow = {"jobs": {"a": {"steps": [{"run": 'echo "no equals sign" >> "$OUTPUTS"'}]}}}
    result = run_workflow(workflow, {}, tmp_path / "run")
    assert statuses(result) == {"a": "failure"}
    assert "not a KEY=VALUE line" in result["jobs"]["a"]["steps"][-1]["output"]


# --------------------------------------------------------------------------- inputs and the form's expressions


FORM = {
    "resource": {"type": "compute-clusters"},
    "scheduler": {"type": "boolean", "default": True,
                  "hidden": "${{ inputs.resource.schedulerType != 'slurm' && inputs.resource.schedulerType != 'pbs' }}",
                  "ignore": "${{ .hidden }}"},
    "slurm": {"type": "group", "items": {
        "walltime": {"type": "string", "default": "01:00:00",
                     "ignore": "${{ inputs.resource.schedulerType != 'slurm' || inputs.scheduler != true }}"}}},
    "workers": {"type": "number", "default": 0,
                "ignore": "${{ inputs.scheduler == true && (inputs.resource.schedulerType == 'slurm') }}"},
    "negated": {"type": "string", "default": "shown", "ignore": "${{ !(inputs.scheduler == true) }}"},
    "note": {"type": "string", "optional": True},
}


@pytest.mark.parametrize(("scheduler_type", "given", "expected"), [
    ("slurm", {}, {"scheduler": True, "slurm": {"walltime": "01:00:00"}, "workers": None, "negated": "shown"}),
    ("slurm", {"scheduler": False}, {"scheduler": False, "slurm": {"walltime": None}, "workers": 0, "negated": None}),
    ("pbs", {"slurm": {"walltime": "02:00:00"}}, {"scheduler": True, "slurm": {"walltime": None}, "workers": 0,
                                                    "negated": "shown"}),
    # the form's expressions see the values as entered: `ignore` leaves a value out of the run only
    ("", {}, {"scheduler": None, "slurm": {"walltime": None}, "workers": 0, "negated": "shown"}),
])
def test_inputs_are_the_defaults_with_the_given_values_and_ignored_ones_left_out(scheduler_type, given, expected):
    resource = {"ip": "login", "schedulerType": scheduler_type}
    resolved = resolve_inputs(FORM, {"resource": resource, **given})
    assert resolved == {"resource": resource, "note": None, **expected}


@pytest.mark.parametrize(("given", "message"), [
    ({}, "input resource is required"),
    ({"resource": {"ip": "x"}, "nope": 1}, "not in the form"),
    ({"resource": {"ip": "x"}, "workers": "two"}, "is a number"),
    ({"resource": {"ip": "x"}, "scheduler": "yes"}, "is a boolean"),
    ({"resource": "login"}, "is a resource"),
])
def test_bad_inputs_are_refused(given, message):
    with pytest.raises(WorkflowError, match=message):
        resolve_inputs(FORM, given)


# --------------------------------------------------------------------------- the actions


def test_checkout_clones_the_given_branch_into_the_job_dir(tmp_path):
    source = tmp_path / "source"
    git = ["git", "-C", str(source), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(source)], check=True)
    (source / "marker").write_text("main\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "main"], check=True)
    subprocess.run([*git, "checkout", "-q", "-b", "feature"], check=True)
    (source / "marker").write_text("feature\n")
    subprocess.run([*git, "commit", "-q", "-am", "feature"], check=True)
    workflow = {"jobs": {"setup": {"steps": [
        {"uses": "parallelworks/checkout", "with": {"repo": "${{ inputs.repo }}", "branch": "${{ inputs.branch }}"}},
        {"run": 'echo "marker=$(cat marker)" >> "$OUTPUTS"'}]}},
        "on": {"execute": {"inputs": {"repo": {"type": "string"}, "branch": {"type": "string", "default": "main"}}}}}
    for branch in ("main", "feature"):
        result = run_workflow(workflow, {"repo": str(source), "branch": branch}, tmp_path / f"run-{branch}")
        assert result["jobs"]["setup"]["outputs"] == {"marker": branch}
    result = run_workflow(workflow, {"repo": str(source), "branch": "nope"}, tmp_path / "run-nope")
    assert statuses(result) == {"setup": "failure"}


def session_workflow(port: str, target: str = "user-workspace") -> dict:
    return {"sessions": {"web": {"redirect": True}}, "jobs": {
        "probe": {"steps": [{"run": f'echo "port={port}" >> "$OUTPUTS"'}]},
        "session": {"needs": ["probe"], "steps": [{"uses": "parallelworks/update-session", "with": {
            "name": "${{ sessions.web }}", "target": target, "remoteHost": "127.0.0.1",
            "remotePort": "${{ needs.probe.outputs.port }}", "status": "running"}}]}}}


def test_update_session_records_its_inputs_and_the_target_answers(tmp_path, http_server):
    result = run_workflow(session_workflow(str(http_server)), {}, tmp_path / "run", run_name="r1")
    assert statuses(result) == {"probe": "success", "session": "success"}
    (session,) = result["sessions"]
    assert session["with"] == {"name": "r1-web", "target": "user-workspace", "remoteHost": "127.0.0.1",
                               "remotePort": str(http_server), "status": "running"}
    assert session["probe"]["status"] == 200 and "hello dashboard" in session["probe"]["body"]


def test_update_session_fails_when_nothing_answers_or_the_target_is_elsewhere(tmp_path, http_server, monkeypatch):
    import socket

    import tests.workflow_runner as runner

    monkeypatch.setattr(runner, "SESSION_ANSWER_SECONDS", 2)  # not 30 s of a test's time for a port nobody opens

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    result = run_workflow(session_workflow(str(closed)), {}, tmp_path / "run")
    assert statuses(result)["session"] == "failure"
    assert "nothing answers" in result["sessions"][0]["error"]
    result = run_workflow(session_workflow(str(http_server), target="some-cluster-id"), {}, tmp_path / "run2")
    assert statuses(result)["session"] == "failure" and "only the user workspace" in result["sessions"][0]["error"]


def test_a_run_dir_that_is_not_empty_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old").touch()
    with pytest.raises(WorkflowError, match="not empty"):
        run_workflow({"jobs": {"a": {"steps": [{"run": "true"}]}}}, {}, tmp_path / "run")


def test_the_command_line_writes_the_result_and_exits_with_the_runs_status(tmp_path):
    import json
    import sys

    workflow = tmp_path / "wf.yaml"
    workflow.write_text("jobs:\n  a:\n    steps:\n      - run: echo \"x=${{ inputs.word }}\" >> \"$OUTPUTS\"\n"
                        "'on':\n  execute:\n    inputs:\n      word:\n        type: string\n        default: hi\n")
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"word": "there"}))
    runner = Path(__file__).with_name("workflow_runner.py")
    cp = subprocess.run([sys.executable, str(runner), str(workflow), "--inputs", str(inputs), "--run-dir",
                         str(tmp_path / "run"), "--result", str(tmp_path / "result.json")], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    assert json.loads((tmp_path / "result.json").read_text())["jobs"]["a"]["outputs"] == {"x": "there"}
    workflow.write_text("jobs:\n  a:\n    steps:\n      - uses: someone/else\n")
    cp = subprocess.run([sys.executable, str(runner), str(workflow), "--run-dir", str(tmp_path / "run2")],
                        capture_output=True, text=True)
    assert cp.returncode == 2 and "not modelled" in cp.stderr
