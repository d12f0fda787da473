//! The device's I/O thread: one per activated device, epolling the receive and transmit kicks,
//! the tap and a stop eventfd, and running the transport-independent rx/tx paths.
//!
//! System calls made by the running thread (for its seccomp filter): `epoll_wait`, `epoll_ctl`
//! (re-arming the tap), `read` (draining eventfds), `readv` and `writev` (the tap), whatever
//! [`VirtioInterrupt::signal_used_queue`] uses (`write` to an irqfd/eventfd, or `ioctl` for a
//! KVM irq line), `write` plus `futex` for logging, and for thread exit `munmap`, `madvise`,
//! `sigaltstack`, `rt_sigprocmask`, `close` and `exit`.
//!
//! The tap is watched level-triggered for input only while the guest has receive buffers: when
//! they run out, input interest is dropped (frames wait in the tap's kernel queue) and receive
//! resumes on the next receive-queue kick. Output interest is only set while the tap refuses
//! frames.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::request_notification;
use super::rx::{RxPath, RxStop};
use super::tap::Tap;
use super::tx::{TxPath, TxStop};
use super::{NetCounters, NetError, RX_QUEUE, TX_QUEUE};
use crate::threads::{self, ThreadRole};
use crate::virtio::VirtioInterrupt;

const TOKEN_STOP: u64 = 0;
const TOKEN_RX_KICK: u64 = 1;
const TOKEN_TX_KICK: u64 = 2;
const TOKEN_TAP: u64 = 3;

/// What the worker serves.
pub(crate) struct WorkerParts {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub rx_queue: Queue,
    pub rx_kick: EventFd,
    pub tx_queue: Queue,
    pub tx_kick: EventFd,
    pub tap: Arc<Tap>,
    pub mrg_rxbuf: bool,
    pub counters: Arc<NetCounters>,
}

/// A running worker; dropping it stops the thread and waits for it.
pub(crate) struct WorkerHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("virtio-net: cannot signal the worker to stop: {e}");
            return;
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("virtio-net: the worker thread panicked");
            }
        }
    }
}

/// Starts the worker thread `name`. Setup errors (epoll, eventfd, thread) are returned here.
pub(crate) fn spawn(name: String, parts: WorkerParts) -> io::Result<WorkerHandle> {
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let epoll = Epoll::new()?;
    let add = |fd: i32, events: EventSet, token: u64| {
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    };
    add(stop.as_raw_fd(), EventSet::IN, TOKEN_STOP)?;
    add(parts.rx_kick.as_raw_fd(), EventSet::IN, TOKEN_RX_KICK)?;
    add(parts.tx_kick.as_raw_fd(), EventSet::IN, TOKEN_TX_KICK)?;
    add(parts.tap.as_raw_fd(), EventSet::IN, TOKEN_TAP)?;
    let worker = Worker {
        epoll,
        tap_events: EventSet::IN,
        tap_dead: false,
        rx: RxPath::new(parts.mrg_rxbuf, parts.counters.clone()),
        tx: TxPath::new(parts.counters),
        rx_starved: false,
        rx_more: false,
        rx_notify: true,
        tx_blocked: false,
        tx_more: false,
        mem: parts.mem,
        interrupt: parts.interrupt,
        rx_queue: parts.rx_queue,
        rx_kick: parts.rx_kick,
        tx_queue: parts.tx_queue,
        tx_kick: parts.tx_kick,
        tap: parts.tap,
    };
    let thread = threads::spawn(ThreadRole::NetWorker, name, move || worker.run())?;
    Ok(WorkerHandle {
        stop,
        thread: Some(thread),
    })
}

struct Worker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx_queue: Queue,
    rx_kick: EventFd,
    tx_queue: Queue,
    tx_kick: EventFd,
    tap: Arc<Tap>,
    epoll: Epoll,
    /// The tap's current epoll interest.
    tap_events: EventSet,
    /// The tap reported an error or hang-up and was removed from the epoll set.
    tap_dead: bool,
    rx: RxPath,
    tx: TxPath,
    /// The guest has no receive buffers: the tap is not polled, a kick resumes.
    rx_starved: bool,
    /// The receive budget ran out with frames left.
    rx_more: bool,
    /// Receive-queue notifications (kicks) are enabled.
    rx_notify: bool,
    /// The tap refused a frame: transmit resumes when it is writable.
    tx_blocked: bool,
    /// The transmit budget ran out with chains left.
    tx_more: bool,
}

impl Worker {
    fn run(mut self) {
        if let Err(e) = self.serve() {
            log::error!("virtio-net {}: device stopped: {e}", self.tap.if_name());
        }
    }

    fn serve(&mut self) -> Result<(), NetError> {
        // The driver may have queued buffers before activation completed.
        self.handle_tx()?;
        self.handle_rx()?;
        let mut events = [EpollEvent::default(); 8];
        loop {
            self.update_tap_interest()?;
            let timeout = if self.rx_more || self.tx_more { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetError::Epoll(e)),
            };
            let (mut do_rx, mut do_tx) = (self.rx_more, self.tx_more);
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_RX_KICK => {
                        // An empty eventfd (spurious wakeup) is harmless.
                        let _ = self.rx_kick.read();
                        do_rx = true;
                    }
                    TOKEN_TX_KICK => {
                        let _ = self.tx_kick.read();
                        do_tx = true;
                    }
                    TOKEN_TAP => {
                        let set = event.event_set();
                        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                            self.drop_tap();
                        }
                        if set.contains(EventSet::IN) {
                            do_rx = true;
                        }
                        if set.contains(EventSet::OUT) {
                            self.tx_blocked = false;
                            do_tx = true;
                        }
                    }
                    _ => {}
                }
            }
            if do_tx {
                self.handle_tx()?;
            }
            if do_rx {
                self.handle_rx()?;
            }
        }
    }

    fn handle_rx(&mut self) -> Result<(), NetError> {
        if self.tap_dead {
            return Ok(());
        }
        if self.rx_notify {
            // We poll the tap while the guest has buffers: its kicks would only cost exits.
            self.rx_queue
                .disable_notification(&self.mem)
                .map_err(NetError::Queue)?;
            self.rx_notify = false;
        }
        let mut armed_at = None;
        loop {
            let out = match self.rx.process(&self.mem, &mut self.rx_queue, &*self.tap) {
                Err(NetError::TapRead(e)) => {
                    log::error!("virtio-net {}: {e}", self.tap.if_name());
                    self.drop_tap();
                    return Ok(());
                }
                out => out?,
            };
            if out.notify {
                signal(&*self.interrupt, RX_QUEUE);
            }
            self.rx_more = out.stop == RxStop::Budget;
            self.rx_starved = false;
            if out.stop != RxStop::NoBuffers {
                return Ok(());
            }
            // Out of buffers (or short of them for a pending frame): ask for a kick when the
            // guest adds any, then look once more for ones added before the request.
            let idx = self
                .rx_queue
                .avail_idx(&self.mem, Ordering::Acquire)
                .map_err(NetError::Queue)?
                .0;
            if armed_at == Some(idx) {
                self.rx_starved = true;
                return Ok(());
            }
            request_notification(&self.mem, &self.rx_queue, idx)?;
            self.rx_notify = true;
            armed_at = Some(idx);
        }
    }

    fn handle_tx(&mut self) -> Result<(), NetError> {
        if self.tx_blocked {
            return Ok(());
        }
        loop {
            self.tx_queue
                .disable_notification(&self.mem)
                .map_err(NetError::Queue)?;
            let out = self.tx.process(&self.mem, &mut self.tx_queue, &*self.tap)?;
            if out.notify {
                signal(&*self.interrupt, TX_QUEUE);
            }
            self.tx_more = out.stop == TxStop::Budget;
            match out.stop {
                TxStop::TapFull => {
                    self.tx_blocked = true;
                    return Ok(());
                }
                TxStop::Budget => return Ok(()),
                TxStop::Empty => {
                    if !self
                        .tx_queue
                        .enable_notification(&self.mem)
                        .map_err(NetError::Queue)?
                    {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn update_tap_interest(&mut self) -> Result<(), NetError> {
        if self.tap_dead {
            return Ok(());
        }
        let mut want = EventSet::empty();
        if !self.rx_starved {
            want |= EventSet::IN;
        }
        if self.tx_blocked {
            want |= EventSet::OUT;
        }
        if want != self.tap_events {
            self.epoll
                .ctl(
                    ControlOperation::Modify,
                    self.tap.as_raw_fd(),
                    EpollEvent::new(want, TOKEN_TAP),
                )
                .map_err(NetError::Epoll)?;
            self.tap_events = want;
        }
        Ok(())
    }

    /// The tap is gone (interface deleted): stop polling it, which would report the error
    /// forever. Transmits keep completing (as drops) so the guest does not stall.
    fn drop_tap(&mut self) {
        if self.tap_dead {
            return;
        }
        log::error!(
            "virtio-net {}: the tap reported an error or hang-up; no more frames will be received",
            self.tap.if_name()
        );
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.tap.as_raw_fd(),
            EpollEvent::default(),
        );
        self.tap_dead = true;
        self.tx_blocked = false;
    }
}

fn signal(interrupt: &dyn VirtioInterrupt, queue: u16) {
    if let Err(e) = interrupt.signal_used_queue(queue) {
        log::warn!("virtio-net: cannot signal queue {queue}: {e}");
    }
}
