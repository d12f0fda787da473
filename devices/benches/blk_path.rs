//! virtio-blk device-path throughput benchmark: no guest, no KVM, no vCPU.
//!
//! This program plays the guest driver (`common/blk.rs`). It lays out a 256-entry split
//! virtqueue by hand in a `GuestMemoryMmap`, activates a real `devices::virtio::block::Block`
//! on a file, and keeps `--qd` requests in flight through it:
//!
//! ```text
//! driver: descriptors + header -> avail ring -> fence -> avail idx -> kick eventfd write
//!   device worker thread: epoll wakes -> pops chains -> preadv/pwritev on the file
//!                         -> used ring -> interrupt (an eventfd write)
//! driver: blocking eventfd read -> reaps the used ring, checks every status byte -> resubmits
//! ```
//!
//! In the VMM the kick eventfd is a KVM ioeventfd (the guest's QueueNotify write) and the
//! interrupt eventfd an irqfd; here both are plain eventfds, so the cost of the VM exit per
//! kick is not included. EVENT_IDX is on by default, as Linux negotiates it.
//!
//! Usage (all options have defaults; `cargo bench` runs it on a temporary 64 MiB file):
//!
//! ```text
//! blk_path [--file PATH] [--workload randread|randwrite|seqread|seqwrite] [--bs BYTES]
//!          [--qd N] [--seconds S] [--warmup S] [--direct] [--event-idx on|off] [--verify]
//! ```
//!
//! Prints one JSON line: IOPS, MB/s (10^6 bytes), process CPU per request (getrusage of the
//! whole process: driver thread + device worker thread), kicks and interrupts per request,
//! and latency from submission to reaping.

#[path = "common/mod.rs"]
mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::exit;

use common::blk::{self, BlkGuest, Wait};
use common::blk_options::{BlkOptions, BLK_USAGE};
use common::{die, json_str, Args};
use devices::virtio::block::{Block, BlockConfig};

struct Options {
    file: Option<String>,
    direct: bool,
    blk: BlkOptions,
}

fn usage() -> String {
    format!(
        "usage: blk_path [--file PATH] [--direct] {BLK_USAGE}\n\
         Without --file, runs on a temporary 64 MiB file."
    )
}

fn parse_args() -> Options {
    let usage = usage();
    let mut o = Options {
        file: None,
        direct: false,
        blk: BlkOptions::default(),
    };
    let mut args = Args::from_env();
    while let Some(name) = args.next_arg() {
        if o.blk.parse_one(&mut args, &usage) {
            continue;
        }
        match name.as_str() {
            "--file" => o.file = Some(args.value(&usage)),
            "--direct" => o.direct = true,
            // `cargo bench` passes --bench to harness = false benches.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{usage}");
                exit(0)
            }
            _ => die(&format!("unknown argument {name}\n{usage}")),
        }
    }
    o.blk.check();
    o
}

fn open_disk(path: &str, direct: bool) -> File {
    let mut oo = OpenOptions::new();
    oo.read(true).write(true);
    if direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    oo.open(path)
        .unwrap_or_else(|e| die(&format!("cannot open {path}: {e}")))
}

fn main() {
    let o = parse_args();

    // Without --file (plain `cargo bench`), use a temporary 64 MiB file of non-zero data.
    let _tmp;
    let path = match &o.file {
        Some(p) => p.clone(),
        None => {
            let mut t = tempfile::NamedTempFile::new()
                .unwrap_or_else(|e| die(&format!("cannot create a temporary file: {e}")));
            let chunk = vec![0x5au8; 1 << 20];
            for _ in 0..64 {
                t.write_all(&chunk)
                    .unwrap_or_else(|e| die(&format!("cannot fill the temporary file: {e}")));
            }
            let p = t.path().to_string_lossy().into_owned();
            _tmp = t;
            p
        }
    };
    let file = open_disk(&path, o.direct);

    // The device, configured as the VMM would for a writable disk.
    let mut block = Block::new(BlockConfig {
        file,
        read_only: false,
        serial: Some("bench".into()),
        direct: o.direct,
        queue_size: blk::QUEUE_SIZE,
    })
    .unwrap_or_else(|e| die(&format!("cannot create the block device: {e}")));
    let mut guest = BlkGuest::new(&o.blk, false);
    let features = guest.negotiate(&block, o.blk.event_idx, true);
    guest.activate(&mut block, features);
    let size = blk::capacity(&block);

    let m = blk::run(&mut guest, &o.blk, size, Wait::Blocking, |_| {});
    // Stop the worker before reporting (it hands the disk back).
    drop(block);
    println!(
        "{{\"file\":{},\"direct\":{},{}}}",
        json_str(&path),
        o.direct,
        m.json_fields(&o.blk, guest.event_idx())
    );
}
