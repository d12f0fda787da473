//! Guest RAM: where it goes around the MMIO hole, and its creation through vm-memory.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{FOUR_GIB, MMIO_HOLE_START};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot create {mib} MiB of shared guest memory (memfd): {source}")]
    Memfd { mib: u64, source: std::io::Error },
}

/// RAM regions for `size` bytes: below the 32-bit MMIO hole first, the rest above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if size > low {
        regions.push((GuestAddress(FOUR_GIB), (size - low) as usize));
    }
    regions
}

/// Maps lazily populated guest RAM (pages cost host memory only once touched).
///
/// `shared` backs it with one memfd mapped MAP_SHARED, so a vhost-user backend process can map
/// the same pages; otherwise it is private anonymous memory. Shared memory cannot be merged by
/// KSM.
pub fn create_guest_memory(memory_mib: u64, shared: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = ram_regions(memory_mib << 20);
    let map_err = |source| MemoryError::Map {
        mib: memory_mib,
        source,
    };
    if !shared {
        return GuestMemoryMmap::from_ranges(&regions).map_err(map_err);
    }
    let memfd_err = |source| MemoryError::Memfd {
        mib: memory_mib,
        source,
    };
    let memfd = Arc::new(create_memfd(memory_mib << 20).map_err(memfd_err)?);
    // Regions are consecutive slices of the one memfd.
    let mut offset = 0;
    let ranges: Vec<_> = regions
        .iter()
        .map(|&(addr, len)| {
            let file = FileOffset::from_arc(memfd.clone(), offset);
            offset += len as u64;
            (addr, len, Some(file))
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(map_err)
}

fn create_memfd(size: u64) -> std::io::Result<File> {
    // SAFETY: the name is a valid C string; the returned descriptor is owned by the File.
    let fd = unsafe { libc::memfd_create(c"mvmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Bytes of guest RAM the host has actually populated (resident), from `smaps`: this
/// process's /proc/self/smaps, opened early (the main thread's seccomp filter has no `open`,
/// and a jail has no /proc). Used to report the VMM's own memory overhead: peak RSS minus this.
pub fn resident_guest_bytes(mem: &GuestMemoryMmap, smaps: File) -> Option<u64> {
    use std::io::{BufRead, BufReader};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    let starts: Vec<u64> = mem
        .iter()
        .filter_map(|r| mem.get_host_address(r.start_addr()).ok())
        .map(|p| p as u64)
        .collect();
    // Stream the file: collecting it would itself add to the RSS being measured.
    let smaps = BufReader::new(smaps);
    let mut in_guest_mapping = false;
    let mut total_kib = 0;
    for line in smaps.lines() {
        let line = line.ok()?;
        if let Some(range) = line.split_whitespace().next().filter(|w| w.contains('-')) {
            let start = range
                .split('-')
                .next()
                .and_then(|s| u64::from_str_radix(s, 16).ok());
            if let Some(start) = start {
                in_guest_mapping = starts.contains(&start);
                continue;
            }
        }
        if in_guest_mapping {
            if let Some(kib) = line.strip_prefix("Rss:") {
                total_kib += kib
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()?;
            }
        }
    }
    Some(total_kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_low_region() {
        assert_eq!(ram_regions(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
        assert_eq!(
            ram_regions(MMIO_HOLE_START),
            vec![(GuestAddress(0), MMIO_HOLE_START as usize)]
        );
    }

    #[test]
    fn shared_memory_is_one_memfd_across_regions() {
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
        let size = MMIO_HOLE_START + (64 << 20);
        let mem = create_guest_memory(size >> 20, true).unwrap();
        let offsets: Vec<u64> = mem
            .iter()
            .map(|r| r.file_offset().expect("memfd backed").start())
            .collect();
        assert_eq!(offsets, vec![0, MMIO_HOLE_START]);
        mem.write_obj(0x1234_u32, GuestAddress(FOUR_GIB)).unwrap();
        let mut back = [0u8; 4];
        let region = mem.find_region(GuestAddress(FOUR_GIB)).unwrap();
        let file = region.file_offset().unwrap();
        std::os::unix::fs::FileExt::read_exact_at(file.file(), &mut back, MMIO_HOLE_START).unwrap();
        assert_eq!(
            u32::from_le_bytes(back),
            0x1234,
            "the backend sees guest writes"
        );
        assert!(create_guest_memory(64, false)
            .unwrap()
            .iter()
            .all(|r| r.file_offset().is_none()));
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let regions = ram_regions(3 << 30);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(regions[1].0, GuestAddress(FOUR_GIB));
        assert_eq!(regions[1].1 as u64, (3 << 30) - MMIO_HOLE_START);
    }
}
