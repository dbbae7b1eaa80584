#!/usr/bin/env bash
#PBS -N ar-0123abcd
#PBS -A proj-1
#PBS -q gpuq
#PBS -l walltime=01:00:00
#PBS -l select=1:ncpus=8:ngpus=1
#PBS -j oe
#PBS -o /scratch/alice/activate-ray/clusters/ar-0123abcd/logs/wjob.pbs.out
# activate-ray worker job of cluster ar-0123abcd (pbs)
set -euo pipefail
export AR_CLUSTER_DIR=/scratch/alice/activate-ray/clusters/ar-0123abcd
. "$AR_CLUSTER_DIR/cluster.env"
export AR_NUM_GPUS=1
. "$AR_CLUSTER_DIR/bin/worker_main.sh"
