# shellcheck shell=bash
# PBS: a Ray worker on every other host of PBS_NODEFILE, all at once. OpenPBS and PBS Pro:
# pbs_tmrsh (a task of the job that its MoM tracks and ends with it); Torque: pbsdsh -u;
# neither: ssh from the head, attached to the job with pbs_attach where it exists.
# Sourced by the job script.

# PBS's own commands: OpenPBS/PBS Pro name their install in pbs.conf (PBS_EXEC). Inside a
# job their bin dir comes last on PATH, so a bare `qdel` could be another batch system's
# wrapper (Slurm's Torque qdel) on a machine that has both.
ar_pbs_command() {
    local exec_dir="" conf="${PBS_CONF_FILE:-/etc/pbs.conf}"
    if [ -r "$conf" ]; then
        exec_dir="$(sed -n 's/^PBS_EXEC=//p' "$conf" | tail -n 1)"
    fi
    if [ -n "$exec_dir" ] && [ -x "$exec_dir/bin/$1" ]; then
        printf '%s\n' "$exec_dir/bin/$1"
    else
        printf '%s\n' "$1"
    fi
}

# Cancel one of the cluster's worker jobs (cluster_main.sh, when the cluster ends without the flow).
ar_cancel_job() { "$(ar_pbs_command qdel)" -- "$1" 2>/dev/null || true; }
# The workers see a stop at their next glance: qsig reaches only the job's first host
# (tasks/schedulers/pbs.py); the head's end waits for them (cluster_main.sh).
ar_wake_workers() { :; }

# The allocation's end, Unix seconds: the job's start (qstat's stime, else when this script
# began) + its Resource_List.walltime (else the walltime asked for). Empty if unknown.
ar_job_deadline() {
    local shown stime walltime start
    shown="$("$(ar_pbs_command qstat)" -f "$PBS_JOBID" 2>/dev/null || true)"
    stime="$(printf '%s\n' "$shown" | sed -n 's/^ *stime = //p' | head -n 1)"
    walltime="$(printf '%s\n' "$shown" | sed -n 's/^ *Resource_List.walltime = //p' | head -n 1)"
    start="$( [ -z "$stime" ] || date -d "$stime" +%s 2>/dev/null)" || start=""
    start="${start:-${AR_JOB_STARTED:-}}"
    walltime="${walltime:-${AR_WALLTIME:-}}"
    [ -n "$start" ] && [ -n "$walltime" ] || return 0
    # [[HH:]MM:]SS
    awk -F: -v start="$start" '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print start + s }' <<<"$walltime"
}

ar_launch_workers() {
    local nodes=() node short head attach="" line
    head="$(hostname -s)"
    # PBS writes one line per mpiproc, with the server's names (short or fully qualified):
    # each host once, in order, the head left out
    declare -A seen=(["$head"]=1)
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        short="${line%%.*}"
        [ -z "${seen[$short]:-}" ] || continue
        seen[$short]=1
        nodes+=("$short")
    done <"$PBS_NODEFILE"
    if [ "$((${#nodes[@]} + 1))" -ne "$AR_EXPECTED_NODES" ]; then
        echo "activate-ray: PBS_NODEFILE names $((${#nodes[@]} + 1)) distinct host(s) for $AR_EXPECTED_NODES chunk(s):" \
            "one Ray node per host, the flow waits for one per chunk" >&2
    fi
    [ "${#nodes[@]}" -gt 0 ] || return 0
    local worker=(/usr/bin/env "AR_CLUSTER_DIR=$AR_CLUSTER_DIR" bash "$AR_CLUSTER_DIR/bin/ray_worker.sh")
    if command -v pbs_tmrsh >/dev/null; then
        # OpenPBS/PBS Pro: one task per host (its pbsdsh has no -u, and runs once per chunk). A
        # task's output goes to the MoM, not to pbs_tmrsh: the task writes its own into the
        # node's launch log, beside pbs_tmrsh's (both appended)
        for node in "${nodes[@]}"; do
            {
                local status=0 log="$AR_CLUSTER_DIR/logs/workers-$node.log"
                # shellcheck disable=SC2016,SC2094 # expanded by the task's bash, on its host; both only append
                pbs_tmrsh "$node" /bin/bash -c 'exec >>"$1" 2>&1; shift; exec "$@"' _ "$log" "${worker[@]}" \
                    >>"$log" 2>&1 || status=$?
                ar_launcher_ended "pbs_tmrsh $node" "$node" "$status"
            } &
        done
        return 0
    fi
    if command -v pbsdsh >/dev/null; then
        # Torque: one task per host; the head skips itself
        {
            local status=0
            # shellcheck disable=SC2016 # expanded by the task's own bash, on its host
            pbsdsh -u -- bash -c '[ "$(hostname -s)" = "$1" ] || exec "${@:2}"' _ "$head" "${worker[@]}" \
                >"$AR_CLUSTER_DIR/logs/workers-pbsdsh.log" 2>&1 || status=$?
            for node in "${nodes[@]}"; do
                cp "$AR_CLUSTER_DIR/logs/workers-pbsdsh.log" "$AR_CLUSTER_DIR/logs/workers-$node.log" 2>/dev/null || true
                ar_launcher_ended "pbsdsh -u" "$node" "$status"
            done
        } &
        return 0
    fi
    # pbs_attach by its full path (an ssh session's PATH may lack PBS's bin dir), told where
    # this job's PBS is (a pbs.conf that is not /etc/pbs.conf reaches the job, not the session)
    if command -v pbs_attach >/dev/null; then
        attach="${PBS_CONF_FILE:+PBS_CONF_FILE=$(printf %q "$PBS_CONF_FILE") }$(printf %q "$(command -v pbs_attach)") -j $(printf %q "$PBS_JOBID")"
    fi
    for node in "${nodes[@]}"; do
        {
            local status=0
            # shellcheck disable=SC2086 # AR_NODE_SSH_OPTS: ssh options, one word each
            ssh -o BatchMode=yes ${AR_NODE_SSH_OPTS:-} "$node" \
                "AR_CLUSTER_DIR=$(printf %q "$AR_CLUSTER_DIR") $attach bash $(printf %q "$AR_CLUSTER_DIR/bin/ray_worker.sh")" \
                >"$AR_CLUSTER_DIR/logs/workers-$node.log" 2>&1 || status=$?
            ar_launcher_ended "ssh $node" "$node" "$status"
        } &
    done
}
