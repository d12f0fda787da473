#!/usr/bin/env python3
"""vhost-user-blk backends: `mvmm backend blk` against qemu-storage-daemon, same file, same run.

The Rust harness (devices/benches/vhost_user_blk_path.rs) is the VMM's vhost-user frontend and
the guest's virtio-blk driver at once: guest memory in a memfd, one split virtqueue in it,
SET_MEM_TABLE / features / vrings through mvmm's own frontend, a kick eventfd and a call
eventfd. The backend process alone serves the queue. No guest and no KVM: this measures the
backend's whole host-side path, the same way for both backends.

Each run starts a fresh backend on the file (mvmm exits when its frontend leaves;
qemu-storage-daemon is stopped with SIGTERM), runs one workload, and samples the backend
process's CPU time and context switches over the measured window.

Files: a 1 GiB file on tmpfs (/dev/shm, or a tmpfs mounted under /tmp when /dev/shm is too
small) and a 1 GiB file on the real disk (/var/tmp), buffered I/O (page cache) for both.

Target (issue 5): mvmm / qemu-storage-daemon >= 1.0 on every row.
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (MIB, REPO, TmpfsDir, build_bench, is_tmpfs, loadavg, log,  # noqa: E402
                      make_file, warm_cache)

TARGET_RATIO = 1.0
WARMUP_S = 0.5
# Prepended to every backend and harness command (--taskset).
PREFIX = []
# (row label, workload, block size, queue depth, what the row compares)
WORKLOADS = [
    ("4K randread QD1", "randread", 4096, 1, "iops"),
    ("4K randread QD32", "randread", 4096, 32, "iops"),
    ("4K randwrite QD1", "randwrite", 4096, 1, "iops"),
    ("4K randwrite QD32", "randwrite", 4096, 32, "iops"),
    ("128K seqread QD32", "seqread", 128 * 1024, 32, "mb_s"),
    ("128K seqwrite QD32", "seqwrite", 128 * 1024, 32, "mb_s"),
]
BACKENDS = ("mvmm", "qsd")


# ---- Setup -------------------------------------------------------------------------------

def ensure_qsd():
    if shutil.which("qemu-storage-daemon"):
        return shutil.which("qemu-storage-daemon")
    log("qemu-storage-daemon missing: installing qemu-system-common ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-system-common"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    path = shutil.which("qemu-storage-daemon")
    if not path:
        sys.exit("qemu-storage-daemon is still missing after installing qemu-system-common")
    return path


def build_mvmm():
    log("building mvmm (cargo build --release --bin mvmm) ...")
    if subprocess.run(["cargo", "build", "--release", "--bin", "mvmm"], cwd=REPO).returncode:
        sys.exit("cargo build of mvmm failed")
    return str(REPO / "target/release/mvmm")


def latest_bench(name):
    cands = sorted((REPO / "target/release/deps").glob(f"{name}-*"),
                   key=lambda p: p.stat().st_mtime)
    cands = [c for c in cands if os.access(c, os.X_OK) and c.suffix == ""]
    if not cands:
        sys.exit(f"no built {name} harness; run without --no-build")
    return str(cands[-1])


def backend_argv(who, tools, path, socket):
    if who == "mvmm":
        return [tools["mvmm"], "backend", "blk", "--socket", socket, "--path", path]
    # The brief's settings: buffered (page cache) and a thread pool, a raw format node on top
    # as QEMU users have it, writable, one queue (the export's default).
    return [tools["qsd"],
            "--blockdev", f"driver=file,node-name=f,filename={path},cache.direct=off,aio=threads",
            "--blockdev", "driver=raw,node-name=r,file=f",
            "--export", f"type=vhost-user-blk,id=e,node-name=r,addr.type=unix,"
                        f"addr.path={socket},writable=on"]


# ---- Runs --------------------------------------------------------------------------------

def wait_listening(socket, proc, timeout=10.0):
    """Until the backend listens on `socket` (a listening socket in /proc/net/unix)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the backend exited early ({proc.returncode})")
        try:
            with open("/proc/net/unix") as f:
                for line in f:
                    fields = line.split()
                    # Flags 0x10000: __SO_ACCEPTCON (listening).
                    if len(fields) >= 8 and fields[7] == socket and int(fields[3], 16) & 0x10000:
                        return
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"the backend did not listen on {socket} within {timeout} s")


def run_one(who, tools, path, workload, bs, qd, seconds, event_idx, tmpdir):
    socket = os.path.join(tmpdir, f"{who}.sock")
    if os.path.exists(socket):
        os.unlink(socket)
    errlog = open(os.path.join(tmpdir, f"{who}.log"), "w+")
    proc = subprocess.Popen(PREFIX + backend_argv(who, tools, path, socket),
                            stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog)
    try:
        wait_listening(socket, proc)
        cmd = [tools["harness"], "--socket", socket, "--backend-pid", str(proc.pid),
               "--workload", workload, "--bs", str(bs), "--qd", str(qd),
               "--seconds", str(seconds), "--warmup", str(WARMUP_S),
               "--event-idx", "on" if event_idx else "off"]
        p = subprocess.run(PREFIX + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=seconds * 4 + 60)
        if p.returncode:
            raise RuntimeError(f"harness failed ({p.returncode}): {p.stderr.strip()}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        # mvmm exits once its frontend is gone; qemu-storage-daemon keeps serving until told.
        if who == "qsd":
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise RuntimeError("the backend did not exit after the run")
        if rc != 0:
            raise RuntimeError(f"the backend exited with {rc}")
        return r
    except Exception as e:
        errlog.seek(0)
        tail = errlog.read()[-600:].strip()
        raise RuntimeError(f"{e}" + (f"\n  backend log: {tail}" if tail else "")) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        errlog.close()


def median_run(runs, key):
    """The run with the median `key` (the lower middle one for an even count)."""
    runs = sorted(runs, key=lambda r: r[key])
    return runs[(len(runs) - 1) // 2] if runs else None


# ---- Output ------------------------------------------------------------------------------

def print_table(rows, out):
    hdr = ("file", "row", "unit", "mvmm", "qsd", "mvmm/qsd", "", "mvmm µs/req", "qsd µs/req",
           "mvmm p99 µs", "qsd p99 µs", "mvmm csw/req", "qsd csw/req")
    lines = []
    for r in rows:
        m, q, key = r.get("mvmm"), r.get("qsd"), r["key"]
        ratio = m[key] / q[key] if m and q and q[key] else None
        flag = "" if ratio is None else ("ok" if ratio >= TARGET_RATIO else "BELOW")

        def cell(d, k, spec):
            return format(d[k], spec) if d and k in d else "FAIL" if not d else "-"

        def csw(d):
            if not d or "backend_vol_switches_per_req" not in d:
                return "FAIL" if not d else "-"
            return f"{d['backend_vol_switches_per_req'] + d['backend_invol_switches_per_req']:.2f}"

        lines.append((r["file"], r["label"], "IOPS" if key == "iops" else "MB/s",
                      cell(m, key, ".0f"), cell(q, key, ".0f"),
                      f"{ratio:.2f}" if ratio is not None else "-", flag,
                      cell(m, "backend_cpu_us_per_req", ".2f"),
                      cell(q, "backend_cpu_us_per_req", ".2f"),
                      cell(m, "lat_us_p99", ".0f"), cell(q, "lat_us_p99", ".0f"),
                      csw(m), csw(q)))
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(hdr)]
    left = {0, 1, 2, 6}
    for row in [hdr] + lines:
        cells = [c.ljust(w) if i in left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip(), file=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3, help="measured seconds per run (3)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per backend and workload; the table shows the median (3)")
    ap.add_argument("--quick", action="store_true",
                    help="1 s per run, 1 repeat, tmpfs file only")
    ap.add_argument("--files", default="tmpfs,disk", help="tmpfs, disk or both (tmpfs,disk)")
    ap.add_argument("--rows", metavar="WORDS",
                    help="only the rows whose label contains one of these comma-separated "
                         "words, e.g. 'seqread,QD1'")
    ap.add_argument("--event-idx", choices=["on", "off"], default="on",
                    help="offer VIRTIO_RING_F_EVENT_IDX from the driver (on, like Linux)")
    ap.add_argument("--size-mib", type=int, default=1024, help="test file size (1024)")
    ap.add_argument("--disk-dir", default="/var/tmp", help="directory on the real disk")
    ap.add_argument("--keep-files", action="store_true", help="keep the test files")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="write results as JSON to FILE (or stdout; the table goes to stderr)")
    ap.add_argument("--no-build", action="store_true",
                    help="use the last built harness and target/release/mvmm")
    ap.add_argument("--taskset", metavar="CPUS",
                    help="run the backends and the harness under `taskset -c CPUS`")
    args = ap.parse_args()
    seconds, repeat = (1.0, 1) if args.quick else (args.seconds, args.repeat)
    files_wanted = ["tmpfs"] if args.quick else args.files.split(",")
    if repeat < 1 or seconds <= 0:
        ap.error("--repeat must be at least 1 and --seconds positive")
    if not set(files_wanted) <= {"tmpfs", "disk"}:
        ap.error("--files takes tmpfs, disk or tmpfs,disk")
    if args.taskset:
        PREFIX[:] = ["taskset", "-c", args.taskset]
    workloads = [w for w in WORKLOADS
                 if not args.rows or any(word in w[0] for word in args.rows.split(","))]
    if not workloads:
        ap.error(f"--rows {args.rows} matches none of: {', '.join(w[0] for w in WORKLOADS)}")
    size = args.size_mib * MIB
    event_idx = args.event_idx == "on"

    tools = {"qsd": ensure_qsd()}
    if args.no_build:
        tools["mvmm"] = str(REPO / "target/release/mvmm")
        tools["harness"] = latest_bench("vhost_user_blk_path")
    else:
        tools["mvmm"] = build_mvmm()
        tools["harness"] = build_bench("vhost_user_blk_path")

    tmpfs = TmpfsDir(size) if "tmpfs" in files_wanted else None
    files = []
    if tmpfs:
        files.append(("tmpfs", os.path.join(tmpfs.path, "vhost-blk.img")))
    if "disk" in files_wanted:
        disk_dir = os.path.join(args.disk_dir, "mvmm-bench")
        os.makedirs(disk_dir, exist_ok=True)
        if is_tmpfs(disk_dir):
            log(f"warning: {disk_dir} is on tmpfs, not a real disk")
        files.append(("disk", os.path.join(disk_dir, "vhost-blk.img")))

    rows, failed, n = [], 0, 0
    load_start = loadavg()
    log(f"{seconds:g} s per run after {WARMUP_S} s warm-up, median of {repeat}; "
        f"EVENT_IDX {args.event_idx}; load average {load_start:.2f}")
    tmpdir = tempfile.mkdtemp(prefix="mvmm-vhost-blk-")
    try:
        for label, path in files:
            make_file(path, size, sync=(label == "disk"))
        for label, path in files:
            warm_cache(path)
            for row_label, workload, bs, qd, key in workloads:
                row = {"file": label, "path": path, "label": row_label, "workload": workload,
                       "bs": bs, "qd": qd, "key": key, "event_idx": event_idx}
                runs = {who: [] for who in BACKENDS}
                for _ in range(repeat):
                    # Alternate who goes first, so drift in machine load is shared.
                    order = BACKENDS if n % 2 == 0 else BACKENDS[::-1]
                    n += 1
                    for who in order:
                        try:
                            runs[who].append(run_one(who, tools, path, workload, bs, qd,
                                                     seconds, event_idx, tmpdir))
                        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                            failed += 1
                            log(f"{label} {row_label} {who}: {e}")
                for who in BACKENDS:
                    row[who] = median_run(runs[who], key)
                    row[who + "_all"] = [round(r[key]) for r in runs[who]]
                m, q = row["mvmm"], row["qsd"]
                if m and q:
                    row["ratio"] = m[key] / q[key] if q[key] else None
                    log(f"{label:5} {row_label:18}  mvmm {m[key]:>9.0f}  qsd {q[key]:>9.0f}  "
                        f"{row['ratio']:.2f}   (runs: mvmm {row['mvmm_all']}, "
                        f"qsd {row['qsd_all']})")
                rows.append(row)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if not args.keep_files:
            for _, path in files:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if tmpfs:
            tmpfs.close()
    load_end = loadavg()

    out = sys.stderr if args.json == "-" else sys.stdout
    print(file=out)
    print_table(rows, out)
    below = [r for r in rows if r.get("ratio") is not None and r["ratio"] < TARGET_RATIO]
    print(f"\ntarget: mvmm >= {TARGET_RATIO:.2f} x qemu-storage-daemon on every row: "
          + ("met" if not below and rows and not failed else
             f"NOT met in {len(below)} of {len(rows)} rows"
             + (f" ({failed} runs failed)" if failed else "")), file=out)
    qsd_version = subprocess.run([tools["qsd"], "--version"], stdout=subprocess.PIPE,
                                 text=True).stdout.splitlines()[0]
    print(f"{seconds:g} s per run, median of {repeat}; µs/req = backend process CPU "
          f"(all threads) per request; csw/req = backend context switches per request; "
          f"{qsd_version}; load average {load_start:.2f} at start, {load_end:.2f} at end; "
          f"{os.cpu_count()} CPUs" + (f"; taskset -c {args.taskset}" if args.taskset else ""),
          file=out)
    if args.json:
        doc = {"seconds": seconds, "warmup_s": WARMUP_S, "repeat": repeat,
               "taskset": args.taskset, "qsd_version": qsd_version,
               "target_ratio": TARGET_RATIO, "load_start": load_start, "load_end": load_end,
               "cpus": os.cpu_count(), "rows": rows}
        if args.json == "-":
            json.dump(doc, sys.stdout, indent=1)
            print()
        else:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
