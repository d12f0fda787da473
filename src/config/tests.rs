use std::io::Write;

use super::validate::{validate, HostLimits};
use super::*;

fn kernel_file() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(b"\x7fELF").unwrap();
    f
}

fn parse(json: &str) -> Result<VmConfig, ConfigError> {
    VmConfig::from_json(json, Path::new("/"))
}

fn minimal(kernel: &Path, machine: &str) -> String {
    format!(
        r#"{{"kernel": {{"path": "{}"}}, "machine": {machine}}}"#,
        kernel.display()
    )
}

#[test]
fn minimal_config_gets_defaults() {
    let k = kernel_file();
    let cfg = parse(&minimal(k.path(), r#"{"vcpus": 2, "memory_mib": 64}"#)).unwrap();
    assert_eq!(cfg.machine.vcpus, 2);
    assert!(cfg.machine.acpi);
    assert_eq!(cfg.serial.mode, SerialMode::Stdout);
    assert_eq!(cfg.cmdline(), DEFAULT_CMDLINE);
}

#[test]
fn relative_paths_follow_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"x").unwrap();
    let json = r#"{"kernel": {"path": "vmlinux"}, "machine": {"vcpus": 1, "memory_mib": 64},
        "serial": {"mode": "file", "path": "out/console.log"}}"#;
    let cfg = VmConfig::from_json(json, dir.path()).unwrap();
    assert_eq!(cfg.kernel.path, dir.path().join("vmlinux"));
    assert_eq!(cfg.serial.path.unwrap(), dir.path().join("out/console.log"));
}

fn invalid_field(result: Result<VmConfig, ConfigError>) -> (String, String) {
    match result {
        Err(ConfigError::Invalid { field, message }) => (field, message),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn zero_vcpus_and_zero_memory_name_their_field() {
    let k = kernel_file();
    let (field, msg) = invalid_field(parse(&minimal(
        k.path(),
        r#"{"vcpus": 0, "memory_mib": 64}"#,
    )));
    assert_eq!(field, "machine.vcpus");
    assert!(msg.contains("1 to 254"), "{msg}");
    let (field, _) = invalid_field(parse(&minimal(
        k.path(),
        r#"{"vcpus": 1, "memory_mib": 0}"#,
    )));
    assert_eq!(field, "machine.memory_mib");
}

#[test]
fn memory_beyond_the_host_is_refused() {
    let k = kernel_file();
    let text = minimal(k.path(), r#"{"vcpus": 1, "memory_mib": 4096}"#);
    let mut cfg: VmConfig = serde_json::from_str(&text).unwrap();
    cfg.resolve_paths(Path::new("/"));
    let small_host = HostLimits {
        memory_mib: Some(1024),
    };
    match validate(&cfg, &small_host) {
        Err(ConfigError::Invalid { field, message }) => {
            assert_eq!(field, "machine.memory_mib");
            assert!(message.contains("1024 MiB"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(validate(
        &cfg,
        &HostLimits {
            memory_mib: Some(8192)
        }
    )
    .is_ok());
}

#[test]
fn missing_kernel_and_initrd_files_are_named() {
    let (field, msg) = invalid_field(parse(&minimal(
        Path::new("/nonexistent/bzImage"),
        r#"{"vcpus": 1, "memory_mib": 64}"#,
    )));
    assert_eq!(field, "kernel.path");
    assert!(msg.contains("/nonexistent/bzImage"), "{msg}");
    let k = kernel_file();
    let json = format!(
        r#"{{"kernel": {{"path": "{}", "initrd": "/nope.cpio"}}, "machine": {{"vcpus": 1, "memory_mib": 64}}}}"#,
        k.path().display()
    );
    assert_eq!(invalid_field(parse(&json)).0, "kernel.initrd");
}

#[test]
fn unknown_field_gets_a_suggestion_and_its_path() {
    let k = kernel_file();
    let err = parse(&minimal(k.path(), r#"{"vcpu": 1, "memory_mib": 64}"#)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("`machine.vcpu`"), "{msg}");
    assert!(msg.contains("did you mean `vcpus`?"), "{msg}");
}

#[test]
fn malformed_json_reports_the_position() {
    let msg = parse("{\"kernel\": {\"path\": \"x\"},\n \"machine\": {")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("malformed JSON at line 2"), "{msg}");
}

#[test]
fn wrong_types_and_bad_serial_modes_are_explained() {
    let k = kernel_file();
    let msg = parse(&minimal(k.path(), r#"{"vcpus": "two", "memory_mib": 64}"#))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("machine.vcpus"), "{msg}");
    let json = format!(
        r#"{{"kernel": {{"path": "{}"}}, "machine": {{"vcpus": 1, "memory_mib": 64}}, "serial": {{"mode": "tty"}}}}"#,
        k.path().display()
    );
    let msg = parse(&json).unwrap_err().to_string();
    assert!(
        msg.contains("serial.mode") && msg.contains("stdout"),
        "{msg}"
    );
    let json = format!(
        r#"{{"kernel": {{"path": "{}"}}, "machine": {{"vcpus": 1, "memory_mib": 64}}, "serial": {{"mode": "file"}}}}"#,
        k.path().display()
    );
    assert_eq!(invalid_field(parse(&json)).0, "serial.path");
}

#[test]
fn overlong_cmdline_is_refused() {
    let k = kernel_file();
    let json = format!(
        r#"{{"kernel": {{"path": "{}", "cmdline": "{}"}}, "machine": {{"vcpus": 1, "memory_mib": 64}}}}"#,
        k.path().display(),
        "a".repeat(4000)
    );
    assert_eq!(invalid_field(parse(&json)).0, "kernel.cmdline");
}

#[test]
fn machine_id_must_be_32_hex_digits() {
    let k = kernel_file();
    let with_id = |id: &str| {
        format!(
            r#"{{"kernel": {{"path": "{}"}}, "machine": {{"vcpus": 1, "memory_mib": 64}}, "machine_id": "{id}"}}"#,
            k.path().display()
        )
    };
    assert!(parse(&with_id("0123456789abcdef0123456789ABCDEF")).is_ok());
    assert_eq!(invalid_field(parse(&with_id("0123"))).0, "machine_id");
    assert_eq!(
        invalid_field(parse(&with_id(&"g".repeat(32)))).0,
        "machine_id"
    );
}

#[test]
fn mp_table_limits_vcpus_without_acpi() {
    let k = kernel_file();
    let (field, msg) = invalid_field(parse(&minimal(
        k.path(),
        r#"{"vcpus": 64, "memory_mib": 64, "acpi": false}"#,
    )));
    assert_eq!(field, "machine.vcpus");
    assert!(msg.contains("MP table"), "{msg}");
    assert!(parse(&minimal(k.path(), r#"{"vcpus": 64, "memory_mib": 64}"#)).is_ok());
}

#[test]
fn api_socket_and_shutdown_timeout() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"x").unwrap();
    let with = |extra: &str, machine: &str| {
        let json = format!(
            r#"{{"kernel": {{"path": "vmlinux"}}, "machine": {{"vcpus": 1, "memory_mib": 64{machine}}}{extra}}}"#
        );
        VmConfig::from_json(&json, dir.path())
    };
    let cfg = with("", "").unwrap();
    assert_eq!(cfg.api_socket, None);
    assert_eq!(
        cfg.machine.shutdown_timeout_secs,
        DEFAULT_SHUTDOWN_TIMEOUT_SECS
    );

    let cfg = with(
        r#", "api_socket": "vm.sock""#,
        r#", "shutdown_timeout_secs": 0"#,
    )
    .unwrap();
    assert_eq!(cfg.api_socket.unwrap(), dir.path().join("vm.sock"));
    assert_eq!(cfg.machine.shutdown_timeout_secs, 0);

    let (field, msg) = invalid_field(with("", r#", "shutdown_timeout_secs": 3601"#));
    assert_eq!(field, "machine.shutdown_timeout_secs");
    assert!(msg.contains("0 (stop at once) to 3600"), "{msg}");
    let (field, msg) = invalid_field(with(r#", "api_socket": "no/such/dir/vm.sock""#, ""));
    assert_eq!(field, "api_socket");
    assert!(msg.contains("does not exist"), "{msg}");
    let long = format!(r#", "api_socket": "/tmp/{}""#, "s".repeat(110));
    let (field, msg) = invalid_field(with(&long, ""));
    assert_eq!(field, "api_socket");
    assert!(msg.contains("1 to 107 bytes"), "{msg}");
    let (field, msg) = invalid_field(with(r#", "api_socket": ".""#, ""));
    assert_eq!(field, "api_socket");
    assert!(msg.contains("is a directory"), "{msg}");
}

#[test]
fn jail_parses_with_defaults_and_lists_socket_dirs() {
    let k = kernel_file();
    let json = format!(
        r#"{{"kernel": {{"path": "{}"}}, "machine": {{"vcpus": 1, "memory_mib": 64}},
            "shares": [{{"tag": "a", "socket": "/run/vm/a.sock"}},
                       {{"tag": "b", "socket": "/run/vm/b.sock"}}],
            "api_socket": "/tmp/vm.sock",
            "jail": {{"root": "jail", "uid": 7, "rlimits": {{"nofile": 64}}}}}}"#,
        k.path().display()
    );
    let cfg = parse(&json).unwrap();
    let jail = cfg.jail.as_ref().unwrap();
    assert_eq!(jail.root, Path::new("/jail"));
    assert_eq!((jail.uid, jail.gid), (Some(7), None));
    assert!(jail.namespaces);
    assert_eq!(jail.rlimits.nofile, Some(64));
    assert_eq!(jail.rlimits.fsize, None);
    assert_eq!(
        cfg.socket_dirs(),
        vec![PathBuf::from("/run/vm"), PathBuf::from("/tmp")]
    );
}

#[test]
fn jail_unknown_field_names_its_path() {
    let k = kernel_file();
    let json = format!(
        r#"{{"kernel": {{"path": "{}"}}, "machine": {{"vcpus": 1, "memory_mib": 64}},
            "jail": {{"root": "/j", "rlimits": {{"nfile": 1}}}}}}"#,
        k.path().display()
    );
    let err = parse(&json).unwrap_err().to_string();
    assert!(err.contains("jail.rlimits"), "{err}");
    assert!(err.contains("nofile"), "{err}");
}
