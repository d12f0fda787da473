"""Helpers shared by the device benchmark scripts (stdlib only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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
