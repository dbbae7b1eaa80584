"""PBS (tasks/schedulers/pbs.py), no PBS needed: the #PBS directives and select statements,
every allowed extra directive, the launcher run for real with fake pbsdsh/ssh/pbs_attach,
OpenPBS `qstat -f -F json -x` and Torque/OpenPBS `qstat -f` text against fixtures in the
documented formats, job ids, state() and submission over a scripted transport."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.cluster import ClusterPlan
from tasks.schedulers import (
    PBS_JOB_ID_RE,
    JobPhase,
    PbsScheduler,
    SchedulerRejected,
    parse_qstat_json,
    parse_qstat_text,
)
from tasks.schedulers.pbs import PBS_ALLOWED, PBS_W_ALLOWED, qstat_text_fields
from tasks.transport import CommandResult
from tests.scheduler_helpers import (
    CLUSTER_DIR,
    CLUSTER_ID,
    FAKE_HOSTNAME,
    FAKE_PBS_ATTACH,
    FAKE_PBS_TMRSH,
    FAKE_PBSDSH,
    FAKE_SSH,
    FAKE_WORKER,
    FakeTransport,
    ScriptedTransport,
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
    pbs,
    read_lines,
    render,
    run_launch,
    settings,
)


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
    assert_well_formed_job_script(script, "#PBS", tmp_path)
    assert "#SBATCH" not in script


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
    assert_well_formed_job_script(script, "#PBS", tmp_path)


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
    assert PbsScheduler(settings(scheduler="pbs", pbs={"walltime": walltime}, walltime_margin=10)).walltime_seconds == seconds


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
    s, ours = assert_extra_directives_follow_ours("pbs", "#PBS", PBS_SAMPLE, tmp_path, nodes=3)
    # the flow's own node layout stays: its select and place=scatter are the only ones it wrote
    assert [l for l in ours if l.startswith("-l ")] == ["-l walltime=01:00:00", f"-l select={PbsScheduler(s).select()}",
                                                       "-l place=scatter"]


def test_pbs_launch_names_its_own_qdel_from_pbs_conf(tmp_path):
    """Inside an OpenPBS job its bin dir comes last on PATH: the cluster's own qdel is PBS_EXEC's."""
    body = launch_function(render(settings(scheduler="pbs")))
    (tmp_path / "pbs" / "bin").mkdir(parents=True)
    (tmp_path / "pbs" / "bin" / "qdel").write_text("#!/bin/sh\n")
    (tmp_path / "pbs" / "bin" / "qdel").chmod(0o755)
    conf = tmp_path / "pbs.conf"
    conf.write_text(f"PBS_SERVER=login\nPBS_EXEC={tmp_path / 'pbs'}\n")
    said = subprocess.run(["bash", "-c", body + "\nar_pbs_command qdel"], env={"PBS_CONF_FILE": str(conf), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=True).stdout
    assert said.strip() == str(tmp_path / "pbs" / "bin" / "qdel")
    # Torque (no pbs.conf): the qdel on PATH
    said = subprocess.run(["bash", "-c", body + "\nar_pbs_command qdel"], env={"PBS_CONF_FILE": str(tmp_path / "none"),
                          "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True).stdout
    assert said.strip() == "qdel"


def pbs_launch(tmp_path: Path, fakes: dict[str, str], worker: str = FAKE_WORKER
               ) -> tuple[subprocess.CompletedProcess, Path, Path]:
    cluster = tmp_path / "clusters" / CLUSTER_ID
    if not cluster.exists():
        cluster = cluster_dir_in(tmp_path)
    calls = tmp_path / "calls"
    calls.mkdir()
    (cluster / "bin" / "ray_worker.sh").write_text(worker)
    nodefile = tmp_path / "nodefile"
    # one line per mpiproc, fully qualified as some servers name their nodes
    nodefile.write_text("".join(f"{node}.cluster.example.org\n" for node in ("node1", "node2", "node3") for _ in range(4)))
    fake_bin = make_fake_bin(tmp_path, {"hostname": FAKE_HOSTNAME, **fakes})
    script = render(settings(scheduler="pbs", pbs={"nodes": 3}, num_cpus_per_node=4), str(cluster))
    env = {"AR_CLUSTER_DIR": str(cluster), "PBS_NODEFILE": str(nodefile), "PBS_JOBID": "123.pbs-server",
           "CALLS": str(calls), "AR_EXPECTED_NODES": "3"}
    return run_launch(script, tmp_path, fake_bin, env), calls, cluster


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


def test_pbs_launch_uses_pbs_tmrsh_on_openpbs(tmp_path):
    """OpenPBS/PBS Pro: one pbs_tmrsh task per other host (its pbsdsh has no -u and runs once per chunk)."""
    result, calls, cluster = pbs_launch(tmp_path, {"ssh": FAKE_SSH, "pbsdsh": FAKE_PBSDSH, "pbs_tmrsh": FAKE_PBS_TMRSH})
    assert result.returncode == 0, result.stderr
    tmrsh = read_lines(calls / "pbs_tmrsh")
    assert sorted(line.split("\t")[0] for line in tmrsh) == ["node2", "node3"], tmrsh
    assert read_lines(calls / "pbsdsh") == [] and read_lines(calls / "ssh") == []
    assert sorted(read_lines(calls / "workers")) == [f"node2 {cluster}", f"node3 {cluster}"]
    assert not (cluster / "status").exists()


def test_pbs_launch_uses_pbsdsh_u_on_torque(tmp_path):
    result, calls, cluster = pbs_launch(tmp_path, {"ssh": FAKE_SSH, "pbsdsh": FAKE_PBSDSH})
    assert result.returncode == 0, result.stderr
    pbsdsh_calls = read_lines(calls / "pbsdsh")
    assert len(pbsdsh_calls) == 1
    assert pbsdsh_calls[0].startswith("-u -- bash -c ")
    assert read_lines(calls / "ssh") == []
    # one task per distinct node; the head (node1, where `hostname -s` says we are) skips itself
    assert sorted(read_lines(calls / "workers")) == [f"node2 {cluster}", f"node3 {cluster}"]


FAILING_LAUNCHER = '''
case "$*" in *node3*) echo "{tool}: invalid option -- 'u'" >&2; exit 2 ;; esac
'''


@pytest.mark.parametrize("tool,fake", [("pbs_tmrsh", FAKE_PBS_TMRSH), ("pbsdsh", FAKE_PBSDSH), ("ssh", FAKE_SSH)])
def test_a_launcher_that_fails_says_so_in_the_status_with_its_own_words(tool, fake, tmp_path):
    """The launcher exits non-zero before the worker began: the status names it, the node and its words
    (the flow then fails at once, not at the readiness timeout, and does not retry)."""
    failing = FAILING_LAUNCHER.replace("*node3*", "*") if tool == "pbsdsh" else FAILING_LAUNCHER  # one launch for all
    result, calls, cluster = pbs_launch(tmp_path, {tool: failing.format(tool=tool) + fake})
    assert result.returncode == 0, result.stderr
    status = (cluster / "status").read_text()
    assert f"RAY_FAILED=launcher: {tool}" in status and "node3" in status, status
    assert "invalid option -- 'u'" in status
    if tool == "pbsdsh":  # one launch for every node: its failure is said for each
        assert "node2" in status, status
    else:
        assert "node2" not in status, status


def test_a_worker_that_fails_before_ray_is_not_called_a_launcher_failure(tmp_path):
    cluster = cluster_dir_in(tmp_path)
    result, calls, _ = pbs_launch(tmp_path, {"pbs_tmrsh": FAKE_PBS_TMRSH}, worker=(
        'echo "activate-ray: worker began on $(hostname -s)" >&2\n'
        '[ "$(hostname -s)" != node2 ] || { echo "setup failed here" >&2; exit 1; }\n' + FAKE_WORKER))
    status = (tmp_path / "clusters" / cluster.name / "status").read_text()
    assert "RAY_FAILED=worker on node2 exited 1 before Ray started: setup failed here" in status, status
    assert "launcher" not in status


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
    assert state.detail.endswith(": killed by signal 15, Exit_status 271")
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


@pytest.mark.parametrize(
    "name,phase,detail",
    [
        ("pbs/qstat_f_torque_running.txt", JobPhase.running, "job_state = R"),
        ("pbs/qstat_f_torque_completed.txt", JobPhase.ended, "job_state = C"),
        ("pbs/qstat_f_openpbs_queued.txt", JobPhase.pending,
         "job_state = Q, Not Running: Insufficient amount of resource: ncpus (R: 32 A: 12 T: 12)"),
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


@pytest.mark.parametrize("job_id", ["123.pbs-server", "123", "123[].server", "123[7].server",
                                    "4567.pbs.example.org", "42.torque_server-1"])
def test_pbs_job_id_accepted(job_id):
    assert PBS_JOB_ID_RE.match(job_id)


@pytest.mark.parametrize("job_id", ["123; rm -rf", "123; rm -rf ~", "", "abc", "123 456", "$(id)", "-1",
                                    "123.server;id", "123.ser ver", "123.`id`", ".server", "123[x].server"])
def test_pbs_job_id_rejected(job_id):
    assert not PBS_JOB_ID_RE.match(job_id)


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
    target = FakeTransport([("cd /home/alice/c && if qstat --version", CommandResult(rc, stdout, ""))])
    with pytest.raises(SchedulerRejected):
        asyncio.run(pbs().submit(target, "/home/alice/c"))


@pytest.mark.parametrize("stdout", ["123.pbs-server\n", "123\n", "123[].pbs-server\n"])
def test_pbs_submit_returns_job_id(stdout):
    target = FakeTransport([("cd /home/alice/c && if qstat --version", ok(stdout))])
    assert asyncio.run(pbs().submit(target, "/home/alice/c")) == stdout.strip()
    # -f on OpenPBS (no background qsub left on the login host); Torque's wrappers refuse -f
    assert target.commands == ["cd /home/alice/c && if qstat --version 2>/dev/null | grep -q '^pbs_version'; "
                               "then qsub -f bin/job.sh; else qsub bin/job.sh; fi"]


def test_pbs_submit_not_retried_where_qselect_cannot_tell(no_backoff):
    target = ScriptedTransport([("cd /home/alice/c && if qstat --version", failed(1, "qsub: cannot connect to server pbs1\n")),
                                ("command -v qselect", failed(3))])
    with pytest.raises(SchedulerRejected, match="not submitting again"):
        asyncio.run(pbs().submit(target, "/home/alice/c"))


@pytest.mark.parametrize("exit_status,substate,comment,words", [
    (0, 92, "Job run at ... and finished", "exit code 0"),
    (1, 92, "Job run at ... and finished", "exit code 1"),
    (137, 92, "Job run at ... and failed", "exit code 137 (128 + SIGKILL: the job script was killed)"),
    (271, 91, "Job run at ... and terminated by aruser@login", "deleted (qdel), Exit_status 271"),
    # the job's shell exited 128+15 itself before the MoM's kill: still a deletion, by substate
    (143, 91, "Job run at ... and finished", "deleted (qdel), Exit_status 143"),
    (265, 92, "Job run at ... and finished", "killed by signal 9, Exit_status 265"),
    (-29, 93, "Job run at ... and exceeded resource walltime", "walltime exceeded: PBS killed the job"),
    (-27, 93, "", "memory limit"),
    (-99, 92, "", "PBS ended the job, Exit_status -99"),
    (None, 91, "terminated by aruser@login", "deleted (qdel)"),
])
def test_how_a_pbs_job_ended_in_words(exit_status, substate, comment, words):
    from tasks.schedulers.pbs import describe_pbs_end

    assert words in describe_pbs_end(exit_status, substate, comment)


def test_qstat_text_joins_openpbs_wrapped_lines():
    """OpenPBS wraps long values (many nodes, long names) onto tab-led continuation lines."""
    from tasks.schedulers.pbs import exec_host_names, qstat_text_fields

    hosts = [f"compute-node-{i:04d}.hsn.cm.example.org" for i in range(1, 9)]
    exec_host = "+".join(f"{h}/0*2" for h in hosts)
    wrapped = [exec_host[i:i + 70] for i in range(0, len(exec_host), 70)]
    text = ("Job Id: 12.login.example.org\n    job_state = R\n    exec_host = " + wrapped[0] + "\n"
            + "".join(f"\t{part}\n" for part in wrapped[1:]) + "    substate = 42\n")
    fields = qstat_text_fields(text)
    assert fields["exec_host"] == exec_host and fields["substate"] == "42"
    assert exec_host_names(fields["exec_host"]) == hosts


def test_openpbs_can_never_run_is_hopeless():
    state = parse_qstat_text("Job Id: 7.login\n    job_state = Q\n    comment = Can Never Run: Insufficient amount of"
                             " queue resource: ncpus (R: 64 A: 6 T: 6)\n")
    assert state.phase is JobPhase.pending and state.hopeless


def test_launcher_and_node_check_failures_are_not_retried_but_a_nodes_missing_address_is():
    from tasks.readiness import _mendable

    assert not _mendable("RAY_FAILED=launcher: pbsdsh -u exited 1 before the worker on node2 began: invalid option\n")
    assert _mendable("RAY_FAILED=network_interface: node3: no address in 10.0.0.0/8\n")
    # a node's own check names an input to change: the same inputs would fail it again
    assert not _mendable("RAY_FAILED=node check on node2: open files: ulimit -n is 256 on node2: ...; fix: x\n")


def test_qstat_text_of_slurms_torque_wrappers_indents_with_tabs():
    """Slurm's qstat wrapper prints "\\tname = value" lines: attributes, not continuations."""
    text = ("Job Id:\t2\n\tJob_Name = ar-e240510a\n\tJob_Owner = aruser@login\n\tjob_state = R\n"
            "\tqueue = debug\n\texec_host = node1/0+node2/0+node3/0\n")
    fields = qstat_text_fields(text)
    assert fields["job_state"] == "R" and fields["Job_Name"] == "ar-e240510a", fields
    assert parse_qstat_text(text).phase is JobPhase.running


def test_a_walltime_given_on_the_command_line_goes_to_openpbs_and_torque_alike():
    from tasks.schedulers.pbs import PbsScheduler
    from tasks.settings import RayClusterSettings

    scheduler = PbsScheduler(RayClusterSettings(scheduler="pbs"))
    command = scheduler.submit_command("/w/clusters/ar-x", "bin/worker_job.sh", walltime=3725)
    assert command.count("qsub -f -l walltime=1:02:05 bin/worker_job.sh") == 1, command
    assert command.count("qsub -l walltime=1:02:05 bin/worker_job.sh") == 1, command
    assert "walltime" not in scheduler.submit_command("/w/clusters/ar-x", "bin/worker_job.sh")
    assert scheduler.worker_walltime_seconds == 3600
