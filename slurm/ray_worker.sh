#!/usr/bin/env bash
# One Ray worker node, run by slurm/ray_on_slurm.sh as a task of its batched worker srun (one task per other node):
#   ray_worker.sh HEAD_ADDRESS TIMEOUT_S PYTHON RAY_START_COMMAND...
# Waits until the head's GCS port answers (retrying for TIMEOUT_S), then runs `ray start --block` with this node's
# label and temp dir. A start that fails within its first START_GRACE_S seconds (it could not join) is retried up to
# START_ATTEMPTS times; once a worker has run longer, its exit (the launcher stopping Ray) ends the task.
set -uo pipefail
ADDRESS=$1 TIMEOUT_S=$2 PYTHON=$3
shift 3
START_ATTEMPTS=${RAY_WORKER_START_ATTEMPTS:-3}
START_GRACE_S=60
node=${SLURMD_NODENAME:-$(hostname)}
echo "[ray_worker $node $(date +%H:%M:%S)] waiting for the Ray head at $ADDRESS"
"$PYTHON" -m cipo_nemo.distributed.wait_for_head --address="$ADDRESS" --timeout-s="$TIMEOUT_S" || exit 1

RAY_PID= STOPPING=0
trap 'STOPPING=1; [ -n "$RAY_PID" ] && kill -TERM "$RAY_PID" 2>/dev/null' TERM INT
for attempt in $(seq "$START_ATTEMPTS"); do
    started=$SECONDS
    "$@" --labels="slurm_node=$node" --temp-dir="$RAY_TMPDIR/ray-$SLURM_JOB_ID-w$SLURM_NODEID" &
    RAY_PID=$!
    while :; do  # `wait` returns early when a trapped signal arrives: wait again until ray start has exited
        wait "$RAY_PID"; rc=$?
        kill -0 "$RAY_PID" 2>/dev/null || break
    done
    if [ "$STOPPING" = 1 ] || [ $((SECONDS - started)) -ge "$START_GRACE_S" ] || [ "$attempt" -ge "$START_ATTEMPTS" ]; then
        exit "$rc"
    fi
    echo "[ray_worker $node $(date +%H:%M:%S)] ray start exited with $rc after $((SECONDS - started)) s" \
         "(attempt $attempt of $START_ATTEMPTS); retrying in 5 s"
    sleep 5
done
