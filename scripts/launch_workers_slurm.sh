# shellcheck shell=bash
# SLURM: one job step starts a Ray worker on every other node of the allocation, all at
# once (the batch host is the head). Sourced by the job script.
# Cancel one of the cluster's worker jobs (cluster_main.sh, when the cluster ends without the flow).
ar_cancel_job() { scancel -- "$1" 2>/dev/null || true; }
# Tell every worker to look at the cluster dir now (cluster_main.sh, when the cluster stops):
# WINCH to the job's steps (the workers' supervisors; every other process ignores it).
# (by number: scancel knows no name WINCH)
ar_wake_workers() { scancel --signal="$(kill -l WINCH)" -- "$SLURM_JOB_ID" 2>/dev/null || true; }

# The allocation's end, Unix seconds, as the controller has it (empty if it can not be read):
# Slurm's own SLURM_JOB_END_TIME (23.02+), else squeue's %e, a local time of this host's zone.
ar_job_deadline() {
    local end
    if [ -n "${SLURM_JOB_END_TIME:-}" ] && [ "$SLURM_JOB_END_TIME" -gt 0 ] 2>/dev/null; then
        printf '%s\n' "$SLURM_JOB_END_TIME"
        return 0
    fi
    end="$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null | head -n 1)"
    case "$end" in "" | N/A | Unknown) return 0 ;; esac
    date -d "$end" +%s 2>/dev/null || true
}

ar_launch_workers() {
    local count=$((SLURM_JOB_NUM_NODES - 1))
    [ "$count" -gt 0 ] || return 0
    {
        local status=0 node
        # one output file per node (srun --output=%N): a node whose launch failed is named with its own words
        srun --nodes="$count" --ntasks="$count" --ntasks-per-node=1 --exclude="$SLURMD_NODENAME" \
            --kill-on-bad-exit=0 --cpus-per-task="${AR_NUM_CPUS:-$SLURM_CPUS_ON_NODE}" \
            --output="$AR_CLUSTER_DIR/logs/workers-%N.log" \
            bash "$AR_CLUSTER_DIR/bin/ray_worker.sh" >"$AR_CLUSTER_DIR/logs/workers-srun.log" 2>&1 || status=$?
        [ "$status" = 0 ] && exit 0
        for node in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
            [ "$node" != "$SLURMD_NODENAME" ] || continue
            # srun's own refusal (bad option, no nodes): in its own output, not a node's
            [ -s "$AR_CLUSTER_DIR/logs/workers-$node.log" ] || cp "$AR_CLUSTER_DIR/logs/workers-srun.log" \
                "$AR_CLUSTER_DIR/logs/workers-$node.log" 2>/dev/null || true
            ar_launcher_ended srun "$node" "$status"
        done
    } &
}
