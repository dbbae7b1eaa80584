#!/usr/bin/env bash
#SBATCH --job-name=ar-0123abcd
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=16896M
#SBATCH --time=02:00:00
#SBATCH --output=/scratch/alice/activate-ray/clusters/ar-0123abcd/logs/job-%j.out
#SBATCH --signal=B:USR1@300
#SBATCH --gpus-per-node=1
#SBATCH --account=proj-1
#SBATCH --partition=gpu
#SBATCH --constraint=a100
# activate-ray cluster ar-0123abcd (slurm)
set -euo pipefail
export AR_CLUSTER_DIR=/scratch/alice/activate-ray/clusters/ar-0123abcd
. "$AR_CLUSTER_DIR/cluster.env"
. "$AR_CLUSTER_DIR/bin/launch_workers_slurm.sh"
. "$AR_CLUSTER_DIR/bin/cluster_main.sh"
