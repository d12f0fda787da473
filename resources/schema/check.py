#!/usr/bin/env python3
"""Check resources/schema/vm.schema.json and the configs in resources/examples/.

What it checks:

1. Every resources/examples/*.json is valid against the schema. Also checked,
   because a JSON Schema cannot say them (see semantic_errors): no duplicate
   keys, the kernel and initrd files exist (relative to the config file's
   directory), every disk image is a regular file or block device, the serial
   output's directory exists, the command line is under 2048 bytes of UTF-8
   also after mvmm appends its virtio_mmio.device= words, tap names are at
   most 15 bytes, and disks + net are at most 19 devices. Example files
   listed in TEMPLATES are exempt from the file checks. The test guest images
   come from `cargo build --release`, so build first. Disk images that an
   example names under target/ are created (sparse, EXAMPLE_DISK_MIB) when
   they are missing.
2. A built-in set of small configs: the schema (plus those semantic checks)
   must accept the good ones and reject the bad ones (range limits, unknown
   fields, the serial mode/path rule, disk and net rules, ...), so a loosened
   schema is noticed. The cases run in a scratch directory that holds a small
   disk image (disk.img) and a stand-in kernel, so file checks apply to them.
3. With --mvmm BIN, mvmm itself must agree: it boots every good case and every
   example that is not in TEMPLATES or NOT_BOOTED (exit status 0, serial
   output ends with "testguest: done"), and refuses every bad case with exit
   status 2 (bad config). Good cases with a `net` section are NOT booted:
   mvmm would open (or even create) the tap interface on this host. They are
   still checked against the schema, and the bad net cases are still run,
   since mvmm refuses those while loading the config, before any device
   exists. Bad cases in SCHEMA_ONLY (a planned section the parser already
   reads) are not run through mvmm either.

Validation uses the `jsonschema` package when it is importable (full draft
2020-12). Otherwise a built-in validator that knows exactly the keywords the
schema uses runs instead; it stops with an error if the schema starts using a
keyword it does not know. --install-jsonschema runs `pip install jsonschema`
first.

Usage: resources/schema/check.py [--builtin] [--install-jsonschema] [--mvmm BIN]
Exit status: 0 when everything passed, 1 on any failure, 2 on bad usage.
Standard library only (plus jsonschema if present).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent
SCHEMA_PATH = SCHEMA_DIR / "vm.schema.json"
REPO_ROOT = SCHEMA_DIR.parent.parent
EXAMPLES_DIR = REPO_ROOT / "resources" / "examples"

# Examples that name files which only exist on a real deployment: not booted,
# files not checked.
TEMPLATES = {"linux.json"}
# Examples that are complete here but need host set-up to run: checked, not booted.
NOT_BOOTED = {"net.json": "needs a tap interface on the host"}
# Size of the disk images check.py creates for the examples under target/.
EXAMPLE_DISK_MIB = 64

CMDLINE_MAX_BYTES = 2047
# Mirrors src/config/devices.rs and src/arch/x86_64/layout.rs.
MAX_VIRTIO_DEVICES = 19
IFNAME_MAX_BYTES = 15
VIRTIO_MMIO_START = 0xD000_0000
VIRTIO_MMIO_WINDOW = 0x1000
VIRTIO_IRQ_FIRST = 5
GUEST_DONE = "testguest: done"
BOOT_TIMEOUT_S = 120


# --------------------------------------------------------------------------
# JSON loading


class DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f, object_pairs_hook=_no_duplicates)


# --------------------------------------------------------------------------
# Built-in validator: the subset of draft 2020-12 that vm.schema.json uses.

ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "default", "examples"}
ASSERTIONS = {
    "type", "properties", "required", "additionalProperties", "enum", "const",
    "minimum", "maximum", "minLength", "maxLength", "pattern", "if", "then", "else", "not",
    "items", "maxItems", "oneOf",
}


class SchemaUnsupported(Exception):
    pass


def _is_type(value, name):
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    if name == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    raise SchemaUnsupported(f"type {name!r}")


def _json_equal(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def builtin_errors(schema, value, path="$"):
    """Returns a list of "path: message" strings; empty when value is valid."""
    if schema is True:
        return []
    if schema is False:
        return [f"{path}: not allowed here"]
    unknown = set(schema) - ANNOTATIONS - ASSERTIONS
    if unknown:
        raise SchemaUnsupported(", ".join(sorted(unknown)))
    errors = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            return [f"{path}: {json.dumps(value)} is not of type {' or '.join(types)}"]
    if "enum" in schema and not any(_json_equal(value, e) for e in schema["enum"]):
        errors.append(f"{path}: {json.dumps(value)} is not one of {json.dumps(schema['enum'])}")
    if "const" in schema and not _json_equal(value, schema["const"]):
        errors.append(f"{path}: {json.dumps(value)} is not {json.dumps(schema['const'])}")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_number and "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value} is less than the minimum {schema['minimum']}")
    if is_number and "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {value} is more than the maximum {schema['maximum']}")
    if isinstance(value, str):
        # JSON Schema counts code points, like Python's len().
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: does not match {schema['pattern']!r}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}: required field {name!r} is missing")
        props = schema.get("properties", {})
        for name, item in value.items():
            if name in props:
                errors += builtin_errors(props[name], item, f"{path}.{name}")
            elif "additionalProperties" in schema:
                extra = schema["additionalProperties"]
                if extra is False:
                    errors.append(f"{path}: unknown field {name!r}")
                else:
                    errors += builtin_errors(extra, item, f"{path}.{name}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += builtin_errors(schema["items"], item, f"{path}[{i}]")
    if "oneOf" in schema:
        matching = sum(not builtin_errors(s, value, path) for s in schema["oneOf"])
        if matching != 1:
            errors.append(f"{path}: matches {matching} of the oneOf forms, not exactly one: "
                          f"{json.dumps(schema['oneOf'])}")
    if "if" in schema:
        branch = "then" if not builtin_errors(schema["if"], value, path) else "else"
        if branch in schema:
            errors += builtin_errors(schema[branch], value, path)
    if "not" in schema and not builtin_errors(schema["not"], value, path):
        errors.append(f"{path}: matches a form that is not allowed: {json.dumps(schema['not'])}")
    return errors


# --------------------------------------------------------------------------
# Validator selection


def make_validator(schema, force_builtin, install):
    """Returns (name, function value -> list of error strings)."""
    if not force_builtin:
        try:
            import jsonschema  # noqa: F401
        except ImportError:
            if install:
                print("check: installing jsonschema with pip (requested by --install-jsonschema)")
                subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "jsonschema"],
                               check=True)
            else:
                print("check: the jsonschema package is not installed; using the built-in "
                      "validator (covers exactly this schema's keywords). For full draft "
                      "2020-12 validation: pip install jsonschema, or pass --install-jsonschema.")
        try:
            import jsonschema

            cls = jsonschema.Draft202012Validator
            cls.check_schema(schema)
            validator = cls(schema, format_checker=cls.FORMAT_CHECKER)

            def run(value):
                return [
                    f"$.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}".replace("$.:", "$:")
                    for e in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
                ]

            return "jsonschema (draft 2020-12)", run
        except ImportError:
            pass
    builtin_errors(schema, {})  # walk the top level once so unknown keywords fail early
    return "built-in", lambda value: builtin_errors(schema, value)


# --------------------------------------------------------------------------
# Checks a schema cannot express (mirroring src/config/validate.rs)


def _dict(config, name):
    value = config.get(name, {})
    return value if isinstance(value, dict) else {}


def _list(config, name):
    value = config.get(name, [])
    return value if isinstance(value, list) else []


def device_words(count):
    """The virtio_mmio.device= words mvmm appends to the command line for `count` devices
    (src/vmm/mmio_devices.rs: one 4 KiB window and one IRQ each, disks first, then net)."""
    return "".join(
        f" virtio_mmio.device=4K@{VIRTIO_MMIO_START + i * VIRTIO_MMIO_WINDOW:#x}:{VIRTIO_IRQ_FIRST + i}"
        for i in range(count)
    )


def semantic_errors(config, base_dir, check_files):
    errors = []
    kernel = _dict(config, "kernel")
    cmdline = kernel.get("cmdline")
    disks, nets = _list(config, "disks"), _list(config, "net")
    if isinstance(cmdline, str) and len(cmdline.encode("utf-8")) > CMDLINE_MAX_BYTES:
        errors.append(f"$.kernel.cmdline: more than {CMDLINE_MAX_BYTES} bytes of UTF-8")
    elif isinstance(cmdline, str) and (disks or nets):
        full = cmdline + device_words(len(disks) + len(nets))
        if len(full.encode("utf-8")) > CMDLINE_MAX_BYTES:
            errors.append(f"$.kernel.cmdline: {len(full.encode('utf-8'))} bytes with the "
                          f"virtio_mmio.device= words mvmm appends for {len(disks) + len(nets)} "
                          f"device(s); the limit is {CMDLINE_MAX_BYTES}")
    if len(disks) + len(nets) > MAX_VIRTIO_DEVICES:
        errors.append(f"$: {len(disks)} disks and {len(nets)} network interfaces are more than "
                      f"{MAX_VIRTIO_DEVICES} virtio devices")
    for i, net in enumerate(nets):
        tap = net.get("tap") if isinstance(net, dict) else None
        if isinstance(tap, str) and len(tap.encode("utf-8")) > IFNAME_MAX_BYTES:
            errors.append(f"$.net[{i}].tap: more than {IFNAME_MAX_BYTES} bytes of UTF-8")
    if not check_files:
        return errors
    for field in ("path", "initrd"):
        value = kernel.get(field)
        if isinstance(value, str) and not (base_dir / value).is_file():
            errors.append(f"$.kernel.{field}: {base_dir / value} is not an existing regular file"
                          " (the test guest images come from `cargo build --release`)")
    for i, disk in enumerate(disks):
        value = disk.get("path") if isinstance(disk, dict) else None
        if isinstance(value, str) and value:
            path = base_dir / value
            if not (path.is_file() or path.is_block_device()):
                errors.append(f"$.disks[{i}].path: {path} is neither an existing regular file "
                              "nor a block device")
    serial_path = _dict(config, "serial").get("path")
    if isinstance(serial_path, str) and not (base_dir / serial_path).parent.is_dir():
        errors.append(f"$.serial.path: directory {(base_dir / serial_path).parent} does not exist")
    return errors


def create_example_disks(config, base_dir):
    """Creates the missing disk images an example names under target/ (sparse files).
    Returns the paths it created."""
    created = []
    target = (REPO_ROOT / "target").resolve()
    for disk in _list(config, "disks"):
        value = disk.get("path") if isinstance(disk, dict) else None
        if not isinstance(value, str) or not value:
            continue
        path = (base_dir / value).resolve()
        if path.exists() or target not in path.parents or not target.is_dir():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(EXAMPLE_DISK_MIB << 20)
        created.append(path)
    return created


# --------------------------------------------------------------------------
# Good and bad cases. KERNEL is replaced by the test guest's absolute path.

KERNEL = "@KERNEL@"
INITRD = "@INITRD@"


def _cfg(kernel=None, machine=None, serial=None, **top):
    cfg = {"kernel": {"path": KERNEL}, "machine": {"vcpus": 1, "memory_mib": 64}}
    if kernel is not None:
        cfg["kernel"] = kernel
    if machine is not None:
        cfg["machine"] = machine
    if serial is not None:
        cfg["serial"] = serial
    cfg.update(top)
    return cfg


def _drop(cfg, section, field=None):
    if field is None:
        del cfg[section]
    else:
        del cfg[section][field]
    return cfg


# Cases run in a scratch directory holding DISK (a small regular file) and a
# stand-in kernel, so relative disk paths resolve there.
DISK = "disk.img"
DISK_BYTES = 1 << 20
MAC = "52:54:00:12:34:56"
MACHINE_ID = "0123456789abcdef0123456789abcdef"
# MP table room (src/arch/x86_64/mptable.rs MAX_VCPUS): the vCPU limit with acpi false.
MPTABLE_MAX_VCPUS = 37
# A device word for device 0 (" virtio_mmio.device=4K@0xd0000000:5") is 35 bytes.
ONE_DEVICE_WORD = len(device_words(1))


def _disk(**fields):
    return {"path": DISK, **fields}


def _net(**fields):
    # fd 3 is closed in the mvmm child (subprocess closes inherited fds): never a real tap.
    base = {"fd": 3} if "tap" not in fields and "fd" not in fields else {}
    return {**base, "mac": MAC, **fields}


GOOD = {
    "minimal (all defaults)": _cfg(),
    "8 MiB, the smallest memory": _cfg(machine={"vcpus": 1, "memory_mib": 8}),
    "254 vCPUs, the most": _cfg(machine={"vcpus": 254, "memory_mib": 64}),
    "acpi false": _cfg(machine={"vcpus": 2, "memory_mib": 64, "acpi": False}),
    f"acpi false with {MPTABLE_MAX_VCPUS} vCPUs, the MP table's most":
        _cfg(machine={"vcpus": MPTABLE_MAX_VCPUS, "memory_mib": 64, "acpi": False}),
    "initrd and cmdline": _cfg(kernel={"path": KERNEL, "initrd": INITRD, "cmdline": "console=ttyS0"}),
    "empty cmdline": _cfg(kernel={"path": KERNEL, "cmdline": ""}),
    "cmdline of 2047 bytes": _cfg(kernel={"path": KERNEL, "cmdline": "x" * 2047}),
    "serial section empty": _cfg(serial={}),
    "serial off": _cfg(serial={"mode": "off"}),
    "serial file with path": _cfg(serial={"mode": "file", "path": "console.log"}),
    # machine_id
    "machine_id lower case": _cfg(machine_id=MACHINE_ID),
    "machine_id upper case": _cfg(machine_id=MACHINE_ID.upper()),
    # disks
    "empty disks and net": _cfg(disks=[], net=[]),
    "one disk, defaults": _cfg(disks=[_disk()]),
    "read-only disk with a serial": _cfg(disks=[_disk(read_only=True, serial="nix-store")]),
    "all disk fields": _cfg(disks=[_disk(read_only=False, serial="data", direct=True, queue_size=128)]),
    "disk serial of 20 printable characters": _cfg(disks=[_disk(serial="!~abcdefghijklmnopqr")]),
    "disk queue sizes 4 and 256": _cfg(disks=[_disk(queue_size=4), _disk(queue_size=256)]),
    "store image and a writable volume": _cfg(disks=[_disk(read_only=True), _disk()]),
    f"{MAX_VIRTIO_DEVICES} disks, the most":
        _cfg(disks=[_disk(read_only=True) for _ in range(MAX_VIRTIO_DEVICES)]),
    "cmdline that fits with one disk's device word": _cfg(
        kernel={"path": KERNEL, "cmdline": "x" * (CMDLINE_MAX_BYTES - ONE_DEVICE_WORD)},
        disks=[_disk()]),
    # net (schema only under --mvmm, see run_cases)
    "net with a tap": _cfg(net=[_net(tap="vm-test0")]),
    "net with an inherited fd": _cfg(net=[_net(fd=3)]),
    "net tap of 15 bytes, mtu and queue size": _cfg(net=[_net(tap="a" * 15, mtu=9000, queue_size=2)]),
    "net MAC in upper case": _cfg(net=[_net(mac="52:54:00:AB:CD:EF")]),
    "net mtu 68 and 65535": _cfg(net=[_net(mtu=68), _net(fd=4, mac="02:00:00:00:00:02", mtu=65535)]),
    f"10 disks and 9 NICs, {MAX_VIRTIO_DEVICES} devices": _cfg(
        disks=[_disk(read_only=True) for _ in range(10)],
        net=[_net(fd=3 + i, mac=f"02:00:00:00:00:{i:02x}") for i in range(9)]),
}

BAD = {
    "no kernel section": _drop(_cfg(), "kernel"),
    "no machine section": _drop(_cfg(), "machine"),
    "no kernel.path": _cfg(kernel={"cmdline": "console=ttyS0"}),
    "empty kernel.path": _cfg(kernel={"path": ""}),
    "kernel.path not a string": _cfg(kernel={"path": 42}),
    "no machine.vcpus": _cfg(machine={"memory_mib": 64}),
    "no machine.memory_mib": _cfg(machine={"vcpus": 1}),
    "0 vCPUs": _cfg(machine={"vcpus": 0, "memory_mib": 64}),
    "255 vCPUs": _cfg(machine={"vcpus": 255, "memory_mib": 64}),
    "negative vCPUs": _cfg(machine={"vcpus": -1, "memory_mib": 64}),
    "vCPUs as a string": _cfg(machine={"vcpus": "2", "memory_mib": 64}),
    "fractional vCPUs": _cfg(machine={"vcpus": 1.5, "memory_mib": 64}),
    f"acpi false with {MPTABLE_MAX_VCPUS + 1} vCPUs":
        _cfg(machine={"vcpus": MPTABLE_MAX_VCPUS + 1, "memory_mib": 64, "acpi": False}),
    "7 MiB": _cfg(machine={"vcpus": 1, "memory_mib": 7}),
    "0 MiB": _cfg(machine={"vcpus": 1, "memory_mib": 0}),
    "acpi as a string": _cfg(machine={"vcpus": 1, "memory_mib": 64, "acpi": "yes"}),
    "cmdline of 2048 bytes": _cfg(kernel={"path": KERNEL, "cmdline": "x" * 2048}),
    "cmdline with a NUL": _cfg(kernel={"path": KERNEL, "cmdline": "console=ttyS0\u0000x"}),
    "cmdline too long once a disk's device word is added": _cfg(
        kernel={"path": KERNEL, "cmdline": "x" * (CMDLINE_MAX_BYTES - ONE_DEVICE_WORD + 1)},
        disks=[_disk()]),
    "unknown top-level field": _cfg(kernels=[]),
    "planned section shares[]": _cfg(shares=[{"tag": "store", "socket": "virtiofsd.sock"}]),
    "planned section vsock": _cfg(vsock={"cid": 3, "socket": "vsock.sock"}),
    "planned field api_socket": _cfg(api_socket="api.sock"),
    "$schema key": _cfg(**{"$schema": "../schema/vm.schema.json"}),
    "unknown kernel field": _cfg(kernel={"path": KERNEL, "initramfs": INITRD}),
    "unknown machine field": _cfg(machine={"vcpus": 1, "memory_mib": 64, "memory": 64}),
    "unknown serial field": _cfg(serial={"mode": "file", "file": "console.log"}),
    "serial mode not in the enum": _cfg(serial={"mode": "tty"}),
    "serial mode capitalised": _cfg(serial={"mode": "Stdout"}),
    "serial file without path": _cfg(serial={"mode": "file"}),
    "serial stdout with path": _cfg(serial={"mode": "stdout", "path": "console.log"}),
    "serial off with path": _cfg(serial={"mode": "off", "path": "console.log"}),
    "serial path without mode": _cfg(serial={"path": "console.log"}),
    "serial not an object": _cfg(serial="stdout"),
    # machine_id
    "machine_id of 31 digits": _cfg(machine_id=MACHINE_ID[:-1]),
    "machine_id of 33 digits": _cfg(machine_id=MACHINE_ID + "0"),
    "machine_id not hex": _cfg(machine_id="g" + MACHINE_ID[1:]),
    "machine_id as a dashed UUID": _cfg(machine_id="01234567-89ab-cdef-0123-456789abcdef"),
    "machine_id as a number": _cfg(machine_id=123),
    # disks
    "disks not an array": _cfg(disks=_disk()),
    "disk without path": _cfg(disks=[{"read_only": True}]),
    "empty disk path": _cfg(disks=[_disk(path="")]),
    "disk path that does not exist": _cfg(disks=[_disk(path="missing.img")]),
    "disk path is a directory": _cfg(disks=[_disk(path=".")]),
    "disk read_only as a string": _cfg(disks=[_disk(read_only="yes")]),
    "disk direct as a number": _cfg(disks=[_disk(direct=1)]),
    "disk serial of 21 characters": _cfg(disks=[_disk(serial="x" * 21)]),
    "disk serial with a space": _cfg(disks=[_disk(serial="nix store")]),
    "disk serial not ASCII": _cfg(disks=[_disk(serial="disk-\u00e9")]),
    "disk queue_size not a power of two": _cfg(disks=[_disk(queue_size=100)]),
    "disk queue_size 512": _cfg(disks=[_disk(queue_size=512)]),
    "disk queue_size 0": _cfg(disks=[_disk(queue_size=0)]),
    # The config parser accepts 2; the virtio-blk device refuses it at start-up (exit 2).
    "disk queue_size 2 (virtio-blk needs 4)": _cfg(disks=[_disk(queue_size=2)]),
    "unknown disk field": _cfg(disks=[_disk(cache="none")]),
    f"{MAX_VIRTIO_DEVICES + 1} disks": _cfg(disks=[_disk(read_only=True) for _ in range(MAX_VIRTIO_DEVICES + 1)]),
    f"{MAX_VIRTIO_DEVICES} disks and 1 NIC": _cfg(
        disks=[_disk(read_only=True) for _ in range(MAX_VIRTIO_DEVICES)], net=[_net()]),
    # net
    "net not an array": _cfg(net=_net()),
    "net with tap and fd": _cfg(net=[_net(tap="vm-test0", fd=3)]),
    "net with neither tap nor fd": _cfg(net=[{"mac": MAC}]),
    "net without mac": _cfg(net=[{"fd": 3}]),
    "net tap empty": _cfg(net=[_net(tap="")]),
    "net tap of 16 bytes": _cfg(net=[_net(tap="a" * 16)]),
    "net tap of 8 characters but 16 bytes": _cfg(net=[_net(tap="\u00e9" * 8)]),
    "net tap with a '/'": _cfg(net=[_net(tap="vm/0")]),
    "net tap with a space": _cfg(net=[_net(tap="vm 0")]),
    "net fd 2 (stderr)": _cfg(net=[_net(fd=2)]),
    "net fd -1": _cfg(net=[_net(fd=-1)]),
    "net fd as a string": _cfg(net=[_net(fd="3")]),
    "net MAC of 5 bytes": _cfg(net=[_net(mac="52:54:00:12:34")]),
    "net MAC with '-'": _cfg(net=[_net(mac="52-54-00-12-34-56")]),
    "net MAC not hex": _cfg(net=[_net(mac="52:54:00:12:34:zz")]),
    "net MAC multicast": _cfg(net=[_net(mac="01:00:5e:00:00:01")]),
    "net MAC broadcast": _cfg(net=[_net(mac="ff:ff:ff:ff:ff:ff")]),
    "net mtu 67": _cfg(net=[_net(mtu=67)]),
    "net mtu 65536": _cfg(net=[_net(mtu=65536)]),
    "net queue_size 1": _cfg(net=[_net(queue_size=1)]),
    "net queue_size not a power of two": _cfg(net=[_net(queue_size=3)]),
    "net queue_size 512": _cfg(net=[_net(queue_size=512)]),
    "unknown net field": _cfg(net=[_net(ip="10.0.0.2")]),
    f"{MAX_VIRTIO_DEVICES + 1} NICs": _cfg(
        net=[_net(fd=3 + i, mac=f"02:00:00:00:00:{i:02x}") for i in range(MAX_VIRTIO_DEVICES + 1)]),
}


# Bad cases the schema refuses but mvmm (for now) accepts: checked against the schema only.
SCHEMA_ONLY = {
    "planned section shares[]": "the parser accepts `shares` already, but creates no "
                                "virtio-fs device from it yet",
}


def boots_a_tap(config):
    """Good cases with NICs are not booted: mvmm would open or create the tap."""
    return bool(config.get("net"))


def _substitute(value, kernel, initrd):
    if isinstance(value, dict):
        return {k: _substitute(v, kernel, initrd) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, kernel, initrd) for v in value]
    if value == KERNEL:
        return kernel
    if value == INITRD:
        return initrd
    return value


# --------------------------------------------------------------------------
# Running mvmm


def run_mvmm(mvmm, config_path):
    """Returns (exit status, stdout text, stderr text)."""
    try:
        proc = subprocess.run([str(mvmm), "--config", str(config_path)], capture_output=True,
                              timeout=BOOT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, "", f"timed out after {BOOT_TIMEOUT_S} s"
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))


def boot_errors(mvmm, config_path, config):
    """Boots a config that should run the test guest to its end."""
    code, out, err = run_mvmm(mvmm, config_path)
    serial = config.get("serial", {})
    if serial.get("mode") == "file":
        console_path = config_path.parent / serial["path"]
        try:
            out = console_path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            out = f"(cannot read {console_path}: {e})"
    errors = []
    if code != 0:
        last = err.strip().splitlines()[-1:] or ["(no stderr)"]
        errors.append(f"exit status {code}, expected 0: {last[0]}")
    if serial.get("mode") != "off" and not out.rstrip("\n").endswith(GUEST_DONE):
        tail = out.strip().splitlines()[-1:] or ["(no output)"]
        errors.append(f"serial output does not end with {GUEST_DONE!r}; last line: {tail[0]}")
    return errors


def reject_errors(mvmm, config_path):
    code, _, err = run_mvmm(mvmm, config_path)
    if code == 2:
        return []
    last = err.strip().splitlines()[-1:] or ["(no stderr)"]
    return [f"exit status {code}, expected 2 (bad config): {last[0]}"]


# --------------------------------------------------------------------------


def _shorten(text, limit=110):
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builtin", action="store_true",
                        help="use the built-in validator even if jsonschema is installed")
    parser.add_argument("--install-jsonschema", action="store_true",
                        help="pip install jsonschema if it is missing")
    parser.add_argument("--mvmm", metavar="BIN", type=Path,
                        help="also boot/refuse the configs with this mvmm binary")
    args = parser.parse_args()

    failures = 0

    def report(ok, what, errors=()):
        nonlocal failures
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        for e in errors:
            print(f"         {e}")
        if not ok:
            failures += 1

    try:
        schema = load_json(SCHEMA_PATH)
        name, validate = make_validator(schema, args.builtin, args.install_jsonschema)
    except (OSError, ValueError) as e:
        print(f"check: cannot load {SCHEMA_PATH}: {e}")
        return 1
    except SchemaUnsupported as e:
        print(f"check: the built-in validator does not know schema keyword(s) {e}; "
              "install jsonschema or extend check.py")
        return 1
    except Exception as e:  # jsonschema.SchemaError and friends
        print(f"check: {SCHEMA_PATH} is not a valid draft 2020-12 schema: {e}")
        return 1
    print(f"check: validator: {name}")

    # 1. The examples.
    examples = sorted(EXAMPLES_DIR.glob("*.json"))
    print(f"examples in {EXAMPLES_DIR.relative_to(REPO_ROOT)}/ ({len(examples)}):")
    if not examples:
        report(False, "no example configs found")
    loaded = {}
    for path in examples:
        try:
            config = load_json(path)
        except (OSError, ValueError) as e:
            report(False, path.name, [f"cannot parse: {e}"])
            continue
        loaded[path] = config
        template = path.name in TEMPLATES
        errors = validate(config)
        if not errors and not template:
            for created in create_example_disks(config, path.parent):
                print(f"  note {path.name}: created {created.relative_to(REPO_ROOT)} "
                      f"({EXAMPLE_DISK_MIB} MiB, sparse)")
        if not errors:
            errors = semantic_errors(config, path.parent, check_files=not template)
        report(not errors, path.name + (" (template: files not checked)" if template else ""),
               errors)

    # The cases run in a scratch directory: under target/ when it exists, because O_DIRECT
    # (a good case uses `direct`) fails on tmpfs, which /tmp often is.
    target = REPO_ROOT / "target"
    with tempfile.TemporaryDirectory(prefix="mvmm-check-",
                                     dir=target if target.is_dir() else None) as tmp:
        tmp = Path(tmp)
        with open(tmp / DISK, "wb") as f:
            f.truncate(DISK_BYTES)
        initrd = tmp / "initrd"
        initrd.write_bytes(b"070701" + b"0" * 104)  # any bytes do for the test guest
        stand_in = tmp / "vmlinux"
        stand_in.write_bytes(b"\x7fELF")  # only has to exist for the schema-side checks

        # 2. Good and bad cases against the schema (and the checks it cannot express).
        def case_errors(config):
            config = _substitute(config, str(stand_in), str(initrd))
            return validate(config) + semantic_errors(config, tmp, check_files=True)

        print(f"schema cases ({len(GOOD)} good, {len(BAD)} bad):")
        for what, config in GOOD.items():
            errors = case_errors(config)
            report(not errors, f"accepts: {what}", errors)
        for what, config in BAD.items():
            errors = case_errors(config)
            reason = f"  ({_shorten(errors[0])})" if errors else ""
            report(bool(errors), f"rejects: {what}{reason}",
                   [] if errors else ["the schema accepted it"])

        # 3. The same against mvmm itself.
        if args.mvmm:
            run_mvmm_checks(args.mvmm, examples, loaded, tmp, initrd, report)

    print("check: all passed" if not failures else f"check: {failures} FAILED")
    return 1 if failures else 0


def run_mvmm_checks(mvmm, examples, loaded, tmp, initrd, report):
    mvmm = mvmm.resolve()
    guest = REPO_ROOT / "target" / "release" / "testguest" / "testguest-pvh.elf"
    if not os.access(mvmm, os.X_OK):
        report(False, f"{mvmm} is not an executable")
        return
    if not guest.is_file():
        report(False, f"{guest} is missing; run cargo build --release")
        return
    print(f"booting the examples with {mvmm}:")
    for path in examples:
        if path.name in TEMPLATES:
            print(f"  skip {path.name} (template)")
            continue
        if path.name in NOT_BOOTED:
            print(f"  skip {path.name} ({NOT_BOOTED[path.name]})")
            continue
        if path not in loaded:
            continue  # already reported as unparsable
        errors = boot_errors(mvmm, path, loaded[path])
        report(not errors, f"boots: {path.name}", errors)
    print("mvmm on the schema cases:")
    for i, (what, config) in enumerate(list(GOOD.items()) + list(BAD.items())):
        config = _substitute(config, str(guest), str(initrd))
        config_path = tmp / f"case{i}.json"
        config_path.write_text(json.dumps(config), encoding="utf-8")
        if what in GOOD:
            if boots_a_tap(config):
                # Booting would make mvmm open, or with CAP_NET_ADMIN create, a tap on this
                # host. The schema side above covers these; the bad net cases below do run,
                # because mvmm refuses them while loading the config.
                print(f"  skip boots: {what} (has a NIC; checked against the schema only)")
                continue
            errors = boot_errors(mvmm, config_path, config)
            report(not errors, f"boots: {what}", errors)
        elif what in SCHEMA_ONLY:
            print(f"  skip refuses: {what} ({SCHEMA_ONLY[what]})")
        else:
            errors = reject_errors(mvmm, config_path)
            report(not errors, f"refuses: {what}", errors)

if __name__ == "__main__":
    sys.exit(main())
