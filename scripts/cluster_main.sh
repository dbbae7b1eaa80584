# shellcheck shell=bash
# The body of every cluster, sourced by the job script after it defined
# ar_launch_workers (how this scheduler starts the other nodes, all at once).
# Runs on the head: head node, workers, then supervise until told to stop.
# Exits 0 only when the flow asked the cluster to stop; otherwise non-zero, so
# the scheduler's record (sacct, scontrol, qstat) says the cluster failed.

# shellcheck disable=SC1091
. "$AR_CLUSTER_DIR/bin/ray_lib.sh"
mkdir -p "$AR_CLUSTER_DIR/logs" "$AR_CLUSTER_DIR/nodes"
touch "$AR_CLUSTER_DIR/heartbeat"

# The cluster's worker jobs (scale options, recorded in worker_jobs/) that have not started
# a node, for a cluster that ends without the flow (dead-man switch, head failed): a queued
# one would otherwise wait in the queue for a cluster that is gone. One whose node started
# (nodes/wjob-ID.tmp) stops itself, as every node does, and is not cut short by a cancel.
# The flow's own teardown ends them all itself.
ar_cancel_worker_jobs() {
    local file job
    for file in "$AR_CLUSTER_DIR"/worker_jobs/*; do
        [ -e "$file" ] || continue
        job="${file##*/}"
        case "$job" in -* | *[!0-9A-Za-z.\[\]_-]*) continue ;; esac
        [ ! -e "$AR_CLUSTER_DIR/nodes/wjob-${job%%.*}.tmp" ] || continue
        ar_log "cancelling worker job $job"
        ar_cancel_job "$job"
    done
}

# Every node stops itself once asked (ar_run_node: its logs kept, its temp dir removed):
# workers started over ssh included, which a signal here would not reach. What did not,
# on this host, is swept after.
ar_cleanup() {
    local status="$1" _
    trap - EXIT TERM INT HUP USR1
    ar_request_stop
    # told to look now: this shell's own nodes (the head's; every node without a scheduler)
    # shellcheck disable=SC2046 # one word per job pid
    kill -WINCH $(jobs -pr) 2>/dev/null || true
    ar_wake_workers
    [ "$status" = 0 ] || ar_cancel_worker_jobs
    # the worker launch (srun step, pbsdsh, ssh clients) ends once its nodes stopped: at
    # their next glance at the latest (a scheduler that ends the job kills what is left,
    # OpenPBS's sister MoMs with KILL, so the nodes get the time to stop themselves)
    for _ in $(seq 1 $(((AR_LOOK_EVERY + 5) * 10))); do
        [ -z "$(jobs -pr)" ] && break
        sleep 0.1
    done
    ar_stop_cluster_here allocation
    # shellcheck disable=SC2046 # one word per job pid
    kill -- $(jobs -pr) 2>/dev/null || true
    wait 2>/dev/null || true
    ar_log "cluster $AR_CLUSTER_ID stopped (exit $status)"
    if [ "${AR_REMOVE_CLUSTER_DIR:-0}" = 1 ]; then
        rm -rf "$AR_CLUSTER_DIR"
    fi
    exit "$status"
}
trap 'ar_cleanup "$?"' EXIT
trap 'ar_log "signal received"; exit 143' TERM INT HUP
# Slurm's walltime warning (--signal=B:USR1@margin): with the deadline known the flow stops
# the job at the margin and the cluster stops itself just before the end (ar_supervise);
# without it, the warning stops the cluster now.
trap 'if [ -n "${AR_DEADLINE:-}" ]; then ar_log "walltime warning (USR1): the allocation ends at $AR_DEADLINE"; else ar_log "walltime warning (USR1)"; exit 143; fi' USR1
AR_JOB_STARTED="${AR_JOB_STARTED:-$(date +%s)}"

# The Python and Ray to run: for a batch job the flow may still be building them
# on the login host when the job starts (it submits first, builds while queued).
ar_wait_for_environment || exit 1
# The allocation's end, read from the scheduler now that the job runs (empty: none or
# unknown): in head.env for the flow (ar_write_head_env), and ar_supervise stops in time.
AR_DEADLINE="$(ar_job_deadline || true)"
case "$AR_DEADLINE" in *[!0-9]*) AR_DEADLINE="" ;; esac
export AR_DEADLINE
ar_run_node head head &
head_pid=$!
# head.env comes once the head's GCS port was found its own (ar_verify_ports), which
# ar_run_node waits for up to AR_PORTS_WAIT seconds: this waits a little longer, so the
# head's own, more precise RAY_FAILED says why when it gives up.
for _ in $(seq 1 $(((${AR_PORTS_WAIT:-180} + 30) * 10))); do
    [ -e "$AR_CLUSTER_DIR/head.env" ] && break
    if ! kill -0 "$head_pid" 2>/dev/null; then
        # the head said why (a port held by someone else, Ray ending at once) unless it could not
        grep -q '^RAY_FAILED=' "$AR_CLUSTER_DIR/status" 2>/dev/null || echo "RAY_FAILED=head did not start" >>"$AR_CLUSTER_DIR/status"
        exit 1
    fi
    sleep 0.1
done
[ -e "$AR_CLUSTER_DIR/head.env" ] || { echo "RAY_FAILED=head not up after $((${AR_PORTS_WAIT:-180} + 30))s" >>"$AR_CLUSTER_DIR/status"; exit 1; }
[ -z "$AR_DEADLINE" ] || ar_log "the allocation ends at $(date -d "@$AR_DEADLINE" '+%F %T %Z') ($AR_DEADLINE)"
ar_launch_workers
ar_supervise "$head_pid"
