//! The backends' vring: the crate's [`VringMutex`], plus one interrupt whenever a ring starts.
//!
//! A backend that was killed (or crashed) may have put completions in the used ring and died
//! before it signalled the call eventfd. The frontend reconnects a new backend, which resumes
//! from the used index in guest memory, but nothing tells the driver about those completions:
//! with EVENT_IDX it waits for an interrupt that never comes (seen with Linux's virtio-blk under
//! QEMU, about every second run of the crash test). So whenever a ring becomes live (started,
//! enabled and with a call eventfd), or gets a new call eventfd while live, the driver is
//! signalled once if it may be owed an interrupt: with EVENT_IDX, when the used index in guest
//! memory is not the one the driver last asked to hear about (`used_event`; a fresh ring has
//! both at 0); without EVENT_IDX always, as the driver says nothing about what it has seen. A
//! spurious interrupt costs the driver one look at the used ring; virtio drivers tolerate
//! them.
//!
//! Requests the dead backend had taken but not completed need no help: the frontend rewinds
//! the available index to the used index, and vhost-user-backend 0.24 runs the backend's
//! `handle_event` once whenever it registers a started, enabled ring, which serves them
//! without waiting for a kick (the driver will not kick again for them).

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;

use vhost_user_backend::{VringMutex, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as QueueError, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

/// A vring that signals the driver whenever it starts; see the module documentation.
#[derive(Clone)]
pub struct Vring<M: GuestAddressSpace> {
    inner: VringMutex<M>,
    /// The guest memory the ring lives in (the daemon swaps its content, not the handle).
    mem: M,
}

impl<M: GuestAddressSpace + 'static> Vring<M> {
    /// Signals the call eventfd if the ring is live and the driver may be owed an interrupt.
    /// Called by the protocol thread after each change that can make the ring live.
    fn announce(&self) {
        let state = self.inner.get_ref();
        if live(&state) && owed(&state, &self.mem) {
            if let Err(e) = state.signal_used_queue() {
                log::warn!("cannot signal a restarted vring: {e}");
            }
        }
    }
}

fn live<M: GuestAddressSpace>(state: &VringState<M>) -> bool {
    state.is_enabled() && state.get_queue().ready() && state.get_call().is_some()
}

/// Whether the driver may be waiting for an interrupt about used entries (see the module
/// documentation). Rings that cannot be read get the interrupt: the driver will look.
fn owed<M: GuestAddressSpace>(state: &VringState<M>, mem: &M) -> bool {
    let queue = state.get_queue();
    if !queue.event_idx_enabled() {
        return true;
    }
    let mem = mem.memory();
    // used_event sits after the available ring's flags, index and `size` entries.
    let used_event = queue
        .avail_ring()
        .checked_add(4 + 2 * u64::from(queue.size()))
        .and_then(|at| mem.read_obj::<u16>(GuestAddress(at)).ok())
        .map(u16::from_le);
    match (queue.used_idx(&*mem, Ordering::Acquire), used_event) {
        (Ok(used), Some(event)) => used.0 != event,
        _ => true,
    }
}

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for Vring<M> {
    type G = <VringMutex<M> as VringStateGuard<'a, M>>::G;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for Vring<M> {
    type G = <VringMutex<M> as VringStateMutGuard<'a, M>>::G;
}

impl<M: GuestAddressSpace + 'static> VringT<M> for Vring<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, QueueError> {
        Ok(Vring {
            inner: VringMutex::new(mem.clone(), max_queue_size)?,
            mem,
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled);
        self.announce();
    }

    fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), QueueError> {
        self.inner.set_queue_info(desc, avail, used)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready);
        self.announce();
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file);
        self.announce();
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, IntoRawFd};

    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn vring() -> Vring<Mem> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let vring = Vring::new(GuestMemoryAtomic::new(mem), 16).unwrap();
        vring.set_queue_size(16);
        vring
            .set_queue_info(0x1000, AVAIL, USED)
            .expect("ring addresses");
        vring
    }

    /// A second descriptor for `call`, as the frontend would send it.
    fn call_file(call: &EventFd) -> Option<File> {
        let fd = call.try_clone().unwrap().into_raw_fd();
        // SAFETY: `fd` is the clone's descriptor, released by into_raw_fd: ours alone.
        Some(unsafe { File::from_raw_fd(fd) })
    }

    /// Whether the call eventfd was signalled (and consumes the signal).
    fn signalled(call: &EventFd) -> bool {
        call.read().is_ok()
    }

    #[test]
    fn a_ring_signals_once_when_it_goes_live_in_any_order() {
        // Started, then call, then enabled (QEMU with protocol features).
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let v = vring();
        v.set_queue_ready(true);
        assert!(!signalled(&call));
        v.set_call(call_file(&call));
        assert!(!signalled(&call), "not enabled yet");
        v.set_enabled(true);
        assert!(signalled(&call), "no interrupt when the ring went live");
        assert!(!signalled(&call));

        // Enabled, then started, then call (no protocol features: enabled from the start).
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let v = vring();
        v.set_enabled(true);
        v.set_queue_ready(true);
        assert!(!signalled(&call));
        v.set_call(call_file(&call));
        assert!(
            signalled(&call),
            "no interrupt when the call eventfd came last"
        );

        // A new call eventfd on a live ring is told too; a stopped ring signals nothing.
        let again = EventFd::new(EFD_NONBLOCK).unwrap();
        v.set_call(call_file(&again));
        assert!(signalled(&again));
        v.set_queue_ready(false);
        v.set_call(call_file(&call));
        assert!(!signalled(&call), "a stopped ring signalled");
    }

    #[test]
    fn with_event_idx_only_a_driver_owed_completions_is_signalled() {
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let v = vring();
        v.set_queue_event_idx(true);
        v.set_queue_ready(true);
        v.set_enabled(true);
        // A fresh ring: used index and used_event both 0.
        v.set_call(call_file(&call));
        assert!(!signalled(&call), "a fresh ring signalled");

        // A dead backend completed two entries past the driver's used_event (still 0).
        let mem = v.mem.memory();
        mem.write_obj(2u16.to_le(), GuestAddress(USED + 2)).unwrap();
        v.set_queue_ready(false);
        v.set_queue_ready(true);
        assert!(
            signalled(&call),
            "completions the driver waits for were not announced"
        );

        // The driver has seen them all (used_event == used index): nothing is owed.
        let used_event = GuestAddress(AVAIL + 4 + 2 * 16);
        mem.write_obj(2u16.to_le(), used_event).unwrap();
        v.set_queue_ready(false);
        v.set_queue_ready(true);
        assert!(!signalled(&call));
    }
}
