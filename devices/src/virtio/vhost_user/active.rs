//! What an activation hands the backend, kept to replay it after a reconnection.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::VhostUserMemoryRegionInfo;
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

use super::Error;
use crate::virtio::{ActivatedQueue, VirtioInterrupt};

/// The most regions SET_MEM_TABLE carries (one file descriptor each).
const MAX_REGIONS: usize = vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;

/// One queue the driver set up, as the backend sees it.
pub(super) struct ActiveQueue {
    pub index: u16,
    pub size: u16,
    /// Host virtual addresses of the rings, in this process (the backend translates them
    /// through the memory table).
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Guest address of the used ring, to read its index after the backend died.
    pub used_gpa: GuestAddress,
    /// The driver's next available index at activation (0 on a fresh start).
    pub first_base: u16,
    /// The queue's ioeventfd: the backend waits on it directly.
    pub kick: EventFd,
}

/// The state of a running device.
pub(super) struct Active {
    /// Keeps the regions' mappings and file descriptors alive for `regions`.
    pub mem: GuestMemoryMmap,
    pub regions: Vec<VhostUserMemoryRegionInfo>,
    pub queues: Vec<ActiveQueue>,
    /// The transport's interrupt eventfd, signalled by the backend (VRING_CALL).
    pub call: EventFd,
    pub acked_features: u64,
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl Active {
    pub fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        acked_features: u64,
        queue_count: usize,
    ) -> Result<Self, Error> {
        let regions = memory_regions(&mem)?;
        let queues = queues
            .into_iter()
            .map(|q| active_queue(&mem, q, queue_count))
            .collect::<Result<Vec<_>, _>>()?;
        let call = interrupt.direct_notifier().ok_or(Error::NoNotifier)?;
        Ok(Active {
            mem,
            regions,
            queues,
            call,
            acked_features,
            interrupt,
        })
    }

    /// The available index each queue starts from at activation.
    pub fn first_bases(&self) -> Vec<u16> {
        self.queues.iter().map(|q| q.first_base).collect()
    }

    /// The used index of each queue, as the last backend left it: a new backend starts there,
    /// so it serves again the requests that were in flight.
    pub fn used_indexes(&self) -> Result<Vec<u16>, Error> {
        self.queues
            .iter()
            .map(|q| {
                // The used ring starts with `flags: le16, idx: le16`.
                let addr = q.used_gpa.unchecked_add(2);
                self.mem
                    .load::<u16>(addr, Ordering::Acquire)
                    .map(u16::from_le)
                    .map_err(|e| Error::UsedIndex {
                        queue: q.index,
                        reason: e.to_string(),
                    })
            })
            .collect()
    }

    /// Makes the backend look at every queue, for buffers the driver added while it was away.
    pub fn kick_all(&self) {
        for q in &self.queues {
            if let Err(e) = q.kick.write(1) {
                log::warn!("vhost-user: cannot kick queue {}: {e}", q.index);
            }
        }
    }
}

/// SET_MEM_TABLE's regions: every region must be a shared mapping of a file (memfd).
fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, Error> {
    let regions = mem
        .iter()
        .map(|region| {
            let gpa = region.start_addr().raw_value();
            if region.file_offset().is_none() {
                return Err(Error::PrivateMemory { gpa });
            }
            VhostUserMemoryRegionInfo::from_guest_region(region)
                .map_err(|_| Error::PrivateMemory { gpa })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if regions.len() > MAX_REGIONS {
        return Err(Error::TooManyRegions(regions.len()));
    }
    Ok(regions)
}

fn active_queue(
    mem: &GuestMemoryMmap,
    activated: ActivatedQueue,
    queue_count: usize,
) -> Result<ActiveQueue, Error> {
    let ActivatedQueue { index, queue, kick } = activated;
    if usize::from(index) >= queue_count {
        return Err(Error::QueueIndex {
            index,
            count: queue_count,
        });
    }
    let size = queue.size();
    let n = u64::from(size);
    let hva = |ring: &'static str, gpa: u64, len: u64| {
        ring_address(mem, GuestAddress(gpa), len).ok_or(Error::RingAddress {
            queue: index,
            ring,
            gpa,
        })
    };
    Ok(ActiveQueue {
        index,
        size,
        desc: hva("descriptor", queue.desc_table(), 16 * n)?,
        avail: hva("available", queue.avail_ring(), 6 + 2 * n)?,
        used: hva("used", queue.used_ring(), 6 + 8 * n)?,
        used_gpa: GuestAddress(queue.used_ring()),
        first_base: queue.next_avail(),
        kick,
    })
}

/// The host address of a ring that lies within one region (the backend maps regions apart).
fn ring_address(mem: &GuestMemoryMmap, gpa: GuestAddress, len: u64) -> Option<u64> {
    let (region, offset) = mem.to_region_addr(gpa)?;
    let end = offset.raw_value().checked_add(len)?;
    if end > region.len() {
        return None;
    }
    region.get_host_address(offset).ok().map(|p| p as u64)
}
