#!/bin/bash
# skipnets on a SLURM cluster: 2 nodes x 4 GPUs, one task per GPU, requeued on pre-emption.
#
#   sbatch configs/cluster/sbatch.sh configs/quickstart.yaml [more skipnets fit options]
#
# Run it from the repository root (the configs are relative paths). Each job writes under
# runs/slurm-<job id>: a requeued job keeps its id, so it finds its hpc checkpoint and W&B run.
#SBATCH --job-name=skipnets
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm-%j.out

set -euo pipefail
config=${1:?usage: sbatch configs/cluster/sbatch.sh CONFIG [skipnets fit options]}
shift

# Compute nodes often have no internet: W&B then logs offline (or set WANDB_MODE=offline), and
# the run directory's run.json holds the `wandb sync` command to upload it from a login node.
srun skipnets fit \
    --config "$config" \
    --config configs/cluster/multinode.yaml \
    --trainer.default_root_dir "runs/slurm-${SLURM_JOB_ID}" \
    "$@"
