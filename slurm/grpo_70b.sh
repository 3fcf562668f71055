#!/bin/bash
# GRPO baseline on Llama-3 70B, math (the CIPO run without the correction stream): 8 nodes x 8 GPUs.
#   sbatch slurm/grpo_70b.sh [key=value overrides...]      (from the repository root; docs/launching.md)
#   CONFIG=... sbatch slurm/grpo_70b.sh selects another config.
# The USR1 comes 1800 s before the time limit: the driver finishes its step, checkpoints, and the job requeues itself
# and resumes. Make it longer than one step plus one checkpoint save (both are in driver.log).
#SBATCH --job-name=grpo-70b
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
export CONFIG=${CONFIG:-conf/grpo_llama3_70b_math.yaml}
# sbatch runs a copy of this file from Slurm's spool: find the launcher through the submit directory.
exec "${REPO_DIR:-$SLURM_SUBMIT_DIR}/slurm/ray_on_slurm.sh" "$@"
