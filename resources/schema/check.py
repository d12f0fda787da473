#!/usr/bin/env python3
"""Check resources/schema/vm.schema.json and the configs in resources/examples/.

What it checks:

1. Every resources/examples/*.json is valid against the schema. Also checked,
   because a JSON Schema cannot say them (see semantic_errors): no duplicate
   keys, the kernel and initrd files exist (relative to the config file's
   directory), every disk image is a regular file or block device, the serial
   output's directory exists, the command line is under 2048 bytes of UTF-8
   also after mvmm appends its virtio_mmio.device= words, tap names are at
   most 15 bytes and share tags at most 36 bytes, share tags are unique, and
   disks + net + shares are at most 19 devices. Example files listed in
   TEMPLATES are exempt from the file checks. The test guest images come from
   `cargo build --release`, so build first. Disk images that an example names
   under target/ are created (sparse, EXAMPLE_DISK_MIB) when they are missing.
2. A built-in set of small configs: the schema (plus those semantic checks)
   must accept the good ones and reject the bad ones (range limits, unknown
   fields, the serial mode/path rule, disk, net and share rules, ...), so a
   loosened schema is noticed. The cases run in a scratch directory that holds
   a small disk image (disk.img) and a stand-in kernel, so file checks apply
   to them. The REFUSED_AT_START cases are valid configs whose vhost-user
   socket nobody serves: the schema must accept them.
3. With --mvmm BIN, mvmm itself must agree: it boots every good case and every
   example that is not in TEMPLATES or NOT_BOOTED (exit status 0, serial
   output ends with "testguest: done" and has no "<device>: error" line), and
   refuses every bad case with exit status 2 (bad config), and every
   REFUSED_AT_START case with exit status 2 once its short connect_timeout_secs
   has passed. Good cases with a `net` section are NOT booted: mvmm would open
   (or even create) the tap interface on this host. They are still checked
   against the schema, and the bad net cases are still run, since mvmm refuses
   those while loading the config, before any device exists. Bad cases in
   SCHEMA_ONLY are not run through mvmm either (the reason is given).

   Configs with vhost-user devices get real backends, started before mvmm and
   stopped after it (see Backends): a virtiofsd per share (`--sandbox=none`,
   as the user running check.py; it shares the directory named like the
   socket without `.sock`, created if missing, holding a hello.txt) and
   `BIN backend blk` per socket disk. virtiofsd is looked for in --virtiofsd,
   $VIRTIOFSD, $CARGO_HOME/bin (default ~/.cargo/bin) and PATH;
   --install-virtiofsd runs resources/guest/install-virtiofsd.sh when it is
   missing (that may build it with cargo, which takes minutes). Without
   virtiofsd, configs with shares are checked against the schema only. An
   example's sockets must lie under target/ to be booted (shares.json's do).

Validation uses the `jsonschema` package when it is importable (full draft
2020-12). Otherwise a built-in validator that knows exactly the keywords the
schema uses runs instead; it stops with an error if the schema starts using a
keyword it does not know. --install-jsonschema runs `pip install jsonschema`
first.

Usage: resources/schema/check.py [--builtin] [--install-jsonschema] [--mvmm BIN]
                                 [--virtiofsd PATH | --install-virtiofsd]
Exit status: 0 when everything passed, 1 on any failure, 2 on bad usage.
Standard library only (plus jsonschema if present).
"""

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent
SCHEMA_PATH = SCHEMA_DIR / "vm.schema.json"
REPO_ROOT = SCHEMA_DIR.parent.parent
EXAMPLES_DIR = REPO_ROOT / "resources" / "examples"

# Examples that name files which only exist on a real deployment: not booted,
# files not checked.
TEMPLATES = {"linux.json", "inherited-fds.json", "supervised.json", "jail.json"}
# Examples that are complete here but need host set-up to run: checked, not booted.
NOT_BOOTED = {
    "net.json": "needs a tap interface on the host",
    "api-socket.json": "its guest waits for `mvmm ctl ... shutdown` (tests/api.rs runs that)",
}
# Size of the disk images check.py creates for the examples under target/.
EXAMPLE_DISK_MIB = 64
# Extra virtiofsd options by share tag: the store is shared read-only, as on a real host.
VIRTIOFSD_OPTIONS = {"nix-store": ["--readonly"]}
# Put into each share directory check.py creates, for the test guest's `test=fs` (fs.read
# defaults to hello.txt).
SHARE_SEED = ("hello.txt", b"hello from the host\n")
# How long a backend may take to create its socket.
BACKEND_START_S = 5

CMDLINE_MAX_BYTES = 2047
# Mirrors src/config/devices.rs and src/arch/x86_64/layout.rs.
MAX_VIRTIO_DEVICES = 19
IFNAME_MAX_BYTES = 15
FS_TAG_MAX_BYTES = 36
VIRTIO_MMIO_START = 0xD000_0000
VIRTIO_MMIO_WINDOW = 0x1000
VIRTIO_IRQ_FIRST = 5
GUEST_DONE = "testguest: done"
BOOT_TIMEOUT_S = 120
# A refusal comes at once, or after a case's short connect_timeout_secs.
REFUSE_TIMEOUT_S = 10
# The serial line of a test guest device test that went wrong (blk0:, blk1:, net:, fs:).
GUEST_ERROR = re.compile(r"^(blk\d|net|fs): error", re.M)


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
    (src/vmm/mmio_devices.rs: one 4 KiB window and one IRQ each: disks, net, then shares)."""
    return "".join(
        f" virtio_mmio.device=4K@{VIRTIO_MMIO_START + i * VIRTIO_MMIO_WINDOW:#x}:{VIRTIO_IRQ_FIRST + i}"
        for i in range(count)
    )


def semantic_errors(config, base_dir, check_files):
    errors = []
    kernel = _dict(config, "kernel")
    cmdline = kernel.get("cmdline")
    disks, nets, shares = _list(config, "disks"), _list(config, "net"), _list(config, "shares")
    devices = len(disks) + len(nets) + len(shares)
    if isinstance(cmdline, str) and len(cmdline.encode("utf-8")) > CMDLINE_MAX_BYTES:
        errors.append(f"$.kernel.cmdline: more than {CMDLINE_MAX_BYTES} bytes of UTF-8")
    elif isinstance(cmdline, str) and devices:
        full = cmdline + device_words(devices)
        if len(full.encode("utf-8")) > CMDLINE_MAX_BYTES:
            errors.append(f"$.kernel.cmdline: {len(full.encode('utf-8'))} bytes with the "
                          f"virtio_mmio.device= words mvmm appends for {devices} "
                          f"device(s); the limit is {CMDLINE_MAX_BYTES}")
    if devices > MAX_VIRTIO_DEVICES:
        errors.append(f"$: {len(disks)} disks, {len(nets)} network interfaces and {len(shares)} "
                      f"shares are more than {MAX_VIRTIO_DEVICES} virtio devices")
    for i, net in enumerate(nets):
        tap = net.get("tap") if isinstance(net, dict) else None
        if isinstance(tap, str) and len(tap.encode("utf-8")) > IFNAME_MAX_BYTES:
            errors.append(f"$.net[{i}].tap: more than {IFNAME_MAX_BYTES} bytes of UTF-8")
    tags = set()
    for i, share in enumerate(shares):
        tag = share.get("tag") if isinstance(share, dict) else None
        if not isinstance(tag, str):
            continue
        if len(tag.encode("utf-8")) > FS_TAG_MAX_BYTES:
            errors.append(f"$.shares[{i}].tag: more than {FS_TAG_MAX_BYTES} bytes of UTF-8")
        if tag in tags:
            errors.append(f"$.shares[{i}].tag: {tag!r} is used by another share; tags must be "
                          "unique")
        tags.add(tag)
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
    api_socket = config.get("api_socket")
    if isinstance(api_socket, str) and api_socket and not (base_dir / api_socket).parent.is_dir():
        errors.append(f"$.api_socket: directory {(base_dir / api_socket).parent} does not exist")
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


def _socket_disk(n=0, **fields):
    """A vhost-user-blk disk; under --mvmm, `mvmm backend blk` serves DISK on its socket."""
    return {"socket": f"blk{n}.sock", **fields}


def _share(n=0, **fields):
    """A virtio-fs share; under --mvmm, a virtiofsd serves directory fs<n>/ on its socket."""
    return {"tag": f"fs{n}", "socket": f"fs{n}.sock", **fields}


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
    # graceful shutdown and the control socket
    "shutdown_timeout_secs 0 and api_socket": _cfg(
        machine={"vcpus": 1, "memory_mib": 64, "shutdown_timeout_secs": 0}, api_socket="api.sock"),
    "shutdown_timeout_secs 3600, the most":
        _cfg(machine={"vcpus": 1, "memory_mib": 64, "shutdown_timeout_secs": 3600}),
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
    # vhost-user-blk disks (booted against `mvmm backend blk`)
    "socket disk": _cfg(disks=[_socket_disk()]),
    "socket disk with queue_size 4": _cfg(disks=[_socket_disk(queue_size=4)]),
    # The parser only refuses the backend's options when they would change something.
    "socket disk with read_only and direct false":
        _cfg(disks=[_socket_disk(read_only=False, direct=False)]),
    "file disk then socket disk": _cfg(disks=[_disk(read_only=True), _socket_disk()]),
    # shares (booted against virtiofsd)
    "one share, defaults": _cfg(shares=[_share()]),
    "all share fields": _cfg(shares=[_share(queue_size=1024, num_queues=1,
                                            connect_timeout_secs=5)]),
    "share queue_size 2, the smallest": _cfg(shares=[_share(queue_size=2)]),
    "share tag of 36 bytes": _cfg(shares=[_share(tag="t" * 36)]),
    "share tag with spaces and non-ASCII (36 bytes)": _cfg(shares=[_share(tag="f\u00fcr " + "x" * 31)]),
    "share connect_timeout_secs 0 and 4294967295": _cfg(shares=[
        _share(0, connect_timeout_secs=0), _share(1, connect_timeout_secs=4294967295)]),
    "nix-store and journal shares with machine_id": _cfg(
        shares=[_share(tag="nix-store", socket="nix-store.sock"),
                _share(tag="journal", socket="journal.sock")],
        machine_id=MACHINE_ID),
    "file disk, socket disk and share": _cfg(
        disks=[_disk(read_only=True), _socket_disk()], shares=[_share()]),
    f"{MAX_VIRTIO_DEVICES} shares, the most":
        _cfg(shares=[_share(i) for i in range(MAX_VIRTIO_DEVICES)]),
    f"17 disks, a socket disk and a share, {MAX_VIRTIO_DEVICES} devices": _cfg(
        disks=[_disk(read_only=True) for _ in range(17)] + [_socket_disk()],
        shares=[_share()]),
    f"10 disks, 5 NICs and 4 shares, {MAX_VIRTIO_DEVICES} devices": _cfg(
        disks=[_disk(read_only=True) for _ in range(10)],
        net=[_net(fd=3 + i, mac=f"02:00:00:00:00:{i:02x}") for i in range(5)],
        shares=[_share(i) for i in range(4)]),
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
    "shutdown_timeout_secs 3601": _cfg(machine={"vcpus": 1, "memory_mib": 64, "shutdown_timeout_secs": 3601}),
    "shutdown_timeout_secs -1": _cfg(machine={"vcpus": 1, "memory_mib": 64, "shutdown_timeout_secs": -1}),
    "shutdown_timeout_secs as a string":
        _cfg(machine={"vcpus": 1, "memory_mib": 64, "shutdown_timeout_secs": "30"}),
    "empty api_socket": _cfg(api_socket=""),
    "api_socket of 108 bytes": _cfg(api_socket="s" * 108),
    "api_socket in a missing directory": _cfg(api_socket="no-such-dir/api.sock"),
    "planned section vsock": _cfg(vsock={"cid": 3, "socket": "vsock.sock"}),
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
    "disk with neither path nor socket": _cfg(disks=[{"read_only": True}]),
    "disk with path and socket": _cfg(disks=[_disk(socket="blk0.sock")]),
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
    "disk queue_size 2 (virtio-blk needs 4)": _cfg(disks=[_disk(queue_size=2)]),
    "unknown disk field": _cfg(disks=[_disk(cache="none")]),
    f"{MAX_VIRTIO_DEVICES + 1} disks": _cfg(disks=[_disk(read_only=True) for _ in range(MAX_VIRTIO_DEVICES + 1)]),
    f"{MAX_VIRTIO_DEVICES} disks and 1 NIC": _cfg(
        disks=[_disk(read_only=True) for _ in range(MAX_VIRTIO_DEVICES)], net=[_net()]),
    # socket disks: read_only, serial and direct are the backend's
    "socket disk with read_only true": _cfg(disks=[_socket_disk(read_only=True)]),
    "socket disk with a serial": _cfg(disks=[_socket_disk(serial="data")]),
    "socket disk with direct true": _cfg(disks=[_socket_disk(direct=True)]),
    "socket disk queue_size 2": _cfg(disks=[_socket_disk(queue_size=2)]),
    "socket disk queue_size 512": _cfg(disks=[_socket_disk(queue_size=512)]),
    "disk socket as a number": _cfg(disks=[_socket_disk(socket=5)]),
    "empty disk socket": _cfg(disks=[_socket_disk(socket="")]),
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
    # shares. connect_timeout_secs is short wherever mvmm would get as far as the socket.
    "shares not an array": _cfg(shares=_share()),
    "share without tag": _cfg(shares=[{"socket": "fs0.sock"}]),
    "share without socket": _cfg(shares=[{"tag": "fs0"}]),
    "empty share tag": _cfg(shares=[_share(tag="")]),
    "share tag of 37 bytes": _cfg(shares=[_share(tag="t" * 37)]),
    "share tag of 19 characters but 38 bytes": _cfg(shares=[_share(tag="\u00e9" * 19)]),
    "share tag with a NUL": _cfg(shares=[_share(tag="fs\u00000")]),
    "share tag as a number": _cfg(shares=[_share(tag=1)]),
    "two shares with the same tag": _cfg(shares=[_share(0), _share(1, tag="fs0")]),
    "share socket as a number": _cfg(shares=[_share(socket=5)]),
    "empty share socket (the config's directory)":
        _cfg(shares=[_share(socket="", connect_timeout_secs=0)]),
    "share queue_size 1": _cfg(shares=[_share(queue_size=1)]),
    "share queue_size not a power of two": _cfg(shares=[_share(queue_size=100)]),
    "share queue_size 2048": _cfg(shares=[_share(queue_size=2048)]),
    "share num_queues 0": _cfg(shares=[_share(num_queues=0)]),
    "share num_queues 65536": _cfg(shares=[_share(num_queues=65536)]),
    "share connect_timeout_secs -1": _cfg(shares=[_share(connect_timeout_secs=-1)]),
    "share connect_timeout_secs 4294967296": _cfg(shares=[_share(connect_timeout_secs=2**32)]),
    "share connect_timeout_secs as a string": _cfg(shares=[_share(connect_timeout_secs="30")]),
    "share connect_timeout_secs 1.5": _cfg(shares=[_share(connect_timeout_secs=1.5)]),
    "unknown share field (virtiofsd's shared_dir)": _cfg(shares=[_share(shared_dir="/nix/store")]),
    f"{MAX_VIRTIO_DEVICES + 1} shares": _cfg(shares=[_share(i) for i in range(MAX_VIRTIO_DEVICES + 1)]),
    f"{MAX_VIRTIO_DEVICES - 1} disks and 2 shares":
        _cfg(disks=[_disk(read_only=True) for _ in range(MAX_VIRTIO_DEVICES - 1)],
             shares=[_share(0), _share(1)]),
    "10 disks, 5 NICs and 5 shares": _cfg(
        disks=[_disk(read_only=True) for _ in range(10)],
        net=[_net(fd=3 + i, mac=f"02:00:00:00:00:{i:02x}") for i in range(5)],
        shares=[_share(i) for i in range(5)]),
    "cmdline too long once a share's device word is added": _cfg(
        kernel={"path": KERNEL, "cmdline": "x" * (CMDLINE_MAX_BYTES - ONE_DEVICE_WORD + 1)},
        shares=[_share(connect_timeout_secs=1)]),
}

# Valid configs that mvmm must refuse at start (exit status 2) because nobody serves the
# vhost-user socket: the schema accepts them, and mvmm gives up after connect_timeout_secs.
# (A socket disk always waits 30 s, too long to try here.)
UNSERVED_SOCKET = "nobody.sock"
REFUSED_AT_START = {
    "share socket nobody listens on (connect_timeout_secs 1)":
        _cfg(shares=[_share(socket=UNSERVED_SOCKET, connect_timeout_secs=1)]),
    "share socket that is a regular file (connect_timeout_secs 0)":
        _cfg(shares=[_share(socket=DISK, connect_timeout_secs=0)]),
    "second share's socket missing (connect_timeout_secs 0)":
        _cfg(shares=[_share(0), _share(1, socket=UNSERVED_SOCKET, connect_timeout_secs=0)]),
}
# What mvmm's error line says for them.
SOCKET_TIMEOUT_MESSAGE = "did not appear within"

# Bad cases whose vhost-user backends are started under --mvmm: mvmm gets past connecting,
# and refuses the config only after that.
BAD_WITH_BACKENDS = {"cmdline too long once a share's device word is added"}


# Bad cases checked against the schema only, with the reason.
SCHEMA_ONLY = {
    "empty disk socket": "the parser takes it as the config's directory, where mvmm would wait "
                         "30 s for a backend",
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


def run_mvmm(mvmm, config_path, timeout=BOOT_TIMEOUT_S):
    """Returns (exit status, stdout text, stderr text)."""
    try:
        proc = subprocess.run([str(mvmm), "--config", str(config_path)], capture_output=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, "", f"timed out after {timeout} s"
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
    guest_error = GUEST_ERROR.search(out)
    if guest_error:
        line = out[guest_error.start():].splitlines()[0]
        errors.append(f"the test guest reported: {line}")
    return errors


def reject_errors(mvmm, config_path, must_say=None, must_not_say=None):
    """Runs a config mvmm must refuse with exit status 2; `must_say` / `must_not_say`: text
    its stderr must (not) contain, so that it is refused for the right reason."""
    code, _, err = run_mvmm(mvmm, config_path, timeout=REFUSE_TIMEOUT_S)
    last = (err.strip().splitlines()[-1:] or ["(no stderr)"])[0]
    if code != 2:
        return [f"exit status {code}, expected 2 (bad config): {last}"]
    if must_say and must_say not in err:
        return [f"refused, but stderr does not say {must_say!r}: {last}"]
    if must_not_say and must_not_say in err:
        return [f"refused for the wrong reason: {last}"]
    return []


# --------------------------------------------------------------------------
# vhost-user backends for the configs that have shares or socket disks


def needs_backends(config):
    return bool(_list(config, "shares")) or any(
        isinstance(d, dict) and "socket" in d for d in _list(config, "disks"))


def find_virtiofsd(given, install):
    """Returns (path or None, why not)."""
    if given:
        return (given, "") if os.access(given, os.X_OK) else (None, f"{given} is not executable")
    cargo_home = Path(os.environ.get("CARGO_HOME") or Path.home() / ".cargo")
    for cand in (os.environ.get("VIRTIOFSD"), cargo_home / "bin" / "virtiofsd",
                 shutil.which("virtiofsd")):
        if cand and os.access(cand, os.X_OK):
            return Path(cand), ""
    if not install:
        return None, ("virtiofsd not found; run `bash resources/guest/install-virtiofsd.sh`, "
                      "or pass --virtiofsd PATH or --install-virtiofsd")
    script = REPO_ROOT / "resources" / "guest" / "install-virtiofsd.sh"
    print(f"check: installing virtiofsd with {script.relative_to(REPO_ROOT)} "
          "(requested by --install-virtiofsd)")
    proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("VIRTIOFSD="):
            return Path(line[len("VIRTIOFSD="):]), ""
    return None, f"{script.name} failed (exit status {proc.returncode})"


class Backends:
    """Starts the vhost-user backends a config names, and stops them again (a context manager;
    `errors` says what did not start). Each share gets a virtiofsd sharing the directory
    named like its socket without `.sock` (created, with SHARE_SEED in it, if missing); each
    socket disk gets `mvmm backend blk` serving `disk_image`. Sockets in `unserved` are left
    alone. Only the processes started here are stopped, each through its own handle."""

    def __init__(self, config, base_dir, mvmm, virtiofsd, disk_image, unserved=(), notes=None):
        self.config, self.base_dir = config, base_dir
        self.mvmm, self.virtiofsd, self.disk_image = mvmm, virtiofsd, disk_image
        self.unserved = {Path(os.path.normpath(p)) for p in unserved}
        self.notes = notes  # list for "created ..." notes, or None
        self.procs = []  # (what, socket path, Popen, stderr file)
        self.errors = []

    def _socket(self, value):
        return Path(os.path.normpath(self.base_dir / value))

    def _start(self, what, socket, argv):
        if socket in self.unserved:
            return
        if socket.exists() or socket.is_symlink():
            if not stat.S_ISSOCK(socket.lstat().st_mode):
                self.errors.append(f"{what}: {socket} exists and is not a socket")
                return
            socket.unlink()  # left behind by a backend that was stopped
        socket.parent.mkdir(parents=True, exist_ok=True)
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log)
        self.procs.append((what, socket, proc, log))

    def _share_dir(self, socket):
        directory = socket.with_suffix("") if socket.suffix == ".sock" else Path(f"{socket}.dir")
        if not directory.is_dir():
            directory.mkdir(parents=True)
            (directory / SHARE_SEED[0]).write_bytes(SHARE_SEED[1])
            if self.notes is not None:
                self.notes.append(f"created {_show(directory)}/ with {SHARE_SEED[0]}")
        return directory

    def __enter__(self):
        try:
            self._start_all()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_all(self):
        for i, share in enumerate(_list(self.config, "shares")):
            socket = self._socket(share["socket"])
            if socket in self.unserved:
                continue
            if self.virtiofsd is None:
                self.errors.append(f"shares[{i}]: no virtiofsd")
                continue
            self._start(f"virtiofsd for shares[{i}]", socket, [
                str(self.virtiofsd), f"--socket-path={socket}",
                f"--shared-dir={self._share_dir(socket)}", "--sandbox=none", "--log-level=error",
                *VIRTIOFSD_OPTIONS.get(share["tag"], [])])
        for i, disk in enumerate(_list(self.config, "disks")):
            if "socket" in disk:
                socket = self._socket(disk["socket"])
                self._start(f"mvmm backend blk for disks[{i}]", socket, [
                    str(self.mvmm), "backend", "blk", "--socket", str(socket),
                    "--path", str(self.disk_image(socket))])
        deadline = time.monotonic() + BACKEND_START_S
        for what, socket, proc, log in self.procs:
            while not (socket.exists() and stat.S_ISSOCK(socket.lstat().st_mode)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode("utf-8", "replace").strip().splitlines()[-1:]
                    state = ("exited with status " + str(proc.returncode)
                             if proc.returncode is not None else
                             f"did not create its socket within {BACKEND_START_S} s")
                    self.errors.append(f"{what} {state}: {tail[0] if tail else '(no stderr)'}")
                    break
                time.sleep(0.005)

    def __exit__(self, *exc):
        for _, _, proc, log in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
        return False


def _show(path):
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


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
    parser.add_argument("--virtiofsd", metavar="PATH", type=Path,
                        help="the virtiofsd to serve the shares with under --mvmm "
                             "(default: $VIRTIOFSD, ~/.cargo/bin, PATH)")
    parser.add_argument("--install-virtiofsd", action="store_true",
                        help="run resources/guest/install-virtiofsd.sh if virtiofsd is missing")
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

        print(f"schema cases ({len(GOOD)} good, {len(BAD)} bad, "
              f"{len(REFUSED_AT_START)} valid but refused at start):")
        for what, config in list(GOOD.items()) + list(REFUSED_AT_START.items()):
            errors = case_errors(config)
            report(not errors, f"accepts: {what}", errors)
        for what, config in BAD.items():
            errors = case_errors(config)
            reason = f"  ({_shorten(errors[0])})" if errors else ""
            report(bool(errors), f"rejects: {what}{reason}",
                   [] if errors else ["the schema accepted it"])

        # 3. The same against mvmm itself.
        if args.mvmm:
            virtiofsd, why_not = find_virtiofsd(args.virtiofsd, args.install_virtiofsd)
            run_mvmm_checks(args.mvmm, examples, loaded, tmp, initrd, report,
                            virtiofsd, why_not)

    print("check: all passed" if not failures else f"check: {failures} FAILED")
    return 1 if failures else 0


def _example_disk_image(socket):
    """The image `mvmm backend blk` serves for an example's socket disk: named like the socket,
    created (sparse) if missing."""
    image = socket.with_suffix(".img")
    if not image.exists():
        with open(image, "wb") as f:
            f.truncate(EXAMPLE_DISK_MIB << 20)
    return image


def run_mvmm_checks(mvmm, examples, loaded, tmp, initrd, report, virtiofsd, why_not):
    mvmm = mvmm.resolve()
    guest = REPO_ROOT / "target" / "release" / "testguest" / "testguest-pvh.elf"
    if not os.access(mvmm, os.X_OK):
        report(False, f"{mvmm} is not an executable")
        return
    if not guest.is_file():
        report(False, f"{guest} is missing; run cargo build --release")
        return
    print(f"vhost-user backends: virtiofsd {virtiofsd or '(none: ' + why_not + ')'}, "
          f"{mvmm.name} backend blk")

    def no_virtiofsd(config):
        return virtiofsd is None and bool(_list(config, "shares"))

    print(f"booting the examples with {mvmm}:")
    target = (REPO_ROOT / "target").resolve()
    for path in examples:
        if path.name in TEMPLATES:
            print(f"  skip {path.name} (template)")
            continue
        if path.name in NOT_BOOTED:
            print(f"  skip {path.name} ({NOT_BOOTED[path.name]})")
            continue
        if path not in loaded:
            continue  # already reported as unparsable
        config = loaded[path]
        if no_virtiofsd(config):
            print(f"  skip {path.name} (has shares; {why_not})")
            continue
        sockets = [Path(os.path.normpath(path.parent / d["socket"]))
                   for d in _list(config, "shares") + _list(config, "disks") if "socket" in d]
        outside = [s for s in sockets if target not in s.parents]
        if outside:
            print(f"  skip {path.name} (its socket {outside[0]} is not under target/; "
                  "start its backends yourself)")
            continue
        notes = []
        with Backends(config, path.parent, mvmm, virtiofsd, _example_disk_image,
                      notes=notes) as backends:
            for note in notes:
                print(f"  note {path.name}: {note}")
            errors = backends.errors or boot_errors(mvmm, path, config)
        report(not errors, f"boots: {path.name}", errors)

    print("mvmm on the schema cases:")
    cases = list(GOOD.items()) + list(BAD.items()) + list(REFUSED_AT_START.items())
    for i, (what, config) in enumerate(cases):
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
            if no_virtiofsd(config):
                print(f"  skip boots: {what} (has shares; {why_not})")
                continue
            with Backends(config, tmp, mvmm, virtiofsd, lambda _: tmp / DISK) as backends:
                errors = backends.errors or boot_errors(mvmm, config_path, config)
            report(not errors, f"boots: {what}", errors)
        elif what in SCHEMA_ONLY:
            print(f"  skip refuses: {what} ({SCHEMA_ONLY[what]})")
        elif what in REFUSED_AT_START:
            # The other sockets get their backends, so that mvmm gets as far as the missing one.
            unserved = {tmp / UNSERVED_SOCKET, tmp / DISK}
            if virtiofsd is None and any(tmp / s["socket"] not in unserved
                                         for s in _list(config, "shares")):
                print(f"  skip refuses: {what} ({why_not})")
                continue
            with Backends(config, tmp, mvmm, virtiofsd, lambda _: tmp / DISK,
                          unserved=unserved) as backends:
                errors = backends.errors or reject_errors(
                    mvmm, config_path, must_say=SOCKET_TIMEOUT_MESSAGE)
            report(not errors, f"refuses at start: {what}", errors)
        elif what in BAD_WITH_BACKENDS:
            if no_virtiofsd(config):
                print(f"  skip refuses: {what} ({why_not})")
                continue
            with Backends(config, tmp, mvmm, virtiofsd, lambda _: tmp / DISK) as backends:
                errors = backends.errors or reject_errors(
                    mvmm, config_path, must_not_say=SOCKET_TIMEOUT_MESSAGE)
            report(not errors, f"refuses: {what}", errors)
        else:
            errors = reject_errors(mvmm, config_path)
            report(not errors, f"refuses: {what}", errors)


if __name__ == "__main__":
    sys.exit(main())
