//! Packaging, systemd: the unit (resources/systemd/mvmm@.service) passes `systemd-analyze
//! verify` (broken copies must not) and keeps its sandboxing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const UNIT: &str = "resources/systemd/mvmm@.service";
/// The binary path the shipped unit names; tests point it at the built binary instead.
const UNIT_BIN: &str = "/usr/local/bin/mvmm";

/// The unit as `mvmm@test.service` in `dir`, with `edit` applied and ExecStart naming the built
/// binary.
fn instantiate_unit(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let unit = std::fs::read_to_string(repo(UNIT)).unwrap();
    assert!(
        unit.contains(UNIT_BIN),
        "the unit no longer runs {UNIT_BIN}"
    );
    let path = dir.join("mvmm@test.service");
    std::fs::write(&path, edit(unit.replace(UNIT_BIN, mvmm_bin()))).unwrap();
    path
}

/// `systemd-analyze verify`: Err with its output when it fails or says anything about the
/// unit. It exits 0 on unknown keys and bad values (it only warns), so warnings count too.
fn verify(unit: &Path) -> Result<(), String> {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit)
        .output()
        .expect("systemd-analyze (Debian's systemd package) is needed");
    let all = text(&out);
    let about_unit: Vec<&str> = all.lines().filter(|l| l.contains("mvmm@test")).collect();
    if out.status.success() && about_unit.is_empty() {
        Ok(())
    } else {
        Err(format!("{:?}\n{all}", out.status))
    }
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let unit = instantiate_unit(dir.path(), |u| u);
    if let Err(e) = verify(&unit) {
        panic!("systemd-analyze verify rejected {UNIT}:\n{e}");
    }
}

#[test]
fn verify_catches_a_broken_unit() {
    // The same check on copies with one mistake each: a misspelt key (a warning only), a bad
    // value, and a binary that does not exist (an error).
    type Edit = fn(String) -> String;
    let breakages: [(&str, Edit); 3] = [
        ("misspelt key", |u| {
            u.replacen("CapabilityBoundingSet=", "CapabilityBoundingSett=", 1)
        }),
        ("bad value", |u| {
            u.replacen("Type=notify", "Type=notifyy", 1)
        }),
        ("missing binary", |u| {
            u.replace(mvmm_bin(), "/nonexistent/mvmm")
        }),
    ];
    for (what, edit) in breakages {
        let dir = tempfile::tempdir().unwrap();
        let unit = instantiate_unit(dir.path(), edit);
        assert!(
            verify(&unit).is_err(),
            "verify accepted a unit with a {what}"
        );
    }
}

/// The unit's [Service] settings: key → every value given (keys may repeat).
fn service_settings() -> BTreeMap<String, Vec<String>> {
    let unit = std::fs::read_to_string(repo(UNIT)).unwrap();
    let mut section = String::new();
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_owned();
        } else if section == "[Service]" && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                settings.entry(k.to_owned()).or_default().push(v.to_owned());
            }
        }
    }
    settings
}

/// The capabilities the unit allows, and the only ones: adding one must be deliberate.
const CAPABILITIES: [&str; 13] = [
    "CAP_NET_ADMIN",
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_KILL",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_MKNOD",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_SYS_ADMIN",
];

#[test]
fn unit_keeps_its_sandboxing() {
    let s = service_settings();
    let one = |key: &str| -> &str {
        match s.get(key).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!("{UNIT}: expected one {key}=, found {other:?}"),
        }
    };
    let all = |key: &str| -> Vec<&str> {
        s.get(key)
            .into_iter()
            .flatten()
            .flat_map(|v| v.split_whitespace())
            .collect()
    };
    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("KillMode", "mixed"),
        ("Restart", "on-failure"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("DevicePolicy", "closed"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("AmbientCapabilities", ""),
    ] {
        assert_eq!(one(key), value, "{UNIT}: {key}=");
    }
    assert!(one("ExecStart").contains("mvmm supervise %i"));
    assert!(!s.contains_key("User") && !s.contains_key("DynamicUser"));
    let devices = s.get("DeviceAllow").cloned().unwrap_or_default();
    assert_eq!(
        devices,
        ["/dev/kvm rw", "/dev/net/tun rw"],
        "{UNIT}: DeviceAllow="
    );
    assert!(all("ReadWritePaths").contains(&"-/var/lib/microvms"));
    assert_eq!(all("RestrictNamespaces"), ["mnt", "pid", "net"]);

    // Every capability is one of the expected ones and is justified in a comment.
    let caps: BTreeSet<&str> = all("CapabilityBoundingSet").into_iter().collect();
    assert_eq!(
        caps,
        CAPABILITIES.into_iter().collect(),
        "{UNIT}: capabilities"
    );
    let unit = std::fs::read_to_string(repo(UNIT)).unwrap();
    for cap in CAPABILITIES {
        assert!(
            unit.lines().any(|l| l
                .trim_start_matches(['#', ' '])
                .starts_with(&format!("{cap} "))),
            "{UNIT}: no comment says why {cap} is needed"
        );
    }

    // Stopping waits for the guest's grace period (mvmm's default, 30 s) and then some.
    let stop: u64 = one("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop > 30,
        "TimeoutStopSec={stop} must exceed the 30 s grace period"
    );
}
