//! virtio-net over a tap as a vhost-user backend: the device model's [`RxPath`] and
//! [`TxPath`] move the frames, on the daemon's vring worker thread, which also polls the tap.
//!
//! The tap is registered in the daemon's epoll (event [`TAP_EVENT`]) and watched for input
//! only while the guest has receive buffers: when they run out, input interest is dropped
//! (frames wait in the tap's kernel queue, none is lost) and receive resumes on the next
//! receive-queue kick. Output interest is only set while the tap refuses frames. So the worker
//! sleeps whenever it cannot make progress, like the in-VMM device's worker.
//!
//! QEMU (7.2)'s `-netdev vhost-user` sends SET_VRING_ENABLE while it realizes the NIC, before
//! SET_FEATURES, which the vhost crate (0.18) refuses (closing the connection), and without
//! VHOST_USER_F_PROTOCOL_FEATURES QEMU refuses to start the rings instead. So this device's
//! frontends go through the [`relay`](super::relay), which applies the early enable after
//! SET_FEATURES.
//!
//! System calls of the vring worker thread (for its seccomp filter), besides the daemon's own
//! (`epoll_wait`, `read` of kick eventfds): `readv`/`writev` on the tap, `epoll_ctl` on the
//! daemon's epoll (tap interest), `write` to the call eventfds, `write` to stderr for log
//! lines, and `futex`, `mmap`/`munmap`/`madvise`/`brk` from the allocator. The protocol thread
//! additionally calls `ioctl(TUNSETOFFLOAD)` on the tap when the driver's features arrive.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringEpollHandler, VringT};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::{
    config_slice, BackendError, BackendMemory, BackendVring, Daemon, Device, Exclusive, ExitEvent,
    QueueWarnings, Shared, MAX_QUEUE_SIZE,
};
use crate::virtio::net::{
    config_space, request_notification, tap_offloads, NetCounters, NetError, RxPath, RxStop, Tap,
    TxPath, TxStop, BASE_FEATURES, CONFIG_LEN,
};
use crate::virtio::VIRTIO_F_VERSION_1;

const KIND: &str = "net";
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
/// The tap's event id: the daemon reserves 0..NUM_QUEUES for the queues and NUM_QUEUES for
/// its exit event.
pub const TAP_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// The daemon's epoll handler, as the backend reaches it.
type EpollHandler = VringEpollHandler<Shared<NetBackend>>;

/// A tap, with what the driver sees of it; it outlives the connections.
pub struct NetDevice {
    tap: Tap,
    features: u64,
    config: [u8; CONFIG_LEN],
    counters: Arc<NetCounters>,
    #[cfg(test)]
    pub(crate) wakeups: Arc<std::sync::atomic::AtomicU64>,
}

impl NetDevice {
    /// `mac`: the address the guest uses; without one the guest picks its own (the device
    /// does not offer VIRTIO_NET_F_MAC).
    pub fn new(tap: Tap, mac: Option<[u8; 6]>) -> Result<NetDevice, BackendError> {
        let mut features = BASE_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        match mac {
            Some(m) if m[0] & 1 != 0 => {
                let text: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
                return Err(BackendError::MulticastMac(text.join(":")));
            }
            Some(_) => {}
            None => features &= !(1 << VIRTIO_NET_F_MAC),
        }
        Ok(NetDevice {
            tap,
            features,
            config: config_space(&mac.unwrap_or_default(), None),
            counters: Arc::new(NetCounters::default()),
            #[cfg(test)]
            wakeups: Arc::default(),
        })
    }

    /// Traffic statistics, across all connections.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// The features offered to the frontend (virtio and vhost-user).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The tap's interface name.
    pub fn if_name(&self) -> String {
        self.tap.if_name()
    }
}

impl Device for NetDevice {
    type Backend = NetBackend;
    const KIND: &'static str = KIND;
    // QEMU enables the rings before it sets the features.
    const RELAY: bool = true;

    fn into_backend(self, exit: ExitEvent) -> NetBackend {
        // A new driver starts without offloads, like a freshly opened tap.
        if let Err(e) = self.tap.set_offload(0) {
            log::warn!("vhost-user-net: {e}");
        }
        let rx = RxPath::new(false, self.counters.clone());
        let tx = TxPath::new(self.counters.clone());
        NetBackend {
            device: self,
            mem: BackendMemory::new(GuestMemoryMmap::new()),
            exit,
            epoll: Weak::new(),
            tap_events: None,
            tap_dead: false,
            rx: Exclusive(rx),
            tx: Exclusive(tx),
            rx_starved: true,
            rx_more: false,
            rx_notify: true,
            tx_blocked: false,
            tx_more: false,
            warnings: QueueWarnings::default(),
        }
    }

    fn from_backend(backend: NetBackend) -> (NetDevice, ExitEvent) {
        (backend.device, backend.exit)
    }

    fn attach(daemon: &Daemon<NetBackend>, backend: &Shared<NetBackend>) -> io::Result<()> {
        let handler = daemon
            .get_epoll_handlers()
            .into_iter()
            .next()
            .ok_or_else(|| io::Error::other("the daemon has no vring worker"))?;
        let mut b = backend
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // No interest until the receive queue has buffers; errors and hang-ups still report.
        handler.register_listener(
            b.device.tap.as_raw_fd(),
            EventSet::empty(),
            u64::from(TAP_EVENT),
        )?;
        b.tap_events = Some(EventSet::empty());
        // A weak reference: the handler holds the backend, and must not be kept alive by it.
        b.epoll = Arc::downgrade(&handler);
        Ok(())
    }
}

/// One frontend's connection to a [`NetDevice`].
pub struct NetBackend {
    device: NetDevice,
    mem: BackendMemory,
    exit: ExitEvent,
    epoll: Weak<EpollHandler>,
    /// The tap's current interest in the daemon's epoll; None when not registered.
    tap_events: Option<EventSet>,
    /// The tap reported an error or hang-up and was removed from the epoll set.
    tap_dead: bool,
    rx: Exclusive<RxPath>,
    tx: Exclusive<TxPath>,
    /// The guest has no receive buffers (or no receive queue): the tap is not polled, a
    /// receive-queue kick resumes.
    rx_starved: bool,
    /// The receive budget ran out with frames left.
    rx_more: bool,
    /// Receive-queue notifications (kicks) are enabled.
    rx_notify: bool,
    /// The tap refused a frame: transmit resumes when it is writable.
    tx_blocked: bool,
    /// The transmit budget ran out with chains left.
    tx_more: bool,
    warnings: QueueWarnings,
}

/// A vring's queue if the ring is started and enabled.
fn live_queue(state: &mut vhost_user_backend::VringState<BackendMemory>) -> Option<&mut Queue> {
    (state.is_enabled() && state.get_queue().ready()).then(|| state.get_queue_mut())
}

impl NetBackend {
    /// Runs both paths until neither has work left that it can do now, alternating between
    /// them one budget at a time.
    fn process(&mut self, vrings: &[BackendVring], mut do_rx: bool, mut do_tx: bool) {
        let (Some(rx), Some(tx)) = (
            vrings.get(usize::from(RX_QUEUE)),
            vrings.get(usize::from(TX_QUEUE)),
        ) else {
            return;
        };
        while do_rx || do_tx {
            if do_tx {
                self.handle_tx(tx);
            }
            if do_rx {
                self.handle_rx(rx);
            }
            do_rx = self.rx_more;
            do_tx = self.tx_more;
        }
    }

    fn handle_rx(&mut self, vring: &BackendVring) {
        self.rx_more = false;
        if self.tap_dead {
            return;
        }
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let Some(queue) = live_queue(&mut state) else {
            self.rx_starved = true;
            return;
        };
        let mut notify = false;
        let result = self.receive(&mem, queue, &mut notify);
        if notify {
            if let Err(e) = state.signal_used_queue() {
                self.warnings
                    .warn(KIND, format_args!("cannot signal the receive queue: {e}"));
            }
        }
        match result {
            Ok(()) => {}
            Err(NetError::TapRead(e)) => {
                log::error!("vhost-user-net {}: {e}", self.device.tap.if_name());
                self.drop_tap();
            }
            Err(e) => {
                // Bad rings: wait for the next kick (likely after a reset) instead of polling.
                self.warnings.warn(KIND, format_args!("receive queue: {e}"));
                self.rx_starved = true;
                self.rx_more = false;
            }
        }
    }

    /// Moves frames from the tap into the receive queue; sets `notify` when the driver wants an
    /// interrupt.
    fn receive(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        notify: &mut bool,
    ) -> Result<(), NetError> {
        if self.rx_notify {
            // We poll the tap while the guest has buffers: its kicks would only cost exits.
            queue.disable_notification(mem).map_err(NetError::Queue)?;
            self.rx_notify = false;
        }
        let mut armed_at = None;
        loop {
            let out = self.rx.get_mut().process(mem, queue, &self.device.tap)?;
            *notify |= out.notify;
            self.rx_more = out.stop == RxStop::Budget;
            self.rx_starved = false;
            if out.stop != RxStop::NoBuffers {
                return Ok(());
            }
            // Out of buffers (or short of them for a pending frame): ask for a kick when the
            // guest adds any, then look once more for ones added before the request.
            let idx = queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(NetError::Queue)?
                .0;
            if armed_at == Some(idx) {
                self.rx_starved = true;
                return Ok(());
            }
            request_notification(mem, queue, idx)?;
            self.rx_notify = true;
            armed_at = Some(idx);
        }
    }

    fn handle_tx(&mut self, vring: &BackendVring) {
        self.tx_more = false;
        if self.tx_blocked {
            return;
        }
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let Some(queue) = live_queue(&mut state) else {
            return;
        };
        let mut notify = false;
        let result = self.transmit(&mem, queue, &mut notify);
        if notify {
            if let Err(e) = state.signal_used_queue() {
                self.warnings
                    .warn(KIND, format_args!("cannot signal the transmit queue: {e}"));
            }
        }
        if let Err(e) = result {
            self.warnings
                .warn(KIND, format_args!("transmit queue: {e}"));
            self.tx_more = false;
        }
    }

    /// Sends the guest's frames to the tap; sets `notify` when the driver wants an interrupt.
    fn transmit(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        notify: &mut bool,
    ) -> Result<(), NetError> {
        loop {
            queue.disable_notification(mem).map_err(NetError::Queue)?;
            let out = self.tx.get_mut().process(mem, queue, &self.device.tap)?;
            *notify |= out.notify;
            self.tx_more = out.stop == TxStop::Budget;
            match out.stop {
                TxStop::TapFull => {
                    self.tx_blocked = true;
                    return Ok(());
                }
                TxStop::Budget => return Ok(()),
                TxStop::Empty => {
                    if !queue.enable_notification(mem).map_err(NetError::Queue)? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Makes the tap's epoll interest match what the paths wait for.
    fn update_tap_interest(&mut self) {
        let Some(current) = self.tap_events else {
            return;
        };
        let mut want = EventSet::empty();
        if !self.rx_starved {
            want |= EventSet::IN;
        }
        if self.tx_blocked {
            want |= EventSet::OUT;
        }
        if want == current {
            return;
        }
        let Some(epoll) = self.epoll.upgrade() else {
            return;
        };
        let fd = self.device.tap.as_raw_fd();
        let data = u64::from(TAP_EVENT);
        // The handler offers no modify: remove and add again.
        let result = epoll.unregister_listener(fd, current, data).and_then(|()| {
            self.tap_events = None;
            epoll.register_listener(fd, want, data)
        });
        match result {
            Ok(()) => self.tap_events = Some(want),
            Err(e) => {
                // Without the tap in the epoll set, nothing more is received.
                log::error!(
                    "vhost-user-net {}: cannot change the tap's epoll interest: {e}; no more frames will be received",
                    self.device.tap.if_name()
                );
                self.tap_dead = true;
            }
        }
    }

    /// The tap is gone (interface deleted): stop polling it, which would report the error
    /// forever. Transmits keep completing (as drops) so the guest does not stall.
    fn drop_tap(&mut self) {
        if self.tap_dead {
            return;
        }
        log::error!(
            "vhost-user-net {}: the tap reported an error or hang-up; no more frames will be received",
            self.device.tap.if_name()
        );
        if let (Some(current), Some(epoll)) = (self.tap_events.take(), self.epoll.upgrade()) {
            let _ = epoll.unregister_listener(
                self.device.tap.as_raw_fd(),
                current,
                u64::from(TAP_EVENT),
            );
        }
        self.tap_dead = true;
        self.tx_blocked = false;
    }
}

impl VhostUserBackendMut for NetBackend {
    type Bitmap = ();
    type Vring = BackendVring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.device.features
    }

    fn acked_features(&mut self, features: u64) {
        if features & VIRTIO_F_VERSION_1 == 0 {
            log::warn!(
                "vhost-user-net: the frontend did not accept VIRTIO_F_VERSION_1; legacy drivers \
                 (10-byte headers) are not supported and will see garbled frames"
            );
        }
        self.rx = Exclusive(RxPath::new(
            features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            self.device.counters.clone(),
        ));
        let offloads = tap_offloads(features);
        // What was negotiated, once per driver: the offloads follow from it.
        log::info!(
            "vhost-user-net {}: offered features {:#x}, the driver accepted {features:#x}; \
             tap offloads {offloads:#x}",
            self.device.tap.if_name(),
            self.device.features
        );
        if let Err(e) = self.device.tap.set_offload(offloads) {
            // The guest still works; the kernel just cannot pass it offloaded frames.
            log::warn!("vhost-user-net: {e}");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The daemon sets it on the queues themselves, which is all the paths look at.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_slice(&self.device.config, offset, size)
    }

    fn update_memory(&mut self, mem: BackendMemory) -> io::Result<()> {
        self.mem = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.hand_out()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[BackendVring],
        _thread_id: usize,
    ) -> io::Result<()> {
        #[cfg(test)]
        self.device
            .wakeups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (mut do_rx, mut do_tx) = (false, false);
        match device_event {
            // The daemon has already read the kick eventfd.
            RX_QUEUE => do_rx = true,
            TX_QUEUE => do_tx = true,
            TAP_EVENT => {
                if evset.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    self.drop_tap();
                }
                if evset.contains(EventSet::IN) {
                    do_rx = true;
                }
                if evset.contains(EventSet::OUT) {
                    self.tx_blocked = false;
                    do_tx = true;
                }
            }
            _ => log::debug!("vhost-user-net: ignoring event {device_event}"),
        }
        self.process(vrings, do_rx, do_tx);
        self.update_tap_interest();
        Ok(())
    }
}
