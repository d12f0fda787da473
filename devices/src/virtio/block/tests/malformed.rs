//! Requests a buggy or hostile driver makes, host I/O errors, and notification suppression.

use super::*;

#[test]
fn malformed_requests_fail_with_ioerr() {
    let out = HDR;
    let cases: Vec<(&str, Vec<D>)> = vec![
        (
            "data outside guest memory",
            vec![r(out, 16), r(OUTSIDE, 512), w(STATUS, 1)],
        ),
        (
            "data running off the end of memory",
            vec![r(out, 16), r(2 * REGION_SIZE - 256, 512), w(STATUS, 1)],
        ),
        (
            "address + length overflows",
            vec![r(out, 16), r(u64::MAX - 100, 512), w(STATUS, 1)],
        ),
        (
            "OUT data device-writable",
            vec![r(out, 16), w(DATA, 512), w(STATUS, 1)],
        ),
        (
            "OUT length not whole sectors",
            vec![r(out, 16), r(DATA, 100), w(STATUS, 1)],
        ),
        ("short header", vec![r(out, 8), w(STATUS, 1)]),
        (
            "header outside guest memory",
            vec![r(OUTSIDE, 16), w(STATUS, 1)],
        ),
    ];
    for (name, descs) in cases {
        eprintln!("case: {name}");
        expect_ioerr_with_header(&descs, VIRTIO_BLK_T_OUT, 0);
    }
    let cases: Vec<(&str, u64, Vec<D>)> = vec![
        (
            "IN data device-readable",
            0,
            vec![r(DATA, 512), w(STATUS, 1)],
        ),
        (
            "IN length not whole sectors",
            0,
            vec![w(DATA, 700), w(STATUS, 1)],
        ),
        (
            "IN past the end",
            DISK_SECTORS - 1,
            vec![w(DATA, 1024), w(STATUS, 1)],
        ),
        (
            "IN sector overflow",
            u64::MAX,
            vec![w(DATA, 512), w(STATUS, 1)],
        ),
        (
            "IN sector far past the end",
            1 << 60,
            vec![w(DATA, 512), w(STATUS, 1)],
        ),
        (
            "IN data outside guest memory",
            0,
            vec![w(OUTSIDE, 512), w(STATUS, 1)],
        ),
    ];
    for (name, sector, mut descs) in cases {
        eprintln!("case: {name}");
        descs.insert(0, r(HDR, 16));
        expect_ioerr_with_header(&descs, VIRTIO_BLK_T_IN, sector);
    }
}

/// Submits `descs` as they are, with a header of `request_type` at HDR, and checks the request
/// failed with IOERR without touching the disk.
fn expect_ioerr_with_header(descs: &[D], request_type: u32, sector: u64) {
    let tmp = image();
    let before = file_contents(&tmp);
    let mem = guest_memory();
    write_header(&mem, 0, request_type, sector);
    let st = descs.last().unwrap().addr;
    mem.write_obj(UNTOUCHED, GuestAddress(st)).unwrap();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    drv.submit(descs);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used(0).1, 1);
    assert_eq!(file_contents(&tmp), before, "nothing written");
    assert_eq!(h.counters().errors.load(Ordering::Relaxed), 1);
}

/// Chains that cannot carry a status come back with used length 0, status untouched.
fn expect_dropped(setup: impl FnOnce(&mut Driver)) {
    let tmp = image();
    let before = file_contents(&tmp);
    let mem = guest_memory();
    write_header(&mem, 0, VIRTIO_BLK_T_OUT, 0);
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    setup(&mut drv);
    process(&mut h, &mem, &mut q);
    assert_eq!(drv.used_idx(), 1, "the chain is returned to the driver");
    assert_eq!(drv.used(0).1, 0);
    assert_eq!(status(&mem, STATUS), UNTOUCHED);
    assert_eq!(file_contents(&tmp), before);
    assert_eq!(h.counters().errors.load(Ordering::Relaxed), 1);
}

#[test]
fn broken_chains_are_dropped() {
    eprintln!("case: no status descriptor");
    expect_dropped(|d| {
        d.submit(&[r(HDR, 16), r(DATA, 512)]);
    });
    eprintln!("case: status descriptor not writable");
    expect_dropped(|d| {
        d.submit(&[r(HDR, 16), r(DATA, 512), r(STATUS, 1)]);
    });
    eprintln!("case: readable after writable");
    expect_dropped(|d| {
        d.submit(&[r(HDR, 16), w(STATUS, 1), r(DATA, 512)]);
    });
    eprintln!("case: status outside guest memory");
    expect_dropped(|d| {
        d.submit(&[r(HDR, 16), r(DATA, 512), w(OUTSIDE, 1)]);
    });
    eprintln!("case: descriptor loop");
    expect_dropped(|d| {
        d.store(0, HDR, 16, VRING_DESC_F_NEXT, 1);
        d.store(1, DATA, 512, VRING_DESC_F_NEXT, 0);
        d.make_available(0);
    });
    eprintln!("case: next index beyond the table");
    expect_dropped(|d| {
        d.store(0, HDR, 16, VRING_DESC_F_NEXT, 200);
        d.make_available(0);
    });
    eprintln!("case: chain longer than 4 GiB");
    expect_dropped(|d| {
        d.submit(&[r(HDR, 16), r(DATA, u32::MAX - 8), w(STATUS, 1)]);
    });
    eprintln!("case: indirect chain longer than the queue");
    expect_dropped(|d| {
        let mut descs = vec![r(HDR, 16)];
        descs.extend((0..QUEUE_SIZE).map(|i| r(DATA + 512 * u64::from(i), 512)));
        descs.push(w(STATUS, 1));
        d.submit_indirect(&descs);
    });
    eprintln!("case: indirect table outside guest memory");
    expect_dropped(|d| {
        d.store(0, OUTSIDE, 48, VRING_DESC_F_INDIRECT, 0);
        d.make_available(0);
    });
    eprintln!("case: indirect table length not whole descriptors");
    expect_dropped(|d| {
        d.submit_indirect(&[r(HDR, 16), w(STATUS, 1)]);
        d.store(0, INDIRECT, 20, VRING_DESC_F_INDIRECT, 0);
    });
    eprintln!("case: nested indirect table");
    expect_dropped(|d| {
        d.submit_indirect(&[r(HDR, 16), w(STATUS, 1)]);
        let nested = SplitDescriptor::new(INDIRECT, 32, VRING_DESC_F_INDIRECT as u16, 0);
        d.mem.write_obj(nested, GuestAddress(INDIRECT)).unwrap();
    });
    eprintln!("case: empty indirect table");
    expect_dropped(|d| {
        d.store(0, INDIRECT, 0, VRING_DESC_F_INDIRECT, 0);
        d.make_available(0);
    });
}

#[test]
fn bogus_available_ring_does_not_panic() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    // A head index beyond the queue: skipped, and the next chain is still served.
    drv.make_available(QUEUE_SIZE + 3);
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_IN, 0, &[w(DATA, 512)]);
    assert!(process(&mut h, &mem, &mut q));
    assert_eq!(status(&mem, st), OK);
    assert_eq!(drv.used_idx(), 1);

    // An available index running more than a queue ahead: the queue is unusable.
    drv.set_avail_idx(drv.avail.wrapping_add(QUEUE_SIZE + 1));
    assert!(matches!(
        h.process_queue(&mem, &mut q),
        Err(BlockError::Queue(_))
    ));
}

#[test]
fn host_io_errors_become_ioerr() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);
    // The image shrinks behind the device's back: reads past the new end hit EOF.
    tmp.as_file().set_len(512).unwrap();
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_IN, 8, &[w(DATA, 512)]);
    process(&mut h, &mem, &mut q);
    assert_eq!(status(&mem, st), IOERR);
    assert_eq!(drv.used(0).1, 1);
}

#[test]
fn event_idx_suppresses_notifications() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    q.set_event_idx(true);
    let mut h = handler_for(&tmp, false);

    // The driver wants an interrupt once used index passes 0: three at once give one.
    drv.set_used_event(0);
    for slot in 0..3 {
        submit(&mut drv, slot, VIRTIO_BLK_T_IN, 0, &[w(DATA, 512)]);
    }
    assert!(process(&mut h, &mem, &mut q));
    assert_eq!(drv.used_idx(), 3);

    // Still asking about index 0: no interrupt for the fourth.
    submit(&mut drv, 3, VIRTIO_BLK_T_IN, 0, &[w(DATA, 512)]);
    assert!(!process(&mut h, &mem, &mut q));
    assert_eq!(drv.used_idx(), 4);

    // Now the driver asks to hear about the fifth.
    drv.set_used_event(4);
    submit(&mut drv, 4, VIRTIO_BLK_T_IN, 0, &[w(DATA, 512)]);
    assert!(process(&mut h, &mem, &mut q));

    // Nothing processed, nothing to say.
    assert!(!process(&mut h, &mem, &mut q));
}

#[test]
fn one_call_handles_at_most_a_queue_worth() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut q = drv.queue();
    let mut h = handler_for(&tmp, false);

    // A driver that makes the flush available again each time it completes.
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    let (mem2, avail_ring) = (mem.clone(), drv.avail_ring);
    h.disk_mut().sync_hook = Some(Box::new(move || {
        let idx: u16 = mem2.read_obj(GuestAddress(avail_ring + 2)).unwrap();
        let slot = u64::from(idx % QUEUE_SIZE);
        mem2.write_obj(0u16, GuestAddress(avail_ring + 4 + 2 * slot))
            .unwrap();
        mem2.write_obj(idx.wrapping_add(1), GuestAddress(avail_ring + 2))
            .unwrap();
    }));
    process(&mut h, &mem, &mut q);
    assert_eq!(
        drv.used_idx(),
        QUEUE_SIZE,
        "the call returned after a queue's worth"
    );
    assert_eq!(status(&mem, st), OK);

    h.disk_mut().sync_hook = None;
    process(&mut h, &mem, &mut q);
    assert_eq!(drv.used_idx(), QUEUE_SIZE + 1);
}
