//! Guest RAM: where it goes around the MMIO hole, and its creation through vm-memory.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{FOUR_GIB, MMIO_HOLE_START};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
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

/// Maps anonymous, lazily populated guest RAM (pages cost host memory only once touched).
pub fn create_guest_memory(memory_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_regions(memory_mib << 20)).map_err(|source| {
        MemoryError::Map {
            mib: memory_mib,
            source,
        }
    })
}

/// Bytes of guest RAM the host has actually populated (resident), from /proc/self/smaps.
/// Used to report the VMM's own memory overhead: peak RSS minus this.
pub fn resident_guest_bytes(mem: &GuestMemoryMmap) -> Option<u64> {
    use std::io::{BufRead, BufReader};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    let starts: Vec<u64> = mem
        .iter()
        .filter_map(|r| mem.get_host_address(r.start_addr()).ok())
        .map(|p| p as u64)
        .collect();
    // Stream the file: collecting it would itself add to the RSS being measured.
    let smaps = BufReader::new(std::fs::File::open("/proc/self/smaps").ok()?);
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
    fn large_memory_skips_the_hole() {
        let regions = ram_regions(3 << 30);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(regions[1].0, GuestAddress(FOUR_GIB));
        assert_eq!(regions[1].1 as u64, (3 << 30) - MMIO_HOLE_START);
    }
}
