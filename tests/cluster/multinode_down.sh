#!/usr/bin/env bash
# Undo multinode_up.sh BASE_DIR: daemons by recorded PID, then the namespaces, the bridge and the /etc/hosts lines.
BASE=${1:?usage: multinode_down.sh BASE_DIR}
for file in "$BASE"/run/slurmd-n1.fgpid "$BASE"/run/slurmd-n2.fgpid "$BASE"/run/slurmctld.fgpid; do
    pid=$(cat "$file" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
done
for i in 1 2; do ip netns del "n$i" 2>/dev/null; done
ip link del simbr0 2>/dev/null
sed -i '/# simcluster$/d' /etc/hosts
exit 0
