use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::{
    ActivateError, ActivatedQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

#[derive(Default)]
struct Recorded {
    acked: Option<u64>,
    activated: Vec<(u16, u16)>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

struct DummyDevice {
    rec: Arc<Mutex<Recorded>>,
    resettable: bool,
}

impl VirtioDevice for DummyDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 8]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 0b101
    }
    fn ack_features(&mut self, features: u64) {
        self.rec.lock().unwrap().acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.rec
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let mut rec = self.rec.lock().unwrap();
        rec.activated = queues.iter().map(|q| (q.index, q.queue.size())).collect();
        rec.interrupt = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.rec.lock().unwrap().resets += 1;
        self.resettable
    }
}

struct Fixture {
    transport: MmioTransport,
    rec: Arc<Mutex<Recorded>>,
    irq: EventFd,
}

fn fixture(resettable: bool) -> Fixture {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let rec = Arc::new(Mutex::new(Recorded::default()));
    let device = Arc::new(Mutex::new(DummyDevice {
        rec: rec.clone(),
        resettable,
    }));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let transport = MmioTransport::new(device, mem, irq.try_clone().unwrap()).unwrap();
    Fixture {
        transport,
        rec,
        irq,
    }
}

fn read(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write(t, reg::DRIVER_FEATURES_SEL, 0);
    write(t, reg::DRIVER_FEATURES, features as u32);
    write(t, reg::DRIVER_FEATURES_SEL, 1);
    write(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    write(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    read(t, reg::STATUS)
}

fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
    write(t, reg::QUEUE_SEL, index);
    write(t, reg::QUEUE_NUM, size);
    write(t, reg::QUEUE_DESC_LOW, base as u32);
    write(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
    write(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
    write(t, reg::QUEUE_DRIVER_HIGH, 0);
    write(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
    write(t, reg::QUEUE_DEVICE_HIGH, 0);
    write(t, reg::QUEUE_READY, 1);
}

const RUNNING: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

#[test]
fn identifies_itself_as_a_modern_device() {
    let mut f = fixture(true);
    let t = &mut f.transport;
    assert_eq!(read(t, reg::MAGIC), 0x7472_6976);
    assert_eq!(read(t, reg::VERSION), 2);
    assert_eq!(read(t, reg::DEVICE_ID), 2);
    write(t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(read(t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
    write(t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(read(t, reg::DEVICE_FEATURES), 0b101);
    write(t, reg::QUEUE_SEL, 1);
    assert_eq!(read(t, reg::QUEUE_NUM_MAX), 8);
    write(t, reg::QUEUE_SEL, 7);
    assert_eq!(read(t, reg::QUEUE_NUM_MAX), 0, "no such queue");
}

#[test]
fn features_ok_needs_a_subset_with_version_1() {
    let mut f = fixture(true);
    assert_eq!(
        negotiate(&mut f.transport, 0b1) & status::FEATURES_OK,
        0,
        "legacy driver"
    );
    write(&mut f.transport, reg::STATUS, 0);
    let unknown = VIRTIO_F_VERSION_1 | 0b10;
    assert_eq!(
        negotiate(&mut f.transport, unknown) & status::FEATURES_OK,
        0
    );
    write(&mut f.transport, reg::STATUS, 0);
    let good = VIRTIO_F_VERSION_1 | 0b100;
    assert_ne!(negotiate(&mut f.transport, good) & status::FEATURES_OK, 0);
    assert_eq!(f.rec.lock().unwrap().acked, Some(good));
}

#[test]
fn driver_ok_activates_the_ready_queues() {
    let mut f = fixture(true);
    let t = &mut f.transport;
    negotiate(t, VIRTIO_F_VERSION_1);
    setup_queue(t, 0, 16, 0x1_0000);
    write(t, reg::STATUS, RUNNING);
    assert_eq!(read(t, reg::STATUS), RUNNING);
    assert_eq!(f.rec.lock().unwrap().activated, vec![(0, 16)]);
    // Queue registers are frozen while running.
    write(t, reg::QUEUE_SEL, 0);
    write(t, reg::QUEUE_NUM, 4);
    write(t, reg::QUEUE_READY, 0);
    assert_eq!(read(t, reg::QUEUE_READY), 1);
}

#[test]
fn a_queue_outside_guest_memory_marks_the_device_needing_reset() {
    let mut f = fixture(true);
    let t = &mut f.transport;
    negotiate(t, VIRTIO_F_VERSION_1);
    setup_queue(t, 0, 16, 0xffff_0000_0000);
    write(t, reg::STATUS, RUNNING);
    assert_ne!(read(t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(f.rec.lock().unwrap().activated.is_empty());
    assert_eq!(f.irq.read().unwrap(), 1);
    assert_ne!(read(t, reg::INTERRUPT_STATUS) & INT_CONFIG_CHANGE, 0);
    assert_eq!(read(t, reg::CONFIG_GENERATION), 1);
}

#[test]
fn bad_queue_sizes_are_refused_at_driver_ok() {
    let mut f = fixture(true);
    let t = &mut f.transport;
    negotiate(t, VIRTIO_F_VERSION_1);
    setup_queue(t, 0, 12, 0x1_0000); // not a power of two
    write(t, reg::STATUS, RUNNING);
    assert_ne!(read(t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    setup_queue(t, 1, 0x1_0000, 0x1_0000); // does not fit 16 bits
}

#[test]
fn interrupts_set_status_until_acknowledged() {
    let mut f = fixture(true);
    let t = &mut f.transport;
    negotiate(t, VIRTIO_F_VERSION_1);
    setup_queue(t, 0, 16, 0x1_0000);
    write(t, reg::STATUS, RUNNING);
    let interrupt = f.rec.lock().unwrap().interrupt.clone().unwrap();
    interrupt.signal_used_queue(0).unwrap();
    assert_eq!(f.irq.read().unwrap(), 1);
    assert_eq!(read(t, reg::INTERRUPT_STATUS), INT_USED_RING);
    write(t, reg::INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(read(t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn notify_writes_reach_the_kick_eventfd() {
    let mut f = fixture(true);
    write(&mut f.transport, reg::QUEUE_NOTIFY, 1);
    assert_eq!(f.transport.queue_kicks()[1].read().unwrap(), 1);
    write(&mut f.transport, reg::QUEUE_NOTIFY, 99);
    assert!(f.transport.queue_kicks()[0].read().is_err());
}

#[test]
fn reset_stops_the_device_and_clears_state() {
    let mut f = fixture(true);
    let t = &mut f.transport;
    negotiate(t, VIRTIO_F_VERSION_1);
    setup_queue(t, 0, 16, 0x1_0000);
    write(t, reg::STATUS, RUNNING);
    write(t, reg::STATUS, 0);
    assert_eq!(f.rec.lock().unwrap().resets, 1);
    assert_eq!(read(t, reg::STATUS), 0);
    write(t, reg::QUEUE_SEL, 0);
    assert_eq!(read(t, reg::QUEUE_READY), 0);
    // And it can be brought up again.
    negotiate(t, VIRTIO_F_VERSION_1);
    setup_queue(t, 0, 8, 0x2_0000);
    write(t, reg::STATUS, RUNNING);
    assert_eq!(f.rec.lock().unwrap().activated, vec![(0, 8)]);
}

#[test]
fn a_device_that_cannot_reset_needs_reset() {
    let mut f = fixture(false);
    let t = &mut f.transport;
    negotiate(t, VIRTIO_F_VERSION_1);
    setup_queue(t, 0, 16, 0x1_0000);
    write(t, reg::STATUS, RUNNING);
    write(t, reg::STATUS, 0);
    assert_ne!(read(t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn config_space_is_forwarded_at_any_width() {
    let mut f = fixture(true);
    let t = &mut f.transport;
    let mut one = [0u8; 1];
    t.read(0x105, &mut one);
    assert_eq!(one, [5]);
    let mut eight = [0u8; 8];
    t.read(0x100, &mut eight);
    assert_eq!(eight, [0, 1, 2, 3, 4, 5, 6, 7]);
    t.write(0x102, &[9, 9]);
    assert_eq!(f.rec.lock().unwrap().config_writes, vec![(2, vec![9, 9])]);
}

#[test]
fn odd_register_accesses_are_harmless() {
    let mut f = fixture(true);
    let t = &mut f.transport;
    let mut two = [0xffu8; 2];
    t.read(reg::MAGIC, &mut two);
    assert_eq!(two, [0, 0]);
    t.read(reg::MAGIC + 1, &mut [0u8; 4]);
    t.write(reg::STATUS, &[1]);
    assert_eq!(read(t, reg::STATUS), 0);
    t.write(0xffc, &[1, 2, 3, 4, 5, 6, 7, 8]);
    // Status bits cannot be taken back without a reset.
    write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write(t, reg::STATUS, status::ACKNOWLEDGE);
    assert_eq!(read(t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
}

#[test]
fn a_direct_notifier_makes_every_status_read_report_used_buffers() {
    let mut f = fixture(true);
    let t = &mut f.transport;
    negotiate(t, VIRTIO_F_VERSION_1);
    setup_queue(t, 0, 16, 0x1_0000);
    write(t, reg::STATUS, RUNNING);
    assert_eq!(read(t, reg::INTERRUPT_STATUS), 0);
    let interrupt = f.rec.lock().unwrap().interrupt.clone().unwrap();
    let notifier = interrupt.direct_notifier().unwrap();
    // The backend writes the irqfd itself; the transport never hears of it.
    notifier.write(1).unwrap();
    assert_eq!(f.irq.read().unwrap(), 1);
    assert_eq!(read(t, reg::INTERRUPT_STATUS), INT_USED_RING);
    write(t, reg::INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(
        read(t, reg::INTERRUPT_STATUS),
        INT_USED_RING,
        "sticky while direct"
    );
    write(t, reg::STATUS, 0);
    assert_eq!(read(t, reg::INTERRUPT_STATUS), 0, "reset ends direct mode");
}
