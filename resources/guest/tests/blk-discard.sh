#!/bin/sh
# blk-discard: DISCARD and WRITE_ZEROES on the virtio-blk disk under test
# (/dev/vda unless MVMM_DISK=<name>). Destroys the disk's contents.
#
# Parameters (mvmm.<key>=<value> -> MVMM_<KEY>):
#   discard=0|1     whether the device is expected to support discard
#                   (default 1; with 0 the checks expect it to be refused)
#   discard_mib=N   size of the file written and deleted before fstrim
#                   (default 32)
#
# Checks: fstrim -v on a fresh ext4 (made with -E nodiscard) after writing and
# deleting a file reports trimmed bytes; blkdiscard of a raw 4 MiB region;
# blkdiscard -z (BLKZEROOUT: WRITE_ZEROES if the device offers it, else the
# kernel writes zero pages) reads back as zeros. The host can check that the
# image file got sparser (see resources/guest/selftest-qemu.sh).
. /tests/lib/common.sh

DISK=${MVMM_DISK:-vda}
DEV=/dev/$DISK
SYS=/sys/block/$DISK
WANT=${MVMM_DISCARD:-1}
MIB=${MVMM_DISCARD_MIB:-32}

if ! wait_for "$SYS" 10 || ! wait_for "$DEV" 5; then
    result discard-present FAIL "no $SYS / $DEV after 10 s"
    finish
fi
result discard-features INFO "$(virtio_features "$SYS/device")"
result discard-queue INFO "$(blk_queue_info "$DISK")"
dmax=$(cat "$SYS/queue/discard_max_bytes")
if [ "$WANT" = 1 ]; then
    if [ "$dmax" -gt 0 ]; then
        result discard-supported PASS "discard_max_bytes=$dmax granularity=$(cat "$SYS/queue/discard_granularity")"
    else
        result discard-supported FAIL "discard_max_bytes=0 (the device offers no VIRTIO_BLK_F_DISCARD)"
    fi
else
    check_eq discard-supported 0 "$dmax" discard_max_bytes
fi
sectors=$(cat "$SYS/size")
if [ "$sectors" -lt $(((MIB + 64) * 2048)) ]; then
    result discard-size FAIL "disk too small: $sectors sectors, need $(((MIB + 64) * 2048))"
    finish
fi

# fstrim on ext4.
if ! $MKFS_EXT4 -F -q -E nodiscard "$DEV" >/tmp/mkfs.log 2>&1; then
    result discard-mkfs FAIL "$(tail -n2 /tmp/mkfs.log | tr '\n' ' ')"
    finish
fi
mkdir -p /mnt/blk
if ! mount -t ext4 "$DEV" /mnt/blk 2>/tmp/mount.err; then
    result discard-mount FAIL "$(cat /tmp/mount.err)"
    finish
fi
dd if=/dev/urandom of=/mnt/blk/big bs=1M count="$MIB" 2>/dev/null
sync
rm /mnt/blk/big
sync
t=$(now_cs)
out=$($FSTRIM -v /mnt/blk 2>&1)
rc=$?
trimmed=$(echo "$out" | sed -n 's/.*(\([0-9]*\) bytes) trimmed.*/\1/p')
if [ "$WANT" = 1 ]; then
    if [ $rc -eq 0 ] && [ "${trimmed:-0}" -ge $((MIB * 1048576)) ]; then
        result discard-fstrim PASS "$out in $(elapsed "$t") s"
    else
        result discard-fstrim FAIL "rc=$rc $out (expected >= $((MIB * 1048576)) bytes)"
    fi
else
    if [ $rc -ne 0 ]; then
        result discard-fstrim PASS "refused as expected: $out"
    else
        result discard-fstrim FAIL "fstrim worked on a device without discard: $out"
    fi
fi
umount /mnt/blk
if $E2FSCK -fn "$DEV" >/tmp/fsck.log 2>&1; then
    result discard-fsck PASS "e2fsck -fn clean after fstrim"
else
    result discard-fsck FAIL "$(tail -n3 /tmp/fsck.log | tr '\n' ' ')"
fi

# Raw regions near the end of the disk: 4 MiB of random data, then discard /
# write zeroes.
mib_total=$((sectors / 2048))
dd if=/dev/urandom of=/tmp/r bs=1M count=4 2>/dev/null
zero_md5=$(dd if=/dev/zero bs=1M count=4 2>/dev/null | md5sum)
region_md5() { dd if="$DEV" bs=1M skip="$1" count=4 iflag=direct 2>/dev/null | md5sum; }

off=$((mib_total - 8))
dd if=/tmp/r of="$DEV" bs=1M seek=$off count=4 oflag=direct conv=notrunc 2>/dev/null
if out=$($BLKDISCARD -o $((off * 1048576)) -l 4194304 "$DEV" 2>&1); then
    if [ "$WANT" = 1 ]; then
        z=no
        [ "$(region_md5 $off)" = "$zero_md5" ] && z=yes
        result discard-raw PASS "blkdiscard 4 MiB at MiB $off; reads back as zeros: $z (not required)"
    else
        result discard-raw FAIL "blkdiscard worked on a device without discard"
    fi
else
    if [ "$WANT" = 1 ]; then
        result discard-raw FAIL "blkdiscard: $out"
    else
        result discard-raw PASS "refused as expected: $out"
    fi
fi

off=$((mib_total - 4))
dd if=/tmp/r of="$DEV" bs=1M seek=$off count=4 oflag=direct conv=notrunc 2>/dev/null
wz=$(cat "$SYS/queue/write_zeroes_max_bytes")
if out=$($BLKDISCARD -z -o $((off * 1048576)) -l 4194304 "$DEV" 2>&1); then
    if [ "$(region_md5 $off)" = "$zero_md5" ]; then
        result discard-zeroout PASS "blkdiscard -z 4 MiB at MiB $off reads back as zeros (write_zeroes_max_bytes=$wz)"
    else
        result discard-zeroout FAIL "region not zero after blkdiscard -z (write_zeroes_max_bytes=$wz)"
    fi
else
    result discard-zeroout FAIL "blkdiscard -z: $out"
fi
rm -f /tmp/r
finish
