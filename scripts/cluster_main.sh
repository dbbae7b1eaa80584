# The body of every cluster, sourced by the job script after it defined
# ar_launch_workers (how this scheduler starts the other nodes, all at once).
# Runs on the head: head node, workers, then supervise until told to stop.

# shellcheck disable=SC1091
. "$AR_CLUSTER_DIR/bin/ray_lib.sh"
mkdir -p "$AR_CLUSTER_DIR/logs" "$AR_CLUSTER_DIR/nodes"
touch "$AR_CLUSTER_DIR/heartbeat"

ar_cleanup() {
    trap - EXIT TERM INT HUP USR1
    ar_stop_cluster_here
    kill -- $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
    ar_log "cluster $AR_CLUSTER_ID stopped"
    if [ "${AR_REMOVE_CLUSTER_DIR:-0}" = 1 ]; then
        rm -rf "$AR_CLUSTER_DIR"
    fi
}
trap 'ar_cleanup; exit 0' EXIT
trap 'ar_log "signal received"; exit 143' TERM INT HUP USR1

ar_run_node head head &
head_pid=$!
for _ in $(seq 1 600); do
    [ -e "$AR_CLUSTER_DIR/head.env" ] && break
    kill -0 "$head_pid" 2>/dev/null || { echo "RAY_FAILED=head did not start" >>"$AR_CLUSTER_DIR/status"; exit 1; }
    sleep 0.1
done
ar_launch_workers
ar_supervise "$head_pid"
