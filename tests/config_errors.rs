//! Bad input exits with 2 and one error line that names the problem: no panic, no backtrace.

mod common;

use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs mvmm on `json` and checks the exit code, the single error line and its content.
fn expect_config_error(vm: &VmDir, json: &str, needles: &[&str]) {
    let config = vm.write_config(json);
    let out = run_config(&config, TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(out.stdout.is_empty(), "{}", out.dump());
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line:\n{}", out.dump());
    let line = lines[0];
    assert!(line.contains("ERROR"), "{line}");
    for needle in needles {
        assert!(line.contains(needle), "{needle:?} missing from: {line}");
    }
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!out.stderr.contains(bad), "{}", out.dump());
    }
}

fn machine_json(kernel: &std::path::Path, machine: serde_json::Value) -> String {
    serde_json::json!({"kernel": {"path": kernel}, "machine": machine}).to_string()
}

#[test]
fn missing_kernel_file() {
    let vm = VmDir::new();
    let missing = vm.path("no-such-vmlinux");
    let json = machine_json(&missing, serde_json::json!({"vcpus": 1, "memory_mib": 64}));
    expect_config_error(
        &vm,
        &json,
        &["kernel.path", "no-such-vmlinux", "No such file"],
    );
}

#[test]
fn file_that_is_not_a_kernel() {
    let vm = VmDir::new();
    let bogus = vm.path("notes.txt");
    std::fs::write(
        &bogus,
        "these are not the bytes you are looking for\n".repeat(100),
    )
    .unwrap();
    let json = machine_json(&bogus, serde_json::json!({"vcpus": 1, "memory_mib": 64}));
    expect_config_error(&vm, &json, &["notes.txt", "not a Linux kernel"]);
}

#[test]
fn truncated_bzimage() {
    let vm = VmDir::new();
    let image = std::fs::read(testguest("bzimage")).unwrap();
    let truncated = vm.path("bzImage.part");
    std::fs::write(&truncated, &image[..image.len() / 2]).unwrap();
    let json = machine_json(
        &truncated,
        serde_json::json!({"vcpus": 1, "memory_mib": 64}),
    );
    expect_config_error(&vm, &json, &["bzImage.part", "truncated"]);
}

#[test]
fn truncated_elf() {
    let vm = VmDir::new();
    let image = std::fs::read(testguest("pvh")).unwrap();
    let truncated = vm.path("vmlinux.part");
    std::fs::write(&truncated, &image[..image.len() / 2]).unwrap();
    let json = machine_json(
        &truncated,
        serde_json::json!({"vcpus": 1, "memory_mib": 64}),
    );
    expect_config_error(&vm, &json, &["vmlinux.part", "cannot load kernel"]);
}

#[test]
fn zero_vcpus() {
    let vm = VmDir::new();
    let json = machine_json(
        &testguest("pvh"),
        serde_json::json!({"vcpus": 0, "memory_mib": 64}),
    );
    expect_config_error(&vm, &json, &["machine.vcpus", "1 to 254"]);
}

#[test]
fn zero_memory() {
    let vm = VmDir::new();
    let json = machine_json(
        &testguest("pvh"),
        serde_json::json!({"vcpus": 1, "memory_mib": 0}),
    );
    expect_config_error(&vm, &json, &["machine.memory_mib", "at least"]);
}

#[test]
fn memory_beyond_the_host() {
    let vm = VmDir::new();
    // 64 TiB: more than any CI host has.
    let json = machine_json(
        &testguest("pvh"),
        serde_json::json!({"vcpus": 1, "memory_mib": 64u64 << 20}),
    );
    expect_config_error(
        &vm,
        &json,
        &["machine.memory_mib", "more than this host has"],
    );
}

#[test]
fn unknown_field_with_a_suggestion() {
    let vm = VmDir::new();
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "comdline": "x"},
        "machine": {"vcpus": 1, "memory_mib": 64},
    })
    .to_string();
    expect_config_error(
        &vm,
        &json,
        &[
            "`kernel.comdline`",
            "unknown field `comdline`",
            "did you mean `cmdline`?",
        ],
    );
}

#[test]
fn malformed_json() {
    let vm = VmDir::new();
    expect_config_error(
        &vm,
        "{\"kernel\": {\"path\": \"x\"}\n\"machine\": {}}",
        &["malformed JSON", "line 2"],
    );
}

#[test]
fn initrd_that_does_not_fit_in_memory() {
    let vm = VmDir::new();
    let initrd = vm.path("huge.cpio");
    // Sparse: costs no disk, but is larger than the guest's 16 MiB.
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "initrd": initrd},
        "machine": {"vcpus": 1, "memory_mib": 16},
    })
    .to_string();
    expect_config_error(
        &vm,
        &json,
        &["huge.cpio", "does not fit", "machine.memory_mib"],
    );
}

#[test]
fn missing_config_file_and_bad_arguments() {
    let out = run_mvmm(&["--config", "/nonexistent/vm.json"], TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains("/nonexistent/vm.json"),
        "{}",
        out.dump()
    );
    let out = run_mvmm(&["--no-such-flag"], TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    let out = run_mvmm(&[], TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(out.stderr.contains("--config"), "{}", out.dump());
}

#[test]
fn help_and_version_exit_0() {
    let out = run_mvmm(&["--help"], TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(out.stdout.contains("--config") && out.stdout.contains("--log-level"));
    assert!(out.stdout.contains("Exit codes"), "{}", out.dump());
    let out = run_mvmm(&["--version"], TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(out.stdout.starts_with("mvmm 0."), "{}", out.dump());
}

#[test]
fn global_options_work_before_a_command_but_config_does_not_mix_with_one() {
    // `--log-level` before the command reaches it: ctl then fails to connect (2, naming
    // the socket), not on the command line.
    let out = run_mvmm(
        &[
            "--log-level",
            "debug",
            "ctl",
            "--socket",
            "/nonexistent/mvmm.sock",
            "status",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains("/nonexistent/mvmm.sock"),
        "{}",
        out.dump()
    );

    let out = run_mvmm(
        &[
            "--config",
            "vm.json",
            "ctl",
            "--socket",
            "/nonexistent/mvmm.sock",
            "status",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains("cannot be combined with a command"),
        "{}",
        out.dump()
    );
}
