#!/bin/bash
# The launcher on a tiny CPU run, for tests/cluster: like slurm/cipo_qwen3_4b_math.sh with CPU-sized resources.
# The test sets CONFIG, REPO_DIR, DEVICES_PER_NODE, RAY_LOOPBACK and LOG_ROOT, and --output on the sbatch line.
#SBATCH --job-name=cipo-tiny
#SBATCH --nodes=1
#SBATCH --exclusive
#SBATCH --time=00:15:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@60
exec "$REPO_DIR/slurm/ray_on_slurm.sh" "$@"
