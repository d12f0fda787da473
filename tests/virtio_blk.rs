//! virtio-blk end to end: the test guest's virtio-mmio driver writes, flushes and reads back
//! disk 1, reads the read-only disk 0 and fails to write it; the host files must agree.

mod common;

use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);
const PATTERN_STARTS: [u64; 2] = [0, 2048];

#[test]
fn guest_reads_writes_and_flushes_through_virtio_blk() {
    let vm = VmDir::new();
    let ro = vm.path("store.img");
    let rw = vm.path("data.img");
    let ro_bytes = pseudo_random_bytes(1 << 20, 11);
    let rw_bytes = pseudo_random_bytes(2 << 20, 23);
    std::fs::write(&ro, &ro_bytes).unwrap();
    std::fs::write(&rw, &rw_bytes).unwrap();
    let seed = 7;
    let json = serde_json::json!({
        "kernel": {"path": testguest("pvh"), "cmdline": format!("test=blk blk.seed={seed}")},
        "machine": {"vcpus": 1, "memory_mib": 64},
        "disks": [
            {"path": "store.img", "read_only": true, "serial": "nix-store"},
            {"path": "data.img"},
        ],
    });
    let out = run_config(&vm.write_config(&json.to_string()), TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    let s = &out.stdout;
    let expect = |prefix: &str, value: &str| {
        assert_eq!(
            line_value(s, prefix),
            Some(value),
            "{prefix}\n{}",
            out.dump()
        );
    };

    // Both disks are on the command line, in config order.
    assert!(
        s.contains("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"),
        "{}",
        out.dump()
    );
    // Disk 1: the write survived a flush and reads back.
    expect("blk1: flush=", "1");
    assert!(s.contains("blk1: write+flush+read ok\n"), "{}", out.dump());
    let mut written = Vec::new();
    for start in PATTERN_STARTS {
        for sector in start..start + 8 {
            written.extend(blk_pattern_sector(sector, seed));
        }
    }
    expect("blk1: fnv=", &format!("{:016x}", fnv1a64(&written)));
    // Disk 0: read-only, its bytes, size and serial.
    expect(
        "blk0: fnv=",
        &format!("{:016x}", fnv1a64(&ro_bytes[..64 << 10])),
    );
    expect("blk0: capacity=", &(ro_bytes.len() / 512).to_string());
    expect("blk0: id=", "nix-store");
    expect("blk0: ro=", "1");
    expect("blk0: write status=", "1");
    assert!(s.contains("blk: done"), "{}", out.dump());

    // On the host: disk 1 holds the pattern and nothing else changed; disk 0 is untouched.
    let after = std::fs::read(&rw).unwrap();
    let mut expected = rw_bytes.clone();
    for start in PATTERN_STARTS {
        for sector in start..start + 8 {
            let at = (sector * 512) as usize;
            expected[at..at + 512].copy_from_slice(&blk_pattern_sector(sector, seed));
        }
    }
    assert!(
        after == expected,
        "data.img does not hold exactly the guest's writes"
    );
    assert!(
        std::fs::read(&ro).unwrap() == ro_bytes,
        "the read-only disk changed"
    );
}
