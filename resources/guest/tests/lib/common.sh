# Helpers for the guest tests (busybox sh). Sourced: . /tests/lib/common.sh
#
# Output protocol: one line per check,
#   RESULT <check> PASS|FAIL|SKIP|INFO <detail>
# on stdout (the console). Tests exit 0 when no check failed, 1 otherwise
# (use `finish`).

# shellcheck disable=SC2034 # the tool paths below are used by the tests
NFAIL=0

result() { # <check> <PASS|FAIL|SKIP|INFO> [detail...]
    _c=$1 _s=$2
    shift 2
    echo "RESULT $_c $_s $*"
    [ "$_s" = FAIL ] && NFAIL=$((NFAIL + 1))
    return 0
}

# PASS if <actual> = <expected>; INFO if nothing is expected (empty).
check_eq() { # <check> <expected> <actual> [what]
    if [ -z "$2" ]; then
        result "$1" INFO "${4:-value}=$3 (nothing expected)"
    elif [ "$2" = "$3" ]; then
        result "$1" PASS "${4:-value}=$3"
    else
        result "$1" FAIL "${4:-value}=$3 expected=$2"
    fi
}

finish() {
    [ "$NFAIL" -eq 0 ]
    exit $?
}

# Centiseconds since boot (/proc/uptime).
now_cs() {
    read -r _u _ </proc/uptime
    echo "${_u%.*}${_u#*.}" | sed 's/^0*//;s/^$/0/'
}

# Seconds (2 decimals) between two now_cs values.
elapsed() { # <start_cs> [end_cs]
    _e=${2:-$(now_cs)}
    awk -v a="$1" -v b="$_e" 'BEGIN { printf "%.2f", (b - a) / 100 }'
}

# MiB/s for <bytes> over <centiseconds>.
rate() { # <bytes> <cs>
    awk -v n="$1" -v t="$2" 'BEGIN { if (t <= 0) t = 1; printf "%.1f", n / 1048576 / (t / 100) }'
}

# Wait until <path> exists; fails after <seconds> (default 10).
wait_for() { # <path> [seconds]
    _n=$((${2:-10} * 10))
    while [ ! -e "$1" ]; do
        _n=$((_n - 1))
        [ "$_n" -gt 0 ] || return 1
        sleep 0.1
    done
}

# Negotiated virtio features of a virtio device directory (/sys/bus/virtio/
# devices/virtioN, or a symlink to it such as /sys/block/vda/device).
# Prints: hex=0x... bits=<n,...> names=<NAME,...>
virtio_features() { # <device dir>
    _id=$(cat "$1/device" 2>/dev/null)
    awk -v id="$((_id))" '
    BEGIN {
        t[24] = "NOTIFY_ON_EMPTY"; t[27] = "ANY_LAYOUT"; t[28] = "RING_INDIRECT_DESC"
        t[29] = "RING_EVENT_IDX"; t[32] = "VERSION_1"; t[33] = "ACCESS_PLATFORM"
        t[34] = "RING_PACKED"; t[35] = "IN_ORDER"; t[36] = "ORDER_PLATFORM"
        t[37] = "SR_IOV"; t[38] = "NOTIFICATION_DATA"; t[40] = "RING_RESET"
        if (id == 1) {
            d[0] = "CSUM"; d[1] = "GUEST_CSUM"; d[2] = "CTRL_GUEST_OFFLOADS"; d[3] = "MTU"
            d[5] = "MAC"; d[6] = "GSO"; d[7] = "GUEST_TSO4"; d[8] = "GUEST_TSO6"
            d[9] = "GUEST_ECN"; d[10] = "GUEST_UFO"; d[11] = "HOST_TSO4"; d[12] = "HOST_TSO6"
            d[13] = "HOST_ECN"; d[14] = "HOST_UFO"; d[15] = "MRG_RXBUF"; d[16] = "STATUS"
            d[17] = "CTRL_VQ"; d[18] = "CTRL_RX"; d[19] = "CTRL_VLAN"; d[20] = "CTRL_RX_EXTRA"
            d[21] = "GUEST_ANNOUNCE"; d[22] = "MQ"; d[23] = "CTRL_MAC_ADDR"
            d[53] = "NOTF_COAL"; d[57] = "HASH_REPORT"; d[60] = "RSS"; d[61] = "RSC_EXT"
            d[62] = "STANDBY"; d[63] = "SPEED_DUPLEX"
        } else if (id == 2) {
            d[0] = "BARRIER"; d[1] = "SIZE_MAX"; d[2] = "SEG_MAX"; d[4] = "GEOMETRY"
            d[5] = "RO"; d[6] = "BLK_SIZE"; d[7] = "SCSI"; d[9] = "FLUSH"; d[10] = "TOPOLOGY"
            d[11] = "CONFIG_WCE"; d[12] = "MQ"; d[13] = "DISCARD"; d[14] = "WRITE_ZEROES"
            d[15] = "LIFETIME"; d[16] = "SECURE_ERASE"; d[17] = "ZONED"
        } else if (id == 19) {
            d[0] = "STREAM"; d[1] = "SEQPACKET"
        } else if (id == 26) {
            d[0] = "NOTIFICATION"
        }
    }
    {
        # Hex built nibble by nibble: busybox awk has neither "^" nor a
        # printf %x that handles values above 2^31.
        hex = ""; bits = ""; names = ""
        for (n = 0; n < 16; n++) {
            v = 0
            for (k = 3; k >= 0; k--) v = v * 2 + (substr($0, 4 * n + k + 1, 1) == "1")
            hex = substr("0123456789abcdef", v + 1, 1) hex
        }
        for (i = 1; i <= length($0); i++) {
            if (substr($0, i, 1) != "1") continue
            b = i - 1
            bits = bits (bits == "" ? "" : ",") b
            nm = (b in d) ? d[b] : ((b in t) ? t[b] : "BIT" b)
            names = names (names == "" ? "" : ",") nm
        }
        printf "hex=0x%s bits=%s names=%s\n", hex, bits, names
    }' "$1/features"
}


# The Debian tools. Debian's static busybox runs its own applets in
# preference to PATH lookups (FEATURE_SH_STANDALONE), and it has fstrim,
# blkdiscard and mke2fs applets, so the util-linux/e2fsprogs tools are called
# by absolute path.
MKFS_EXT4=/usr/local/sbin/mkfs.ext4
E2FSCK=/usr/local/sbin/e2fsck
DUMPE2FS=/usr/local/sbin/dumpe2fs
FSTRIM=/usr/local/sbin/fstrim
BLKDISCARD=/usr/local/sbin/blkdiscard
ETHTOOL=/usr/local/sbin/ethtool

# Block-queue facts of /sys/block/<disk> on one line.
blk_queue_info() { # <disk>
    _q=/sys/block/$1/queue
    _nq=$(ls "/sys/block/$1/mq" 2>/dev/null | wc -l)
    echo "hw_queues=$_nq lbs=$(cat "$_q/logical_block_size") pbs=$(cat "$_q/physical_block_size")" \
        "max_hw_sectors_kb=$(cat "$_q/max_hw_sectors_kb") max_segments=$(cat "$_q/max_segments")" \
        "max_segment_size=$(cat "$_q/max_segment_size") discard_max_bytes=$(cat "$_q/discard_max_bytes")" \
        "write_zeroes_max_bytes=$(cat "$_q/write_zeroes_max_bytes") write_cache=$(tr ' ' _ <"$_q/write_cache")"
}
