#!/usr/bin/env python3
"""vhost-user-trace.py - log the vhost-user conversation between a frontend
(QEMU) and a backend (qemu-storage-daemon, `mvmm backend ...`).

Listens on --listen, and for each frontend connection connects to --backend
and relays bytes and passed file descriptors (SCM_RIGHTS) both ways, decoding
every message into one log line, e.g.

  F>B SET_VRING_NUM flags=0x1 size=8 index=0 num=256
  B>F GET_FEATURES reply flags=0x5 size=8 0x0000000170006e46 (SIZE_MAX,...)

Point the frontend at --listen instead of at the backend's socket:

  vhost-user-trace.py --listen /tmp/trace.sock --backend /tmp/blk.sock --kind blk &
  run-qemu.py --test blk --vhost-user-blk /tmp/trace.sock ...

The backend-to-frontend channel (SET_SLAVE_REQ_FD / SET_BACKEND_REQ_FD) is a
separate socket passed as a file descriptor, so it is not traced.
"""

import argparse
import array
import os
import socket
import struct
import sys
import threading
import time

REQUESTS = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER",
    5: "SET_MEM_TABLE", 6: "SET_LOG_BASE", 7: "SET_LOG_FD", 8: "SET_VRING_NUM",
    9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE",
    12: "SET_VRING_KICK", 13: "SET_VRING_CALL", 14: "SET_VRING_ERR",
    15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM",
    18: "SET_VRING_ENABLE", 19: "SEND_RARP", 20: "NET_SET_MTU", 21: "SET_SLAVE_REQ_FD",
    22: "IOTLB_MSG", 23: "SET_VRING_ENDIAN", 24: "GET_CONFIG", 25: "SET_CONFIG",
    26: "CREATE_CRYPTO_SESSION", 27: "CLOSE_CRYPTO_SESSION", 28: "POSTCOPY_ADVISE",
    29: "POSTCOPY_LISTEN", 30: "POSTCOPY_END", 31: "GET_INFLIGHT_FD",
    32: "SET_INFLIGHT_FD", 33: "GPU_SET_SOCKET", 34: "RESET_DEVICE",
    35: "VRING_KICK", 36: "GET_MAX_MEM_SLOTS", 37: "ADD_MEM_REG", 38: "REM_MEM_REG",
    39: "SET_STATUS", 40: "GET_STATUS",
}
PROTOCOL_FEATURES = {
    0: "MQ", 1: "LOG_SHMFD", 2: "RARP", 3: "REPLY_ACK", 4: "NET_MTU", 5: "SLAVE_REQ",
    6: "CROSS_ENDIAN", 7: "CRYPTO_SESSION", 8: "PAGEFAULT", 9: "CONFIG",
    10: "SLAVE_SEND_FD", 11: "HOST_NOTIFIER", 12: "INFLIGHT_SHMFD", 13: "RESET_DEVICE",
    14: "INBAND_NOTIFICATIONS", 15: "CONFIGURE_MEM_SLOTS", 16: "STATUS",
}
TRANSPORT_FEATURES = {
    24: "NOTIFY_ON_EMPTY", 27: "ANY_LAYOUT", 28: "RING_INDIRECT_DESC",
    29: "RING_EVENT_IDX", 30: "PROTOCOL_FEATURES(vhost-user)", 32: "VERSION_1",
    33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER", 36: "ORDER_PLATFORM",
    37: "SR_IOV", 38: "NOTIFICATION_DATA", 40: "RING_RESET",
}
DEVICE_FEATURES = {
    "blk": {
        0: "BARRIER", 1: "SIZE_MAX", 2: "SEG_MAX", 4: "GEOMETRY", 5: "RO", 6: "BLK_SIZE",
        7: "SCSI", 9: "FLUSH", 10: "TOPOLOGY", 11: "CONFIG_WCE", 12: "MQ", 13: "DISCARD",
        14: "WRITE_ZEROES", 15: "LIFETIME", 16: "SECURE_ERASE", 17: "ZONED",
    },
    "net": {
        0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC", 6: "GSO",
        7: "GUEST_TSO4", 8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO", 11: "HOST_TSO4",
        12: "HOST_TSO6", 13: "HOST_ECN", 14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS",
        17: "CTRL_VQ", 18: "CTRL_RX", 19: "CTRL_VLAN", 20: "CTRL_RX_EXTRA",
        21: "GUEST_ANNOUNCE", 22: "MQ", 23: "CTRL_MAC_ADDR", 53: "NOTF_COAL",
        57: "HASH_REPORT", 60: "RSS", 61: "RSC_EXT", 62: "STANDBY", 63: "SPEED_DUPLEX",
    },
}
# Requests whose frontend message carries no payload but gets a u64 reply.
U64_PAYLOAD = {"GET_FEATURES", "SET_FEATURES", "GET_PROTOCOL_FEATURES",
               "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "GET_MAX_MEM_SLOTS",
               "SET_STATUS", "GET_STATUS", "SET_LOG_BASE"}
VRING_STATE = {"SET_VRING_NUM", "SET_VRING_BASE", "GET_VRING_BASE", "SET_VRING_ENABLE"}
VRING_FD = {"SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"}


def names(value, table):
    return ",".join(table.get(b, f"BIT{b}") for b in range(64) if value >> b & 1)


BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB")  # struct virtio_blk_config, 57 bytes


def decode_blk_config(data):
    if len(data) < BLK_CONFIG.size:
        return data.hex()
    (cap, size_max, seg_max, cyl, heads, sectors, blk_size, pexp, align, min_io,
     opt_io, wce, _unused, nq, max_disc, max_disc_seg, disc_align, max_wz, max_wz_seg,
     wz_unmap) = BLK_CONFIG.unpack_from(data)
    return (f"capacity={cap} size_max={size_max} seg_max={seg_max} "
            f"geometry={cyl}/{heads}/{sectors} blk_size={blk_size} "
            f"topology(pexp={pexp},align={align},min_io={min_io},opt_io={opt_io}) "
            f"writeback={wce} num_queues={nq} max_discard_sectors={max_disc} "
            f"max_discard_seg={max_disc_seg} discard_sector_alignment={disc_align} "
            f"max_write_zeroes_sectors={max_wz} max_write_zeroes_seg={max_wz_seg} "
            f"write_zeroes_may_unmap={wz_unmap}")


def decode(name, flags, payload, kind, is_reply):
    """Human-readable payload of one message."""
    p = payload
    try:
        if name in U64_PAYLOAD and len(p) >= 8:
            (v,) = struct.unpack_from("<Q", p)
            if name in ("GET_FEATURES", "SET_FEATURES"):
                table = dict(TRANSPORT_FEATURES)
                table.update(DEVICE_FEATURES.get(kind, {}))
                return f"0x{v:016x} ({names(v, table)})"
            if "PROTOCOL" in name:
                return f"0x{v:016x} ({names(v, PROTOCOL_FEATURES)})"
            return f"{v}"
        if name in VRING_STATE and len(p) >= 8:
            idx, num = struct.unpack_from("<II", p)
            return f"index={idx} num={num}"
        if name == "SET_VRING_ADDR" and len(p) >= 40:
            idx, fl, desc, used, avail, logaddr = struct.unpack_from("<IIQQQQ", p)
            return (f"index={idx} flags=0x{fl:x} desc=0x{desc:x} used=0x{used:x} "
                    f"avail=0x{avail:x} log=0x{logaddr:x}")
        if name in VRING_FD and len(p) >= 8:
            (v,) = struct.unpack_from("<Q", p)
            return f"index={v & 0xff}" + (" no-fd(polling)" if v & 0x100 else "")
        if name == "SET_MEM_TABLE" and len(p) >= 8:
            (n,) = struct.unpack_from("<I", p)
            regs = []
            for i in range(n):
                gpa, size, uaddr, off = struct.unpack_from("<QQQQ", p, 8 + 32 * i)
                regs.append(f"[gpa=0x{gpa:x} size=0x{size:x} uaddr=0x{uaddr:x} off=0x{off:x}]")
            return f"regions={n} " + " ".join(regs)
        if name in ("ADD_MEM_REG", "REM_MEM_REG") and len(p) >= 40:
            gpa, size, uaddr, off = struct.unpack_from("<QQQQ", p, 8)
            return f"gpa=0x{gpa:x} size=0x{size:x} uaddr=0x{uaddr:x} off=0x{off:x}"
        if name in ("GET_CONFIG", "SET_CONFIG") and len(p) >= 12:
            off, size, cfl = struct.unpack_from("<III", p)
            data = p[12:12 + size]
            text = decode_blk_config(data) if (kind == "blk" and is_reply and off == 0) else data.hex()
            return f"offset={off} size={size} flags=0x{cfl:x} " + text
        if name in ("GET_INFLIGHT_FD", "SET_INFLIGHT_FD") and len(p) >= 16:
            mmap_size, mmap_off, nq, qs = struct.unpack_from("<QQHH", p)
            return f"mmap_size={mmap_size} mmap_offset={mmap_off} num_queues={nq} queue_size={qs}"
    except struct.error:
        pass
    return p.hex() if p else ""


class Relay:
    def __init__(self, logf, kind):
        self.logf = logf
        self.kind = kind
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.last_req = {}  # direction -> last request name, to label replies

    def log(self, text):
        with self.lock:
            self.logf.write(f"{time.monotonic() - self.t0:8.3f} {text}\n")
            self.logf.flush()

    @staticmethod
    def recv_exact(sock, n, fds):
        """n bytes from sock (b"" at EOF); passed fds are appended to fds."""
        buf = b""
        while len(buf) < n:
            data, anc, _flags, _addr = sock.recvmsg(
                n - len(buf), socket.CMSG_SPACE(64 * fds.itemsize))
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
            if not data:
                return b""
            buf += data
        return buf

    def pump(self, src, dst, tag):
        # Message by message, like libvhost-user reads them: the fds a sender
        # attached to a message arrive with the read of its header, so each
        # message is forwarded with its own fds.
        while True:
            fds = array.array("i")
            try:
                hdr = self.recv_exact(src, 12, fds)
                payload = b""
                if hdr:
                    req, flags, size = struct.unpack("<III", hdr)
                    payload = self.recv_exact(src, size, fds) if size else b""
                    if size and not payload:
                        hdr = b""
            except OSError as e:
                self.log(f"{tag} recv error: {e}")
                hdr = b""
            if not hdr:
                for fd in fds:
                    os.close(fd)
                self.log(f"{tag} closed")
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            name = REQUESTS.get(req, f"REQ{req}")
            is_reply = bool(flags & 0x4)
            text = decode(name, flags, payload, self.kind, is_reply)
            fdtxt = f" fds={len(fds)}" if fds else ""
            label = " reply" if is_reply else ""
            self.log(f"{tag} {name}{label} flags=0x{flags:x} size={size}{fdtxt} {text}".rstrip())
            try:
                if fds:
                    dst.sendmsg([hdr + payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                else:
                    dst.sendall(hdr + payload)
            except OSError as e:
                self.log(f"{tag} send error: {e}")
                return
            finally:
                for fd in fds:
                    os.close(fd)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, help="socket the frontend connects to")
    ap.add_argument("--backend", required=True, help="the backend's listening socket")
    ap.add_argument("--kind", choices=["blk", "net", "other"], default="other",
                    help="device type, for feature and config decoding")
    ap.add_argument("--log", help="log file (default: stderr)")
    ap.add_argument("--once", action="store_true", help="exit after one connection")
    args = ap.parse_args()

    logf = open(args.log, "w", encoding="utf-8") if args.log else sys.stderr
    if os.path.exists(args.listen):
        os.unlink(args.listen)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(args.listen)
    srv.listen(1)
    relay = Relay(logf, args.kind)
    relay.log(f"listening on {args.listen}, backend {args.backend}")
    while True:
        front, _ = srv.accept()
        back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        back.connect(args.backend)
        relay.log("frontend connected")
        threads = [
            threading.Thread(target=relay.pump, args=(front, back, "F>B"), daemon=True),
            threading.Thread(target=relay.pump, args=(back, front, "B>F"), daemon=True),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        front.close()
        back.close()
        if args.once:
            return 0


if __name__ == "__main__":
    sys.exit(main())
