#!/bin/sh
# info: list the virtio devices the guest sees, with their negotiated feature
# bits, and basic system facts. Needs no devices; always passes.
. /tests/lib/common.sh

result info-kernel INFO "$(uname -r) cpus=$(nproc) mem_kib=$(awk '/MemTotal/ { print $2 }' /proc/meminfo)"
n=0
for d in /sys/bus/virtio/devices/virtio*; do
    [ -e "$d" ] || continue
    n=$((n + 1))
    drv=$(basename "$(readlink "$d/driver" 2>/dev/null)" 2>/dev/null)
    result "info-${d##*/}" INFO "device=$(cat "$d/device") vendor=$(cat "$d/vendor") driver=${drv:-none} $(virtio_features "$d")"
done
result info-virtio-count INFO "$n"
finish
