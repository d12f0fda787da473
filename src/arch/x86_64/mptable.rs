//! Intel MultiProcessor Specification 1.4 table, for guests booted with ACPI disabled.
//!
//! The floating pointer structure sits at the start of the EBDA (the last KiB of conventional
//! memory, which Linux scans) and the configuration table follows it directly, so everything
//! must end below 640 KiB. That space, not the spec, bounds the vCPU count.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::acpi::ioapic_id;
use super::layout;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("invalid vCPU count {0}: the MP table fits 1 to {MAX_VCPUS} vCPUs below 640 KiB")]
    InvalidVcpuCount(u8),
    #[error("failed to write the MP table at {addr:#x}: {source}")]
    Write { addr: u64, source: GuestMemoryError },
}

/// End of conventional memory; the table must not reach the VGA hole.
const TABLE_END: u64 = 0xa_0000;

const FPS_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;
/// KVM's in-kernel IOAPIC has 24 pins; each gets an interrupt assignment entry.
const IOAPIC_PINS: u8 = 24;
/// Bus, IOAPIC, one I/O interrupt per pin, ExtINT and NMI local interrupts.
const FIXED_ENTRIES: usize = 2 + IOAPIC_PINS as usize + 2;
const FIXED_LEN: usize = FPS_LEN + HEADER_LEN + FIXED_ENTRIES * ENTRY_LEN;

/// How many processor entries fit between the EBDA start and 640 KiB.
pub const MAX_VCPUS: u8 = {
    let room = (TABLE_END - layout::EBDA_START) as usize - FIXED_LEN;
    let max = room / PROCESSOR_LEN;
    assert!(max > 0 && max < 255);
    max as u8
};

// The floating pointer and header store 32-bit physical addresses.
const _: () = assert!(TABLE_END <= u32::MAX as u64);
const _: () = assert!(layout::LAPIC_START <= u32::MAX as u64);
const _: () = assert!(layout::IOAPIC_START <= u32::MAX as u64);

const SPEC_REV: u8 = 4; // MP spec 1.4
const OEM_ID: [u8; 8] = *b"MVMM    ";
const PRODUCT_ID: [u8; 12] = *b"MICROVM     ";

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOT_PROCESSOR: u8 = 1 << 1;
/// Version registers of KVM's in-kernel local APIC (integrated xAPIC) and IOAPIC.
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;
/// Family 6; only informational, Linux reads the real CPUID.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX FPU and APIC bits, the ones the spec says to report.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode "conform to the bus": edge, active high on ISA.
const INT_FLAGS_CONFORM: u16 = 0;
const ISA_BUS_ID: u8 = 0;
/// Destination "all local APICs" in a local interrupt entry.
const ALL_LAPICS: u8 = 0xff;

/// Writes the MP floating pointer at `layout::EBDA_START` and the configuration table after it.
pub fn setup_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let table = build_mptable(vcpus)?;
    mem.write_slice(&table, GuestAddress(layout::EBDA_START))
        .map_err(|source| MptableError::Write {
            addr: layout::EBDA_START,
            source,
        })
}

/// The floating pointer followed by the configuration table, as placed at the EBDA start.
fn build_mptable(vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::InvalidVcpuCount(vcpus));
    }
    let mut t = Vec::with_capacity(FIXED_LEN + usize::from(vcpus) * PROCESSOR_LEN);

    // Floating pointer: length in 16-byte units, feature bytes all zero (a configuration table
    // is present; no IMCR, i.e. virtual wire mode, which is what KVM's PIC/LAPIC model).
    let config_addr = (layout::EBDA_START + FPS_LEN as u64) as u32;
    t.extend_from_slice(b"_MP_");
    t.extend_from_slice(&config_addr.to_le_bytes());
    t.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    t[10] = checksum(&t[..FPS_LEN]);

    // Configuration table header; length, entry count and checksum are patched below.
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&[SPEC_REV, 0]);
    t.extend_from_slice(&OEM_ID);
    t.extend_from_slice(&PRODUCT_ID);
    t.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&0u16.to_le_bytes()); // entry count
    t.extend_from_slice(&(layout::LAPIC_START as u32).to_le_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]); // no extended table

    for id in 0..vcpus {
        let bsp = if id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        t.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, CPU_ENABLED | bsp]);
        t.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        t.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
    }
    t.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    t.extend_from_slice(b"ISA   ");

    let ioapic = ioapic_id(vcpus);
    t.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, IOAPIC_ENABLED]);
    t.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    // ISA IRQ n -> IOAPIC pin n for every pin, IRQ 0 included: KVM's default routing injects
    // the PIT on pin 0, and virtio devices use the pins above 15 under the same identity.
    for pin in 0..IOAPIC_PINS {
        t.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        t.extend_from_slice(&INT_FLAGS_CONFORM.to_le_bytes());
        t.extend_from_slice(&[ISA_BUS_ID, pin, ioapic, pin]);
    }
    // The 8259 feeds LINT0 (virtual wire mode); NMIs arrive on LINT1.
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        t.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, int_type]);
        t.extend_from_slice(&INT_FLAGS_CONFORM.to_le_bytes());
        t.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LAPICS, lint]);
    }

    // The lengths are bounded by MAX_VCPUS, so they fit the 16-bit fields.
    let config_len = (t.len() - FPS_LEN) as u16;
    let entries = u16::from(vcpus) + FIXED_ENTRIES as u16;
    let config = &mut t[FPS_LEN..];
    config[4..6].copy_from_slice(&config_len.to_le_bytes());
    config[34..36].copy_from_slice(&entries.to_le_bytes());
    config[7] = checksum(config);
    Ok(t)
}

/// The byte that makes `bytes` (whose checksum byte is still zero) sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Reads the table back from guest memory via the floating pointer and checks both
    /// checksums; returns the configuration table's entries as (type, bytes).
    fn read_back(mem: &GuestMemoryMmap) -> Vec<(u8, Vec<u8>)> {
        let mut fps = [0u8; FPS_LEN];
        mem.read_slice(&mut fps, GuestAddress(layout::EBDA_START))
            .unwrap();
        assert_eq!(&fps[..4], b"_MP_");
        assert_eq!((fps[8], fps[9]), (1, SPEC_REV));
        assert_eq!(sum(&fps), 0, "floating pointer checksum");

        let addr = u64::from(u32_at(&fps, 4));
        let mut header = [0u8; HEADER_LEN];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        assert_eq!(&header[..4], b"PCMP");
        assert_eq!(header[6], SPEC_REV);
        assert_eq!(u32_at(&header, 36), layout::LAPIC_START as u32);
        let len = usize::from(u16_at(&header, 4));
        assert!(addr + len as u64 <= TABLE_END, "table ends past 640 KiB");
        let mut config = vec![0u8; len];
        mem.read_slice(&mut config, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&config), 0, "configuration table checksum");

        let mut entries = Vec::new();
        let mut off = HEADER_LEN;
        while off < len {
            let entry_len = if config[off] == ENTRY_PROCESSOR {
                PROCESSOR_LEN
            } else {
                ENTRY_LEN
            };
            entries.push((config[off], config[off..off + entry_len].to_vec()));
            off += entry_len;
        }
        assert_eq!(off, len);
        assert_eq!(usize::from(u16_at(&header, 34)), entries.len());
        entries
    }

    fn of_type(entries: &[(u8, Vec<u8>)], ty: u8) -> Vec<&[u8]> {
        entries
            .iter()
            .filter(|(t, _)| *t == ty)
            .map(|(_, e)| e.as_slice())
            .collect()
    }

    #[test]
    fn table_reads_back() {
        for vcpus in [1, 2, 4, MAX_VCPUS] {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            setup_mptable(&mem, vcpus).unwrap();
            let entries = read_back(&mem);

            let cpus = of_type(&entries, ENTRY_PROCESSOR);
            assert_eq!(cpus.len(), usize::from(vcpus));
            for (i, cpu) in cpus.iter().enumerate() {
                assert_eq!(cpu[1], i as u8, "APIC ID");
                let flags = if i == 0 { 3 } else { 1 };
                assert_eq!(cpu[3], flags, "enabled/BSP flags of CPU {i}");
            }
            let bus = of_type(&entries, ENTRY_BUS);
            assert_eq!(bus, [[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']]);
            let ioapics = of_type(&entries, ENTRY_IOAPIC);
            assert_eq!(ioapics.len(), 1);
            assert_eq!(ioapics[0][1], ioapic_id(vcpus));
            assert_eq!(u32_at(ioapics[0], 4), layout::IOAPIC_START as u32);
            let ints = of_type(&entries, ENTRY_IO_INTERRUPT);
            assert_eq!(ints.len(), 24);
            for (pin, int) in ints.iter().enumerate() {
                let pin = pin as u8;
                assert_eq!(int, &[3, 0, 0, 0, 0, pin, ioapic_id(vcpus), pin]);
            }
            let lints = of_type(&entries, ENTRY_LOCAL_INTERRUPT);
            assert_eq!(
                lints,
                [[4, 3, 0, 0, 0, 0, 0xff, 0], [4, 1, 0, 0, 0, 0, 0xff, 1]]
            );
        }
    }

    #[test]
    fn largest_table_ends_below_640k() {
        let t = build_mptable(MAX_VCPUS).unwrap();
        assert!(layout::EBDA_START + t.len() as u64 <= TABLE_END);
        assert!(layout::EBDA_START + (t.len() + PROCESSOR_LEN) as u64 > TABLE_END);
    }

    #[test]
    fn rejects_bad_vcpu_counts() {
        for vcpus in [0, MAX_VCPUS + 1, u8::MAX] {
            let err = build_mptable(vcpus).unwrap_err();
            assert!(matches!(err, MptableError::InvalidVcpuCount(v) if v == vcpus));
        }
    }

    #[test]
    fn reports_unbacked_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = setup_mptable(&mem, 1).unwrap_err();
        assert!(matches!(err, MptableError::Write { .. }), "{err}");
    }
}
