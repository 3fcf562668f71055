#!/usr/bin/env bash
# Two simulated Slurm nodes on this machine (docs/notes/slurm_launcher.md; reference: network namespaces n1, n2 on a
# private bridge, one slurmd per namespace in its own UTS namespace so that `hostname` is n1 / n2). Run as root after
# slurm_up.sh has installed the packages and started munged (one munged serves both nodes through its socket).
# Usage: bash multinode_up.sh BASE_DIR; then export SLURM_CONF=BASE_DIR/slurm.conf. Stop with multinode_down.sh.
# The controller listens on 6827 (not 6817) so that it can run beside the one-node test Slurm.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${1:?usage: multinode_up.sh BASE_DIR}
mkdir -p "$BASE"/{state,spool,log,run}
ip link add simbr0 type bridge
ip addr add 10.200.0.1/24 dev simbr0
ip link set simbr0 up
for i in 1 2; do
    ip netns add "n$i"
    ip link add "veth-n$i" type veth peer name eth0 netns "n$i"
    ip link set "veth-n$i" master simbr0 up
    ip -n "n$i" addr add "10.200.0.1$i/24" dev eth0
    ip -n "n$i" link set eth0 up
    ip -n "n$i" link set lo up
done
printf '10.200.0.1 ctl # simcluster\n10.200.0.11 n1 # simcluster\n10.200.0.12 n2 # simcluster\n' >> /etc/hosts
cat > "$BASE/slurm.conf" <<CONF
ClusterName=ciposim
SlurmctldHost=$(hostname -s)(10.200.0.1)
Include $HERE/slurm_common.conf
SlurmdParameters=config_overrides
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldPort=6827
NodeName=n1 NodeAddr=10.200.0.11 CPUs=2 RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeAddr=10.200.0.12 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=sim Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$BASE/slurm.conf"
slurmctld -D -f "$SLURM_CONF" >"$BASE/log/slurmctld.out" 2>&1 &
echo $! > "$BASE/run/slurmctld.fgpid"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
for n in n1 n2; do
    # nsenter, not `ip netns exec` (which remounts /sys, and slurmd then finds no /sys/fs/cgroup)
    nsenter --net="/var/run/netns/$n" unshare --uts sh -c "hostname $n; exec slurmd -D -N $n -f $SLURM_CONF" \
        >"$BASE/log/slurmd-$n.out" 2>&1 &
    echo $! > "$BASE/run/slurmd-$n.fgpid"
done
for _ in $(seq 150); do [ "$(sinfo -h -N -o %t 2>/dev/null | sort -u)" = idle ] && exit 0; sleep 0.2; done
echo "multinode_up: the nodes did not become idle; $BASE/log has the daemons' logs" >&2
sinfo -N >&2 || true
exit 1
