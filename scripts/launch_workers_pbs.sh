# shellcheck shell=bash
# PBS: a Ray worker on every other host of PBS_NODEFILE, all at once: with pbsdsh where
# the site has it (tasks the MoM tracks), else with ssh from the head, attached to the
# job with pbs_attach where it exists. Sourced by the job script.
# Cancel one of the cluster's worker jobs (cluster_main.sh, when the cluster ends without the flow).
ar_cancel_job() { qdel -- "$1" 2>/dev/null || true; }

ar_launch_workers() {
    local nodes node attach=""
    # PBS writes one line per mpiproc: keep each host once, in order
    mapfile -t nodes < <(awk '!seen[$0]++' "$PBS_NODEFILE")
    if [ "${#nodes[@]}" -ne "$AR_EXPECTED_NODES" ]; then
        echo "activate-ray: PBS_NODEFILE names ${#nodes[@]} distinct host(s) for $AR_EXPECTED_NODES chunk(s):" \
            "one Ray node per host, the flow waits for one per chunk" >&2
    fi
    [ "${#nodes[@]}" -gt 1 ] || return 0
    if command -v pbsdsh >/dev/null; then
        # one task per host; the head skips itself
        # shellcheck disable=SC2016 # expanded by the task's own bash, on its host
        pbsdsh -u -- bash -c '[ "$(hostname -s)" = "$1" ] || exec bash "$2"' _ "$(hostname -s)" \
            "$AR_CLUSTER_DIR/bin/ray_worker.sh" >"$AR_CLUSTER_DIR/logs/workers.log" 2>&1 &
        return 0
    fi
    command -v pbs_attach >/dev/null && attach="pbs_attach -j $PBS_JOBID"
    for node in "${nodes[@]:1}"; do
        # shellcheck disable=SC2086 # AR_NODE_SSH_OPTS: ssh options, one word each
        ssh -o BatchMode=yes ${AR_NODE_SSH_OPTS:-} "$node" \
            "AR_CLUSTER_DIR=$(printf %q "$AR_CLUSTER_DIR") $attach bash $(printf %q "$AR_CLUSTER_DIR/bin/ray_worker.sh")" \
            >>"$AR_CLUSTER_DIR/logs/workers.log" 2>&1 &
    done
}
