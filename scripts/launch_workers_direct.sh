# shellcheck shell=bash
# No scheduler: AR_DIRECT_WORKERS more Ray nodes on this host, beside the head, all at
# once. Sourced by the job script (which has sourced cluster.env and ray_lib.sh's users).
# No worker jobs without a scheduler (scale options need one).
ar_cancel_job() { :; }
# The workers are this shell's background jobs, told to look now with the head (cluster_main.sh).
ar_wake_workers() { :; }
# No allocation, no end.
ar_job_deadline() { :; }

ar_launch_workers() {
    local i
    for i in $(seq 1 "$AR_DIRECT_WORKERS"); do
        ar_run_node worker "worker$i" &
    done
}
