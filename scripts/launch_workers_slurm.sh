# shellcheck shell=bash
# SLURM: one job step starts a Ray worker on every other node of the allocation, all at
# once (the batch host is the head). Sourced by the job script.
ar_launch_workers() {
    local count=$((SLURM_JOB_NUM_NODES - 1))
    [ "$count" -gt 0 ] || return 0
    srun --nodes="$count" --ntasks="$count" --ntasks-per-node=1 --exclude="$SLURMD_NODENAME" \
        --kill-on-bad-exit=0 --cpus-per-task="${AR_NUM_CPUS:-$SLURM_CPUS_ON_NODE}" \
        bash "$AR_CLUSTER_DIR/bin/ray_worker.sh" >"$AR_CLUSTER_DIR/logs/workers.log" 2>&1 &
}
