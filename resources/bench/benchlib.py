"""Helpers shared by the device benchmark scripts (stdlib only)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def build_bench(name):
    """Builds `devices/benches/<name>.rs` (bench profile = release) and returns its path."""
    log(f"building devices/benches/{name}.rs (cargo bench --no-run) ...")
    cmd = ["cargo", "bench", "-p", "devices", "--bench", name, "--no-run",
           "--message-format=json-render-diagnostics"]
    p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if p.returncode:
        sys.exit(f"cargo build of the {name} bench failed")
    exe = None
    for line in p.stdout.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (msg.get("reason") == "compiler-artifact"
                and msg.get("target", {}).get("name") == name and msg.get("executable")):
            exe = msg["executable"]
    if not exe:
        sys.exit(f"cargo did not report the {name} executable")
    return exe


# ---- Test files (the block benchmarks) ------------------------------------------------------

def is_tmpfs(path):
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return False
    best = ("", "")
    real = os.path.realpath(path)
    for m in mounts:
        mnt = m[1]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
            best = (mnt, m[2])
    return best[1] == "tmpfs"


class TmpfsDir:
    """/dev/shm if it is a tmpfs with room, else a tmpfs we mount (and unmount) under /tmp."""

    def __init__(self, need):
        self.mounted = None
        shm = "/dev/shm"
        if is_tmpfs(shm) and shutil.disk_usage(shm).free >= need + 64 * MIB:
            self.path = os.path.join(shm, "mvmm-bench")
            os.makedirs(self.path, exist_ok=True)
            return
        self.path = "/tmp/mvmm-bench-tmpfs"
        os.makedirs(self.path, exist_ok=True)
        if not is_tmpfs(self.path):
            size = need + 64 * MIB
            log(f"/dev/shm is too small: mounting a {size // MIB} MiB tmpfs on {self.path}")
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", self.path],
                           check=True)
            self.mounted = self.path

    def close(self):
        if self.mounted:
            subprocess.run(["umount", self.mounted])


def make_file(path, size, sync):
    """Creates `path` of `size` bytes of non-zero data, unless it already is that size."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    d = os.path.dirname(path)
    if shutil.disk_usage(d).free < size + 256 * MIB:
        sys.exit(f"not enough free space in {d} for a {size // MIB} MiB test file")
    log(f"creating {path} ({size // MIB} MiB of non-zero data) ...")
    chunk = bytes((i * 7 + 1) % 255 + 1 for i in range(MIB))
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(chunk)
        f.write(chunk[: size % MIB])
        if sync:
            f.flush()
            os.fsync(f.fileno())


def warm_cache(path):
    """Reads the file once so buffered runs start from the page cache, for both tools."""
    with open(path, "rb", buffering=0) as f:
        while f.read(4 * MIB):
            pass
