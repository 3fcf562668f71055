#!/bin/bash
# CIPO on Seed-Coder-8B, code: 2 nodes x 8 GPUs.
#   sbatch slurm/cipo_seed_coder_8b_code.sh [key=value overrides...]      (from the repository root; docs/launching.md)
#   CONFIG=... sbatch slurm/cipo_seed_coder_8b_code.sh selects another config.
# The USR1 comes 600 s before the time limit: the driver finishes its step, checkpoints, and the job requeues itself
# and resumes. Make it longer than one step plus one checkpoint save (both are in driver.log).
#SBATCH --job-name=cipo-seed-coder-8b
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
export CONFIG=${CONFIG:-conf/cipo_seed_coder_8b_code.yaml}
# sbatch runs a copy of this file from Slurm's spool: find the launcher through the submit directory.
exec "${REPO_DIR:-$SLURM_SUBMIT_DIR}/slurm/ray_on_slurm.sh" "$@"
