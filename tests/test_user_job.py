"""Submitting the user's job while the head's job agent is not yet reachable.

Ray's job head answers `500 No available agent to submit job, please try again later.`
when the head node's dashboard agent has not published its address within 10 s (seen on
the bed's shared, busy head node). That moment cannot be produced on demand on a real
head, so these tests put Ray's own JobSubmissionClient in front of a small HTTP server
that answers with the job head's exact status codes and texts."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.user_job import NO_AGENT_YET, submit_when_agent_ready

NO_AGENT = f"{NO_AGENT_YET}, please try again later."


class JobHead(ThreadingHTTPServer):
    """Answers /api/version like Ray 2.60, and POST /api/jobs/ with `answers` in turn
    (then 200). `lost_answer` records the job on the first POST but answers as if no agent
    were there, as when the agent took the job and its reply timed out."""

    def __init__(self, answers: list[tuple[int, str]], lost_answer: bool = False):
        self.answers, self.lost_answer, self.submitted, self.posts = list(answers), lost_answer, set(), 0
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: JobHead

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, body: str, content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(200, json.dumps({"ray_version": "2.60.0", "version": "2"}), "application/json")

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        head, submission_id = self.server, request["submission_id"]
        head.posts += 1
        if submission_id in head.submitted:
            return self._answer(400, f"Job with submission_id {submission_id} already exists.")
        if head.lost_answer and head.posts == 1:
            head.submitted.add(submission_id)
            return self._answer(500, NO_AGENT)
        if head.answers:
            return self._answer(*head.answers.pop(0))
        head.submitted.add(submission_id)
        self._answer(200, json.dumps({"submission_id": submission_id, "job_id": None}), "application/json")


@pytest.fixture
def client_for():
    heads: list[JobHead] = []

    def make(answers, lost_answer=False):
        from ray.job_submission import JobSubmissionClient

        heads.append(head := JobHead(answers, lost_answer))
        return head, JobSubmissionClient(head.url)

    yield make
    for head in heads:
        head.shutdown()
        head.server_close()


def test_a_job_is_submitted_once_the_agent_answers(client_for, caplog):
    head, client = client_for([(500, NO_AGENT), (500, NO_AGENT)])
    with caplog.at_level("INFO", logger="activate_ray"):
        assert submit_when_agent_ready(client, "c1-hello", entrypoint="python hello.py") == "c1-hello"
    assert head.posts == 3 and head.submitted == {"c1-hello"}
    assert [r.getMessage() for r in caplog.records] == [
        "the head's job agent is not up yet; submitting again for up to 120 s"]


def test_a_submission_whose_answer_was_lost_is_the_job_not_an_error(client_for):
    head, client = client_for([], lost_answer=True)
    assert submit_when_agent_ready(client, "c1-hello", entrypoint="python hello.py") == "c1-hello"
    assert head.posts == 2 and head.submitted == {"c1-hello"}


def test_an_existing_submission_id_on_the_first_try_is_still_an_error(client_for):
    head, client = client_for([])
    head.submitted.add("c1-hello")
    with pytest.raises(RuntimeError, match="already exists"):
        submit_when_agent_ready(client, "c1-hello", entrypoint="python hello.py")
    assert head.posts == 1


def test_any_other_refusal_is_raised_at_once(client_for):
    head, client = client_for([(400, "entrypoint_num_cpus must be a number")])
    with pytest.raises(RuntimeError, match="entrypoint_num_cpus"):
        submit_when_agent_ready(client, "c1-hello", entrypoint="python hello.py")
    assert head.posts == 1


def test_an_agent_that_never_comes_ends_in_rays_own_message(client_for):
    head, client = client_for([(500, NO_AGENT)] * 50)
    with pytest.raises(RuntimeError, match=NO_AGENT_YET):
        submit_when_agent_ready(client, "c1-hello", wait_s=1.0, entrypoint="python hello.py")
    assert 2 <= head.posts <= 3
