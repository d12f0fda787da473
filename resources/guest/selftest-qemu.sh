#!/usr/bin/env bash
# selftest-qemu.sh - prove the guest test kit against QEMU's own backends.
#
# Boots the kit under QEMU/TCG (run-qemu.py) against:
#   blk      qemu-storage-daemon's vhost-user-blk export of a fresh image;
#            then verify-blk-image.sh checks the image on the host
#   blk-mq   the same with 2 queues and 2 vCPUs
#   ro       a read-only vhost-user-blk export; the guest hashes the disk
#   discard  blk-discard.sh against a vhost-user-blk export with discard=unmap;
#            the host checks that the image file got sparser
#   net      a plain QEMU tap netdev (virtio-net) inside a network namespace
#            created for the run, with net-peer.py as the peer in it
#
# Usage: selftest-qemu.sh [blk|blk-mq|ro|discard|net]...   (default: all)
#
# Needs root for the network namespace (net) and qemu-system-x86,
# qemu-storage-daemon (package qemu-system-common in Debian 12), e2fsprogs,
# iproute2 and python3 on the host. Prints the guest's RESULT lines, TIMING
# lines and, per part, "SELFTEST <part> PASS|FAIL"; exits non-zero if a part
# failed. Work files live in a temporary directory that is removed at exit
# (MVMM_SELFTEST_KEEP=1 keeps it). MVMM_SELFTEST_MACHINE=q35 uses PCI
# transports instead of microvm's virtio-mmio.
set -euo pipefail

here=$(cd "${BASH_SOURCE[0]%/*}" && pwd -P)
log() { printf 'selftest: %s\n' "$*" >&2; }
die() {
    printf 'selftest: error: %s\n' "$*" >&2
    exit 1
}

parts=("$@")
((${#parts[@]})) || parts=(blk blk-mq ro discard net)
for p in "${parts[@]}"; do
    case $p in blk | blk-mq | ro | discard | net) ;; *) die "unknown part '$p'" ;; esac
done

for t in qemu-system-x86_64 qemu-storage-daemon python3 e2fsck debugfs ip; do
    command -v "$t" >/dev/null || die "$t is missing (apt-get install qemu-system-x86 qemu-system-common e2fsprogs iproute2 python3)"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/mvmm-selftest.XXXXXX")
ns=mvmmt$$
tap=mvtap$$
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if ip netns list 2>/dev/null | grep -qw "$ns"; then
        ip netns exec "$ns" ip link del "$tap" 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    fi
    if [[ ${MVMM_SELFTEST_KEEP:-0} == 1 ]]; then
        log "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kit=$("$here/build-initramfs.sh") || die "build-initramfs.sh failed"
kernel=$(sed -n 's/^BZIMAGE=//p' <<<"$kit")
initrd=$(sed -n 's/^INITRAMFS=//p' <<<"$kit")
run=("$here/run-qemu.py" --kernel "$kernel" --initrd "$initrd" --quiet --timeout 240
    --machine "${MVMM_SELFTEST_MACHINE:-microvm}")

declare -A verdict=()

# qemu-storage-daemon exporting <img> as vhost-user-blk on <sock>.
# Extra args: export options (e.g. writable=off,num-queues=2) and file options.
start_qsd() { # <img> <sock> <export opts> <file opts> <log>
    rm -f "$2"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$1${4:+,$4}" \
        --export "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=$2,$3" \
        >"$5" 2>&1 &
    qsd_pid=$!
    pids+=("$qsd_pid")
    local n=100
    while [[ ! -S $2 ]]; do
        kill -0 "$qsd_pid" 2>/dev/null || { cat "$5" >&2; die "qemu-storage-daemon exited"; }
        ((n-- > 0)) || die "qemu-storage-daemon did not create $2"
        sleep 0.05
    done
}
stop_qsd() {
    kill "$qsd_pid" 2>/dev/null || true
    wait "$qsd_pid" 2>/dev/null || true
}

# Runs the harness; its stdout (RESULT/TIMING/SUMMARY) is shown and kept.
guest() { # <part> <run-qemu args>...
    local part=$1 rc=0 t0=$SECONDS
    shift
    log "$part: ${*}"
    "${run[@]}" --log "$work/$part.console" "$@" >"$work/$part.out" || rc=$?
    sed "s/^/[$part] /" "$work/$part.out"
    log "$part: harness exit $rc after $((SECONDS - t0)) s (console log: $work/$part.console)"
    return $rc
}

part_blk() { # <part> <queues> <smp>
    local part=$1 img=$work/$1.img sock=$work/$1.sock ok=1
    truncate -s 1G "$img"
    start_qsd "$img" "$sock" "writable=on,num-queues=$2" "" "$work/$part.qsd.log"
    guest "$part" --test blk --vhost-user-blk "$sock" --blk-queues "$2" --smp "$3" \
        -p size_sectors=$((1 << 21)) -p serial=vhost_user_blk || ok=0
    stop_qsd
    if "$here/verify-blk-image.sh" "$img" >"$work/$part.verify"; then :; else ok=0; fi
    sed "s/^/[$part] /" "$work/$part.verify"
    # The guest's manifest hash must be the one the host read back.
    g=$(sed -n 's/.*RESULT blk-manifest INFO \/MANIFEST sha256=\([0-9a-f]*\).*/\1/p' "$work/$part.out")
    h=$(sed -n 's/.*host-blk-manifest PASS.*sha256=\([0-9a-f]*\)).*/\1/p' "$work/$part.verify")
    if [[ -n $g && $g == "$h" ]]; then
        echo "[$part] RESULT host-manifest-match PASS guest and host agree on /MANIFEST ($g)"
    else
        echo "[$part] RESULT host-manifest-match FAIL guest '$g' host '$h'"
        ok=0
    fi
    rm -f "$img"
    verdict[$part]=$ok
}

part_ro() {
    local img=$work/ro.img sock=$work/ro.sock ok=1 sum
    head -c $((16 << 20)) /dev/urandom >"$img"
    sum=$(sha256sum "$img" | cut -d' ' -f1)
    start_qsd "$img" "$sock" "writable=off" "read-only=on" "$work/ro.qsd.log"
    guest ro --test blk --vhost-user-blk "$sock" -p ro=1 -p sha256="$sum" \
        -p size_sectors=$((16 << 11)) || ok=0
    stop_qsd
    [[ $(sha256sum "$img" | cut -d' ' -f1) == "$sum" ]] || {
        echo "[ro] RESULT host-ro-unchanged FAIL the image changed"
        ok=0
    }
    verdict[ro]=$ok
}

part_discard() {
    local img=$work/discard.img sock=$work/discard.sock ok=1 before after
    truncate -s 1G "$img"
    start_qsd "$img" "$sock" "writable=on" "discard=unmap" "$work/discard.qsd.log"
    guest discard --test blk-discard --vhost-user-blk "$sock" -p discard_mib=64 || ok=0
    stop_qsd
    after=$(($(stat -c %b "$img") * 512))
    before=$(sed -n 's/.*discard-fstrim PASS.*(\([0-9]*\) bytes) trimmed.*/\1/p' "$work/discard.out")
    # After deleting a 64 MiB file and trimming, the image holds little more
    # than ext4's metadata (journal, inode tables: ~40 MiB for 1 GiB).
    if ((after < 56 << 20)); then
        echo "[discard] RESULT host-sparse PASS image allocates $after bytes after fstrim (guest trimmed ${before:-?})"
    else
        echo "[discard] RESULT host-sparse FAIL image still allocates $after bytes"
        ok=0
    fi
    rm -f "$img"
    verdict[discard]=$ok
}

part_net() {
    local ok=1 mac=52:54:00:12:34:56 peer_out=$work/peer.out
    ((EUID == 0)) || die "net needs root (network namespace, tap)"
    ip netns add "$ns"
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip tuntap add dev "$tap" mode tap
    ip netns exec "$ns" ip addr add 192.0.2.1/24 dev "$tap"
    ip netns exec "$ns" ip link set "$tap" up
    ip netns exec "$ns" python3 "$here/net-peer.py" --listen 192.0.2.1 --port 5201 \
        --count 2 --ready-file "$work/peer.ready" >"$peer_out" 2>"$work/peer.log" &
    pids+=($!)
    local n=100
    while [[ ! -f $work/peer.ready ]]; do
        ((n-- > 0)) || die "net-peer.py did not start: $(cat "$work/peer.log")"
        sleep 0.05
    done
    guest net --test net --netns "$ns" --tap "$tap" --mac "$mac" \
        -p mac=$mac -p ip=192.0.2.2/24 -p peer=192.0.2.1 -p port=5201 || ok=0
    sed 's/^/[net] /' "$peer_out"
    grep -q '^PEER ERROR' "$peer_out" && ok=0
    ip netns exec "$ns" ip link del "$tap"
    ip netns del "$ns"
    verdict[net]=$ok
}

t_all=$SECONDS
for p in "${parts[@]}"; do
    case $p in
    blk) part_blk blk 1 1 ;;
    blk-mq) part_blk blk-mq 2 2 ;;
    ro) part_ro ;;
    discard) part_discard ;;
    net) part_net ;;
    esac
done
status=0
for p in "${parts[@]}"; do
    if [[ ${verdict[$p]:-0} == 1 ]]; then
        echo "SELFTEST $p PASS"
    else
        echo "SELFTEST $p FAIL"
        status=1
    fi
done
log "all parts done in $((SECONDS - t_all)) s"
exit $status
