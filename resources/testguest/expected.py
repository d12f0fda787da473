#!/usr/bin/env python3
"""Expected output of the test guest's "test=blk" (and "test=net") lines.

Stdlib only. The formulas (mirrored in README.md, for reimplementation in Rust):

* pattern byte i (0..511) of sector s (absolute sector number) with seed:
      (s * 31 + i * 7 + seed) & 0xff
  written to disk 1 sectors 0..7 and 2048..2055.
* FNV-1a 64: h = 0xcbf29ce484222325; per byte: h ^= b; h = (h * 0x100000001b3) mod 2^64.
* "blk1: fnv=" is FNV-1a 64 over the pattern of sectors 0..7 then 2048..2055
  (8 KiB): it depends only on the seed.
* "blk0: fnv=" is FNV-1a 64 over the first min(capacity, 128) sectors of
  disk 0 (64 KiB for any image of at least 64 KiB); capacity = size // 512.

Usage:
  expected.py [--seed N] [--ro disk0.img] [--rw disk1.img] [--token WORD]
prints the lines the guest should print; with --rw it also checks that the
image holds the pattern (exit status 1 if not).
"""

import argparse
import sys

SECTOR = 512
PATTERN_RANGES = (0, 2048)  # first sectors of the two 8-sector ranges
PATTERN_SECTORS = 8
DISK0_SECTORS = 128

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv1a64(data, h=FNV_OFFSET):
    for b in data:
        h ^= b
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def pattern_sector(sector, seed):
    """The 512 bytes the guest writes to `sector` of disk 1."""
    return bytes((sector * 31 + i * 7 + seed) & 0xFF for i in range(SECTOR))


def pattern(seed):
    """The 8 KiB the guest writes and reads back, in hashing order."""
    return b"".join(
        pattern_sector(start + s, seed)
        for start in PATTERN_RANGES
        for s in range(PATTERN_SECTORS)
    )


def blk1_fnv(seed):
    return fnv1a64(pattern(seed))


def disk0_capacity(path):
    with open(path, "rb") as f:
        f.seek(0, 2)
        return f.tell() // SECTOR


def blk0_fnv(path):
    n = min(disk0_capacity(path), DISK0_SECTORS) * SECTOR
    with open(path, "rb") as f:
        return fnv1a64(f.read(n))


def check_rw_image(path, seed):
    """Returns a list of problems: sectors that do not hold the pattern."""
    problems = []
    with open(path, "rb") as f:
        for start in PATTERN_RANGES:
            for s in range(start, start + PATTERN_SECTORS):
                f.seek(s * SECTOR)
                if f.read(SECTOR) != pattern_sector(s, seed):
                    problems.append(f"sector {s} of {path} does not hold the pattern")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1, help="blk.seed (default 1)")
    ap.add_argument("--ro", help="disk 0 image (first virtio-blk device)")
    ap.add_argument("--rw", help="disk 1 image: check it holds the pattern")
    ap.add_argument("--token", help="net.token: print the expected ping payload")
    args = ap.parse_args()

    print("blk1: write+flush+read ok")
    print(f"blk1: fnv={blk1_fnv(args.seed):016x}")
    if args.ro:
        print(f"blk0: fnv={blk0_fnv(args.ro):016x}")
        print(f"blk0: capacity={disk0_capacity(args.ro)}")
    if args.token is not None:
        print(f"ping payload: mvmm-ping {args.token[:40]}")
    problems = check_rw_image(args.rw, args.seed) if args.rw else []
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
