#!/usr/bin/env python3
"""virtio-fs benchmark: attaching a share, and FUSE READ throughput against cat/dd.

The Rust harness (devices/benches/fs_path.rs) plays the guest's virtio-fs driver: it puts
guest memory in a memfd, sets up the virtqueues by hand, attaches mvmm's vhost-user frontend
(VhostUserDevice, kind Fs) to a real virtiofsd it starts itself, and sends FUSE requests on
the request queue. No guest and no KVM.

1. Attach: from the frontend starting to connect to the FUSE_INIT reply (the point where a
   guest driver sees the device ready), with virtiofsd already listening and with virtiofsd
   started in parallel (the frontend waits for the socket). A fresh virtiofsd per run.
2. READ throughput of a file in the share (FUSE_INIT, LOOKUP, OPEN, READs of 128 KiB and
   1 MiB, 1 and 8 in flight), against `cat` and `dd` of the same file to /dev/null on the
   host, all with a warm page cache, in the same run.

The file (default 256 MiB) is on disk (/var/tmp) and on tmpfs (/dev/shm). virtiofsd runs with
--sandbox none (needs root for its other defaults) and --cache=never and --cache=auto.
"""
import argparse
import array
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import build_bench, loadavg, log  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
FILE_NAME = "bench.dat"
INSTALL_VIRTIOFSD = REPO / "resources/guest/install-virtiofsd.sh"


# ---- Setup -------------------------------------------------------------------------------


def install_virtiofsd():
    log("checking virtiofsd (resources/guest/install-virtiofsd.sh) ...")
    p = subprocess.run(["bash", str(INSTALL_VIRTIOFSD)], stdout=subprocess.PIPE, text=True)
    if p.returncode:
        sys.exit("install-virtiofsd.sh failed")
    for line in p.stdout.splitlines():
        if line.startswith("VIRTIOFSD="):
            path = line.split("=", 1)[1]
            version = subprocess.run([path, "--version"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True).stdout.strip()
            return path, version.splitlines()[0] if version else "?"
    sys.exit("install-virtiofsd.sh printed no VIRTIOFSD= line")


def fs_type(path):
    """The type of the file system holding `path` (longest mount point in /proc/mounts)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def make_file(directory, size_mib):
    """A file that holds its own offsets: the u64 at byte offset o is o (little endian)."""
    path = Path(directory) / FILE_NAME
    words = MIB // 8
    with open(path, "wb") as f:
        for mib in range(size_mib):
            base = mib * MIB
            chunk = array.array("Q", range(base, base + MIB, 8))
            if sys.byteorder != "little":
                chunk.byteswap()
            assert len(chunk) == words
            f.write(chunk.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return path


# ---- Host baselines ------------------------------------------------------------------------

BASELINES = [
    ("cat > /dev/null", lambda p: ["cat", str(p)]),
    ("dd bs=1M of=/dev/null", lambda p: ["dd", f"if={p}", "of=/dev/null", "bs=1M"]),
    ("dd bs=128K of=/dev/null", lambda p: ["dd", f"if={p}", "of=/dev/null", "bs=128K"]),
]


def run_timed(argv):
    """Runs argv with stdout to /dev/null; returns (wall seconds, CPU seconds)."""
    with open(os.devnull, "wb") as null:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=null, stderr=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        sys.exit(f"{argv[0]} failed with status {p.returncode}")
    return wall, ru.ru_utime + ru.ru_stime


def baselines(path, size, passes, results):
    for name, argv in BASELINES:
        for _ in range(passes):
            wall, cpu = run_timed(argv(path))
            results.setdefault(name, []).append(
                {"mb_s": size / wall / 1e6, "seconds": wall, "cpu_ms": cpu * 1e3})


# ---- The harness ---------------------------------------------------------------------------

def run_harness(exe, args):
    """Runs fs_path; returns its JSON lines as dicts."""
    p = subprocess.run([exe] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    noise = "Cannot announce submounts"
    for line in p.stderr.splitlines():
        if noise not in line:
            log(f"  fs_path: {line}")
    if p.returncode:
        sys.exit(f"fs_path {' '.join(args)} failed with status {p.returncode}")
    out = []
    for line in p.stdout.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log(f"  fs_path: {line}")
    return out


def stats(values):
    values = sorted(values)
    return values[0], statistics.median(values), values[-1]


# ---- Main ----------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20,
                    help="attach runs per mode (default 20; --quick: 5)")
    ap.add_argument("--size-mib", type=int, default=256, help="file size (default 256)")
    ap.add_argument("--passes", type=int, default=5,
                    help="timed read passes per configuration and baseline (default 5)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer runs and passes, disk only, cache=never, 3 read configurations")
    ap.add_argument("--fs", default=None,
                    help="where to put the file: disk, tmpfs or disk,tmpfs (default both)")
    ap.add_argument("--cache", default=None,
                    help="virtiofsd --cache values for the read test (default never,auto)")
    ap.add_argument("--pool", type=int, default=2,
                    help="also run the QD 8 reads with this --thread-pool-size (0: skip; "
                         "default 2)")
    ap.add_argument("--json", metavar="FILE", help="also write all results to FILE")
    ap.add_argument("--no-build", action="store_true", help="use the last built harness")
    a = ap.parse_args()

    if a.quick:
        a.runs = min(a.runs, 5)
        a.passes = min(a.passes, 2)
    places = (a.fs or ("disk" if a.quick else "disk,tmpfs")).split(",")
    caches = (a.cache or ("never" if a.quick else "never,auto")).split(",")
    if any(p not in ("disk", "tmpfs") for p in places):
        sys.exit("--fs takes disk, tmpfs or disk,tmpfs")
    if a.size_mib < 1 or a.runs < 1 or a.passes < 1:
        sys.exit("--size-mib, --runs and --passes must be at least 1")
    if os.geteuid() != 0:
        log("warning: not root; virtiofsd --sandbox none may fail to switch credentials")

    if a.no_build:
        exes = sorted((REPO / "target/release/deps").glob("fs_path-*"),
                      key=lambda p: p.stat().st_mtime)
        exes = [p for p in exes if os.access(p, os.X_OK) and p.suffix == ""]
        if not exes:
            sys.exit("no built fs_path harness: run without --no-build")
        exe = str(exes[-1])
    else:
        exe = build_bench("fs_path")
    virtiofsd, version = install_virtiofsd()
    load_start = loadavg()

    # Read configurations: (bs, qd, pool).
    if a.quick:
        configs = [(128 << 10, 1, 0), (128 << 10, 8, 0), (1 << 20, 8, 0)]
    else:
        configs = [(bs, qd, 0) for bs in (128 << 10, 1 << 20) for qd in (1, 8)]
    pool_configs = [(bs, 8, a.pool) for bs in (128 << 10, 1 << 20)] if a.pool > 0 else []

    common = ["--virtiofsd", virtiofsd]
    results = {"virtiofsd": version, "virtiofsd_path": virtiofsd, "attach": {}, "read": {}}
    dirs = []
    try:
        # 1. Attach times: a small share, a fresh virtiofsd each run.
        share = tempfile.mkdtemp(prefix="mvmm-fs-attach-", dir="/var/tmp")
        dirs.append(share)
        for mode in ("ready", "parallel"):
            log(f"attach, virtiofsd {mode}: {a.runs} runs ...")
            results["attach"][mode] = run_harness(
                exe, ["attach", "--mode", mode, "--runs", str(a.runs), "--shared", share,
                      "--cache", "never"] + common)

        # 2. Throughput, per place.
        size = a.size_mib * MIB
        for place in places:
            parent = "/var/tmp" if place == "disk" else "/dev/shm"
            if place == "tmpfs" and shutil.disk_usage(parent).free < 2 * size:
                log(f"skipping tmpfs: {parent} has less than {2 * a.size_mib} MiB free")
                continue
            d = tempfile.mkdtemp(prefix="mvmm-fs-", dir=parent)
            dirs.append(d)
            log(f"{place}: writing a {a.size_mib} MiB file in {d} ({fs_type(d)}) ...")
            path = make_file(d, a.size_mib)
            run_timed(["cat", str(path)])  # warm the page cache
            entry = {"dir": d, "fstype": fs_type(d), "size": size, "baselines": {},
                     "fuse": []}
            log(f"{place}: cat/dd baselines ...")
            baselines(path, size, a.passes, entry["baselines"])
            for cache in caches:
                for bs, qd, pool in configs + (pool_configs if cache == caches[0] else []):
                    log(f"{place}: FUSE READ bs={bs >> 10}K qd={qd} cache={cache} "
                        f"pool={pool} ...")
                    lines = run_harness(
                        exe, ["read", "--shared", d, "--file", FILE_NAME, "--bs", str(bs),
                              "--qd", str(qd), "--passes", str(a.passes), "--cache", cache,
                              "--thread-pool-size", str(pool)] + common)
                    setup = next((l for l in lines if l.get("test") == "read_setup"), {})
                    passes = [l for l in lines if l.get("test") == "read" and not l["warmup"]]
                    warm = [l for l in lines if l.get("test") == "read" and l["warmup"]]
                    entry["fuse"].append({"cache": cache, "bs": bs, "qd": qd, "pool": pool,
                                          "setup": setup, "warmup": warm, "passes": passes})
            log(f"{place}: cat/dd baselines again ...")
            baselines(path, size, a.passes, entry["baselines"])
            results["read"][place] = entry
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    results["load_start"], results["load_end"] = load_start, loadavg()

    print_tables(results, a, caches)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
        log(f"results written to {a.json}")


def print_tables(r, a, caches):
    print()
    print(f"virtio-fs benchmark: {r['virtiofsd']} ({r['virtiofsd_path']}), "
          f"{os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"load {r['load_start']:.2f} -> {r['load_end']:.2f}")
    print("virtiofsd: --sandbox none --log-level error --thread-pool-size=0 (its default) "
          "unless noted; seccomp on (default)")

    # Attach.
    print()
    print(f"== Attach a share: frontend connect -> FUSE_INIT answered (ms, {a.runs} runs, "
          f"fresh virtiofsd each, --cache=never) ==")
    print(f"{'':52} {'min':>8} {'median':>8} {'max':>8}")

    def row(label, values):
        lo, med, hi = stats(values)
        print(f"{label:52} {lo:8.3f} {med:8.3f} {hi:8.3f}")

    ready = r["attach"]["ready"]
    print("virtiofsd already waiting in accept():")
    row("  connect + negotiate (VhostUserDevice::new)", [x["connect_negotiate_ms"] for x in ready])
    row("  activate (SET_MEM_TABLE, vrings, watcher thread)", [x["activate_ms"] for x in ready])
    row("  FUSE_INIT round trip", [x["fuse_init_ms"] for x in ready])
    row("  total: connect -> FUSE_INIT answered", [x["connect_to_init_ms"] for x in ready])
    row("  (reference: virtiofsd spawn -> listening)", [x["spawn_to_listen_ms"] for x in ready])
    acc = [x["spawn_to_accept_ms"] for x in ready if x["spawn_to_accept_ms"] is not None]
    if len(acc) == len(ready):
        row("  (reference: virtiofsd spawn -> in accept())", acc)
    else:
        print(f"  (virtiofsd was seen in accept() in only {len(acc)} of {len(ready)} runs: "
              "those connects include its start-up)")
    par = r["attach"]["parallel"]
    print("virtiofsd spawned in parallel (socket appears late):")
    row("  spawn -> connected + negotiated", [x["connect_negotiate_ms"] for x in par])
    row("  total: spawn -> FUSE_INIT answered", [x["total_ms"] for x in par])
    print("  all runs, sorted: " + " ".join(f"{v:.1f}" for v in sorted(x["total_ms"] for x in par)))

    # Throughput.
    for place, e in r["read"].items():
        print()
        print(f"== READ a {e['size'] // MIB} MiB file, warm page cache: {place} "
              f"({e['dir']}, {e['fstype']}), {a.passes} timed passes each ==")
        b = e["baselines"]
        cat_med = statistics.median(x["mb_s"] for x in b["cat > /dev/null"])
        dd_med = statistics.median(x["mb_s"] for x in b["dd bs=1M of=/dev/null"])
        hdr = (f"{'reader':40} {'MB/s med':>9} {'best':>7} {'/cat':>6} {'/dd1M':>6} "
               f"{'ms/GB':>6} {'vfsd ms/GB':>10} {'kick/req':>8} {'frontend':>9}")
        print(hdr)
        print("-" * len(hdr))
        gb = e["size"] / 1e9
        for name, runs in b.items():
            mbs = [x["mb_s"] for x in runs]
            med = statistics.median(mbs)
            cpu = statistics.median(x["cpu_ms"] for x in runs) / gb
            print(f"{name:40} {med:9.0f} {max(mbs):7.0f} {med / cat_med:6.2f} "
                  f"{med / dd_med:6.2f} {cpu:6.0f}")
        for f in e["fuse"]:
            if not f["passes"]:
                continue
            mbs = [x["mb_s"] for x in f["passes"]]
            med = statistics.median(mbs)
            label = f"FUSE READ {f['bs'] >> 10}K QD{f['qd']} cache={f['cache']}"
            if f["pool"]:
                label += f" pool={f['pool']}"
            drv = statistics.median(x["driver_cpu_ms"] for x in f["passes"]) / gb
            vfsd = statistics.median(x["virtiofsd_cpu_ms"] for x in f["passes"]) / gb
            kicks = statistics.median(x["kicks_per_req"] for x in f["passes"])
            fe_ms = sum(x["frontend_cpu_ms"] for x in f["passes"])
            fe_runs = sum(x["frontend_runs"] for x in f["passes"])
            print(f"{label:40} {med:9.0f} {max(mbs):7.0f} {med / cat_med:6.2f} "
                  f"{med / dd_med:6.2f} {drv:6.0f} {vfsd:10.0f} {kicks:8.3f} "
                  f"{fe_ms:5.2f}ms/{fe_runs}")
        setups = [f["setup"] for f in e["fuse"] if f["setup"]]
        if setups:
            s = setups[0]
            modes = sorted({(x["cache"], x["direct_io"], x["keep_cache"]) for x in setups})
            print(f"FUSE_INIT: max_write {s['max_write']}, max_pages {s['max_pages']} "
                  f"(READ up to {s['max_read_bytes'] >> 10} KiB); OPEN: "
                  + ", ".join(f"cache={c} -> direct_io={d} keep_cache={k}"
                              for c, d, k in modes))
        verified = all(w["verified"] for f in e["fuse"] for w in f["warmup"])
        print(f"data: every byte checked in each untimed warm-up pass: "
              f"{'ok' if verified else 'NOT CHECKED'}")
    print()
    print("ms/GB: CPU time per GB read. cat/dd: the whole process (incl. exec); FUSE: the "
          "driver thread (this bench's 'guest').")
    print("vfsd ms/GB: virtiofsd's CPU time per GB (all its threads) during the timed passes; "
          "it does the copy that cat does.")
    print("kick/req: kicks the driver had to send per READ (EVENT_IDX); near 1 = virtiofsd "
          "went to sleep between requests.")
    print("frontend: CPU time / times scheduled of mvmm's frontend threads (vhu-*) over all "
          "timed passes.")
    print("/cat, /dd1M: median MB/s over the median of `cat` and of `dd bs=1M` (run before "
          "and after the FUSE runs).")


if __name__ == "__main__":
    main()
