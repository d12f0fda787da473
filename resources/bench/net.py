#!/usr/bin/env python3
"""virtio-net transmit benchmark: mvmm's Net device against raw writes on the same tap.

The Rust harness (devices/benches/net_path.rs) plays the guest driver: it keeps the transmit
queue of a real devices::virtio::net::Net full of [12-byte virtio_net_hdr_v1 + Ethernet frame]
chains (mode virtio), or writes the same bytes to the tap itself in a loop (mode raw). No guest,
no KVM.

This script creates a network namespace with a persistent tap in it (MTU 9000, link up), runs
both modes inside the namespace for each frame size, prints a table, and deletes the namespace.
Needs root (CAP_NET_ADMIN). Frames written to a tap fd are *received* by the kernel on that
interface; with the link up, the stack takes them and drops them (no handler for ethertype
0x88b5), counted as RX dropped on the tap. Nobody reads the tap fd.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import build_bench, log  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SIZES = [64, 1514, 9014]
TAP_MTU = 9000


def run(cmd, check=True):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def link_stats(ns, tap):
    out = run(["ip", "-n", ns, "-s", "-j", "link", "show", tap]).stdout
    st = json.loads(out)[0].get("stats64", {})
    return st.get("rx", {}), st.get("tx", {})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per run (default 3)")
    ap.add_argument("--runs", type=int, default=1, help="runs per mode and size; best kept")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)),
                    help="frame sizes without the vnet header (default 64,1514,9014)")
    ap.add_argument("--json", action="store_true", help="also print every result as JSON")
    ap.add_argument("--no-build", metavar="EXE", help="use this net_path binary")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (creates a network namespace and a tap)")

    exe = args.no_build or build_bench("net_path")
    ns = f"mvmm-nb-{os.getpid()}"
    tap = "mvmmnb0"
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    rows = []
    run(["ip", "netns", "add", ns])
    try:
        run(["ip", "-n", ns, "tuntap", "add", tap, "mode", "tap"])
        mtu_ok = run(["ip", "-n", ns, "link", "set", tap, "mtu", str(TAP_MTU)],
                     check=False).returncode == 0
        run(["ip", "-n", ns, "link", "set", tap, "up"])
        if not mtu_ok:
            log(f"cannot set MTU {TAP_MTU} on the tap: skipping frames above 1514")
            sizes = [s for s in sizes if s <= 1514]
        for size in sizes:
            row = {"frame_size": size}
            for mode in ("virtio", "raw"):
                best = None
                for _ in range(args.runs):
                    p = run(["ip", "netns", "exec", ns, exe, "--tap", tap, "--mode", mode,
                             "--frame-size", str(size), "--seconds", str(args.seconds)])
                    r = json.loads(p.stdout.strip().splitlines()[-1])
                    results.append(r)
                    if best is None or r["frames_per_s"] > best["frames_per_s"]:
                        best = r
                row[mode] = best
                log(f"  {size:>5} B {mode:<6} {best['frames_per_s']:>10.0f} frames/s "
                    f"{best['gbit_s']:7.3f} Gbit/s {best['cpu_us_per_frame']:6.3f} us/frame")
            rows.append(row)
        rx, tx = link_stats(ns, tap)
    finally:
        run(["ip", "netns", "del", ns], check=False)

    print(f"\nvirtio-net TX -> tap (netns {ns}, link up, MTU {TAP_MTU if mtu_ok else 1500}), "
          f"{args.seconds:g} s per run, best of {args.runs}")
    hdr = (f"{'frame B':>7} | {'mvmm frames/s':>13} {'Gbit/s':>7} {'CPU us/fr':>9} | "
           f"{'raw frames/s':>12} {'Gbit/s':>7} {'CPU us/fr':>9} | {'ratio':>5}")
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        v, r = row["virtio"], row["raw"]
        print(f"{row['frame_size']:>7} | {v['frames_per_s']:>13,.0f} {v['gbit_s']:>7.3f} "
              f"{v['cpu_us_per_frame']:>9.3f} | {r['frames_per_s']:>12,.0f} {r['gbit_s']:>7.3f} "
              f"{r['cpu_us_per_frame']:>9.3f} | {v['frames_per_s'] / r['frames_per_s']:>5.2f}")
    print(f"tap totals: RX packets {rx.get('packets')} dropped {rx.get('dropped')} "
          f"(frames we wrote, dropped by the stack: no handler for 0x88b5); "
          f"TX packets {tx.get('packets')} dropped {tx.get('dropped')}")
    if args.json:
        for r in results:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
