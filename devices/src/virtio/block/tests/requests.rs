//! Well-formed requests: reads, writes, flushes, IDs, discard, write-zeroes, read-only disks.

use super::*;

#[test]
fn write_then_read_back() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    let data = pattern(1, 1024);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_OUT, 3, &[r(DATA, 1024)]);
    assert!(process(&mut h, &mem, &mut q));
    assert_eq!(status(&mem, st), OK);
    assert_eq!(drv.used(0), (0, 1), "OUT writes only the status byte");
    assert_eq!(&file_contents(&tmp)[3 * 512..5 * 512], &data[..]);

    let st = submit(&mut drv, 1, VIRTIO_BLK_T_IN, 3, &[w(DATA + 0x10000, 1024)]);
    assert!(process(&mut h, &mem, &mut q));
    assert_eq!(status(&mem, st), OK);
    assert_eq!(
        drv.used(1).1,
        1025,
        "IN writes the data and the status byte"
    );
    assert_eq!(read_guest(&mem, DATA + 0x10000, 1024), data);

    let c = h.counters();
    assert_eq!(c.writes.load(Ordering::Relaxed), 1);
    assert_eq!(c.reads.load(Ordering::Relaxed), 1);
    assert_eq!(c.write_bytes.load(Ordering::Relaxed), 1024);
    assert_eq!(c.read_bytes.load(Ordering::Relaxed), 1024);
    assert_eq!(c.errors.load(Ordering::Relaxed), 0);
}

#[test]
fn multi_segment_io_across_regions() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    // The second segment straddles the boundary between the two memory regions.
    let straddle = REGION_SIZE - 300;
    let segs = [(DATA, 512u32), (straddle, 1024), (DATA + 0x8000, 1536)];
    let data = pattern(9, 3072);
    let mut off = 0;
    for (addr, len) in segs {
        mem.write_slice(&data[off..off + len as usize], GuestAddress(addr))
            .unwrap();
        off += len as usize;
    }
    let descs: Vec<D> = segs.iter().map(|&(a, l)| r(a, l)).collect();
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_OUT, 10, &descs);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(&file_contents(&tmp)[10 * 512..16 * 512], &data[..]);

    // Read it back into four differently sized buffers, one straddling again.
    let bufs = [
        (DATA + 0x20000, 100u32),
        (straddle, 1948),
        (DATA + 0x30000, 1000),
        (DATA + 0x40000, 24),
    ];
    let descs: Vec<D> = bufs.iter().map(|&(a, l)| w(a, l)).collect();
    let st = submit(&mut drv, 1, VIRTIO_BLK_T_IN, 10, &descs);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(drv.used(1).1, 3073);
    let mut back = Vec::new();
    for (addr, len) in bufs {
        back.extend(read_guest(&mem, addr, len as usize));
    }
    assert_eq!(back, data);
}

#[test]
fn header_and_status_may_share_descriptors_with_data() {
    // virtio 1.x has no fixed layout: header+data in one buffer, data+status in another.
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    let data = pattern(3, 512);
    write_header(&mem, 0, VIRTIO_BLK_T_OUT, 1);
    mem.write_slice(&data, GuestAddress(HDR + 16)).unwrap();
    let st = status_at(&mem, 0);
    drv.submit(&[r(HDR, 16 + 512), w(st, 1)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(&file_contents(&tmp)[512..1024], &data[..]);

    write_header(&mem, 1, VIRTIO_BLK_T_IN, 1);
    mem.write_obj(UNTOUCHED, GuestAddress(DATA + 512)).unwrap();
    drv.submit(&[r(HDR + 16, 16), w(DATA, 513)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, DATA + 512), OK);
    assert_eq!(read_guest(&mem, DATA, 512), data);
}

#[test]
fn indirect_chain() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    let hdr = write_header(&mem, 0, VIRTIO_BLK_T_IN, 0);
    let st = status_at(&mem, 0);
    drv.submit_indirect(&[r(hdr, 16), w(DATA, 512), w(DATA + 4096, 512), w(st, 1)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    let disk = file_contents(&tmp);
    assert_eq!(read_guest(&mem, DATA, 512), &disk[..512]);
    assert_eq!(read_guest(&mem, DATA + 4096, 512), &disk[512..1024]);
}

#[test]
fn flush_syncs_before_writing_the_status() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    // The hook runs right after fdatasync returns: the status must still be untouched then.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (seen2, mem2) = (seen.clone(), mem.clone());
    let st_addr = STATUS;
    h.disk_mut().sync_hook = Some(Box::new(move || {
        let s: u8 = mem2.read_obj(GuestAddress(st_addr)).unwrap();
        seen2.lock().unwrap().push(s);
    }));
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(st, st_addr);
    process(&mut h, &mem, &mut q);
    assert_eq!(*seen.lock().unwrap(), vec![UNTOUCHED]);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(h.counters().flushes.load(Ordering::Relaxed), 1);
}

#[test]
fn writethrough_syncs_every_write() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    let syncs = Arc::new(Mutex::new(0));
    let syncs2 = syncs.clone();
    h.disk_mut().sync_hook = Some(Box::new(move || *syncs2.lock().unwrap() += 1));

    submit(&mut drv, 0, VIRTIO_BLK_T_OUT, 0, &[r(DATA, 512)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(*syncs.lock().unwrap(), 0, "write-back by default");

    h.set_writethrough(true);
    let st = submit(&mut drv, 1, VIRTIO_BLK_T_OUT, 0, &[r(DATA, 512)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(*syncs.lock().unwrap(), 1);
}

#[test]
fn get_id() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    mem.write_slice(&[0xffu8; 20], GuestAddress(DATA)).unwrap();
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_GET_ID, 0, &[w(DATA, 20)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    let mut expected = [0u8; 20];
    expected[..11].copy_from_slice(b"serial-0123");
    assert_eq!(read_guest(&mem, DATA, 20), expected);
    assert_eq!(drv.used(0).1, 21);

    // A short buffer gets a truncated ID.
    mem.write_slice(&[0xffu8; 8], GuestAddress(DATA + 64))
        .unwrap();
    let st = submit(&mut drv, 1, VIRTIO_BLK_T_GET_ID, 0, &[w(DATA + 64, 4)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(read_guest(&mem, DATA + 64, 8), b"seri\xff\xff\xff\xff");
    assert_eq!(drv.used(1).1, 5);

    assert!(matches!(
        RequestHandler::new(
            "x".into(),
            Disk::new(tmp.reopen().unwrap(), true, false).unwrap(),
            false,
            Some("a-serial-longer-than-20")
        ),
        Err(BlockError::SerialTooLong(23))
    ));
}

/// Sends one DISCARD / WRITE_ZEROES segment.
fn submit_range(
    drv: &mut Driver,
    slot: u64,
    kind: u32,
    sector: u64,
    count: u32,
    flags: u32,
) -> u64 {
    let seg_addr = DATA + 0x1000 * slot;
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&count.to_le_bytes());
    seg[12..16].copy_from_slice(&flags.to_le_bytes());
    drv.mem.write_slice(&seg, GuestAddress(seg_addr)).unwrap();
    submit(drv, slot, kind, 0, &[r(seg_addr, 16)])
}

#[test]
fn discard_punches_a_hole() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    if !h.disk().supports_discard() {
        eprintln!("skipped: the temp directory's filesystem cannot punch holes");
        return;
    }
    let blocks_before = tmp.as_file().metadata().unwrap().blocks();
    let st = submit_range(&mut drv, 0, VIRTIO_BLK_T_DISCARD, 64, 128, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    let blocks_after = tmp.as_file().metadata().unwrap().blocks();
    assert!(
        blocks_after < blocks_before,
        "{blocks_after} >= {blocks_before}"
    );
    let disk = file_contents(&tmp);
    assert!(disk[64 * 512..192 * 512].iter().all(|&b| b == 0));
    assert_eq!(disk[..64 * 512], pattern(0x5a, 64 * 512)[..]);
    assert_eq!(disk.len() as u64, DISK_SECTORS * 512, "size kept");

    // Past the end, too big, flags, several segments.
    let st = submit_range(&mut drv, 1, VIRTIO_BLK_T_DISCARD, DISK_SECTORS - 1, 2, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    let st = submit_range(
        &mut drv,
        2,
        VIRTIO_BLK_T_DISCARD,
        0,
        MAX_DISCARD_SECTORS + 1,
        0,
    );
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    let st = submit_range(&mut drv, 3, VIRTIO_BLK_T_DISCARD, 0, 1, 1);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), UNSUPP, "UNMAP is not a discard flag");
    let st = submit(&mut drv, 4, VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 32)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), UNSUPP, "one segment at most");
    let st = submit(&mut drv, 5, VIRTIO_BLK_T_DISCARD, 0, &[r(DATA, 10)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR, "partial segment");
}

#[test]
fn discard_unsupported_without_hole_punching() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    h.disk_mut().set_discard(false);
    let st = submit_range(&mut drv, 0, VIRTIO_BLK_T_DISCARD, 0, 8, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), UNSUPP);
    assert_eq!(
        file_contents(&tmp),
        pattern(0x5a, (DISK_SECTORS * 512) as usize)
    );
}

#[test]
fn write_zeroes_all_paths() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    let zeroed = |tmp: &tempfile::NamedTempFile, from: u64, count: u64| {
        let d = file_contents(tmp);
        d[(from * 512) as usize..((from + count) * 512) as usize]
            .iter()
            .all(|&b| b == 0)
    };

    // ZERO_RANGE (or the fallback when the filesystem lacks it).
    let st = submit_range(&mut drv, 0, VIRTIO_BLK_T_WRITE_ZEROES, 1, 3, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert!(zeroed(&tmp, 1, 3));
    assert!(!zeroed(&tmp, 0, 1) && !zeroed(&tmp, 4, 1));

    // UNMAP: punch a hole when possible.
    let st = submit_range(&mut drv, 1, VIRTIO_BLK_T_WRITE_ZEROES, 16, 16, 1);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert!(zeroed(&tmp, 16, 16));

    // Writing zero buffers.
    h.disk_mut().set_zero_range(false);
    h.disk_mut().set_discard(false);
    let st = submit_range(&mut drv, 2, VIRTIO_BLK_T_WRITE_ZEROES, 100, 50, 1);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert!(zeroed(&tmp, 100, 50));
    assert!(!zeroed(&tmp, 99, 1) && !zeroed(&tmp, 150, 1));

    let st = submit_range(&mut drv, 3, VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 2);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), UNSUPP, "unknown flag");
    let st = submit_range(&mut drv, 4, VIRTIO_BLK_T_WRITE_ZEROES, u64::MAX, 2, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR, "sector overflow");
}

#[test]
fn read_only_disk() {
    let tmp = image();
    let before = file_contents(&tmp);
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, true);

    let st = submit(&mut drv, 0, VIRTIO_BLK_T_OUT, 0, &[r(DATA, 512)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    let st = submit_range(&mut drv, 1, VIRTIO_BLK_T_DISCARD, 0, 8, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    let st = submit_range(&mut drv, 2, VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    assert_eq!(file_contents(&tmp), before);

    // Reads and flushes still work.
    let st = submit(&mut drv, 3, VIRTIO_BLK_T_IN, 0, &[w(DATA, 512)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    let st = submit(&mut drv, 4, VIRTIO_BLK_T_FLUSH, 0, &[]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), OK);
    assert_eq!(h.counters().errors.load(Ordering::Relaxed), 3);

    let f = config::device_features(h.disk(), true);
    assert_ne!(f & VIRTIO_BLK_F_RO, 0);
    assert_eq!(f & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES), 0);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    for (slot, t) in [(0, 2u32), (1, 14), (2, 0xdead_beef)] {
        let st = submit(&mut drv, slot, t, 0, &[w(DATA, 512)]);
        process(&mut h, &mem, &mut q);
        assert_eq!(status(&mem, st), UNSUPP, "type {t}");
        assert_eq!(drv.used(slot as u16).1, 1);
    }
}
