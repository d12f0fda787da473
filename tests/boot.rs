//! mvmm boots the test guest in every image form, with 1 and 2 vCPUs, below and above the
//! 32-bit MMIO hole, and ends the VM the way the guest asks.

mod common;

use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(30);
const FOUR_GIB: u64 = 1 << 32;

fn boot_and_check(form: &str, vcpus: u32, memory_mib: u64) {
    let vm = VmDir::new();
    let cmdline = format!("console=ttyS0 form={form} vcpus={vcpus} token=\"a b\" x=1");
    let config = vm.write_config(&config_json(&testguest(form), vcpus, memory_mib, &cmdline));
    let out = run_config(&config, TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());

    let protocol = if form == "pvh" { "pvh" } else { "linux" };
    assert!(
        out.stdout
            .contains(&format!("testguest: boot={protocol}\n")),
        "{}",
        out.dump()
    );
    assert!(
        out.stdout.contains(&format!("\ncmdline: {cmdline}\n")),
        "guest did not print the exact command line:\n{}",
        out.dump()
    );
    assert!(out.stdout.contains("testguest: done\n"), "{}", out.dump());

    // The memory map describes exactly memory_mib of RAM (usable plus the BIOS area).
    let e820 = parse_e820(&out.stdout);
    let total: u64 = e820.iter().map(|e| e.size).sum();
    assert_eq!(total, memory_mib * MIB, "{e820:#x?}");
    let ram_line = format!(
        "mem: ram={} total={}",
        total - (0x10_0000 - 0x9_fc00),
        total
    );
    assert!(out.stdout.contains(&ram_line), "{}", out.dump());
    // Nothing overlaps the 32-bit MMIO hole; big guests continue above 4 GiB.
    for e in &e820 {
        assert!(
            e.start + e.size <= 0xb000_0000 || e.start >= FOUR_GIB,
            "{e:x?}"
        );
    }
    let above_4g: u64 = e820
        .iter()
        .filter(|e| e.start >= FOUR_GIB)
        .map(|e| e.size)
        .sum();
    if memory_mib * MIB > 0xb000_0000 {
        assert_eq!(above_4g, memory_mib * MIB - 0xb000_0000, "{e820:#x?}");
    } else {
        assert_eq!(above_4g, 0);
    }
}

macro_rules! boot_matrix {
    ($($name:ident: $form:literal, $vcpus:literal, $mem:literal;)*) => {
        $(
            #[test]
            fn $name() {
                boot_and_check($form, $vcpus, $mem);
            }
        )*
    };
}

boot_matrix! {
    pvh_1cpu_64m: "pvh", 1, 64;
    pvh_2cpu_64m: "pvh", 2, 64;
    pvh_1cpu_3g: "pvh", 1, 3072;
    pvh_2cpu_3g: "pvh", 2, 3072;
    elf64_1cpu_64m: "elf64", 1, 64;
    elf64_2cpu_64m: "elf64", 2, 64;
    elf64_1cpu_3g: "elf64", 1, 3072;
    elf64_2cpu_3g: "elf64", 2, 3072;
    bzimage_1cpu_64m: "bzimage", 1, 64;
    bzimage_2cpu_64m: "bzimage", 2, 64;
    bzimage_1cpu_3g: "bzimage", 1, 3072;
    bzimage_2cpu_3g: "bzimage", 2, 3072;
}

#[test]
fn acpi_poweroff_ends_the_vm_cleanly() {
    let vm = VmDir::new();
    let config = vm.write_config(&config_json(&testguest("pvh"), 1, 64, "test=poweroff"));
    let out = run_config(&config, TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(out.stderr.contains("guest powered off"), "{}", out.dump());
}

#[test]
fn triple_fault_exits_1_and_logs_rip() {
    let vm = VmDir::new();
    let config = vm.write_config(&config_json(&testguest("elf64"), 1, 64, "test=triplefault"));
    let out = run_config(&config, TIMEOUT);
    assert_eq!(out.code(), Some(1), "{}", out.dump());
    assert!(
        out.stdout.contains("testguest: triple fault"),
        "{}",
        out.dump()
    );
    assert!(
        out.stderr
            .contains("triple fault (KVM_EXIT_SHUTDOWN) at rip=0x10"),
        "{}",
        out.dump()
    );
}

/// With no grace period a stop signal ends the VM at once, without asking the guest (see
/// tests/shutdown.rs for the graceful path).
fn stop_with_signal(signal: libc::c_int) {
    let vm = VmDir::new();
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": "test=hang"},
        "machine": {"vcpus": 2, "memory_mib": 64, "shutdown_timeout_secs": 0},
    });
    let config = vm.write_config(&json.to_string());
    let child = spawn_mvmm(&["--config", config.to_str().unwrap()]);
    let pid = child.id() as libc::pid_t;
    // Give the guest time to get going, then stop it.
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    let sent = std::time::Instant::now();
    let out = wait_with_timeout(child, Duration::from_secs(10));
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "took {:?}",
        sent.elapsed()
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(out.stdout.contains("testguest: hanging"), "{}", out.dump());
    assert!(
        out.stderr
            .contains(&format!("stopped by {}", signal_name(signal))),
        "{}",
        out.dump()
    );
}

fn signal_name(signal: libc::c_int) -> &'static str {
    if signal == libc::SIGTERM {
        "SIGTERM"
    } else {
        "SIGINT"
    }
}

#[test]
fn sigterm_stops_a_running_vm_within_two_seconds() {
    stop_with_signal(libc::SIGTERM);
}

#[test]
fn sigint_stops_a_running_vm_within_two_seconds() {
    stop_with_signal(libc::SIGINT);
}

#[test]
fn serial_output_to_a_file_and_off() {
    let vm = VmDir::new();
    let console = vm.path("console.log");
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": "to-file"},
        "machine": {"vcpus": 1, "memory_mib": 64},
        "serial": {"mode": "file", "path": "console.log"},
    });
    let out = run_config(&vm.write_config(&json.to_string()), TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(!out.stdout.contains("testguest"), "{}", out.dump());
    let logged = std::fs::read_to_string(&console).unwrap();
    assert!(logged.contains("cmdline: to-file\n") && logged.contains("testguest: done"));

    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh")},
        "machine": {"vcpus": 1, "memory_mib": 64},
        "serial": {"mode": "off"},
    });
    let out = run_config(&vm.write_config(&json.to_string()), TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(out.stdout.is_empty(), "{}", out.dump());
}

#[test]
fn default_cmdline_is_used_when_none_is_given() {
    let vm = VmDir::new();
    let json = serde_json::json!({
        "kernel": {"path": testguest("bzimage")},
        "machine": {"vcpus": 1, "memory_mib": 64},
    });
    let out = run_config(&vm.write_config(&json.to_string()), TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert!(
        out.stdout
            .contains("cmdline: console=ttyS0 reboot=k panic=1\n"),
        "{}",
        out.dump()
    );
}

#[test]
fn initrd_is_loaded_and_described() {
    let vm = VmDir::new();
    // Distinct words so a misplaced or partial copy changes the sum.
    let words: Vec<u64> = (0..40_000u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let expected = words.iter().fold(0u64, |a, w| a.wrapping_add(*w));
    std::fs::write(vm.path("initrd.img"), &bytes).unwrap();
    for form in ["pvh", "elf64", "bzimage"] {
        let json = serde_json::json!({
            "kernel": {"path": testguest(form), "initrd": "initrd.img", "cmdline": "test=initrd"},
            "machine": {"vcpus": 1, "memory_mib": 64},
        });
        let out = run_config(&vm.write_config(&json.to_string()), TIMEOUT);
        assert_eq!(out.code(), Some(0), "{form}: {}", out.dump());
        assert!(
            out.stdout.contains(&format!(" size={}\n", bytes.len())),
            "{form}: {}",
            out.dump()
        );
        assert!(
            out.stdout
                .contains(&format!("initrd-sum: 0x{expected:016x}\n")),
            "{form}: {}",
            out.dump()
        );
        // Page aligned, above the kernel, inside low RAM.
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with("initrd: "))
            .unwrap();
        let addr = u64::from_str_radix(&line["initrd: addr=0x".len()..][..16], 16).unwrap();
        assert_eq!(addr % 4096, 0, "{line}");
        assert!(
            addr >= 0x20_0000 && addr + bytes.len() as u64 <= 64 * MIB,
            "{line}"
        );
    }
}

#[test]
fn machine_id_reaches_the_guest_as_the_smbios_system_uuid() {
    let vm = VmDir::new();
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": "test=smbios"},
        "machine": {"vcpus": 1, "memory_mib": 64},
        "machine_id": "0123456789abcdef0123456789ABCDEF",
    });
    let out = run_config(&vm.write_config(&json.to_string()), TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    // The same hex as /etc/machine-id, in UUID form.
    assert!(
        out.stdout
            .contains("smbios: uuid=01234567-89ab-cdef-0123-456789abcdef\n"),
        "{}",
        out.dump()
    );

    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": "test=smbios"},
        "machine": {"vcpus": 1, "memory_mib": 64},
    });
    let out = run_config(&vm.write_config(&json.to_string()), TIMEOUT);
    assert!(
        out.stdout
            .contains("smbios: uuid=00000000-0000-0000-0000-000000000000\n"),
        "without a machine id the UUID is unset:\n{}",
        out.dump()
    );
}
