//! Build script for mvmm.
//!
//! `build_test_guest` compiles the freestanding test guest in
//! `resources/testguest/` with gcc into three image forms:
//!
//! * `testguest-pvh.elf`   ELF with a PVH (XEN_ELFNOTE_PHYS32_ENTRY) note
//! * `testguest-elf64.elf` the same ELF without the note (64-bit Linux entry)
//! * `testguest.bzImage`   bzImage setup area + the same payload
//!
//! They are written to OUT_DIR and copied to `<target-dir>/<profile>/testguest/`,
//! whose path is exported to the crate as `MVMM_TESTGUEST_DIR`.
//!
//! `compile_seccomp_filters` compiles the per-thread seccomp policies in `resources/seccomp/`
//! to BPF with seccompiler and writes them to `OUT_DIR/seccomp_filters.rs`, which
//! `src/seccomp` embeds (see `resources/seccomp/README.md` for how the files combine).

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    build_test_guest();
    compile_seccomp_filters();
}

/// Guest source directory, relative to the package root.
const TESTGUEST_SRC: &str = "resources/testguest";

/// Compiler flags for every guest object: freestanding, no libc, no SSE,
/// non-PIC code linked at a fixed address.
const TESTGUEST_CFLAGS: &[&str] = &[
    "-m64",
    "-std=gnu11",
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-mno-red-zone",
    "-mno-sse",
    "-mno-mmx",
    "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    // Keep gcc from turning the memset/memcpy loops in lib.c into calls to themselves.
    "-fno-tree-loop-distribute-patterns",
    "-ffunction-sections",
    "-fdata-sections",
    "-Wall",
    "-Wextra",
    "-Wa,--noexecstack",
];

/// Linker flags; link.ld lays out the image at 0x100000.
const TESTGUEST_LDFLAGS: &[&str] = &[
    "-m64",
    "-no-pie",
    "-nostdlib",
    "-static",
    "-Wl,--build-id=none",
    "-Wl,--gc-sections",
    "-Wl,-z,noexecstack",
    "-Wl,-z,max-page-size=4096",
];

/// The 64-bit entry point every form must have (load address + 0x200).
const TESTGUEST_ENTRY64: u64 = 0x10_0200;

/// Builds the test guest images. Sources: every `*.c` and `*.S` directly in
/// `resources/testguest/`, plus one form-specific object from `form/`.
fn build_test_guest() {
    println!("cargo:rerun-if-changed={TESTGUEST_SRC}");
    println!("cargo:rerun-if-env-changed=TESTGUEST_CC");
    println!("cargo:rerun-if-env-changed=TESTGUEST_OBJCOPY");

    let src =
        Path::new(&env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR")).join(TESTGUEST_SRC);
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let obj_dir = out_dir.join("testguest-obj");
    fs::create_dir_all(&obj_dir).unwrap_or_else(|e| fail(&format!("create {obj_dir:?}: {e}")));

    let cc = env::var("TESTGUEST_CC").unwrap_or_else(|_| "gcc".into());
    let objcopy = env::var("TESTGUEST_OBJCOPY").unwrap_or_else(|_| "objcopy".into());
    require_tool(&cc, "gcc");
    require_tool(&objcopy, "objcopy (binutils)");

    // Compile every object in parallel: the common sources, then the
    // form-specific ones.
    let compile = |source: PathBuf| {
        let rel = source.strip_prefix(&src).unwrap_or(&source);
        let what = format!("compile {}", rel.display());
        let obj = obj_dir.join(format!("{}.o", rel.display()).replace('/', "-"));
        let mut cmd = Command::new(&cc);
        cmd.args(TESTGUEST_CFLAGS).arg("-I").arg(&src);
        cmd.arg("-c").arg(&source).arg("-o").arg(&obj);
        Job {
            what,
            child: spawn(&mut cmd),
            obj,
        }
    };
    let common: Vec<Job> = guest_sources(&src).into_iter().map(compile).collect();
    let pvh_note = compile(src.join("form/pvh_note.S"));
    let bz_header = compile(src.join("form/bzimage_header.S"));
    let common: Vec<PathBuf> = common.into_iter().map(Job::wait).collect();
    let pvh_note = pvh_note.wait();
    let bz_header = bz_header.wait();

    // Link the three forms from the same objects.
    let link = |extra: Option<&Path>, out: &Path| {
        let mut cmd = Command::new(&cc);
        cmd.args(TESTGUEST_LDFLAGS)
            .arg(format!("-Wl,-T,{}", src.join("link.ld").display()));
        cmd.args(&common).args(extra).arg("-o").arg(out);
        run(
            &format!("link {}", out.file_name().unwrap().to_string_lossy()),
            &mut cmd,
        );
    };
    let pvh = out_dir.join("testguest-pvh.elf");
    let elf64 = out_dir.join("testguest-elf64.elf");
    let bz_elf = obj_dir.join("testguest-bzimage.elf");
    let bzimage = out_dir.join("testguest.bzImage");
    link(Some(&pvh_note), &pvh);
    link(None, &elf64);
    link(Some(&bz_header), &bz_elf);
    run(
        "objcopy testguest.bzImage",
        Command::new(&objcopy)
            .args(["-O", "binary"])
            .arg(&bz_elf)
            .arg(&bzimage),
    );

    check_elf(&pvh, true);
    check_elf(&elf64, false);
    check_bzimage(&bzimage);

    // OUT_DIR = <target>/<profile>/build/mvmm-<hash>/out
    let dest = out_dir
        .ancestors()
        .nth(3)
        .unwrap_or_else(|| fail(&format!("unexpected OUT_DIR {out_dir:?}")))
        .join("testguest");
    fs::create_dir_all(&dest).unwrap_or_else(|e| fail(&format!("create {dest:?}: {e}")));
    for image in [&pvh, &elf64, &bzimage] {
        copy_atomic(image, &dest.join(image.file_name().unwrap()));
    }
    println!("cargo:rustc-env=MVMM_TESTGUEST_DIR={}", dest.display());
}

/// `*.c` and `*.S` files directly in `dir`, sorted so builds are reproducible.
fn guest_sources(dir: &Path) -> Vec<PathBuf> {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| fail(&format!("read {dir:?}: {e}")));
    let mut sources: Vec<PathBuf> = entries
        .map(|e| {
            e.unwrap_or_else(|e| fail(&format!("read {dir:?}: {e}")))
                .path()
        })
        .filter(|p| p.is_file() && matches!(p.extension().and_then(OsStr::to_str), Some("c" | "S")))
        .collect();
    sources.sort();
    if sources.is_empty() {
        fail(&format!("no guest sources in {dir:?}"));
    }
    sources
}

fn require_tool(tool: &str, what: &str) {
    match Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => fail(&format!(
            "`{tool}` was not found. The test guest ({TESTGUEST_SRC}) is built with {what}; \
             install it (Debian/Ubuntu: apt-get install gcc binutils) or point \
             TESTGUEST_CC / TESTGUEST_OBJCOPY at it."
        )),
        Err(e) => fail(&format!("cannot run `{tool}`: {e}")),
    }
}

/// A running compiler job and the object it produces.
struct Job {
    what: String,
    child: Child,
    obj: PathBuf,
}

impl Job {
    fn wait(self) -> PathBuf {
        finish(&self.what, self.child.wait_with_output());
        self.obj
    }
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn()
        .unwrap_or_else(|e| fail(&format!("cannot run {cmd:?}: {e}")))
}

fn run(what: &str, cmd: &mut Command) {
    finish(what, spawn(cmd).wait_with_output());
}

/// Fails on a non-zero exit; forwards compiler diagnostics as cargo warnings.
fn finish(what: &str, result: std::io::Result<Output>) {
    let out = result.unwrap_or_else(|e| fail(&format!("{what}: {e}")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        fail(&format!("{what} failed ({}):\n{stderr}", out.status));
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=testguest: {line}");
    }
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| fail(&format!("read {path:?}: {e}")))
}

fn le(bytes: &[u8], off: usize, len: usize) -> u64 {
    bytes[off..off + len]
        .iter()
        .rev()
        .fold(0, |v, &b| (v << 8) | u64::from(b))
}

/// Sanity checks so a broken link.ld fails the build rather than the tests:
/// static ELF64 x86-64 executable, entry at 0x100200, PT_NOTE iff PVH form.
fn check_elf(path: &Path, want_note: bool) {
    const PT_DYNAMIC: u64 = 2;
    const PT_INTERP: u64 = 3;
    const PT_NOTE: u64 = 4;
    let elf = read(path);
    let bad = |why: &str| fail(&format!("{path:?}: {why}"));
    if elf.len() < 64 || &elf[..5] != b"\x7fELF\x02" || le(&elf, 18, 2) != 62 {
        bad("not an ELF64 x86-64 file");
    }
    if le(&elf, 24, 8) != TESTGUEST_ENTRY64 {
        bad(&format!(
            "e_entry is {:#x}, expected {TESTGUEST_ENTRY64:#x}",
            le(&elf, 24, 8)
        ));
    }
    let (phoff, phentsize, phnum) = (
        le(&elf, 32, 8) as usize,
        le(&elf, 54, 2) as usize,
        le(&elf, 56, 2) as usize,
    );
    let types: Vec<u64> = (0..phnum)
        .map(|i| le(&elf, phoff + i * phentsize, 4))
        .collect();
    if types.contains(&PT_DYNAMIC) || types.contains(&PT_INTERP) {
        bad("has PT_DYNAMIC or PT_INTERP");
    }
    if types.contains(&PT_NOTE) != want_note {
        bad(if want_note {
            "PVH note (PT_NOTE) missing"
        } else {
            "unexpected PT_NOTE"
        });
    }
}

/// Sanity checks on the bzImage setup header.
fn check_bzimage(path: &Path) {
    let bz = read(path);
    let setup_size = (le(&bz, 0x1f1, 1) as usize + 1) * 512;
    let ok = bz.len() > setup_size
        && le(&bz, 0x1fe, 2) == 0xaa55
        && &bz[0x202..0x206] == b"HdrS"
        && le(&bz, 0x214, 4) + 0x200 == TESTGUEST_ENTRY64;
    if !ok {
        fail(&format!("{path:?}: bad bzImage setup header"));
    }
}

/// Copies via a temporary file and rename, so a concurrent build or a
/// running test never sees a half-written image.
fn copy_atomic(from: &Path, to: &Path) {
    let mut tmp = to.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    fs::copy(from, &tmp)
        .and_then(|_| fs::rename(&tmp, to))
        .unwrap_or_else(|e| fail(&format!("copy {from:?} to {to:?}: {e}")));
}

/// Stops the build with `msg` (cargo shows a failed build script's stderr).
fn fail(msg: &str) -> ! {
    eprintln!("error: mvmm build.rs: {msg}");
    std::process::exit(1);
}

/// Seccomp policy directory, relative to the package root.
const SECCOMP_SRC: &str = "resources/seccomp";
/// Rules every thread kind gets (the Rust runtime, the allocator, logging, exit).
const SECCOMP_COMMON: &str = "common";
/// The thread that creates device threads: new threads inherit its filter, so it also gets the
/// rules of every kind it creates.
const SECCOMP_STARTER: &str = "thread-starter";
const SECCOMP_STARTED_KINDS: &[&str] = &["blk", "net", "vhost-user"];

fn compile_seccomp_filters() {
    println!("cargo:rerun-if-changed={SECCOMP_SRC}");
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64") {
        panic!("mvmm's seccomp policies are written for x86_64 only");
    }
    let mut policies = std::collections::BTreeMap::new();
    for entry in fs::read_dir(SECCOMP_SRC).expect("read resources/seccomp") {
        let path = entry.expect("list resources/seccomp").path();
        if path.extension() != Some(OsStr::new("json")) {
            continue;
        }
        let kind = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let filter = json
            .get(&kind)
            .unwrap_or_else(|| panic!("{}: the top-level key must be `{kind}`", path.display()))
            .clone();
        policies.insert(kind, filter);
    }
    let common = policies
        .remove(SECCOMP_COMMON)
        .expect("resources/seccomp/common.json");
    let rules_of = |filter: &serde_json::Value| filter["filter"].as_array().unwrap().clone();
    let mut merged = serde_json::Map::new();
    for (kind, filter) in &policies {
        let mut rules = rules_of(filter);
        rules.extend(rules_of(&common));
        if kind == SECCOMP_STARTER {
            for started in SECCOMP_STARTED_KINDS {
                rules.extend(rules_of(&policies[*started]));
            }
        }
        let mut filter = filter.clone();
        filter["filter"] = serde_json::Value::Array(unconditional_rules_win(rules));
        merged.insert(kind.clone(), filter);
    }
    let json = serde_json::Value::Object(merged).to_string();
    let programs = seccompiler::compile_from_json(json.as_bytes(), seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("resources/seccomp: {e}"));

    let mut out = String::from(
        "// Generated by build.rs from resources/seccomp/*.json.\n\
         /// (thread kind, BPF program as (code, jt, jf, k) instructions)\n\
         pub static FILTERS: &[(&str, &[(u16, u8, u8, u32)])] = &[\n",
    );
    let mut kinds: Vec<_> = programs.keys().collect();
    kinds.sort();
    for kind in kinds {
        out.push_str(&format!("    ({kind:?}, &[\n"));
        for insn in &programs[kind] {
            out.push_str(&format!(
                "        ({}, {}, {}, {}),\n",
                insn.code, insn.jt, insn.jf, insn.k
            ));
        }
        out.push_str("    ]),\n");
    }
    out.push_str("];\n");
    let dest = PathBuf::from(env::var("OUT_DIR").unwrap()).join("seccomp_filters.rs");
    fs::write(&dest, out).unwrap_or_else(|e| panic!("{}: {e}", dest.display()));
}

/// seccompiler treats a syscall with both an unconditional entry and argument rules as
/// conditional; merged policies mean "allowed if any entry allows it", so an unconditional
/// entry drops that syscall's argument rules.
fn unconditional_rules_win(rules: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    let unconditional: std::collections::HashSet<String> = rules
        .iter()
        .filter(|r| r.get("args").is_none())
        .map(|r| r["syscall"].as_str().unwrap().to_owned())
        .collect();
    let mut seen = std::collections::HashSet::new();
    rules
        .into_iter()
        .filter(|r| {
            let name = r["syscall"].as_str().unwrap();
            if unconditional.contains(name) {
                r.get("args").is_none() && seen.insert(name.to_owned())
            } else {
                true
            }
        })
        .collect()
}
