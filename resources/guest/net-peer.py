#!/usr/bin/env python3
"""net-peer.py - TCP peer for the guest test kit's net test (tests/net.sh).

Runs on the host side of the guest's link (e.g. inside the test's network
namespace) and answers one request per TCP connection:

  "PUT <n>\\n" followed by n bytes -> replies "<md5 hex>\\n" of those bytes
  "GET <n>\\n"                     -> replies "<md5 hex>\\n" then n random bytes

Each finished request is logged to stderr and, as one line
  PEER <PUT|GET> bytes=<n> md5=<hex> seconds=<s>
to stdout. Exits after --count requests (default: serve until killed).
"""

import argparse
import hashlib
import os
import socket
import sys
import threading
import time

MAX_BYTES = 1 << 32


def read_line(conn, limit=64):
    buf = b""
    while not buf.endswith(b"\n"):
        c = conn.recv(1)
        if not c or len(buf) > limit:
            raise ValueError(f"bad request line {buf!r}")
        buf += c
    return buf.decode("ascii").strip()


def serve(conn, addr, out_lock):
    t0 = time.monotonic()
    with conn:
        conn.settimeout(120)
        op, n = read_line(conn).split()
        n = int(n)
        if not 0 <= n <= MAX_BYTES:
            raise ValueError(f"bad size {n}")
        h = hashlib.md5()
        if op == "PUT":
            left = n
            while left:
                chunk = conn.recv(min(left, 1 << 20))
                if not chunk:
                    raise ValueError(f"EOF after {n - left} of {n} bytes")
                h.update(chunk)
                left -= len(chunk)
            conn.sendall(h.hexdigest().encode() + b"\n")
        elif op == "GET":
            data = os.urandom(n)
            h.update(data)
            conn.sendall(h.hexdigest().encode() + b"\n")
            conn.sendall(data)
        else:
            raise ValueError(f"unknown request {op!r}")
        conn.shutdown(socket.SHUT_WR)
    dt = time.monotonic() - t0
    with out_lock:
        print(f"PEER {op} bytes={n} md5={h.hexdigest()} seconds={dt:.2f}", flush=True)
        print(f"net-peer: {op} {n} bytes from {addr[0]} in {dt:.2f} s"
              f" ({n / 1048576 / max(dt, 1e-6):.1f} MiB/s)", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="0.0.0.0", help="address to bind")
    ap.add_argument("--port", type=int, default=5201)
    ap.add_argument("--count", type=int, default=0, help="exit after this many requests")
    ap.add_argument("--ready-file", help="create this file once listening")
    args = ap.parse_args()

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.listen, args.port))
    srv.listen(8)
    print(f"net-peer: listening on {args.listen}:{args.port}", file=sys.stderr, flush=True)
    if args.ready_file:
        with open(args.ready_file, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
    out_lock = threading.Lock()
    done = 0
    threads = []
    while not args.count or done < args.count:
        conn, addr = srv.accept()
        done += 1

        def run(conn=conn, addr=addr):
            try:
                serve(conn, addr, out_lock)
            except (OSError, ValueError) as e:
                with out_lock:
                    print(f"PEER ERROR {e}", flush=True)
                    print(f"net-peer: error from {addr[0]}: {e}", file=sys.stderr, flush=True)

        th = threading.Thread(target=run, daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
