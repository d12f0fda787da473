#!/bin/sh
# net: the virtio-net interface under test (eth0 unless MVMM_IFACE=<name>)
# against a peer on the host side of the link running
# resources/guest/net-peer.py.
#
# Parameters (mvmm.<key>=<value> -> MVMM_<KEY>):
#   mac=M        expected MAC address
#   ip=A/N       address for the interface (default 192.0.2.2/24, TEST-NET-1:
#                use addresses that exist only inside the test's own network
#                namespace)
#   peer=A       the peer's address (default 192.0.2.1)
#   port=P       net-peer.py's TCP port (default 5201)
#   mtu=N        set this MTU first (the peer's side must match)
#   net_mib=N    MiB sent each way (default 32)
#
# Checks: MAC, carrier, ping, TCP transfer guest->peer and peer->guest with
# MD5 checks. Offloads and virtio features are reported as INFO lines.
#
# net-peer.py protocol (one request per TCP connection):
#   "PUT <n>\n" + n bytes  -> peer answers "<md5 hex>\n" of the n bytes
#   "GET <n>\n"            -> peer answers "<md5 hex>\n" + n random bytes
. /tests/lib/common.sh

IF=${MVMM_IFACE:-eth0}
IP=${MVMM_IP:-192.0.2.2/24}
PEER=${MVMM_PEER:-192.0.2.1}
PORT=${MVMM_PORT:-5201}
MIB=${MVMM_NET_MIB:-32}
SYS=/sys/class/net/$IF

if ! wait_for "$SYS" 10; then
    result net-present FAIL "no $IF after 10 s; interfaces: $(ls /sys/class/net | tr '\n' ' ')"
    finish
fi
vdev=$(readlink -f "$SYS/device")
result net-present PASS "$IF on ${vdev##*/}"
result net-features INFO "$(virtio_features "$SYS/device")"
nrx=$(ls -d "$SYS"/queues/rx-* 2>/dev/null | wc -l)
ntx=$(ls -d "$SYS"/queues/tx-* 2>/dev/null | wc -l)
result net-queues INFO "rx=$nrx tx=$ntx channels: $($ETHTOOL -l "$IF" 2>/dev/null | awk '/Current/ { c = 1 } c && /Combined/ { print "combined=" $2; exit }')"

mac=$(cat "$SYS/address")
want_mac=$(echo "$MVMM_MAC" | tr 'A-F' 'a-f')
check_eq net-mac "$want_mac" "$mac" mac

[ -n "$MVMM_MTU" ] && ip link set "$IF" mtu "$MVMM_MTU"
ip addr add "$IP" dev "$IF"
ip link set "$IF" up
n=50
while [ "$(cat "$SYS/operstate")" != up ] && [ $n -gt 0 ]; do
    sleep 0.1
    n=$((n - 1))
done
st=$(cat "$SYS/operstate")
if [ "$st" = up ]; then
    result net-link PASS "operstate=up carrier=$(cat "$SYS/carrier") mtu=$(cat "$SYS/mtu") speed=$(cat "$SYS/speed" 2>/dev/null) duplex=$(cat "$SYS/duplex" 2>/dev/null)"
else
    result net-link FAIL "operstate=$st carrier=$(cat "$SYS/carrier" 2>/dev/null)"
fi

# Offloads (ethtool -k: the features that are on), driver info.
offl=$($ETHTOOL -k "$IF" 2>/dev/null | awk -F': ' '/^[a-z]/ && $2 ~ /^on/ { printf "%s%s", sep, $1; sep = "," }')
result net-offloads INFO "on: ${offl:-?}"
result net-driver INFO "$($ETHTOOL -i "$IF" 2>/dev/null | awk -F': ' '/^(driver|bus-info)/ { printf "%s=%s ", $1, $2 }')"

out=$(ping -c 5 -i 0.2 -w 10 "$PEER" 2>&1)
recv=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
rtt=$(echo "$out" | sed -n 's/.*min\/avg\/max = \(.*\)/\1/p')
if [ "${recv:-0}" -ge 4 ]; then
    result net-ping PASS "$recv/5 replies from $PEER, rtt min/avg/max $rtt"
else
    result net-ping FAIL "${recv:-0}/5 replies from $PEER: $(echo "$out" | tail -n2 | tr '\n' ' ')"
fi

bytes=$((MIB * 1048576))

# guest -> peer
dd if=/dev/urandom of=/tmp/up bs=1M count="$MIB" 2>/dev/null
want=$(md5sum </tmp/up | cut -d' ' -f1)
# nc -e runs the shell with the socket as stdin/stdout; busybox cat then
# sends with sendfile() in big chunks (piping into nc would send 1 KiB
# writes, which hardly exercises TSO/GSO and is CPU-bound under TCG).
rm -f /tmp/reply
t=$(now_cs)
timeout 120 nc "$PEER" "$PORT" -e sh -c \
    "echo PUT $bytes && cat /tmp/up && read -r r && echo \"\$r\" >/tmp/reply" 2>/tmp/nc.err
cs=$(($(now_cs) - t))
reply=$(cat /tmp/reply 2>/dev/null)
rm -f /tmp/up
if [ "$reply" = "$want" ]; then
    result net-tx PASS "$bytes bytes to $PEER:$PORT md5=$want in $(elapsed 0 $cs) s, $(rate $bytes $cs) MiB/s"
else
    result net-tx FAIL "peer md5='$reply' expected $want ($(cat /tmp/nc.err))"
fi

# peer -> guest
t=$(now_cs)
echo "GET $bytes" | timeout 120 nc "$PEER" "$PORT" >/tmp/down 2>/tmp/nc.err
cs=$(($(now_cs) - t))
want=$(head -n1 /tmp/down)
size=$(($(stat -c %s /tmp/down) - ${#want} - 1))
got=$(tail -c +$((${#want} + 2)) /tmp/down | md5sum | cut -d' ' -f1)
rm -f /tmp/down
if [ "$size" -eq "$bytes" ] && [ "$got" = "$want" ]; then
    result net-rx PASS "$bytes bytes from $PEER:$PORT md5=$got in $(elapsed 0 $cs) s, $(rate $bytes $cs) MiB/s"
else
    result net-rx FAIL "got $size bytes md5=$got, peer said $bytes bytes md5=$want ($(cat /tmp/nc.err))"
fi

stats=
for s in rx_packets rx_bytes rx_errors rx_dropped tx_packets tx_bytes tx_errors tx_dropped; do
    stats="$stats $s=$(cat "$SYS/statistics/$s")"
done
result net-stats INFO "${stats# }"
finish
