#!/usr/bin/env bash
#SBATCH --job-name=ar-0123abcd
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=16896M
#SBATCH --time=00:30:00
#SBATCH --output=/scratch/alice/activate-ray/clusters/ar-0123abcd/logs/wjob-%j.out
#SBATCH --signal=B:USR1@60
#SBATCH --gpus-per-node=2
#SBATCH --account=proj-1
#SBATCH --partition=gpu-short
# activate-ray worker job of cluster ar-0123abcd (slurm)
set -euo pipefail
export AR_CLUSTER_DIR=/scratch/alice/activate-ray/clusters/ar-0123abcd
. "$AR_CLUSTER_DIR/cluster.env"
export AR_NUM_CPUS=16
export AR_NUM_GPUS=2
. "$AR_CLUSTER_DIR/bin/worker_main.sh"
