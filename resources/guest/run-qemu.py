#!/usr/bin/env python3
"""run-qemu.py - boot mvmm's guest test kit under QEMU (TCG) and collect results.

Boots the pinned Debian kernel with the test-kit initramfs (build-initramfs.sh)
under qemu-system-x86_64 without KVM, with the devices named on the command
line, and runs one guest test (mvmm.test=<name>). The serial console is
streamed to stderr (or only to --log with --quiet). When QEMU exits the RESULT
lines are printed to stdout, followed by one TIMING line and one SUMMARY line.

Exit status: 0 all RESULT lines PASS/INFO/SKIP; 1 at least one FAIL;
2 no RESULT line or QEMU failed; 3 timeout (QEMU killed).

Examples:
  run-qemu.py --test blk --vhost-user-blk /tmp/blk.sock -p size_sectors=2097152
  run-qemu.py --test net --tap tap0 --mac 52:54:00:12:34:56 \\
              -p mac=52:54:00:12:34:56 -p ip=192.0.2.2/24 -p peer=192.0.2.1
  run-qemu.py --test shell --interactive --drive /tmp/disk.img

Memory is a shared memfd (required by vhost-user backends).
"""

import argparse
import os
import re
import selectors
import shlex
import signal
import stat
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULT_RE = re.compile(r"RESULT (\S+) (PASS|FAIL|SKIP|INFO)\b ?(.*)")
END_RE = re.compile(r"MVMM-TEST-END .*")

# -device names per machine type: (virtio-blk, vhost-user-blk, virtio-net)
DEVICES = {
    "microvm": ("virtio-blk-device", "vhost-user-blk", "virtio-net-device"),
    "q35": ("virtio-blk-pci", "vhost-user-blk-pci", "virtio-net-pci"),
}


def log(msg):
    print(f"run-qemu: {msg}", file=sys.stderr, flush=True)


def kit_paths(args):
    """Kernel and initramfs: from the command line or build-initramfs.sh."""
    if args.kernel and args.initrd:
        return args.kernel, args.initrd
    out = subprocess.run(
        [os.path.join(HERE, "build-initramfs.sh")],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        sys.exit("run-qemu: build-initramfs.sh failed")
    vals = dict(
        line.split("=", 1) for line in out.stdout.splitlines() if "=" in line
    )
    return args.kernel or vals["BZIMAGE"], args.initrd or vals["INITRAMFS"]


def host_tsc_khz():
    """The host's TSC frequency in kHz, from /proc/cpuinfo, or None.

    Under TCG the guest TSC runs at the host's TSC rate. The kernel calibrates
    it against the PIT, which is timing-sensitive under emulation: on a busy
    host the fast calibration fails, and the microvm machine has no HPET or
    ACPI PM timer to fall back to, so boot hangs right after "tsc: Marking TSC
    unstable". Passing tsc_early_khz= skips the calibration.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    if not flags or not mhz or "constant_tsc" not in flags.group(1).split():
        return None
    return int(float(mhz.group(1)) * 1000)


def wait_socket(path, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return
        except FileNotFoundError:
            pass
        if time.monotonic() >= deadline:
            sys.exit(f"run-qemu: no unix socket at {path} after {timeout} s")
        time.sleep(0.05)


def build_cmd(args, kernel, initrd):
    blk_dev, vub_dev, net_dev = DEVICES[args.machine]
    mem = f"{args.mem}M"
    machine = args.machine
    if args.machine == "microvm":
        machine += ",acpi=on"
    machine += ",memory-backend=mem"
    cmd = [
        args.qemu,
        "-accel", "tcg",
        "-machine", machine,
        "-cpu", args.cpu,
        "-smp", str(args.smp),
        "-m", mem,
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", kernel, "-initrd", initrd,
    ]
    if args.machine == "microvm":
        cmd += ["-global", "virtio-mmio.force-legacy=false"]
    if args.interactive:
        cmd += ["-serial", "mon:stdio"]
    else:
        cmd += ["-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0"]

    for i, d in enumerate(args.drive):
        path, _, opts = d.partition(",")
        ro = "ro" in opts.split(",")
        cmd += [
            "-blockdev",
            f"driver=file,node-name=file{i},filename={path},read-only={'on' if ro else 'off'}"
            ",discard=unmap",
            "-blockdev",
            f"driver=raw,node-name=drive{i},file=file{i},read-only={'on' if ro else 'off'}"
            ",discard=unmap",
            "-device",
            f"{blk_dev},drive=drive{i}" + (f",serial={args.serial}" if args.serial else ""),
        ]
    for i, sock in enumerate(args.vhost_user_blk):
        wait_socket(sock, args.socket_wait)
        cmd += [
            "-chardev", f"socket,id=vub{i},path={sock}",
            "-device", f"{vub_dev},chardev=vub{i},num-queues={args.blk_queues}",
        ]
    nic = 0
    net_opts = f",{args.net_opts}" if args.net_opts else ""

    def mac_opt():
        if nic < len(args.mac):
            return f",mac={args.mac[nic]}"
        return ""

    for sock in args.vhost_user_net:
        wait_socket(sock, args.socket_wait)
        q = args.net_queues
        dev = f"{net_dev},netdev=net{nic}{mac_opt()}{net_opts}"
        if q > 1:
            dev += ",mq=on" + (f",vectors={2 * q + 2}" if args.machine == "q35" else "")
        cmd += [
            "-chardev", f"socket,id=vun{nic},path={sock}",
            "-netdev", f"vhost-user,id=net{nic},chardev=vun{nic},queues={q}",
            "-device", dev,
        ]
        nic += 1
    for tap in args.tap:
        cmd += [
            "-netdev", f"tap,id=net{nic},ifname={tap},script=no,downscript=no,vhost=off",
            "-device", f"{net_dev},netdev=net{nic}{mac_opt()}{net_opts}",
        ]
        nic += 1

    append = ["console=ttyS0", "panic=-1"]
    if args.tsc_khz:
        append.append(f"tsc_early_khz={args.tsc_khz}")
    append += args.kernel_args
    if args.test:
        append.append(f"mvmm.test={args.test}")
    append += [f"mvmm.{p}" for p in args.param]
    if args.timeout:
        # The guest kills its test a little before we kill QEMU.
        guest_t = max(10, int(args.timeout) - 15)
        if not any(p.startswith("timeout=") for p in args.param):
            append.append(f"mvmm.timeout={guest_t}")
    if args.append:
        append += shlex.split(args.append)
    cmd += ["-append", " ".join(a for a in append if a)]
    cmd += args.qemu_args
    if args.netns:
        cmd = ["ip", "netns", "exec", args.netns] + cmd
    return cmd


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--test", help="guest test to run (mvmm.test=NAME)")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="pass mvmm.KEY=VALUE (the test sees MVMM_KEY=VALUE)")
    ap.add_argument("--append", help="extra kernel command line words")
    ap.add_argument("--kernel-arg", dest="kernel_args", action="append", default=[],
                    help="one extra kernel command line word")
    ap.add_argument("--kernel", help="bzImage (default: from build-initramfs.sh)")
    ap.add_argument("--initrd", help="initramfs (default: from build-initramfs.sh)")
    ap.add_argument("--machine", choices=sorted(DEVICES), default="microvm")
    ap.add_argument("--cpu", default="max")
    ap.add_argument("--mem", type=int, default=512, help="guest RAM in MiB")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--tsc-khz", type=int, default=None,
                    help="guest tsc_early_khz= (default: host's, from /proc/cpuinfo; 0: none)")
    ap.add_argument("--vhost-user-blk", action="append", default=[], metavar="SOCK",
                    help="vhost-user-blk backend socket (QEMU connects to it)")
    ap.add_argument("--blk-queues", type=int, default=1)
    ap.add_argument("--vhost-user-net", action="append", default=[], metavar="SOCK",
                    help="vhost-user-net backend socket (QEMU connects to it)")
    ap.add_argument("--net-queues", type=int, default=1, help="queue pairs")
    ap.add_argument("--tap", action="append", default=[], metavar="IFNAME",
                    help="plain QEMU tap netdev on an existing tap device")
    ap.add_argument("--netns", metavar="NS",
                    help="run QEMU inside this network namespace (where the --tap devices are)")
    ap.add_argument("--net-opts", metavar="PROPS",
                    help="extra properties for every virtio-net device, e.g. "
                         "csum=off,guest_csum=off,mrg_rxbuf=off")
    ap.add_argument("--mac", action="append", default=[],
                    help="MAC of the n-th NIC (vhost-user-net NICs first, then taps)")
    ap.add_argument("--drive", action="append", default=[], metavar="IMG[,ro]",
                    help="QEMU's own virtio-blk on a raw image (for comparison)")
    ap.add_argument("--serial", help="serial of the --drive disks")
    ap.add_argument("--socket-wait", type=float, default=10,
                    help="seconds to wait for backend sockets to appear")
    ap.add_argument("--timeout", type=float, default=300,
                    help="kill QEMU after this many seconds (0: never)")
    ap.add_argument("--log", help="also write the console output to this file")
    ap.add_argument("--quiet", action="store_true", help="do not stream the console")
    ap.add_argument("--interactive", action="store_true",
                    help="console on this terminal (e.g. --test shell); no result parsing")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--dry-run", action="store_true", help="print the QEMU command only")
    ap.add_argument("qemu_args", nargs="*", help="extra QEMU arguments (after --)")
    args = ap.parse_args()

    if args.tsc_khz is None:
        args.tsc_khz = host_tsc_khz()
    kernel, initrd = kit_paths(args)
    cmd = build_cmd(args, kernel, initrd)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    log(shlex.join(cmd))

    if args.interactive:
        return subprocess.call(cmd)

    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    logf = open(args.log, "w", encoding="utf-8", errors="replace") if args.log else None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    results, end_line, qemu_err = [], None, []
    t_first = t_end = None
    timed_out = False
    bufs = {"out": b"", "err": b""}
    deadline = t0 + args.timeout if args.timeout else None

    def handle_line(line):
        nonlocal t_first, t_end, end_line
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if not args.quiet:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        if logf:
            logf.write(text + "\n")
        m = RESULT_RE.search(text)
        if m:
            if t_first is None:
                t_first = time.monotonic() - t0
            results.append(f"RESULT {m.group(1)} {m.group(2)} {m.group(3)}".rstrip())
        m = END_RE.search(text)
        if m:
            t_end = time.monotonic() - t0
            end_line = m.group(0)

    open_streams = 2
    while open_streams:
        timeout = None
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                timed_out = True
                log(f"timeout after {args.timeout} s; killing QEMU")
                proc.kill()
                break
        for key, _ in sel.select(timeout):
            chunk = os.read(key.fileobj.fileno(), 65536)
            name = key.data
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                if bufs[name]:
                    chunk = b"\n"
                else:
                    continue
            bufs[name] += chunk
            *lines, bufs[name] = bufs[name].split(b"\n")
            for line in lines:
                if name == "out":
                    handle_line(line + b"\n")
                else:
                    text = line.decode("utf-8", "replace")
                    qemu_err.append(text)
                    sys.stderr.write(f"qemu: {text}\n")
                    if logf:
                        logf.write(f"qemu: {text}\n")
    rc = proc.wait()
    total = time.monotonic() - t0
    if logf:
        logf.close()

    for r in results:
        print(r)
    fmt = lambda v: "-" if v is None else f"{v:.2f}s"  # noqa: E731
    print(f"TIMING first_result={fmt(t_first)} test_end={fmt(t_end)} qemu_exit={fmt(total)}")
    nfail = sum(1 for r in results if r.split()[2] == "FAIL")
    npass = sum(1 for r in results if r.split()[2] == "PASS")
    status = 0
    if timed_out:
        status = 3
    elif nfail:
        status = 1
    elif not results or end_line is None:
        status = 2
    elif rc != 0:
        status = 2
    print(f"SUMMARY pass={npass} fail={nfail} results={len(results)} qemu_rc={rc}"
          f" timed_out={int(timed_out)} status={status}")
    return status


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
