#!/usr/bin/env bash
# Stop what slurm_up.sh BASE_DIR started, by the PIDs it recorded (never by name: other Slurm or munge instances
# on the machine are left alone).
BASE=${1:?usage: slurm_down.sh BASE_DIR}
for name in slurmd slurmctld munged; do
    file=$BASE/run/$name.fgpid
    [ "$name" = munged ] && file=$BASE/run/munged.pid
    pid=$(cat "$file" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
done
exit 0
