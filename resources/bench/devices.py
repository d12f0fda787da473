#!/usr/bin/env python3
"""virtio-blk device-path benchmark: mvmm's Block device driven in-process vs fio, same file.

The Rust harness (devices/benches/blk_path.rs) plays the guest driver: it puts requests in a
split virtqueue in guest memory, kicks an eventfd, and the real virtio-blk device model
(its worker thread) serves them with preadv/pwritev on the file and interrupts through
another eventfd. No guest and no KVM: this measures the device path alone. fio runs the
same workload on the same file with io_uring (libaio if io_uring does not work here), as the
reference for what the host can do with one thread at that queue depth.

Files: a 1 GiB file on tmpfs (/dev/shm, or a tmpfs mounted under /tmp when /dev/shm is
too small) and a 1 GiB file on the real disk (/var/tmp), filled with non-zero data once.
Buffered I/O everywhere unless --direct (then the disk file uses O_DIRECT for both).

Target: mvmm >= 85% of fio's IOPS at QD 32.
"""
import argparse, json, os, resource, shutil, subprocess, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (TmpfsDir, build_bench, is_tmpfs, loadavg, log, make_file,  # noqa: E402
                      warm_cache)

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
TARGET_RATIO = 0.85
TARGET_QD = 32
WARMUP_S = 0.5
# Prepended to every measured command (--taskset).
PREFIX = []
# (workload, block size, queue depth)
WORKLOADS = [
    ("randread", 4096, 1),
    ("randread", 4096, 32),
    ("randwrite", 4096, 1),
    ("randwrite", 4096, 32),
    ("seqread", 128 * 1024, 32),
    ("seqwrite", 128 * 1024, 32),
]


# ---- Setup -------------------------------------------------------------------------------


def ensure_fio():
    if shutil.which("fio"):
        return
    log("fio missing: installing fio ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "fio"], env=env,
                      stdout=subprocess.DEVNULL).returncode:
        subprocess.run(["apt-get", "update"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "fio"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    if not shutil.which("fio"):
        sys.exit("fio is still missing after apt-get install")


# ---- Runs --------------------------------------------------------------------------------

def run_mvmm(exe, path, workload, bs, qd, seconds, direct, event_idx):
    cmd = [exe, "--file", path, "--workload", workload, "--bs", str(bs), "--qd", str(qd),
           "--seconds", str(seconds), "--warmup", str(WARMUP_S),
           "--event-idx", "on" if event_idx else "off"]
    if direct:
        cmd.append("--direct")
    p = subprocess.run(PREFIX + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=seconds * 4 + 60)
    if p.returncode:
        raise RuntimeError(f"blk_path failed ({p.returncode}): {p.stderr.strip()}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {"iops": r["iops"], "mb_s": r["mb_s"], "cpu_us": r["cpu_us_per_req"],
            "lat_us_avg": r["lat_us_avg"], "lat_us_p99": r["lat_us_p99"],
            "kicks_per_req": r["kicks_per_req"], "irqs_per_req": r["irqs_per_req"], "raw": r}


def fio_cmd(engine, path, size, workload, bs, qd, seconds, direct):
    return ["fio", "--name=mvmm-cmp", f"--filename={path}", f"--size={size}",
            f"--ioengine={engine}", f"--rw={workload.replace('seq', '')}", f"--bs={bs}",
            f"--iodepth={qd}", "--numjobs=1", f"--direct={int(direct)}",
            "--time_based", f"--runtime={seconds}", f"--ramp_time={int(WARMUP_S * 1000)}ms",
            # Same as the harness: uniform random offsets (no random map), page cache kept.
            "--norandommap", "--randrepeat=0", "--invalidate=0",
            "--output-format=json"]


def pick_engine(path):
    """io_uring when it works here (it can be disabled by sysctl or seccomp), else libaio."""
    for engine in ("io_uring", "libaio"):
        cmd = fio_cmd(engine, path, os.path.getsize(path), "randread", 4096, 4, 1, False)
        cmd = [c for c in cmd if not c.startswith(("--runtime", "--time_based", "--ramp"))]
        cmd += ["--io_size=1m"]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode == 0:
            try:
                if json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]["error"] == 0:
                    return engine
            except (ValueError, KeyError, IndexError):
                pass
        log(f"fio: ioengine {engine} does not work here: {p.stderr.strip()[:200]}")
    sys.exit("fio works with neither io_uring nor libaio")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


FIO_FIXED_CPU = {}


def fio_fixed_cpu(engine, path):
    """CPU seconds fio spends outside the I/O (start-up, set-up, exit): the least of three
    runs of a one-request job. Subtracted from every run's CPU time."""
    if engine not in FIO_FIXED_CPU:
        costs = []
        for _ in range(3):
            cmd = [c for c in fio_cmd(engine, path, os.path.getsize(path), "randread", 4096, 1,
                                      1, False)
                   if not c.startswith(("--runtime", "--time_based", "--ramp"))]
            c0 = children_cpu()
            subprocess.run(PREFIX + cmd + ["--io_size=4k"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            costs.append(children_cpu() - c0)
        FIO_FIXED_CPU[engine] = min(costs)
    return FIO_FIXED_CPU[engine]


def run_fio(engine, path, workload, bs, qd, seconds, direct):
    """One fio job. CPU per request comes from our RUSAGE_CHILDREN delta around the whole fio
    run (every fio process and thread, io_uring's io-wq workers included: fio's own usr_cpu /
    sys_cpu count only the job thread and miss the io-wq work), minus fio's fixed cost,
    divided by the requests of ramp + runtime at the measured rate."""
    fixed = fio_fixed_cpu(engine, path)
    cmd = fio_cmd(engine, path, os.path.getsize(path), workload, bs, qd, seconds, direct)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(PREFIX + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=seconds * 4 + 60)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"fio failed ({p.returncode}): {p.stderr.strip()[:500]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    side = job["read" if "read" in workload else "write"]
    iops = side["iops"]
    cpu_s = max(0.0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime) - fixed)
    reported = (job["usr_cpu"] + job["sys_cpu"]) / 100.0  # job thread only
    nan = float("nan")
    return {"iops": iops, "mb_s": side["bw_bytes"] / 1e6,
            "cpu_us": cpu_s * 1e6 / (iops * (seconds + WARMUP_S)) if iops else nan,
            "cpu_us_fio_reported": reported * 1e6 / iops if iops else nan,
            "lat_us_avg": side.get("lat_ns", {}).get("mean", nan) / 1000.0,
            "lat_us_p99": side.get("clat_ns", {}).get("percentile", {})
                              .get("99.000000", nan) / 1000.0}


# ---- Output ------------------------------------------------------------------------------

def print_table(rows, out):
    hdr = ("file", "workload", "bs", "QD", "mvmm IOPS", "mvmm MB/s", "mvmm CPU µs/req",
           "fio IOPS", "fio MB/s", "fio CPU µs/req", "mvmm/fio", "", "psync IOPS", "mvmm/psync")
    lines = []
    for r in rows:
        m, f = r.get("mvmm"), r.get("fio")
        ratio = m["iops"] / f["iops"] if m and f and f["iops"] else None
        flag = ""
        if ratio is not None and r["qd"] == TARGET_QD:
            flag = "ok" if ratio >= TARGET_RATIO else "BELOW"
        fmt = lambda d, k, spec: format(d[k], spec) if d else "FAIL"
        lines.append((r["file"], r["workload"], f"{r['bs'] // 1024}k", str(r["qd"]),
                      fmt(m, "iops", ".0f"), fmt(m, "mb_s", ".0f"), fmt(m, "cpu_us", ".2f"),
                      fmt(f, "iops", ".0f"), fmt(f, "mb_s", ".0f"), fmt(f, "cpu_us", ".2f"),
                      f"{ratio:.0%}" if ratio is not None else "-", flag,
                      fmt(r.get("psync"), "iops", ".0f") if "psync" in r else "-",
                      f"{m['iops'] / r['psync']['iops']:.0%}" if m and r.get("psync") else "-"))
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(hdr)]
    left = {0, 1, 11}
    for row in [hdr] + lines:
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in
                 enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip(), file=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5, help="measured seconds per run (5)")
    ap.add_argument("--quick", action="store_true", help="1 s per run, tmpfs file only")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="write results as JSON to FILE (or stdout; the table goes to stderr)")
    ap.add_argument("--direct", action="store_true",
                    help="O_DIRECT on the disk file, for mvmm and fio (tmpfs stays buffered)")
    ap.add_argument("--event-idx", choices=["on", "off"], default="on",
                    help="negotiate VIRTIO_RING_F_EVENT_IDX in the harness (on, like Linux)")
    ap.add_argument("--size-mib", type=int, default=1024, help="test file size (1024)")
    ap.add_argument("--disk-dir", default="/var/tmp", help="directory on the real disk")
    ap.add_argument("--keep-files", action="store_true", help="keep the test files")
    ap.add_argument("--no-build", action="store_true", help="use the last built harness")
    ap.add_argument("--harness", metavar="PATH", help="use this blk_path binary (no build)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per tool and workload; the table shows the median (1)")
    ap.add_argument("--taskset", metavar="CPUS",
                    help="run mvmm and fio under `taskset -c CPUS` (e.g. 0: driver and device "
                         "thread share one CPU, no cross-CPU wake-ups)")
    ap.add_argument("--no-psync", action="store_true",
                    help="skip the extra fio psync (one thread, one syscall per request) runs")
    args = ap.parse_args()
    seconds = 1 if args.quick else args.seconds
    if seconds != int(seconds):
        ap.error("--seconds must be a whole number (fio's --runtime)")
    seconds = int(seconds)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.taskset:
        PREFIX[:] = ["taskset", "-c", args.taskset]
    size = args.size_mib * MIB
    event_idx = args.event_idx == "on"

    if args.harness:
        exe = args.harness
    elif args.no_build:
        cands = sorted((REPO / "target/release/deps").glob("blk_path-*"),
                       key=lambda p: p.stat().st_mtime)
        cands = [c for c in cands if os.access(c, os.X_OK) and c.suffix == ""]
        if not cands:
            sys.exit("no built blk_path harness; run without --no-build")
        exe = str(cands[-1])
    else:
        exe = build_bench("blk_path")
    ensure_fio()

    tmpfs = TmpfsDir(size)
    files = [("tmpfs", os.path.join(tmpfs.path, "blk.img"), False)]
    if not args.quick:
        disk_dir = os.path.join(args.disk_dir, "mvmm-bench")
        os.makedirs(disk_dir, exist_ok=True)
        if is_tmpfs(disk_dir):
            log(f"warning: {disk_dir} is on tmpfs, not a real disk")
        files.append(("disk", os.path.join(disk_dir, "blk.img"), args.direct))

    rows, failed = [], 0
    load_start = loadavg()
    try:
        for label, path, _ in files:
            make_file(path, size, sync=(label == "disk"))
        engine = pick_engine(files[0][1])
        log(f"fio engine: {engine}; {seconds} s per run after {WARMUP_S} s warm-up; "
            f"EVENT_IDX {args.event_idx}; load average {load_start:.2f}")
        n = 0
        for label, path, direct in files:
            warm_cache(path)
            for workload, bs, qd in WORKLOADS:
                row = {"file": label, "path": path, "workload": workload, "bs": bs, "qd": qd,
                       "direct": direct, "event_idx": event_idx, "fio_engine": engine}
                # Alternate who goes first, so drift in machine load is shared.
                order = ["mvmm", "fio"] if n % 2 == 0 else ["fio", "mvmm"]
                if not args.no_psync:
                    order.append("psync")
                n += 1
                runs = {who: [] for who in order}
                for _ in range(args.repeat):
                    for who in order:
                        try:
                            if who == "mvmm":
                                r = run_mvmm(exe, path, workload, bs, qd, seconds, direct,
                                             event_idx)
                            elif who == "fio":
                                r = run_fio(engine, path, workload, bs, qd, seconds, direct)
                            else:
                                # The ceiling of a synchronous one-thread device: back-to-back
                                # pread/pwrite, nothing else (iodepth is 1 by nature).
                                r = run_fio("psync", path, workload, bs, 1, seconds, direct)
                            runs[who].append(r)
                        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                            failed += 1
                            log(f"{label} {workload} QD{qd} {who}: {e}")
                for who, rs in runs.items():
                    # The run with the median IOPS stands for the tool; all are kept.
                    rs.sort(key=lambda r: r["iops"])
                    row[who] = rs[(len(rs) - 1) // 2] if rs else None
                    if args.repeat > 1:
                        row[who + "_iops_all"] = [round(r["iops"]) for r in rs]
                m, f = row.get("mvmm"), row.get("fio")
                if m and f:
                    row["ratio"] = m["iops"] / f["iops"] if f["iops"] else None
                    log(f"{label:5} {workload:9} {bs // 1024:>3}k QD{qd:<2}  "
                        f"mvmm {m['iops']:>9.0f} IOPS {m['cpu_us']:6.2f} µs/req   "
                        f"fio {f['iops']:>9.0f} IOPS {f['cpu_us']:6.2f} µs/req   "
                        f"{row['ratio']:.0%}")
                rows.append(row)
    finally:
        if not args.keep_files:
            for _, path, _ in files:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        tmpfs.close()
    load_end = loadavg()

    out = sys.stderr if args.json == "-" else sys.stdout
    print(file=out)
    print_table(rows, out)
    below = [r for r in rows if r["qd"] == TARGET_QD and r.get("ratio") is not None
             and r["ratio"] < TARGET_RATIO]
    print(f"\ntarget: mvmm >= {TARGET_RATIO:.0%} of fio's IOPS at QD {TARGET_QD}: "
          + ("met" if not below else f"NOT met in {len(below)} of "
             f"{sum(1 for r in rows if r['qd'] == TARGET_QD)} QD {TARGET_QD} runs"), file=out)
    print(f"fio engine {engine}; {seconds} s per run; CPU µs/req = process CPU time (user+sys, "
          f"all threads) / requests; load average {load_start:.2f} at start, "
          f"{load_end:.2f} at end; {os.cpu_count()} CPUs"
          + (f"; median of {args.repeat} runs" if args.repeat > 1 else "")
          + (f"; taskset -c {args.taskset}" if args.taskset else ""), file=out)
    if args.json:
        doc = {"seconds": seconds, "warmup_s": WARMUP_S, "fio_engine": engine,
               "repeat": args.repeat, "taskset": args.taskset,
               "target": {"qd": TARGET_QD, "ratio": TARGET_RATIO},
               "load_start": load_start, "load_end": load_end, "cpus": os.cpu_count(),
               "rows": rows}
        if args.json == "-":
            json.dump(doc, sys.stdout, indent=1)
            print()
        else:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
