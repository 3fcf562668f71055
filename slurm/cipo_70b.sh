#!/bin/bash
# CIPO on Llama-3 70B, math: 8 nodes x 8 GPUs (80 GB).
#   sbatch slurm/cipo_70b.sh [key=value overrides...]      (from the repository root; docs/launching.md)
#   CONFIG=conf/cipo_llama3_70b_math_fp8.yaml sbatch slurm/cipo_70b.sh      # FP8 (Transformer Engine) variant
# The USR1 comes 1800 s before the time limit: the driver finishes its step, checkpoints, and the job requeues itself
# and resumes. Make it longer than one step plus one checkpoint save (both are in driver.log).
#SBATCH --job-name=cipo-70b
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@1800
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
export CONFIG=${CONFIG:-conf/cipo_llama3_70b_math.yaml}
# sbatch runs a copy of this file from Slurm's spool: find the launcher through the submit directory.
exec "${REPO_DIR:-$SLURM_SUBMIT_DIR}/slurm/ray_on_slurm.sh" "$@"
