#!/usr/bin/env bash
# Ray on Slurm: run `python -m cipo_nemo` on a Ray cluster spanning the whole allocation (the ray.sub pattern).
#
# Run inside an allocation, normally exec'd by a model script (slurm/cipo_70b.sh ...):
#   CONFIG=conf/X.yaml exec slurm/ray_on_slurm.sh [key=value overrides...]
# Steps: (1) the dry run (`python -m cipo_nemo --dry-run`) for this allocation; a failure stops the job before
# Ray starts. (2) The Ray head on this (the first) node, one Ray worker on every other node with one batched
# srun once the head is up (each worker also waits for the head's port, with retries: slurm/ray_worker.sh). (3) Wait
# until every node has registered its CPUs/GPUs. (4) The driver on this node joins the head
# (cluster.ray_address). (5) SIGUSR1/SIGTERM to this script are forwarded to the driver, which finishes its step,
# checkpoints and exits 75; the job is then requeued (`scontrol requeue`) and resumes from that checkpoint.
# (6) Ray is stopped by PID (never `ray stop`, which kills by name every Ray on the node).
# Exit status: the driver's (0 done, 2 config/data/model error, ...); 75 becomes a requeue.
#
# Environment (all optional except CONFIG; docs/launching.md has the details):
#   CONFIG              YAML config, relative to the repository or absolute (required)
#   REPO_DIR            repository root (default: the folder above this script)
#   PYTHON              Python with cipo_nemo and Ray installed (default: python on PATH; with CONTAINER_IMAGE
#                       the container's: this script itself runs no Python on the bare host)
#   GPUS_PER_NODE       GPUs per node (default: SLURM_GPUS_ON_NODE, else 0)
#   DEVICES_PER_NODE    cluster.devices_per_node (default: GPUS_PER_NODE; set it for CPU-only runs)
#   CPUS_PER_NODE       CPUs Ray offers per node (default: SLURM_CPUS_ON_NODE)
#   LOG_ROOT            logs go to LOG_ROOT/<job id>/ (default: logs)
#   RAY_PORT            Ray head (GCS) port (default: a free port)
#   RAY_HEAD_IP         address the head binds and workers dial (default: `hostname --ip-address` of this node)
#   RAY_LOOPBACK        1: single-node cluster pinned to 127.0.0.1 (tests on machines whose interfaces are off-limits)
#   RAY_TMPDIR          parent of the Ray temp dirs ray-<job>-h (head), ray-<job>-w<i> (workers) (default: /tmp;
#                       keep it short: Ray's sockets live below it and Unix socket paths are limited to 107 bytes)
#   RAY_AUTH_MODE       token (default) or disabled; with token a per-job RAY_AUTH_TOKEN is made unless one is set
#   RAY_NODES_TIMEOUT_S how long to wait for every node to register (default: 600)
#   CONTAINER_IMAGE     run Ray and the driver in this container through pyxis (`srun --container-image`); off if unset
#   CONTAINER_MOUNTS    more pyxis --container-mounts (data, models, outputs); REPO_DIR and RAY_TMPDIR are always mounted
#   MAX_REQUEUES        do not requeue once the job has been restarted this many times (default: 50)
set -uo pipefail

LOG_DIR=
log() {
    local line="[ray_on_slurm $(date +%H:%M:%S)] $*"
    echo "$line"
    [ -z "$LOG_DIR" ] || echo "$line" >>"$LOG_DIR/launcher.log"
}
die() { log "ERROR: $*"; exit 1; }

# ------------------------------------------------------------------------------------------------ settings
[ -n "${SLURM_JOB_ID:-}" ] || { echo "ray_on_slurm: run inside a Slurm allocation (sbatch slurm/<model>.sh)" >&2; exit 1; }
[ -n "${CONFIG:-}" ] || { echo "ray_on_slurm: set CONFIG to a YAML config" >&2; exit 1; }
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$REPO_DIR" || exit 1
PYTHON=${PYTHON:-python}
RAY=("$PYTHON" -m ray.scripts.scripts)  # the ray CLI of the same interpreter as the driver
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
NUM_NODES=${#NODES[@]}
HEAD_NODE=${NODES[0]}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
DEVICES_PER_NODE=${DEVICES_PER_NODE:-$GPUS_PER_NODE}
CPUS_PER_NODE=${CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
LOG_ROOT=${LOG_ROOT:-logs}
mkdir -p "$LOG_ROOT/$SLURM_JOB_ID" || exit 1
LOG_DIR=$(cd "$LOG_ROOT/$SLURM_JOB_ID" && pwd)  # absolute: worker steps write here too
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp}  # exported: the worker steps name their temp dirs from it
RAY_NODES_TIMEOUT_S=${RAY_NODES_TIMEOUT_S:-600}
MAX_REQUEUES=${MAX_REQUEUES:-50}
RESTARTS=${SLURM_RESTART_COUNT:-0}
# Ray opens several files and sockets per worker process and per connection: raise the open-files limit as far as
# the hard limit allows. Ray, the driver and the srun steps inherit it (srun propagates resource limits).
ulimit -n 65535 2>/dev/null || ulimit -n "$(ulimit -H -n)" 2>/dev/null

log "job $SLURM_JOB_ID (restart $RESTARTS): $NUM_NODES node(s) ${NODES[*]}, $DEVICES_PER_NODE device(s) and" \
    "$CPUS_PER_NODE CPUs per node, CONFIG=$CONFIG, logs in $LOG_DIR, open files limit $(ulimit -n)"
[ "$DEVICES_PER_NODE" -ge 1 ] 2>/dev/null \
    || die "no GPUs in this allocation (GPUS_PER_NODE=$GPUS_PER_NODE): set DEVICES_PER_NODE for a CPU-only run"
[ "${SLURMD_NODENAME:-$HEAD_NODE}" = "$HEAD_NODE" ] || die "the batch script runs on $SLURMD_NODENAME, not on the first node $HEAD_NODE"

# Every srun step asks for the node's GPUs explicitly: a step gets no GRES unless it asks (nothing when there are no
# GPUs: a cluster without GRES would refuse the option).
STEP_GRES=()
[ "$GPUS_PER_NODE" -ge 1 ] 2>/dev/null && STEP_GRES=(--gres="gpu:$GPUS_PER_NODE")

# Pyxis: Ray and the driver then run in srun steps inside the container (the batch shell itself is not in it).
# ON_HEAD prefixes every command of this node: empty (a direct child of this shell, so that $! is the process
# itself and SIGTERM/SIGUSR1 reach it) or a one-task step in the container (srun passes the signals on).
# Each step is a container of its own, with its own /tmp: the driver's step could not see the raylet's sockets in
# the head's step. So Ray's temp dirs are a host path mounted into every container at the same place, and the steps
# of a node share one named container (the image is unpacked once per node, not once per step).
CONTAINER_ARGS=()
ON_HEAD=()
if [ -n "${CONTAINER_IMAGE:-}" ]; then
    mkdir -p "$RAY_TMPDIR" || exit 1
    RAY_TMPDIR=$(cd "$RAY_TMPDIR" && pwd)
    CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-name="cipo-$SLURM_JOB_ID"
                    --container-workdir="$REPO_DIR"
                    --container-mounts="$REPO_DIR:$REPO_DIR,$RAY_TMPDIR:$RAY_TMPDIR${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}")
    ON_HEAD=(srun --overlap --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --cpus-per-task="$CPUS_PER_NODE"
             "${STEP_GRES[@]}" "${CONTAINER_ARGS[@]}")
fi

# ------------------------------------------------------------------------------------------------ signals
# Slurm signals only this shell (`--signal=B:USR1@300`, `scancel --batch --signal=USR1`): pass the request on to the
# driver, which checkpoints after its current step. Before the driver runs there is nothing to save: just requeue.
STOP_REQUESTED=0
DRIVER_PID=
HEAD_PID=
WORKERS_PID=
on_stop_signal() {
    STOP_REQUESTED=1
    if [ -n "$DRIVER_PID" ]; then
        log "$1 received: asking the driver (pid $DRIVER_PID) to checkpoint and stop"
        kill -USR1 "$DRIVER_PID" 2>/dev/null
    else
        log "$1 received before the driver started: will requeue without starting it"
    fi
}
trap 'on_stop_signal USR1' USR1
trap 'on_stop_signal TERM' TERM

# Stop what this script started, by PID: SIGTERM to `ray start --block` stops that node's Ray (1-3 s); escalate.
stop_pid() {
    local pid=$1 name=$2
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }; sleep 0.1; done
    log "$name (pid $pid) still running 10 s after SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}
cleanup() {
    stop_pid "$DRIVER_PID" driver
    stop_pid "$WORKERS_PID" "Ray workers"
    stop_pid "$HEAD_PID" "Ray head"
}
trap cleanup EXIT

# Wait for a child, riding out the trapped signals that interrupt `wait`; sets RC to its exit status.
# (Not `rc=$(wait_for ...)`: a command substitution is a subshell, which cannot wait for this shell's children.)
wait_for() {
    local pid=$1
    while :; do
        wait "$pid"; RC=$?
        if [ "$RC" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi  # interrupted by a trap, still running
        return 0
    done
}

# `ray start --block` prints this line once the node is up; only lines after `from_line` (this attempt) count.
wait_for_head() {
    local from_line=$1
    for _ in $(seq $((RAY_NODES_TIMEOUT_S * 5))); do
        tail -n +"$from_line" "$LOG_DIR/ray-head.log" | grep -q "Ray runtime started" && return 0
        kill -0 "$HEAD_PID" 2>/dev/null || die "the Ray head exited while starting (ray-head.log)"
        sleep 0.2
    done
    die "the Ray head did not start within $RAY_NODES_TIMEOUT_S s (ray-head.log)"
}

requeue_or_exit() {
    if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
        log "not requeueing: restarted $RESTARTS times already (MAX_REQUEUES=$MAX_REQUEUES)"; exit 75
    fi
    cleanup; trap - EXIT  # Ray down before Slurm ends this attempt
    log "requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint"
    trap '' USR1 TERM  # the requeue ends this attempt with a TERM: nothing is left to stop
    scontrol requeue "$SLURM_JOB_ID" || { log "scontrol requeue failed"; exit 75; }
    exit 0
}

# ------------------------------------------------------------------------------------------------ 1. dry run
CLUSTER_OVERRIDES=("cluster.num_nodes=$NUM_NODES" "cluster.devices_per_node=$DEVICES_PER_NODE")
echo "=== $(date '+%F %T') job $SLURM_JOB_ID restart $RESTARTS: dry run" >>"$LOG_DIR/driver.log"
"${ON_HEAD[@]}" "$PYTHON" -m cipo_nemo --config "$CONFIG" --dry-run "${CLUSTER_OVERRIDES[@]}" "$@" >>"$LOG_DIR/driver.log" 2>&1 &
wait_for $!
if [ "$RC" -ne 0 ]; then
    tail -n 20 "$LOG_DIR/driver.log" | sed 's/^/    /'
    die "the dry run failed (exit $RC; $LOG_DIR/driver.log): not starting Ray"
fi
[ "$STOP_REQUESTED" -eq 0 ] || requeue_or_exit

# ------------------------------------------------------------------------------------------------ 2. Ray
RAY_ARGS=(--block --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" --disable-usage-stats)
if [ "${RAY_LOOPBACK:-0}" = 1 ]; then
    [ "$NUM_NODES" -eq 1 ] || die "RAY_LOOPBACK=1 only works for a single node (this job has $NUM_NODES)"
    RAY_HEAD_IP=127.0.0.1
    # Without this, Ray replaces 127.0.0.1 with the primary interface's address.
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
fi
RAY_HEAD_IP=${RAY_HEAD_IP:-$(hostname --ip-address | awk '{print $1}')}
# Debian-style /etc/hosts maps the host name to 127.0.1.1: other nodes could not reach that.
[[ "$NUM_NODES" -eq 1 || "$RAY_HEAD_IP" != 127.* ]] \
    || die "the head address $RAY_HEAD_IP is a loopback address; set RAY_HEAD_IP to one the other nodes can reach"
# Free ports for everything the head would otherwise open on a fixed port (GCS 6379, client server 10001,
# dashboard 8265, dashboard agent 52365): two jobs, or a job and another Ray, may share a node. And a per-job auth
# token. Both come from the job's Python, on the head node as every $PYTHON here: in the container when there is one
# (the bare host may have no python; pyxis containers share the host's network, so the ports are the host's).
read -r FREE_GCS FREE_CLIENT FREE_DASHBOARD FREE_AGENT NEW_AUTH_TOKEN < <("${ON_HEAD[@]}" "$PYTHON" -c '
import secrets, socket, sys
sockets = [socket.socket() for _ in range(4)]
for s in sockets:
    s.bind((sys.argv[1], 0))
print(*(s.getsockname()[1] for s in sockets), secrets.token_hex(32))' "$RAY_HEAD_IP")
[ -n "$NEW_AUTH_TOKEN" ] || die "could not pick free ports on $HEAD_NODE with $PYTHON"
RAY_PORT=${RAY_PORT:-$FREE_GCS}
RAY_ARGS+=(--dashboard-agent-listen-port="$FREE_AGENT")
RAY_ADDRESS_OF_JOB=$RAY_HEAD_IP:$RAY_PORT
# Token auth is Ray 2.60's default for `ray start --head`; workers and the driver need the same token. A per-job
# token in the environment (srun passes it on) needs no shared ~/.ray and leaves the user's token alone.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    export RAY_AUTH_TOKEN=$NEW_AUTH_TOKEN
fi
unset NEW_AUTH_TOKEN

log "Ray head on $HEAD_NODE at $RAY_ADDRESS_OF_JOB (temp dir $RAY_TMPDIR/ray-$SLURM_JOB_ID-h)"
echo "=== $(date '+%F %T') job $SLURM_JOB_ID restart $RESTARTS" >>"$LOG_DIR/ray-head.log"
HEAD_LOG_FROM=$(wc -l <"$LOG_DIR/ray-head.log")
# setsid: `ray start` and the daemons it forks would otherwise share this shell's process group (measured), and a
# signal meant for the batch shell's group must not stop Ray before the driver has checkpointed.
HEAD_SESSION=(setsid)
[ ${#ON_HEAD[@]} -eq 0 ] || HEAD_SESSION=()
"${ON_HEAD[@]}" "${HEAD_SESSION[@]}" "${RAY[@]}" start --head "${RAY_ARGS[@]}" --node-ip-address="$RAY_HEAD_IP" --port="$RAY_PORT" \
    --ray-client-server-port="$FREE_CLIENT" --dashboard-port="$FREE_DASHBOARD" \
    --include-dashboard=false --labels="slurm_node=$HEAD_NODE" --temp-dir="$RAY_TMPDIR/ray-$SLURM_JOB_ID-h" \
    >>"$LOG_DIR/ray-head.log" 2>&1 &
HEAD_PID=$!

# ------------------------------------------------------------------------------------------------ 3. wait
wait_for_head "$HEAD_LOG_FROM"
if [ "$NUM_NODES" -gt 1 ]; then
    # One batched step, once the head is up: one Ray worker per other node. Each waits for the head's port and
    # retries a start that fails early (slurm/ray_worker.sh), names its own node (label) and temp dir (by its
    # index in the step: distinct even where the nodes share /tmp, short whatever the host names).
    log "Ray workers on ${NODES[*]:1} (one srun, logs ray-worker-<node>.log)"
    srun --overlap --nodes=$((NUM_NODES - 1)) --ntasks=$((NUM_NODES - 1)) --ntasks-per-node=1 \
        --exclude="$HEAD_NODE" --cpus-per-task="$CPUS_PER_NODE" --kill-on-bad-exit=0 "${STEP_GRES[@]}" \
        --output="$LOG_DIR/ray-worker-%N.log" --open-mode=append "${CONTAINER_ARGS[@]}" \
        bash "$REPO_DIR/slurm/ray_worker.sh" "$RAY_ADDRESS_OF_JOB" "$RAY_NODES_TIMEOUT_S" \
        "$PYTHON" "${RAY[@]}" start --address="$RAY_ADDRESS_OF_JOB" "${RAY_ARGS[@]}" &
    WORKERS_PID=$!
fi
"${ON_HEAD[@]}" "$PYTHON" -m cipo_nemo.distributed.wait_for_nodes --address="$RAY_ADDRESS_OF_JOB" \
    --nodes="$(IFS=,; echo "${NODES[*]}")" --cpus-per-node="$CPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE" \
    --timeout-s="$RAY_NODES_TIMEOUT_S" 2>&1 | tee -a "$LOG_DIR/launcher.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || die "Ray did not come up on every node (ray-head.log, ray-worker-*.log)"
[ "$STOP_REQUESTED" -eq 0 ] || requeue_or_exit

# ------------------------------------------------------------------------------------------------ 4. driver
echo "=== $(date '+%F %T') job $SLURM_JOB_ID restart $RESTARTS: training, Ray at $RAY_ADDRESS_OF_JOB" >>"$LOG_DIR/driver.log"
"${ON_HEAD[@]}" "$PYTHON" -m cipo_nemo --config "$CONFIG" "${CLUSTER_OVERRIDES[@]}" "cluster.ray_address=$RAY_ADDRESS_OF_JOB" \
    "$@" >>"$LOG_DIR/driver.log" 2>&1 &
DRIVER_PID=$!
log "driver pid $DRIVER_PID started, joining Ray at $RAY_ADDRESS_OF_JOB (log driver.log)"
wait_for "$DRIVER_PID"
DRIVER_PID=
log "driver exited with status $RC"

# ------------------------------------------------------------------------------------------------ 5. exit
[ "$RC" -eq 75 ] && requeue_or_exit
exit "$RC"
