#!/bin/sh
# blk: the virtio-blk disk under test (/dev/vda unless MVMM_DISK=<name>).
#
# Parameters (kernel command line mvmm.<key>=<value>, seen as MVMM_<KEY>):
#   size_sectors=N  expected /sys/block/vda/size (512-byte sectors)
#   serial=S        expected /sys/block/vda/serial (the device ID string)
#   ro=0|1          expected read-only flag (default 0)
#   sha256=H        read-only disks: expected SHA-256 of the whole disk
#   data_mib=N      writable disks: MiB of file data to write (default 64)
#   files=N         ... spread over N files (default 16)
#
# Writable disks: raw O_DIRECT write/read at the start and end of the disk,
# then mkfs.ext4 (destroys the disk's contents), mount, write the files,
# sync, umount, mount, verify, e2fsck. The checksums stay on the disk in
# /MANIFEST (sha256sum format, paths relative to the fs root) for the host:
#   resources/guest/verify-blk-image.sh IMG
# Read-only disks: a write must fail, the whole disk must be readable.
. /tests/lib/common.sh

DISK=${MVMM_DISK:-vda}
DEV=/dev/$DISK
SYS=/sys/block/$DISK
RO=${MVMM_RO:-0}
DATA_MIB=${MVMM_DATA_MIB:-64}
FILES=${MVMM_FILES:-16}

if ! wait_for "$SYS" 10 || ! wait_for "$DEV" 5; then
    result blk-present FAIL "no $SYS / $DEV after 10 s; virtio devices: $(ls /sys/bus/virtio/devices 2>/dev/null | tr '\n' ' ')"
    finish
fi
vdev=$(readlink -f "$SYS/device")
result blk-present PASS "$DEV on ${vdev##*/}"
result blk-features INFO "$(virtio_features "$SYS/device")"
result blk-queue INFO "$(blk_queue_info "$DISK")"

sectors=$(cat "$SYS/size")
check_eq blk-size "$MVMM_SIZE_SECTORS" "$sectors" sectors
if serial=$(cat "$SYS/serial" 2>/tmp/serial.err); then
    check_eq blk-serial "$MVMM_SERIAL" "$serial" serial
elif [ -n "$MVMM_SERIAL" ]; then
    result blk-serial FAIL "reading $SYS/serial failed: $(cat /tmp/serial.err) expected=$MVMM_SERIAL"
else
    result blk-serial INFO "no serial ($(cat /tmp/serial.err))"
fi
ro=$(cat "$SYS/ro")
check_eq blk-ro "$RO" "$ro" ro

bytes=$((sectors * 512))

if [ "$ro" = 1 ]; then
    if dd if=/dev/zero of="$DEV" bs=4096 count=1 oflag=direct conv=notrunc 2>/tmp/dd.err; then
        result blk-ro-write FAIL "writing to the read-only disk succeeded"
    else
        result blk-ro-write PASS "write refused: $(grep -m1 'dd:' /tmp/dd.err)"
    fi
    t=$(now_cs)
    if sum=$(sha256sum "$DEV"); then
        sum=${sum%% *}
        cs=$(($(now_cs) - t))
        if [ -n "$MVMM_SHA256" ]; then
            check_eq blk-ro-read "$MVMM_SHA256" "$sum" sha256
        else
            result blk-ro-read PASS "sha256=$sum"
        fi
        result blk-ro-read-rate INFO "$bytes bytes in $(elapsed 0 $cs) s, $(rate $bytes $cs) MiB/s"
    else
        result blk-ro-read FAIL "reading the whole disk failed"
    fi
    finish
fi

# Raw I/O at both ends of the disk (O_DIRECT, 1 MiB each).
if [ "$sectors" -ge 8192 ]; then
    dd if=/dev/urandom of=/tmp/raw bs=1M count=1 2>/dev/null
    want=$(md5sum </tmp/raw)
    last=$((bytes / 1048576 - 1))
    ok=1 detail=
    for mib in 0 "$last"; do
        if ! dd if=/tmp/raw of="$DEV" bs=1M seek="$mib" count=1 oflag=direct conv=notrunc 2>/tmp/dd.err; then
            ok=0 detail="$detail write@${mib}MiB failed: $(tail -n1 /tmp/dd.err);"
            continue
        fi
        got=$(dd if="$DEV" bs=1M skip="$mib" count=1 iflag=direct 2>/dev/null | md5sum)
        [ "$got" = "$want" ] || { ok=0 detail="$detail read@${mib}MiB differs;"; }
    done
    if [ $ok = 1 ]; then
        result blk-raw PASS "1 MiB O_DIRECT write+read at MiB 0 and $last"
    else
        result blk-raw FAIL "$detail"
    fi
    rm -f /tmp/raw
fi

# Filesystem round trip.
t=$(now_cs)
if ! $MKFS_EXT4 -F -q "$DEV" >/tmp/mkfs.log 2>&1; then
    result blk-mkfs FAIL "$(tail -n2 /tmp/mkfs.log | tr '\n' ' ')"
    finish
fi
result blk-mkfs PASS "ext4 in $(elapsed "$t") s"
mkdir -p /mnt/blk
if ! mount -t ext4 "$DEV" /mnt/blk 2>/tmp/mount.err; then
    result blk-mount FAIL "$(cat /tmp/mount.err)"
    finish
fi
result blk-mount PASS "$(grep " /mnt/blk " /proc/mounts | cut -d' ' -f4)"

# Source data in RAM first, so the timed copy measures the disk.
per=$((DATA_MIB / FILES))
[ "$per" -ge 1 ] || per=1
mkdir -p /tmp/src/data
t=$(now_cs)
i=0
while [ $i -lt "$FILES" ]; do
    dd if=/dev/urandom of="/tmp/src/data/f$(printf %02d $i)" bs=1M count="$per" 2>/dev/null
    i=$((i + 1))
done
(cd /tmp/src && sha256sum data/* >MANIFEST)
result blk-gen INFO "$FILES x $per MiB from /dev/urandom + sha256 in $(elapsed "$t") s"
total=$((FILES * per * 1048576))

t=$(now_cs)
if cp -r /tmp/src/data /mnt/blk/ && cp /tmp/src/MANIFEST /mnt/blk/MANIFEST && sync; then
    cs=$(($(now_cs) - t))
    result blk-write PASS "$total bytes in $(elapsed 0 $cs) s, $(rate $total $cs) MiB/s (incl. sync)"
else
    result blk-write FAIL "copy to $DEV failed"
fi
rm -rf /tmp/src
if ! umount /mnt/blk 2>/tmp/umount.err; then
    result blk-umount FAIL "$(cat /tmp/umount.err)"
    finish
fi
echo 3 >/proc/sys/vm/drop_caches
if ! mount -t ext4 -o ro "$DEV" /mnt/blk 2>/tmp/mount.err; then
    result blk-remount FAIL "$(cat /tmp/mount.err)"
    finish
fi
t=$(now_cs)
if bad=$(cd /mnt/blk && sha256sum -c MANIFEST 2>&1 | grep -v ': OK$'); [ -z "$bad" ]; then
    cs=$(($(now_cs) - t))
    result blk-verify PASS "$FILES files match after remount; read $(rate $total $cs) MiB/s (incl. sha256)"
else
    result blk-verify FAIL "$(echo "$bad" | head -n3 | tr '\n' ' ')"
fi
result blk-manifest INFO "/MANIFEST sha256=$(sha256sum </mnt/blk/MANIFEST | cut -d' ' -f1)"
umount /mnt/blk
if $E2FSCK -fn "$DEV" >/tmp/fsck.log 2>&1; then
    result blk-fsck PASS "e2fsck -fn clean"
else
    result blk-fsck FAIL "$(tail -n3 /tmp/fsck.log | tr '\n' ' ')"
fi
finish
