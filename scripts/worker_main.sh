# shellcheck shell=bash
# The body of a worker job: one extra Ray worker, a scheduler job of its own (its own
# partition, walltime, GPUs) that joins the running head of its cluster. Sourced by the
# worker job script after cluster.env (and the site setup). Submitted at start
# (scale.worker_jobs), by `scale --add` or by the adaptive loop; ends when the cluster
# stops, when this job is removed (nodes/<name>.remove) or at its walltime.
# Exits 0 for a stop the cluster or the flow asked for.

# shellcheck disable=SC1091
. "$AR_CLUSTER_DIR/bin/ray_lib.sh"
ar_job_id="${SLURM_JOB_ID:-${PBS_JOBID:-}}"
ar_job_id="${ar_job_id%%.*}"
[ -n "$ar_job_id" ] || { ar_log "worker job: no SLURM_JOB_ID or PBS_JOBID"; exit 1; }
ar_worker_name="wjob-$ar_job_id"
# ar_stop_reason also sees this job's own removal (nodes/NAME.remove), while it waits too
export AR_NODE_NAME="$ar_worker_name"
# one log per worker job (PBS's -o is one path for every worker job of the cluster)
exec >>"$AR_CLUSTER_DIR/logs/$ar_worker_name.out" 2>&1
# a job that starts after the cluster stopped (still queued at teardown) leaves at once
if [ -n "$(ar_stop_reason)" ]; then
    ar_log "worker job $ar_job_id: cluster $AR_CLUSTER_ID is stopping ($(ar_stop_reason)): nothing to join"
    exit 0
fi
ar_wait_for_environment || exit 1
for _ in $(seq 1 6000); do
    [ -e "$AR_CLUSTER_DIR/head.env" ] && break
    [ -z "$(ar_stop_reason)" ] || exit 0
    sleep 0.1
done
[ -e "$AR_CLUSTER_DIR/head.env" ] || { ar_log "worker job $ar_job_id: no head after 600s"; exit 1; }
# Ray's node name says host and job: the flow's node watcher keeps worker jobs apart from
# the allocation's nodes (a worker job may end, or be removed, without failing the cluster)
AR_RAY_NODE_NAME="$ar_worker_name@$(ar_host)" ar_run_node worker "$ar_worker_name"
