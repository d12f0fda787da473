#!/usr/bin/env python3
"""Start/exit latency and memory benchmark: mvmm vs QEMU microvm, in the same run.

Both VMMs boot the same test guest (target/release/testguest/), which prints its boot
info on the serial port ("testguest: ... testguest: done") and then resets the machine.
Each iteration runs every VMM twice, a timed run then a memory run; the VMM that goes
first alternates so drift and noise are shared. One untimed warm-up run of each comes first.

Timed run (spawned directly with subprocess.Popen):
  wall      exec -> exit: perf_counter_ns before Popen() to after os.wait4() returns.
  first     exec -> arrival of the first byte of "testguest:" on the VMM's stdout (pipe
            read unbuffered; the peers' usual "start latency" figure).
Memory run (peak RSS = ru_maxrss from os.wait4, KiB):
  A child forked by this Python process starts with Python's RSS (~10-14 MiB) as its
  ru_maxrss, kept across exec, which would swamp a small VMM. So the VMM is forked by a
  small /bin/sh that exits at once, and we, made child subreaper, reap it with wait4.
  The floor of this method (peak RSS of /bin/true launched the same way) is printed.
A run is OK only if its output has "testguest: done" and it exited with status 0
(QEMU: -no-reboot turns the guest's reset into an exit with status 0).

VMM overhead = peak RSS - guest RAM the host actually populated ("guest res"):
  mvmm  each run logs "guest memory resident: N KiB" (--log-level debug), summed from its
        own /proc/self/smaps at exit.
  QEMU  one extra untimed run backs guest RAM with a file on tmpfs (memory-backend-file,
        share=on); the file's allocated blocks after QEMU exits are exactly the guest
        pages touched (by firmware, loader and guest). Other runs use anonymous RAM.
"""
import argparse, ctypes, json, os, re, select, shutil, signal, statistics, subprocess, sys
import tempfile, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGES = {"pvh": "testguest-pvh.elf", "elf64": "testguest-elf64.elf",
          "bzimage": "testguest.bzImage"}
CMDLINE = "console=ttyS0 bench"
RUN_TIMEOUT_S = 30
PR_SET_CHILD_SUBREAPER = 36
RESIDENT_RE = re.compile(rb"guest memory resident: (\d+) KiB")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def ensure_qemu():
    if shutil.which("qemu-system-x86_64"):
        return
    log("qemu-system-x86_64 missing: installing qemu-system-x86 ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "qemu-system-x86"], env=env).returncode:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "qemu-system-x86"], env=env, check=True)


# Launcher for memory runs: the background subshell (a fork of the small sh) waits on its
# fd 3 (our gate pipe) until the sh has exited and it is our child, then execs the VMM.
LAUNCH_SH = 'exec 3<&0; { read _ <&3; exec 3<&-; exec "$@"; } & echo $!'


def spawn(argv, workdir, err, launcher):
    """Starts argv; returns (pid, Popen whose stdout is the VM's). With launcher, a /bin/sh
    forks argv and exits; the orphan is reparented to us (subreaper), then released."""
    if not launcher:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=err, bufsize=0, cwd=workdir)
        return p.pid, p
    gate_r, gate_w = os.pipe()
    sh = subprocess.Popen(["/bin/sh", "-c", LAUNCH_SH, "sh", *argv], stdin=gate_r,
                          stdout=subprocess.PIPE, stderr=err, bufsize=0, cwd=workdir)
    os.close(gate_r)
    line = b""
    while not line.endswith(b"\n"):
        line += os.read(sh.stdout.fileno(), 1) or b"\n"
    sh.wait()
    os.close(gate_w)
    return int(line), sh


def run_once(argv, workdir, launcher=False):
    """Runs one VM: wall and first-output times (ns), peak RSS, exit status, output."""
    errpath = Path(workdir) / "stderr"
    with open(errpath, "wb") as err:
        t0 = time.perf_counter_ns()
        pid, p = spawn(argv, workdir, err, launcher)
    fd, out, chunks, timed_out = p.stdout.fileno(), bytearray(), [], False
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            timed_out = True
            break
        data = os.read(fd, 65536)
        if not data:
            break
        chunks.append((len(out), time.perf_counter_ns()))  # (offset of chunk, arrival)
        out += data
    _, wstatus, rusage = os.wait4(pid, 0)
    t_end = time.perf_counter_ns()
    status = os.waitstatus_to_exitcode(wstatus)
    if not launcher:
        p.returncode = status  # keep Popen from waiting again
    p.stdout.close()
    pos = out.find(b"testguest:")
    first = max(t for off, t in chunks if off <= pos) - t0 if pos >= 0 else None
    stderr = errpath.read_bytes()
    m = RESIDENT_RE.search(stderr)
    return {"ok": not timed_out and status == 0 and b"testguest: done" in out,
            "kind": "memory" if launcher else "timed", "status": status,
            "timed_out": timed_out, "wall_ns": t_end - t0, "first_ns": first,
            "maxrss_kib": rusage.ru_maxrss, "guest_kib": int(m.group(1)) if m else None,
            "stderr": stderr}


def mvmm_argv(image, mem_mib, workdir, cmdline=CMDLINE):
    cfg = {"kernel": {"path": str(image), "cmdline": cmdline},
           "machine": {"vcpus": 1, "memory_mib": mem_mib}, "serial": {"mode": "stdout"}}
    path = Path(workdir) / ("vm.json" if cmdline == CMDLINE else "vm-steady.json")
    path.write_text(json.dumps(cfg))
    return [str(REPO / "target/release/mvmm"), "--config", str(path), "--log-level", "debug"]


def qemu_argv(image, mem_mib, cpu, extra=(), cmdline=CMDLINE):
    return ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", cpu,
            "-m", str(mem_mib), "-smp", "1", "-no-reboot", "-nodefaults", "-nographic",
            "-serial", "stdio", "-kernel", str(image), "-append", cmdline, *extra]


STEADY_CMDLINE = "console=ttyS0 test=hang"
STEADY_RUNS = 5


def steady_memory(argv):
    """Memory of a running VM (the guest spins after booting), 1 s after start, from /proc:
    private anonymous memory (the VMM's heap, stacks and the guest pages it touched) and
    file-backed pages (the binary and its libraries, shared by every VM on a host). Medians
    of STEADY_RUNS runs, in KiB."""
    samples = []
    for _ in range(STEADY_RUNS):
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            time.sleep(1)
            status = Path(f"/proc/{p.pid}/status").read_text()
            rollup = Path(f"/proc/{p.pid}/smaps_rollup").read_text()
        finally:
            p.kill()
            p.wait()
        field = lambda text, name: int(re.search(rf"^{name}:\s+(\d+) kB", text, re.M).group(1))
        samples.append((field(status, "RssAnon"), field(status, "RssFile"),
                        field(rollup, "Pss")))
    return [statistics.median(s[i] for s in samples) for i in range(3)]


def probe_qemu_cpu(image, mem_mib, workdir):
    """`-cpu host` aborts on some KVMs (PVM refuses MSR 0x10a, IA32_ARCH_CAPABILITIES)."""
    for cpu in ("host", "host,-arch-capabilities", "qemu64"):
        r = run_once(qemu_argv(image, mem_mib, cpu), workdir)
        if r["ok"]:
            return cpu
        why = (r["stderr"].decode(errors="replace").strip().splitlines() or [""])[0][:120]
        log(f"note: qemu -cpu {cpu} failed (status {r['status']}): {why}")
    sys.exit("error: QEMU booted the guest with no -cpu choice")


def qemu_guest_touched_kib(image, mem_mib, cpu, workdir):
    """Guest pages QEMU populated, from a tmpfs-backed RAM file's allocated blocks."""
    shm = Path("/dev/shm")
    ram = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else workdir)) / "guest.ram"
    extra = ["-object", f"memory-backend-file,id=ram0,size={mem_mib}M,mem-path={ram},share=on",
             "-machine", "memory-backend=ram0"]
    try:
        r = run_once(qemu_argv(image, mem_mib, cpu, extra), workdir)
        return ram.stat().st_blocks * 512 // 1024 if r["ok"] and ram.exists() else None
    finally:
        shutil.rmtree(ram.parent, ignore_errors=True)


def pct(values, q):
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, -(-len(s) * q // 100) - 1))]


def summarize(name, runs, guest_kib=None):
    """Stats per VMM: times from OK timed runs, memory from OK memory runs (medians)."""
    ok = [r for r in runs if r["ok"]]
    s = {"vmm": name, "ok": len(ok), "failed": len(runs) - len(ok)}
    wall = [r["wall_ns"] / 1e6 for r in ok if r["kind"] == "timed"]
    first = [r["first_ns"] / 1e6 for r in ok if r["kind"] == "timed" and r["first_ns"]]
    mem = [r for r in ok if r["kind"] == "memory"]
    if wall:
        s.update(wall_min_ms=min(wall), wall_median_ms=statistics.median(wall),
                 wall_p95_ms=pct(wall, 95))
    if first:
        s["first_median_ms"] = statistics.median(first)
    if mem:
        s["rss_median_mib"] = statistics.median(r["maxrss_kib"] for r in mem) / 1024
        guest = [r.get("guest_kib") or guest_kib for r in mem]
        if None not in guest:
            s["guest_resident_mib"] = statistics.median(guest) / 1024
            s["overhead_mib"] = statistics.median(
                r["maxrss_kib"] - g for r, g in zip(mem, guest)) / 1024
    return s


COLUMNS = [("VMM", "vmm", "{}"), ("OK", "ok", "{}"), ("fail", "failed", "{}"),
           ("wall min", "wall_min_ms", "{:.2f}"), ("wall med", "wall_median_ms", "{:.2f}"),
           ("wall p95", "wall_p95_ms", "{:.2f}"), ("1st out med", "first_median_ms", "{:.2f}"),
           ("peak RSS med", "rss_median_mib", "{:.2f}"),
           ("guest res", "guest_resident_mib", "{:.3f}"), ("VMM ovh", "overhead_mib", "{:.2f}")]


def table(rows):
    cells = [[c[0] for c in COLUMNS]]
    cells += [[f.format(row[k]) if row.get(k) is not None else "-" for _, k, f in COLUMNS]
              for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + ("\n(ms and MiB; OK/fail count timed + memory runs; "
                               "medians over OK runs)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30, help="iterations (default 30)")
    ap.add_argument("--image", choices=IMAGES, default="pvh",
                    help="guest image (default pvh); QEMU runs only with pvh")
    ap.add_argument("--memory-mib", type=int, default=128)
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="also write JSON results to FILE, or to stdout (table goes to stderr)")
    ap.add_argument("--no-build", action="store_true", help="skip cargo build --release")
    a = ap.parse_args()
    out = sys.stderr if a.json == "-" else sys.stdout

    if not a.no_build:
        log("building mvmm (cargo build --release) ...")
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)
    image = REPO / "target/release/testguest" / IMAGES[a.image]
    with_qemu = a.image == "pvh"
    notes = [f"guest: {image.name}, {a.memory_mib} MiB, 1 vCPU, cmdline {CMDLINE!r}"]
    if with_qemu:
        ensure_qemu()
    else:
        notes.append(f"QEMU skipped: microvm boots only the PVH ELF, not {a.image}")
    load = os.getloadavg()[0]
    launcher = ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    work = tempfile.mkdtemp(prefix="mvmm-bench-")
    try:
        vmms = {"mvmm": mvmm_argv(image, a.memory_mib, work)}
        qemu_touched = None
        if with_qemu:
            cpu = probe_qemu_cpu(image, a.memory_mib, work)  # doubles as QEMU's warm-up
            vmms["qemu"] = qemu_argv(image, a.memory_mib, cpu)
            notes.append("qemu: " + " ".join(vmms["qemu"][:9]) + " ...")
            qemu_touched = qemu_guest_touched_kib(image, a.memory_mib, cpu, work)
        run_once(vmms["mvmm"], work)  # warm-up
        floor = statistics.median(run_once(["/bin/true"], work, launcher)["maxrss_kib"]
                                  for _ in range(5))
        results = {name: [] for name in vmms}
        for i in range(a.runs):
            for name in list(vmms)[::1 if i % 2 == 0 else -1]:
                results[name].append(run_once(vmms[name], work))
                results[name].append(run_once(vmms[name], work, launcher))
            log(f"iteration {i + 1}/{a.runs}")
        steady = {"mvmm": steady_memory(mvmm_argv(image, a.memory_mib, work, STEADY_CMDLINE))}
        if with_qemu:
            steady["qemu"] = steady_memory(qemu_argv(image, a.memory_mib, cpu,
                                                     cmdline=STEADY_CMDLINE))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [summarize("mvmm", results["mvmm"])]
    if with_qemu:
        rows.append(summarize("qemu", results["qemu"], qemu_touched))
        m, q = rows
        rows.append({"vmm": "mvmm/qemu", **{k: m[k] / q[k] for _, k, _ in COLUMNS[3:]
                                            if m.get(k) is not None and q.get(k)}})
    notes.append(f"1-min load average: {load:.2f} at start, {os.getloadavg()[0]:.2f} at end "
                 f"({os.cpu_count()} CPUs; other load skews the times)")
    notes.append(("peak RSS: VMM forked by /bin/sh, reaped as subreaper; floor (/bin/true) "
                  f"{floor / 1024:.2f} MiB") if launcher else
                 "peak RSS: prctl(PR_SET_CHILD_SUBREAPER) failed, so it includes Python's RSS")
    notes.append("mvmm guest res: 'guest memory resident' debug log line (smaps at exit)")
    if with_qemu:
        notes.append("qemu guest res: " + ("allocated blocks of a tmpfs-backed guest RAM "
                     "file, one extra run" if qemu_touched is not None else "not measured: "
                     "peak RSS includes guest pages; mvmm's guest res is a lower bound"))
    targets = []
    if with_qemu and rows[2].get("wall_median_ms") is not None:
        r = rows[2]["wall_median_ms"]
        targets.append({"target": "mvmm median exec->exit <= 1/3 of QEMU's",
                        "value": f"{r:.3f}x QEMU's", "met": r <= 1 / 3})
    if rows[0].get("overhead_mib") is not None:
        v = rows[0]["overhead_mib"]
        targets.append({"target": "mvmm VMM overhead < 3 MiB", "value": f"{v:.2f} MiB",
                        "met": v < 3})

    print(table(rows), file=out)
    print(f"\nrunning VM ({STEADY_CMDLINE!r}, 1 s after start, median of {STEADY_RUNS}; MiB):",
          file=out)
    print(f"{'VMM':<10} {'private anon':>12} {'file-backed':>12} {'PSS':>8}", file=out)
    for name, (anon, file_kib, pss) in steady.items():
        print(f"{name:<10} {anon / 1024:>12.2f} {file_kib / 1024:>12.2f} {pss / 1024:>8.2f}",
              file=out)
    if "qemu" in steady:
        m, q = steady["mvmm"], steady["qemu"]
        print(f"{'mvmm/qemu':<10} {m[0] / q[0]:>12.3f} {m[1] / q[1]:>12.3f} {m[2] / q[2]:>8.3f}",
              file=out)
    for n in notes:
        print("note: " + n, file=out)
    for t in targets:
        print(f"target: {t['target']}: {t['value']} -> {'MET' if t['met'] else 'MISSED'}",
              file=out)
    for name, runs in results.items():
        bad = [r for r in runs if not r["ok"]]
        if bad:  # one example per VMM
            print(f"{name}: {len(bad)} failed runs, e.g. status {bad[0]['status']}, timed out "
                  f"{bad[0]['timed_out']}, stderr ends {bad[0]['stderr'][-300:]!r}", file=out)
    if a.json:
        raw = {n: [{k: v for k, v in r.items() if k != "stderr"} for r in rs]
               for n, rs in results.items()}
        text = json.dumps({"runs": a.runs, "image": a.image, "memory_mib": a.memory_mib,
                           "rows": rows, "targets": targets, "notes": notes, "raw": raw},
                          indent=1)
        if a.json == "-":
            print(text)
        else:
            Path(a.json).write_text(text + "\n")
    return 1 if any(r["failed"] for r in rows if r["vmm"] != "mvmm/qemu") else 0


if __name__ == "__main__":
    sys.exit(main())
