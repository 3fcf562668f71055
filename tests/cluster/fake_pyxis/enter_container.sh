#!/bin/bash
# The inside of tests/cluster/fake_pyxis/srun's container step (already in a private mount namespace):
#   enter_container.sh MOUNTS NAME WORKDIR COMMAND...
set -euo pipefail
mounts=$1 name=$2 workdir=$3
shift 3
# Bind the mount sources somewhere outside /tmp first: the new /tmp hides anything below the old one.
stage=$(mktemp -d /run/fake-pyxis.XXXXXX)
IFS=, read -ra pairs <<<"$mounts"
for i in "${!pairs[@]}"; do
    mkdir -p "$stage/$i"
    mount --bind "${pairs[$i]%%:*}" "$stage/$i"
done
if [ -n "$name" ]; then  # one /tmp per named container and node, kept on the host for the job's other steps
    shared=/var/tmp/fake-pyxis/$SLURM_JOB_ID-$name-$(hostname)
    mkdir -p "$shared"
    mount --bind "$shared" /tmp
    kind="named container $name"
else
    mount -t tmpfs tmpfs /tmp
    kind="own container"
fi
for i in "${!pairs[@]}"; do
    mkdir -p "${pairs[$i]#*:}"
    mount --bind "$stage/$i" "${pairs[$i]#*:}"
    umount "$stage/$i"
done
rm -rf "$stage"
# one line per step: the newlines of a `python -c` program become spaces
command=$(printf '%s ' "$@" | tr '\n' ' ')
echo "step $SLURM_STEP_ID on $(hostname): $kind, private /tmp, mounts $mounts: $command" >> "$FAKE_PYXIS_LOG"
cd "${workdir:-/}"
exec "$@"
