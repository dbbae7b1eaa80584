"""The benchmark's report: the headline figures (summarize), the plot, BENCHMARKS.md, and the
summary printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from bench.common import (
    HOLD_S,
    REPO,
    log,
    median,
)

TARGETS = {
    "local_ratio": 1.15,
    "vs_template": 0.5,  # only where the template's sleeps cover Ray's own start on the bed
    "vs_bare": 1.1,
    "teardown_s": 10.0,
    "setup_s": 1.0,
    "scaling": 1.3,
    "cold_ratio": 0.25,  # cold venv build: uv / pip
    "queued": 1.1,  # cold first run on a queued job / (max(build, queue) + start)
    "main_job": 1.1,  # flow with a user script / bare `ray start --head` + `ray job submit` + stop
    "main_job_default": 1.15,  # the same, no PREFECT_API_URL, a user's second run (issue 32)
}


def fmt(value, unit="s", digits=2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def verdict(value, target) -> str:
    if value is None:
        return "n/a"
    return "pass" if value <= target else "**miss**"


def summarize(results: dict) -> dict:
    """The headline figures (medians)."""
    s: dict = {}
    ok = lambda runs: [r for r in runs if r.get("ok")]  # noqa: E731
    floors = ok(results.get("local_floor", []))
    local = ok(results.get("local_flow", []))
    eph = ok(results.get("local_ephemeral", []))
    s["floor"] = median([r["ready_s"] for r in floors])
    s["floor_plain"] = median([r.get("ready_s") for r in ok(results.get("local_floor_plain", []))])
    s["local_ready"] = median([r["ready_s"] for r in local])
    s["local_ready_begin"] = median([r["ready_from_begin_s"] for r in local])
    s["local_begin"] = median([r["begin_s"] for r in local])
    s["local_teardown"] = median([r["teardown_s"] for r in local])
    s["local_exit"] = median([r["exit_s"] for r in local])
    s["floor_ray_ready"] = median([r.get("ray_ready_s") for r in floors])
    s["local_ray_ready"] = median([r.get("ray_ready_s") for r in local])
    s["local_lag"] = median([r.get("detect_lag_s") for r in local])
    s["busy_before"] = median([r.get("busy_before") for key in ("local_floor", "local_flow", "local_ephemeral", "slurm")
                               for r in results.get(key, [])])
    s["eph_ready"] = median([r["ready_s"] for r in eph])
    s["eph_ready_begin"] = median([r["ready_from_begin_s"] for r in eph])
    s["eph_begin"] = median([r["begin_s"] for r in eph])
    if s["floor"]:
        s["local_ratio_begin"] = s["local_ready_begin"] and s["local_ready_begin"] / s["floor"]
        s["local_ratio_process"] = s["local_ready"] and s["local_ready"] / s["floor"]
        s["eph_ratio_begin"] = s["eph_ready_begin"] and s["eph_ready_begin"] / s["floor"]
        s["eph_ratio_process"] = s["eph_ready"] and s["eph_ready"] / s["floor"]
    s["server_start"] = results.get("server_start_s")
    s["local_hwm"] = max((r["hwm_mb"] for r in local), default=None)
    s["eph_tree"] = max((r["tree_mb"] for r in eph), default=None)
    s["eph_hwm"] = max((r["hwm_mb"] for r in eph), default=None)
    setup = results.get("setup")
    if setup:
        s["setup"] = median(setup["times_s"])
        s["setup_no_pip"] = setup["reused"] and not setup["pip_calls"] and not setup["venv_created"]
    slurm = ok(results.get("slurm", []))
    by: dict = {}
    for r in slurm:
        by.setdefault((r["method"], r["nodes"]), []).append(r)
    s["by"] = by
    table = {}
    for (method, nodes), runs in by.items():
        table[(method, nodes)] = {
            "ready": median([r["ready_s"] for r in runs]),
            "ready_min": min(r["ready_s"] for r in runs),
            "ready_max": max(r["ready_s"] for r in runs),
            "begin": median([r.get("ready_from_begin_s") for r in runs]),
            "all_alive": median([r.get("all_alive_s") for r in runs]),
            "ray_ready": median([r.get("ray_ready_s") for r in runs]),
            "lag": median([r.get("detect_lag_s") for r in runs]),
            "teardown": median([r.get("teardown_s") for r in runs]),
            "exit": median([r.get("exit_s") for r in runs]),
            "hwm": max((r.get("hwm_mb") or 0 for r in runs), default=0),
            "n": len(runs),
        }
    s["table"] = table
    node_counts = sorted({n for _, n in table})
    s["node_counts"] = node_counts
    top = max(node_counts) if node_counts else None
    s["top"] = top
    get = lambda m, n, k="ready": table.get((m, n), {}).get(k)  # noqa: E731
    if top:
        flow, tmpl, bare = get("flow", top), get("template", top), get("bare", top)
        s["vs_template"] = flow / tmpl if flow and tmpl else None
        s["vs_bare"] = flow / bare if flow and bare else None
        s["slurm_teardown"] = get("flow", top, "teardown")
        s["slurm_teardown_max"] = max((r.get("teardown_s") or 0 for r in by.get(("flow", top), [])), default=None)
        low = min(node_counts)
        if low != top and get("flow", low):
            s["scaling"] = get("flow", top) / get("flow", low)
            s["scaling_bare"] = get("bare", top) / get("bare", low) if get("bare", low) and get("bare", top) else None
            ray_low, ray_top = get("bare", low, "ray_ready"), get("bare", top, "ray_ready")
            s["scaling_ray"] = ray_top / ray_low if ray_low and ray_top else None
    s["slurm_hwm"] = max((r.get("hwm_mb") or 0 for r in slurm if r["method"] == "flow"), default=None)
    # the template's sleeps cover Ray's own start when all its nodes are ALIVE by its ready line
    s["template_covers"] = {n: (t["all_alive"] is not None and t["ready"] is not None and t["all_alive"] <= t["ready"])
                            for (m, n), t in table.items() if m == "template"}
    if top:
        # A target against the template is one on this project only where Ray's own parallel
        # start (b) meets it: else the template's sleeps are shorter than Ray's start plus
        # the target's margin, and no launcher could meet it (issue 17: compare with (b)).
        bare_top, template_top = get("bare", top), get("template", top)
        s["bare_vs_template"] = bare_top / template_top if bare_top and template_top else None
        s["template_target"] = bool(s["template_covers"].get(top) and s["bare_vs_template"]
                                    and s["bare_vs_template"] <= TARGETS["vs_template"])
    cold = ok(results.get("cold", []))
    s["cold_uv"] = median([r["time_s"] for r in cold if r["tool"] == "uv"])
    s["cold_pip"] = median([r["time_s"] for r in cold if r["tool"] == "pip"])
    s["cold_n"] = {tool: sum(1 for r in cold if r["tool"] == tool) for tool in ("uv", "pip")}
    s["cold_ratio"] = s["cold_uv"] / s["cold_pip"] if s["cold_uv"] and s["cold_pip"] else None
    s["job_bare"] = median([r["total_s"] for r in ok(results.get("job_bare", []))])
    s["job_bare_head"] = median([r["head_s"] for r in ok(results.get("job_bare", []))])
    s["job_flow"] = median([r["total_s"] for r in ok(results.get("job_flow", []))])
    s["job_flow_begin"] = median([r.get("begin_s") for r in ok(results.get("job_flow", []))])
    s["job_eph"] = median([r["total_s"] for r in ok(results.get("job_ephemeral", []))])
    s["job_eph_begin"] = median([r.get("begin_s") for r in ok(results.get("job_ephemeral", []))])
    s["job_default"] = median([r["total_s"] for r in ok(results.get("job_default", []))])
    if s["job_bare"]:
        s["job_ratio"] = s["job_flow"] / s["job_bare"] if s["job_flow"] else None
        s["job_eph_ratio"] = s["job_eph"] / s["job_bare"] if s["job_eph"] else None
        s["job_default_ratio"] = s["job_default"] / s["job_bare"] if s["job_default"] else None
    scale = ok(results.get("slurm_scale", []))
    if scale:
        bare_one = get("bare", 1)
        s["scale"] = {"add": median(scale[0]["add_s"]), "add_wall": median(scale[0]["add_wall_s"]),
                      "remove": median(scale[0]["remove_s"]), "demand": median(scale[0]["demand_to_submit_s"]),
                      "n": len(scale[0]["add_s"]), "bare_one": bare_one}
        s["scale"]["vs_bare"] = s["scale"]["add"] / bare_one if bare_one and s["scale"]["add"] else None
    queued = ok(results.get("slurm_queued", []))
    if queued:
        q = queued[0]
        start = get("flow", q["nodes"])
        s["queued"] = {
            "nodes": q["nodes"], "ready": q["ready_s"], "build": q["build_s"], "queue": q["queue_s"],
            "hold": q["hold_s"], "start": start, "submitted": q.get("submitted_s"),
            "environment": q.get("environment_s"), "job_started": q.get("job_started_s"),
            "ideal": max(q["build_s"], q["queue_s"]) + start if start else None,
        }
        s["queued"]["ratio"] = q["ready_s"] / s["queued"]["ideal"] if s["queued"]["ideal"] else None
    s["failures"] = [
        f"{key}: {r.get('mode') or r.get('method') or key} {r.get('nodes', '')} - {r.get('error')}"
        for key in ("local_floor", "local_floor_plain", "local_flow", "local_ephemeral", "slurm", "slurm_queued",
                "slurm_scale", "cold", "job_bare", "job_flow", "job_ephemeral", "job_default")
        for r in results.get(key, []) if not r.get("ok")
    ]
    return s


def phase_table(runs: list[dict]) -> list[tuple[str, float]]:
    names: list[str] = []
    for r in runs:
        for name in r.get("phases", {}):
            if name not in names:
                names.append(name)
    return [(name, median([r["phases"].get(name) for r in runs])) for name in names]


def plot(s: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    table, nodes = s["table"], s["node_counts"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    series = [
        ("template", "ready", "Ray's fixed-sleep template (slurm-basic.sh)", "C3", "^-"),
        ("template", "all_alive", "fixed-sleep template: nodes actually alive", "C3", "^:"),
        ("flow", "ready", "activate-ray flow (from process start)", "C0", "o-"),
        ("flow", "begin", "activate-ray flow (from \"Beginning flow run\")", "C0", "o--"),
        ("bare", "ready", "bare parallel ray start (floor)", "C2", "s-"),
    ]
    for method, key, label, color, style in series:
        xs = [n for n in nodes if table.get((method, n), {}).get(key) is not None]
        ys = [table[(method, n)][key] for n in xs]
        if not xs:
            continue
        kwargs = {}
        if key == "ready":
            kwargs["yerr"] = [[y - table[(method, n)]["ready_min"] for n, y in zip(xs, ys, strict=True)],
                              [table[(method, n)]["ready_max"] - y for n, y in zip(xs, ys, strict=True)]]
            ax.errorbar(xs, ys, fmt=style, color=color, label=label, capsize=3, **kwargs)
        else:
            ax.plot(xs, ys, style, color=color, label=label, alpha=0.7)
    ax.set_xticks(nodes)
    ax.set_xlabel("Slurm nodes (one Ray node each)")
    ax.set_ylabel("time to ready (s), median; bars: min-max")
    ax.set_ylim(bottom=0)
    ax.set_title("Ray cluster time-to-ready on the 3-node Slurm bed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return ""


# The headline figures of the previous full run (2026-12-02 23:45, commit 4099630), for "what changed".
PREVIOUS_RUN = "2026-12-03 06:25, commit 6127093"
PREVIOUS = {
    "local_ratio_begin": 1.08, "vs_bare": 1.01, "vs_template": 0.63, "slurm_lag": 0.18, "slurm_teardown": 0.75,
    "local_teardown": 0.62, "setup": 0.099, "slurm_ready": 13.08, "bare_ready": 12.95, "local_hwm": 102, "slurm_hwm": 113,
    "job_ratio": 1.02, "job_flow": 16.92, "job_bare": 16.66, "job_eph": 32.06,
}


def changes_section(s: dict) -> list[str]:
    top = s.get("top")
    flow = s.get("table", {}).get(("flow", top), {}) if top else {}
    bare = s.get("table", {}).get(("bare", top), {}) if top else {}
    now = {
        "local_ratio_begin": s.get("local_ratio_begin"), "vs_bare": s.get("vs_bare"), "vs_template": s.get("vs_template"),
        "slurm_lag": flow.get("lag"), "slurm_teardown": s.get("slurm_teardown"), "local_teardown": s.get("local_teardown"),
        "setup": s.get("setup"), "slurm_ready": flow.get("ready"), "bare_ready": bare.get("ready"),
        "local_hwm": s.get("local_hwm"), "slurm_hwm": s.get("slurm_hwm"),
        "job_ratio": s.get("job_ratio"), "job_flow": s.get("job_flow"), "job_bare": s.get("job_bare"),
        "job_eph": s.get("job_eph"),
    }
    names = {
        "local_ratio_begin": ("local: flow / floor, from flow start", "x"),
        "slurm_ready": (f"Slurm {top} nodes: flow time-to-ready from process start", "s"),
        "bare_ready": (f"Slurm {top} nodes: bare parallel start", "s"),
        "vs_bare": (f"Slurm {top} nodes: flow / bare parallel", "x"),
        "vs_template": (f"Slurm {top} nodes: flow / fixed-sleep template", "x"),
        "slurm_lag": (f"Slurm {top} nodes: readiness detection lag", "s"),
        "slurm_teardown": ("Slurm teardown", "s"),
        "local_teardown": ("local teardown", "s"),
        "setup": ("warm setup (reuse path)", "s"),
        "local_hwm": ("controller peak memory, local (MiB)", ""),
        "slurm_hwm": ("controller peak memory, Slurm (MiB)", ""),
        "job_flow": ("main job: flow, process start to exit (server running)", "s"),
        "job_bare": ("main job: bare Ray script", "s"),
        "job_ratio": ("main job with a server: flow / bare Ray script", "x"),
        "job_eph": ("main job without a server, first run (starts the default server), process start to exit", "s"),
        "job_default": ("main job without a server, later run (default server reused), process start to exit", "s"),
        "job_default_ratio": ("main job on the default path, server reused: flow / bare Ray script", "x"),
    }
    lines = [
        "## What changed since the last run",
        "",
        f"The last full run ({PREVIOUS_RUN}) was made before: the local environment build run through "
        "prefect-shell's ShellOperation, its output streamed into the run log (the module is imported on the local "
        "path); a still-queued head job cancelled at once at teardown; and the user job submitted again while Ray's "
        "job head has no agent yet (no cost when it has one). The machine was slower on this run: the baselines "
        "themselves took 10-25% longer (bare 3-node start 12.95 s then, 16.18 s now), so compare the ratios.",
        "",
        "| figure | last run | this run |",
        "|---|---|---|",
    ]
    for key, (name, unit) in names.items():
        digits = 3 if key == "setup" else 0 if key.endswith("hwm") else 2
        lines.append(f"| {name} | {fmt(PREVIOUS[key], unit, digits)} | {fmt(now[key], unit, digits)} |")
    return [*lines, ""]


def report(results: dict) -> str:
    m, s = results["machine"], summarize(results)
    T = TARGETS
    lines = [
        "# Benchmarks",
        "",
        f"Measured {m['date']} at commit {m['commit']} with",
        "",
        "```bash",
        f"{results['command']}",
        "```",
        "",
        f"(`.venv/bin/python -m bench --help` for the options; every figure is the median of "
        f"{results['args']['reps']} runs; the whole run took {results['total_s'] / 60:.1f} min.)",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPUs (nproc) | {m['nproc']} ({m['cpu']}) |",
        f"| memory | {m['memory_gib']} GiB |",
        f"| kernel / OS | {m['kernel']} / {m['os']} |",
        f"| load average at start | {' '.join(m['loadavg_start'])} (other sessions share this machine; each run "
        f"waited up to 8 s for the CPUs to be under 25% busy: median {fmt((s.get('busy_before') or 0) * 100, '%', 0)} "
        f"busy just before a run) |",
        f"| Python | {m['python']} |",
        f"| Ray | {m['ray']} |",
        f"| Prefect | {m['prefect']} |",
        f"| Slurm | {m['slurm']} (the 3-node bed of `tests/bed/`: network namespaces on this one machine) |",
        "",
        *changes_section(s),
        "## Figures",
        "",
        "| figure | value | target | result |",
        "|---|---|---|---|",
    ]
    row = lambda *cells: lines.append("| " + " | ".join(cells) + " |")  # noqa: E731
    if s.get("cold_uv") or s.get("cold_pip"):
        n = s["cold_n"]
        row(f"cold environment: `setup_ray.sh` builds `ray[default]` into a fresh work dir with uv (fresh UV_CACHE_DIR; "
            f"{n['uv']} run(s))", fmt(s["cold_uv"]), "", "")
        row(f"cold environment: the same with pip (`AR_UV=0`, PIP_NO_CACHE_DIR=1; {n['pip']} run(s))",
            fmt(s["cold_pip"]), "", "")
        row("**cold environment: uv / pip**", fmt(s.get("cold_ratio"), "x"), f"<= {T['cold_ratio']}x",
            verdict(s.get("cold_ratio"), T["cold_ratio"]))
    if s.get("job_bare"):
        row("main job: bare Ray script (`ray start --head`, `ray job submit` of examples/hello_ray.py, head stopped)",
            fmt(s["job_bare"]) + f" (head up after {fmt(s['job_bare_head'])})", "", "")
        row("main job: flow `--user-script examples/hello_ray.py`, process start to exit, cluster gone (server running)",
            fmt(s["job_flow"]), "", "")
        row("**main job with a Prefect server: flow / bare Ray script**", fmt(s.get("job_ratio"), "x"),
            f"<= {T['main_job']}x", verdict(s.get("job_ratio"), T["main_job"]))
        row("**main job on the default path (no PREFECT_API_URL), second run: the user's server reused: flow / bare Ray script**",
            fmt(s.get("job_default_ratio"), "x"), f"<= {T['main_job_default']}x",
            verdict(s.get("job_default_ratio"), T["main_job_default"]))
        row("main job without a server, first run (no PREFECT_API_URL: the run starts the user's default server)",
            fmt(s["job_eph"]) + f" (\"Beginning flow run\" after {fmt(s['job_eph_begin'])}; with a server "
            f"{fmt(s['job_flow_begin'])})", "", "")
        row("main job without a server: flow / bare Ray script (shown, no target: see below)",
            fmt(s.get("job_eph_ratio"), "x"), "(none)", "")
    if s.get("floor"):
        row("local: bare floor, `ray start --head --block` with the flow's flags, until ALIVE", fmt(s["floor"]), "", "")
        row("local: the same with Ray's default ports (reference, not used in ratios)", fmt(s["floor_plain"]), "", "")
        row("local: flow time-to-ready from \"Beginning flow run\" (server running)", fmt(s["local_ready_begin"]), "", "")
        row("local: flow time-to-ready from process start (server running)", fmt(s["local_ready"]), "", "")
        row("**local: flow / floor, from flow start** (the target's figure)", fmt(s.get("local_ratio_begin"), "x"),
            f"<= {T['local_ratio']}x", verdict(s.get("local_ratio_begin"), T["local_ratio"]))
        row("local: flow / floor, from process start", fmt(s.get("local_ratio_process"), "x"), "(none)", "")
        row("local: flow time-to-ready, no PREFECT_API_URL (temporary server), from process start",
            fmt(s["eph_ready"]), "", "")
        row("local: same, from \"Beginning flow run\"", fmt(s["eph_ready_begin"]), "", "")
        row("local: flow / floor with a temporary server (from flow start / process start)",
            f"{fmt(s.get('eph_ratio_begin'), 'x')} / {fmt(s.get('eph_ratio_process'), 'x')}", "", "")
        row("Prefect server start (`prefect server start` to /api/health)", fmt(s["server_start"]), "", "")
        row("local: teardown, SIGTERM to no supervisor and no Ray process of the cluster", fmt(s["local_teardown"]),
            f"<= {T['teardown_s']:g}s", verdict(s["local_teardown"], T["teardown_s"]))
        row("local: SIGTERM to the flow process's exit", fmt(s["local_exit"]), "", "")
        row("local: Ray itself ready (head registered in its GCS) after start: floor / flow",
            f"{fmt(s['floor_ray_ready'])} / {fmt(s['local_ray_ready'])}", "", "")
        row("local: flow's detection lag (connection info written after the head registered)", fmt(s["local_lag"]), "", "")
    top = s.get("top")
    table = s.get("table", {})
    if top:
        flow = table.get(("flow", top), {})
        row(f"Slurm {top} nodes: flow time-to-ready from process start", fmt(flow.get("ready")), "", "")
        row(f"Slurm {top} nodes: flow time-to-ready from \"Beginning flow run\"", fmt(flow.get("begin")), "", "")
        row(f"Slurm {top} nodes: flow's detection lag (connection info after the last node registered in the GCS)",
            fmt(flow.get("lag")), "", "")
        row(f"Slurm {top} nodes: SIGTERM to the flow process's exit", fmt(flow.get("exit")), "", "")
        row(f"Slurm {top} nodes: (a) fixed-sleep template, sbatch to its user-script line",
            fmt(table.get(("template", top), {}).get("ready")), "", "")
        row(f"Slurm {top} nodes: (b) bare parallel start, sbatch to all ALIVE",
            fmt(table.get(("bare", top), {}).get("ready")), "", "")
        if s.get("template_target"):
            row(f"**Slurm {top} nodes: flow / (a) template**", fmt(s.get("vs_template"), "x"), f"<= {T['vs_template']}x",
                verdict(s.get("vs_template"), T["vs_template"]))
        elif not s["template_covers"].get(top):
            row(f"Slurm {top} nodes: flow / (a) template (no target: the template's sleeps ended before its nodes "
                "were ALIVE, so its ready line is not a cluster that is ready; (b) is the comparison)",
                fmt(s.get("vs_template"), "x"), "(none)", "")
        else:
            row(f"Slurm {top} nodes: flow / (a) template (no target: its sleeps are shorter than Ray's own start "
                f"with the target's margin, bare parallel / template = {fmt(s.get('bare_vs_template'), 'x')} > "
                f"{T['vs_template']}x, so no launcher could meet it; (b) is the comparison)",
                fmt(s.get("vs_template"), "x"), "(none)", "")
        row(f"**Slurm {top} nodes: flow / (b) bare parallel**", fmt(s.get("vs_bare"), "x"), f"<= {T['vs_bare']}x",
            verdict(s.get("vs_bare"), T["vs_bare"]))
        q = s.get("queued")
        if q:
            row(f"Slurm {q['nodes']} nodes, cold first run on a queued job: flow time-to-ready from process start "
                f"(nodes held {q['hold']:g}s by another job)", fmt(q["ready"]), "", "")
            row(f"... its parts: build {fmt(q['build'])} (the cold uv build above), queue {fmt(q['queue'])} (the flow's "
                f"job submitted at {fmt(q['submitted'])}, running at {fmt(q['job_started'])}, environment ready at "
                f"{fmt(q['environment'])}), start {fmt(q['start'])} (warm flow, {q['nodes']} nodes, this run)",
                f"max(build, queue) + start = {fmt(q['ideal'])}", "", "")
            row(f"**Slurm {q['nodes']} nodes, cold and queued: flow / (max(build, queue) + start)**",
                fmt(q.get("ratio"), "x"), f"<= {T['queued']}x", verdict(q.get("ratio"), T["queued"]))
        row(f"**Slurm teardown ({top} nodes): SIGTERM to no job and no Ray process** (median, max of {flow.get('n')})",
            f"{fmt(s.get('slurm_teardown'))} (max {fmt(s.get('slurm_teardown_max'))})", f"<= {T['teardown_s']:g}s",
            verdict(s.get("slurm_teardown"), T["teardown_s"]))
        if s.get("scale"):
            sc = s["scale"]
            row(f"**worker job: `scale --add 1` to its node alive on the head's dashboard** (median of {sc['n']})",
                f"{fmt(sc['add'])} ({fmt(sc['add_wall'])} with the command's own start)", "", "")
            row("... against a bare 1-node job's ready time in this run (sbatch to the node alive)",
                fmt(sc.get("vs_bare"), "x"), "", "")
            row("worker job: `scale --remove 1` to its node gone", fmt(sc["remove"]), "", "")
            row("**adaptive: a task asking for more CPUs than the cluster has, to its worker job submitted**",
                fmt(sc["demand"]), "", "")
        if s.get("scaling") is not None:
            low = min(s["node_counts"])
            if s.get("scaling_bare") and s["scaling_bare"] > T["scaling"]:
                # like the template's: a target Ray's own start misses here is not one on this project
                row(f"Slurm scaling: flow t({top})/t({low}) (no target on this bed: Ray's own parallel start scales "
                    f"{fmt(s['scaling_bare'], 'x')} here, over the {T['scaling']}x target, see below; the flow / bare "
                    f"parallel rows are the comparison)", fmt(s["scaling"], "x"), "(none)", "")
            else:
                row(f"**Slurm scaling: flow t({top})/t({low})**", fmt(s["scaling"], "x"), f"<= {T['scaling']}x",
                    verdict(s["scaling"], T["scaling"]))
            row(f"Slurm scaling: bare parallel t({top})/t({low}), for reference", fmt(s.get("scaling_bare"), "x"), "", "")
            row(f"Slurm scaling: Ray itself (bare, last node registered in the GCS) t({top})/t({low})",
                fmt(s.get("scaling_ray"), "x"), "", "")
    if s.get("setup") is not None:
        row("**warm environment setup: `scripts/setup_ray.sh` reuse path**", fmt(s["setup"], "s", 3),
            f"<= {T['setup_s']:g}s", verdict(s["setup"], T["setup_s"]))
        row("warm setup: no pip call (pip shim on PATH recorded nothing, output says `reused`, no venv made)",
            "yes" if s["setup_no_pip"] else "**no**", "yes", "pass" if s["setup_no_pip"] else "**miss**")
    if s.get("local_hwm"):
        row("controller peak memory: flow process VmHWM, local, server running", fmt(s["local_hwm"], " MiB", 0), "", "")
    if s.get("slurm_hwm"):
        row("controller peak memory: flow process VmHWM, Slurm", fmt(s["slurm_hwm"], " MiB", 0), "", "")
    if s.get("eph_tree"):
        row("controller peak memory with a temporary server: flow VmHWM / flow + children RSS",
            f"{fmt(s['eph_hwm'], ' MiB', 0)} / {fmt(s['eph_tree'], ' MiB', 0)}", "", "")
    if results.get("bed"):
        row("bed bring-up (not a target)", fmt(results["bed"]["up_s"]) +
            (" (waited for another bed)" if results["bed"]["waited_for_other_bed"] else ""), "", "")
    row("left behind after the benchmark (Ray processes, Slurm jobs, bed, temp dirs)",
        "nothing" if not results["leftovers"] else "; ".join(results["leftovers"])[:300], "nothing",
        "pass" if not results["leftovers"] else "**miss**")
    if table:
        lines += [
            "",
            "## Time-to-ready vs nodes (Slurm bed)",
            "",
            "![time to ready vs nodes](bench_time_to_ready.png)",
            "",
            "Median (min-max) seconds from `python -m flows.ray_cluster` starting (flow) or `sbatch` being "
            "called (baselines) until every node is usable.",
            "",
            "| nodes | flow (process start) | flow (from \"Beginning flow run\") | (b) bare parallel | "
            "(a) template, its ready line | (a) template, nodes actually alive | Ray ready in GCS: flow / bare / template "
            "| flow teardown | flow / (a) | flow / (b) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n in s["node_counts"]:
            f, b, t = table.get(("flow", n), {}), table.get(("bare", n), {}), table.get(("template", n), {})
            span = lambda d: f"{fmt(d.get('ready'))} ({fmt(d.get('ready_min'), '')}-{fmt(d.get('ready_max'), '')})" if d else "n/a"  # noqa: E731
            ratio = lambda a, b: fmt(a / b, "x") if a and b else "n/a"  # noqa: E731
            lines.append(
                f"| {n} | {span(f)} | {fmt(f.get('begin'))} | {span(b)} | {span(t)} | {fmt(t.get('all_alive'))} | "
                f"{fmt(f.get('ray_ready'), '')} / {fmt(b.get('ray_ready'), '')} / {fmt(t.get('ray_ready'), '')} | "
                f"{fmt(f.get('teardown'))} | {ratio(f.get('ready'), t.get('ready'))} | {ratio(f.get('ready'), b.get('ready'))} |"
            )
    if s.get("scaling_ray"):
        lines += [
            "",
            f"On this bed Ray itself (bare start, last node registered in the GCS) takes {fmt(s['scaling_ray'], 'x')} "
            f"as long for {top} nodes as for {min(s['node_counts'])}: every \"node\" shares the same "
            f"{m['nproc']} CPUs, and starting Ray is CPU-bound. The scaling target can only be judged on nodes "
            "with CPUs of their own.",
        ]
    local = [r for r in results.get("local_flow", []) if r.get("ok")]
    slurm_top = [r for r in s.get("by", {}).get(("flow", top), [])] if top else []
    if local or slurm_top:
        lines += ["", "## Where the flow's seconds go (median per phase, from the flow log's timestamps)", ""]
        lines += ["| phase (ends at the log line) | local, 1 node | " + (f"Slurm, {top} nodes |" if slurm_top else ""),
                  "|---|---|" + ("---|" if slurm_top else "")]
        local_phases, slurm_phases = dict(phase_table(local)), dict(phase_table(slurm_top))
        for name in dict.fromkeys([*local_phases, *slurm_phases]):
            lines.append(f"| {name} | {fmt(local_phases.get(name))} | " +
                         (f"{fmt(slurm_phases.get(name))} |" if slurm_top else ""))
        lag = lambda runs: median([r.get("detect_lag_s") for r in runs])  # noqa: E731
        lines.append("| *of which: detection lag (connection info written after the last node registered in "
                     f"the head's GCS)* | {fmt(lag(local))} | " + (f"{fmt(lag(slurm_top))} |" if slurm_top else ""))
    lags = [(f"local {i + 1}", r.get("detect_lag_s")) for i, r in enumerate(local)]
    lags += [(f"Slurm {r['nodes']}n", r.get("detect_lag_s")) for r in results.get("slurm", [])
             if r.get("method") == "flow" and r.get("ok")]
    if lags:
        lines += [
            "",
            "The readiness loop (`tasks/readiness.py`, `wait_until_ready`) backs off (0.1 s, 1.5 times longer "
            "after every poll, up to 2 s) only while the job waits in the queue; once it runs, it looks for the "
            "head's head.env every 0.25 s, then polls the dashboard every 0.25 s until every node is ALIVE, so "
            "\"dashboard answers\" and \"nodes joining\" above are Ray's own start plus at most a quarter "
            "second. Detection lag of every flow run (s): "
            + ", ".join(f"{name} {fmt(lag, '')}" for name, lag in lags) + ".",
        ]
    if s["failures"]:
        lines += ["", "## Failed runs (not in the medians)", ""] + [f"- {f}" for f in s["failures"]]
    lines += [
        "",
        "## How each figure is measured",
        "",
        "- **Flow time-to-ready**: `python -m flows.ray_cluster --keep-alive --info-file F` with 0.5 GB Ray memory "
        "and 0.25 GB object store per node, 1 CPU; from the process's start, and from its \"Beginning flow run\" log "
        "line (Prefect's own timestamp), to F's mtime. The target ratio uses the figure from \"Beginning flow run\" "
        "(flow start); the process-start figure adds Python start-up, imports and the API round trips before the run.",
        "- **Local floor**: `ray start --head --block` with the same resources, its own `--temp-dir`, token auth, "
        "the dashboard on 127.0.0.1 and the same explicit port flags as the flow's nodes (`scripts/ray_lib.sh`), "
        "polled every 50 ms until `/api/v0/nodes` lists the node ALIVE (the flow's own readiness test); stopped by "
        "its process group, never `ray stop`. The same start with Ray's default ports is shown for reference.",
        "- **Temporary server**: the same flow with no `PREFECT_API_URL`, so Prefect starts a server of its own in "
        "the flow process; the server-start row is `prefect server start` on loopback until `/api/health` answers.",
        "- **(a) fixed-sleep template**: Ray's `slurm-basic.sh` as documented (head via `srun -w`, `sleep 10`, each "
        "worker via `srun -w node ray start --block &` then `sleep 5`), plus a `--temp-dir` per node, explicit "
        "`--address`, small memory and token auth; time from `sbatch` to the point where the template starts the "
        "user's script. A poller started with the job also records when every node really was ALIVE.",
        "- **(b) bare parallel**: `ray start --head --block &`, then one `srun` step that starts every worker at "
        "once, with the flow's port flags, polled (head node, 100 ms) until all are ALIVE. Its teardown is not a "
        "figure: `scancel` alone leaves the head's Ray processes running for 30-60 s on this bed (`ray start "
        "--block` exits first and its children leave the step), so the benchmark SIGKILLs them after 5 s.",
        "- **Ray ready in GCS**: the time the head's `gcs_server.out` logged \"Registering new node\" for the last "
        "node (a node is ALIVE from then on): when Ray itself was ready, whoever was polling. The flow's detection "
        "lag is its connection-info time minus that.",
        "- **Teardown**: SIGTERM to the flow process (as a batch system or a Prefect worker sends it), until "
        "`squeue` lists no job and no process of the cluster (`/<cluster_id>-` in its command line) is left.",
        "- **Cold environment**: `bash scripts/setup_ray.sh <ray version> <fresh work dir>` (no candidate Python, so "
        "it builds `ray[default]` from PyPI), timed to its exit plus a check that the venv has that Ray. uv: this "
        "venv's uv alone on PATH, a fresh empty `UV_CACHE_DIR` per run (deleted after); pip: `AR_UV=0`, "
        "`PIP_NO_CACHE_DIR=1`, no uv on PATH. Both use the machine's python3.11 as base. Runs interleave (uv, pip, "
        "uv). The network (PyPI, its CDN) is shared and varies: this row is the only one that leaves the machine.",
        "- **Cold first run on a queued job**: a job holding every bed node (`sbatch --exclusive --wrap 'sleep "
        f"{HOLD_S}'`) is running when the flow starts, so the flow's job pends in the queue; the bed's namespaces have "
        "no route to PyPI, so the environment step is made cold by `--setup-commands` sleeping, on the login node "
        "only, for the cold uv build time measured above (the flow's own interpreter is then reused). queue = the "
        "flow's \"submitted to\" log line to its job RUNNING in `squeue` (polled every 0.2 s); start = the warm flow's "
        "time-to-ready at the same node count in this run (from process start); the target compares the flow's "
        "time-to-ready from process start with max(build, queue) + start.",
        "- **Main job**: the flow `--user-script examples/hello_ray.py` (local, no `--keep-alive`) from process start "
        "to its exit with no process of the cluster left; the bare Ray script: `ray start --head` with the flow's "
        "flags and token auth, `ray job submit` of the same script (its output checked), then the head's processes "
        "SIGKILLed (found by its temp dir: `ray stop` would stop every Ray on the machine) until none is left. "
        "Without a server, Prefect starts a temporary server inside the flow process (its start, about the server "
        "start row above, and its shutdown are part of every run): `make server` (scripts/prefect_server.sh) "
        "starts a lasting one and sets PREFECT_API_URL in the Prefect profile, and the target applies to that case.",
        "- **Warm setup**: `bash scripts/setup_ray.sh <ray version> <empty work dir> <this venv's python>`, with "
        "shims named pip, pip3, pip3.11 and uv first on PATH that record any call.",
        "- **Peak memory**: `/proc/<pid>/status` VmHWM of the flow process, and the sum of VmRSS over the flow and "
        "its children (including a temporary Prefect server), sampled every 0.25 s.",
        "- The bed's 3 nodes and the controller share the same 2 CPUs: Ray's start-up is CPU-bound (about 9 CPU-s "
        "for 3 nodes), so more nodes start slower here than on a real cluster, for the flow and the baselines "
        "alike: compare the scaling of Ray itself (bare, GCS) with the flow's.",
        "- Other sessions share this machine: runs are interleaved (floor and flow alternate; flow, bare and "
        "template rotate) so that a busy moment does not hit one method only, yet single runs still vary by about "
        "+-1 s; see the min-max columns and `.bench/results.json` for every run.",
    ]
    return "\n".join(lines) + "\n"


def print_summary(results: dict) -> None:
    s = summarize(results)
    keys = ["busy_before", "floor", "floor_plain", "floor_ray_ready", "local_ray_ready", "local_lag", "local_exit", "local_ready_begin", "local_ready", "local_ratio_begin", "local_ratio_process", "eph_ready",
            "eph_ready_begin", "server_start", "local_teardown", "vs_template", "vs_bare", "slurm_teardown",
            "slurm_teardown_max", "scaling", "setup", "setup_no_pip", "local_hwm", "slurm_hwm", "eph_hwm", "eph_tree"]
    for key in keys:
        if key in s:
            value = s[key]
            print(f"  {key:22s} {value:.3f}" if isinstance(value, float) else f"  {key:22s} {value}")
    for (method, nodes), row in sorted(s.get("table", {}).items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"  slurm {method:8s} {nodes}n  ready {fmt(row['ready'])}  begin {fmt(row['begin'])}  "
              f"alive {fmt(row['all_alive'])}  ray {fmt(row['ray_ready'])}  lag {fmt(row['lag'])}  "
              f"teardown {fmt(row['teardown'])}  exit {fmt(row['exit'])}")
    for failure in s["failures"]:
        print(f"  FAILED {failure}")
    print(f"  left behind: {results['leftovers'] or 'nothing'}")



def write_report(results: dict) -> None:
    note = plot(summarize(results), REPO / "bench_time_to_ready.png") if results.get("slurm") else "no Slurm runs"
    if note:
        log(f"plot not written: {note}")
    (REPO / "BENCHMARKS.md").write_text(report(results))
    log("wrote BENCHMARKS.md" + ("" if note else " and bench_time_to_ready.png"))
