# shellcheck shell=bash
# SLURM: one job step starts a Ray worker on every other node of the allocation, all at
# once (the batch host is the head). Sourced by the job script.
# Cancel one of the cluster's worker jobs (cluster_main.sh, when the cluster ends without the flow).
ar_cancel_job() { scancel -- "$1" 2>/dev/null || true; }

ar_launch_workers() {
    local count=$((SLURM_JOB_NUM_NODES - 1))
    [ "$count" -gt 0 ] || return 0
    srun --nodes="$count" --ntasks="$count" --ntasks-per-node=1 --exclude="$SLURMD_NODENAME" \
        --kill-on-bad-exit=0 --cpus-per-task="${AR_NUM_CPUS:-$SLURM_CPUS_ON_NODE}" \
        bash "$AR_CLUSTER_DIR/bin/ray_worker.sh" >"$AR_CLUSTER_DIR/logs/workers.log" 2>&1 &
}
