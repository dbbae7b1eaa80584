#!/usr/bin/env bash
#PBS -N ar-0123abcd
#PBS -A proj-1
#PBS -q workq
#PBS -l walltime=01:00:00
#PBS -l select=3:ncpus=8
#PBS -l place=scatter
#PBS -j oe
#PBS -o /scratch/alice/activate-ray/clusters/ar-0123abcd/logs/job.out
# activate-ray cluster ar-0123abcd (pbs)
set -euo pipefail
export AR_CLUSTER_DIR=/scratch/alice/activate-ray/clusters/ar-0123abcd
. "$AR_CLUSTER_DIR/cluster.env"
. "$AR_CLUSTER_DIR/bin/launch_workers_pbs.sh"
. "$AR_CLUSTER_DIR/bin/cluster_main.sh"
