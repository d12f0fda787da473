//! The device around the request engine: activation, the worker thread, identity and config.

use super::*;

/// Records interrupts and lets a test wait for them.
#[derive(Default)]
struct MockInterrupt {
    count: Mutex<u32>,
    cond: Condvar,
}

impl MockInterrupt {
    fn wait_for(&self, n: u32) -> bool {
        let guard = self.count.lock().unwrap();
        let (guard, _) = self
            .cond
            .wait_timeout_while(guard, Duration::from_secs(10), |c| *c < n)
            .unwrap();
        *guard >= n
    }

    fn count(&self) -> u32 {
        *self.count.lock().unwrap()
    }
}

impl VirtioInterrupt for MockInterrupt {
    fn signal_used_queue(&self, queue_index: u16) -> std::io::Result<()> {
        assert_eq!(queue_index, 0);
        *self.count.lock().unwrap() += 1;
        self.cond.notify_all();
        Ok(())
    }

    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn block_for(tmp: &tempfile::NamedTempFile) -> Block {
    Block::new(BlockConfig {
        file: tmp.reopen().unwrap(),
        read_only: false,
        serial: Some("worker\0disk".into()),
        direct: false,
        queue_size: QUEUE_SIZE,
    })
    .unwrap()
}

fn activate(
    block: &mut Block,
    mem: &GuestMemoryMmap,
    drv: &Driver,
    irq: &Arc<MockInterrupt>,
) -> EventFd {
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let queue = ActivatedQueue {
        index: 0,
        queue: drv.queue(),
        kick: kick.try_clone().unwrap(),
    };
    block
        .activate(mem.clone(), irq.clone(), vec![queue])
        .unwrap();
    kick
}

#[test]
fn worker_serves_kicks_and_stops_on_reset() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut block = block_for(&tmp);
    block.ack_features(block.features());
    let irq = Arc::new(MockInterrupt::default());
    let kick = activate(&mut block, &mem, &drv, &irq);

    let data = pattern(42, 1024);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    drv.set_used_event(0);
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_OUT, 20, &[r(DATA, 1024)]);
    kick.write(1).unwrap();
    assert!(irq.wait_for(1), "no interrupt after the kick");
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used(0), (0, 1));
    assert_eq!(status(&mem, st), OK);
    assert_eq!(&file_contents(&tmp)[20 * 512..22 * 512], &data[..]);
    assert_eq!(block.counters().writes.load(Ordering::Relaxed), 1);

    drv.set_used_event(1);
    let st = submit(&mut drv, 1, VIRTIO_BLK_T_IN, 20, &[w(DATA + 0x1000, 1024)]);
    kick.write(1).unwrap();
    assert!(irq.wait_for(2));
    assert_eq!(status(&mem, st), OK);
    assert_eq!(read_guest(&mem, DATA + 0x1000, 1024), data);

    // Reset joins the worker: later kicks are not served.
    assert!(block.reset());
    let st = submit(&mut drv, 2, VIRTIO_BLK_T_FLUSH, 0, &[]);
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(status(&mem, st), UNTOUCHED);
    assert_eq!(drv.used_idx(), 2);
    assert_eq!(irq.count(), 2);
    assert!(block.reset(), "reset of an inactive device");

    // The disk survives the reset: a fresh queue works again.
    let mut drv2 = Driver::at(&mem, GuestAddress(0x8000));
    block.ack_features(block.features());
    let kick = activate(&mut block, &mem, &drv2, &irq);
    let st = submit(&mut drv2, 3, VIRTIO_BLK_T_FLUSH, 0, &[]);
    kick.write(1).unwrap();
    assert!(irq.wait_for(3));
    assert_eq!(status(&mem, st), OK);
    drop(block); // Stops the worker too.
}

#[test]
fn worker_serves_requests_made_before_the_first_kick() {
    let tmp = image();
    let mem = guest_memory();
    let mut drv = Driver::new(&mem);
    let mut block = block_for(&tmp);
    block.ack_features(block.features());
    let st = submit(&mut drv, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    let irq = Arc::new(MockInterrupt::default());
    let _kick = activate(&mut block, &mem, &drv, &irq);
    assert!(irq.wait_for(1));
    assert_eq!(status(&mem, st), OK);
    assert!(block.reset());
}

#[test]
fn activation_errors() {
    let tmp = image();
    let mem = guest_memory();
    let drv = Driver::new(&mem);
    let mut block = block_for(&tmp);
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(MockInterrupt::default());
    assert!(matches!(
        block.activate(mem.clone(), irq.clone(), vec![]),
        Err(ActivateError::QueueCount { got: 0, want: 1 })
    ));
    let mut not_ready = drv.queue();
    not_ready.set_ready(false);
    let queue = ActivatedQueue {
        index: 0,
        queue: not_ready,
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    assert!(block
        .activate(mem.clone(), irq.clone(), vec![queue])
        .is_err());

    let irq2 = Arc::new(MockInterrupt::default());
    let _kick = activate(&mut block, &mem, &drv, &irq2);
    let queue = ActivatedQueue {
        index: 0,
        queue: drv.queue(),
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    assert!(matches!(
        block.activate(mem.clone(), irq, vec![queue]),
        Err(ActivateError::Other(_))
    ));
    assert!(block.reset());
}

#[test]
fn device_identity_and_config() {
    let tmp = image();
    let block = block_for(&tmp);
    assert_eq!(block.device_type(), crate::virtio::TYPE_BLOCK);
    assert_eq!(block.queue_max_sizes(), vec![QUEUE_SIZE]);
    assert_eq!(
        block.name, "blk-workerdisk",
        "NUL removed from the thread name"
    );

    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
    let mut seg_max = [0u8; 4];
    block.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), u32::from(QUEUE_SIZE) - 2);
    // Reads straddling or past the end are zero filled.
    let mut tail = [0xffu8; 8];
    block.read_config(CONFIG_SPACE_SIZE as u64 - 2, &mut tail);
    assert_eq!(tail[2..], [0u8; 6]);
    let mut far = [0xffu8; 4];
    block.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);

    let mut b2 = block_for(&tmp);
    b2.ack_features(VIRTIO_BLK_F_FLUSH | (1 << 63));
    assert_eq!(
        b2.acked_features, VIRTIO_BLK_F_FLUSH,
        "unknown bits ignored"
    );
}

#[test]
fn block_new_validates_its_config() {
    let tmp = image();
    for queue_size in [0, 2, 3, 100, 512] {
        let r = Block::new(BlockConfig {
            file: tmp.reopen().unwrap(),
            read_only: false,
            serial: None,
            direct: false,
            queue_size,
        });
        assert!(matches!(r, Err(BlockError::QueueSize(q)) if q == queue_size));
    }
    let r = Block::new(BlockConfig {
        file: File::open(tmp.path()).unwrap(),
        read_only: false,
        serial: None,
        direct: false,
        queue_size: 256,
    });
    assert!(matches!(r, Err(BlockError::Disk(DiskError::NotWritable))));
    let r = Block::new(BlockConfig {
        file: tmp.reopen().unwrap(),
        read_only: false,
        serial: Some("x".repeat(21)),
        direct: false,
        queue_size: 256,
    });
    assert!(matches!(r, Err(BlockError::SerialTooLong(21))));
}
