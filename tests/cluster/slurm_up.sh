#!/usr/bin/env bash
# A one-node Slurm on this machine for tests/cluster (docs/notes/slurm_launcher.md). Run as root.
# Usage: bash slurm_up.sh BASE_DIR; then export SLURM_CONF=BASE_DIR/slurm.conf. Stop with slurm_down.sh BASE_DIR.
# Installs Debian's Slurm and munge when missing; everything but the munge key lives under BASE_DIR.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${1:?usage: slurm_up.sh BASE_DIR}
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi
mkdir -p "$BASE"/{state,spool,log,run}
HOST=$(hostname -s)
NCPU=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))

# munge: key + daemon, run as user munge like the Debian unit. A munged that already answers is reused (and left
# running by slurm_down.sh); one started here is recorded so that only it is stopped.
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 755 /run/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$BASE/run/munged.pid"
    for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n </dev/null | unmunge >/dev/null

if scontrol ping 2>/dev/null | grep -q UP; then
    echo "slurm_up: a slurmctld already answers on this machine; refusing to start a second one" >&2
    exit 1
fi
# The settings both test clusters share are in slurm_common.conf.
cat > "$BASE/slurm.conf" <<CONF
ClusterName=cipotest
SlurmctldHost=$HOST
Include $HERE/slurm_common.conf
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldPort=6817
NodeName=$HOST CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
export SLURM_CONF="$BASE/slurm.conf"
slurmctld -D -f "$SLURM_CONF" >"$BASE/log/slurmctld.out" 2>&1 &
echo $! > "$BASE/run/slurmctld.fgpid"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
slurmd -D -f "$SLURM_CONF" >"$BASE/log/slurmd.out" 2>&1 &
echo $! > "$BASE/run/slurmd.fgpid"
for _ in $(seq 150); do [ "$(sinfo -h -N -o %t 2>/dev/null | head -1)" = idle ] && exit 0; sleep 0.2; done
echo "slurm_up: the node did not become idle; $BASE/log has the daemons' logs" >&2
sinfo -N >&2 || true
exit 1
