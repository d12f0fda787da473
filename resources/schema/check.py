#!/usr/bin/env python3
"""Check resources/schema/vm.schema.json and the configs in resources/examples/.

What it checks:

1. Every resources/examples/*.json is valid against the schema. Also checked,
   because a JSON Schema cannot say them: no duplicate keys, the kernel and
   initrd files exist (relative to the config file's directory), the serial
   output's directory exists, and the command line is under 2048 bytes of
   UTF-8. Example files listed in TEMPLATES are exempt from the file checks.
   The test guest images come from `cargo build --release`, so build first.
2. A built-in set of small configs: the schema must accept the good ones and
   reject the bad ones (range limits, unknown fields, the serial mode/path
   rule, ...), so a loosened schema is noticed.
3. With --mvmm BIN, mvmm itself must agree: it boots every good case and every
   example that is not a template (exit status 0, serial output ends with
   "testguest: done"), and refuses every bad case with exit status 2 (bad
   config).

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

# Examples that name files which only exist on a real deployment.
TEMPLATES = {"linux.json"}

CMDLINE_MAX_BYTES = 2047
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


def semantic_errors(config, base_dir, check_files):
    errors = []
    kernel = config.get("kernel", {})
    cmdline = kernel.get("cmdline")
    if isinstance(cmdline, str) and len(cmdline.encode("utf-8")) > CMDLINE_MAX_BYTES:
        errors.append(f"$.kernel.cmdline: more than {CMDLINE_MAX_BYTES} bytes of UTF-8")
    if not check_files:
        return errors
    for field in ("path", "initrd"):
        value = kernel.get(field)
        if isinstance(value, str) and not (base_dir / value).is_file():
            errors.append(f"$.kernel.{field}: {base_dir / value} is not an existing regular file"
                          " (the test guest images come from `cargo build --release`)")
    serial_path = config.get("serial", {}).get("path")
    if isinstance(serial_path, str) and not (base_dir / serial_path).parent.is_dir():
        errors.append(f"$.serial.path: directory {(base_dir / serial_path).parent} does not exist")
    return errors


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


GOOD = {
    "minimal (all defaults)": _cfg(),
    "8 MiB, the smallest memory": _cfg(machine={"vcpus": 1, "memory_mib": 8}),
    "254 vCPUs, the most": _cfg(machine={"vcpus": 254, "memory_mib": 64}),
    "acpi false": _cfg(machine={"vcpus": 2, "memory_mib": 64, "acpi": False}),
    "initrd and cmdline": _cfg(kernel={"path": KERNEL, "initrd": INITRD, "cmdline": "console=ttyS0"}),
    "empty cmdline": _cfg(kernel={"path": KERNEL, "cmdline": ""}),
    "cmdline of 2047 bytes": _cfg(kernel={"path": KERNEL, "cmdline": "x" * 2047}),
    "serial section empty": _cfg(serial={}),
    "serial off": _cfg(serial={"mode": "off"}),
    "serial file with path": _cfg(serial={"mode": "file", "path": "console.log"}),
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
    "7 MiB": _cfg(machine={"vcpus": 1, "memory_mib": 7}),
    "0 MiB": _cfg(machine={"vcpus": 1, "memory_mib": 0}),
    "acpi as a string": _cfg(machine={"vcpus": 1, "memory_mib": 64, "acpi": "yes"}),
    "cmdline of 2048 bytes": _cfg(kernel={"path": KERNEL, "cmdline": "x" * 2048}),
    "cmdline with a NUL": _cfg(kernel={"path": KERNEL, "cmdline": "console=ttyS0\u0000x"}),
    "unknown top-level field": _cfg(kernels=[]),
    "planned section disks[]": _cfg(disks=[{"path": "root.img"}]),
    "planned section net[]": _cfg(net=[{"tap": "vm0"}]),
    "planned field machine_id": _cfg(machine_id="0123456789abcdef0123456789abcdef"),
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
}


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
    for path in examples:
        try:
            config = load_json(path)
        except (OSError, ValueError) as e:
            report(False, path.name, [f"cannot parse: {e}"])
            continue
        template = path.name in TEMPLATES
        errors = validate(config)
        if not errors:
            errors = semantic_errors(config, path.parent, check_files=not template)
        report(not errors, path.name + (" (template: files not checked)" if template else ""),
               errors)

    # 2. Good and bad cases against the schema.
    print(f"schema cases ({len(GOOD)} good, {len(BAD)} bad):")
    for what, config in GOOD.items():
        errors = validate(config) + semantic_errors(config, Path("/"), check_files=False)
        report(not errors, f"accepts: {what}", errors)
    for what, config in BAD.items():
        errors = validate(config) + semantic_errors(config, Path("/"), check_files=False)
        reason = f"  ({_shorten(errors[0])})" if errors else ""
        report(bool(errors), f"rejects: {what}{reason}",
               [] if errors else ["the schema accepted it"])

    # 3. The same against mvmm itself.
    if args.mvmm:
        mvmm = args.mvmm.resolve()
        guest = REPO_ROOT / "target" / "release" / "testguest" / "testguest-pvh.elf"
        if not os.access(mvmm, os.X_OK):
            report(False, f"{mvmm} is not an executable")
        elif not guest.is_file():
            report(False, f"{guest} is missing; run cargo build --release")
        else:
            print(f"booting the examples with {mvmm}:")
            for path in examples:
                if path.name in TEMPLATES:
                    print(f"  skip {path.name} (template)")
                    continue
                errors = boot_errors(mvmm, path, load_json(path))
                report(not errors, f"boots: {path.name}", errors)
            print("mvmm on the schema cases:")
            with tempfile.TemporaryDirectory(prefix="mvmm-check-") as tmp:
                tmp = Path(tmp)
                initrd = tmp / "initrd"
                initrd.write_bytes(b"070701" + b"0" * 104)  # any bytes do for the test guest
                for i, (what, config) in enumerate(list(GOOD.items()) + list(BAD.items())):
                    config = _substitute(config, str(guest), str(initrd))
                    config_path = tmp / f"case{i}.json"
                    config_path.write_text(json.dumps(config), encoding="utf-8")
                    if what in GOOD:
                        errors = boot_errors(mvmm, config_path, config)
                        report(not errors, f"boots: {what}", errors)
                    else:
                        errors = reject_errors(mvmm, config_path)
                        report(not errors, f"refuses: {what}", errors)

    print("check: all passed" if not failures else f"check: {failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
