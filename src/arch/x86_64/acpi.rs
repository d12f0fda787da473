//! ACPI tables for x86_64 guests: RSDP, XSDT, FADT, DSDT and MADT.
//!
//! The machine is described as "hardware-reduced" ACPI: there is no PM1 block, no SCI and no
//! FACS. Poweroff goes through the FADT sleep control register (an I/O port the VMM traps), and
//! devices Linux cannot discover on its own (virtio-mmio windows, the UART, the i8042, the
//! power button and its Generic Event Device) are listed in the DSDT. In hardware-reduced mode Linux does not set up the legacy PIC nor the
//! identity ISA IRQ mappings, so the DSDT entries are also what gets the UART's and keyboard's
//! IRQs routed through the IOAPIC.

use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use devices::legacy::{GED_EVENT_POWER_BUTTON, GED_REGISTER_LEN};

use super::layout;
use super::smbios::SMBIOS_START;

/// One virtio-mmio device window to describe in the DSDT.
#[derive(Clone, Copy, Debug)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("invalid vCPU count {0}: ACPI tables support 1 to {MAX_VCPUS} vCPUs")]
    InvalidVcpuCount(u8),
    #[error("too many virtio-mmio devices ({0}): the DSDT names them VR00..VRFF, at most 256")]
    TooManyDevices(usize),
    #[error("virtio-mmio device {index} window {base:#x}+{size:#x} is empty or not below 4 GiB")]
    InvalidDeviceWindow { index: usize, base: u64, size: u64 },
    #[error("virtio-mmio device {index} IRQ {irq} is beyond the IOAPIC's {IOAPIC_NUM_PINS} pins")]
    InvalidDeviceIrq { index: usize, irq: u32 },
    #[error("ACPI tables end at {end:#x}, past the end of their area at {limit:#x}")]
    TablesTooLarge { end: u64, limit: u64 },
    #[error("failed to write the ACPI {table} table at {addr:#x}: {source}")]
    WriteTable {
        table: &'static str,
        addr: u64,
        source: GuestMemoryError,
    },
}

/// Upper bound on vCPUs: the IOAPIC takes APIC ID `vcpus` (which must stay below the 0xff
/// broadcast ID), and processor UID 0xff means "all processors" in the LAPIC NMI entry.
pub const MAX_VCPUS: u8 = 254;

/// KVM's in-kernel IOAPIC has 24 input pins, i.e. GSIs 0..=23.
const IOAPIC_NUM_PINS: u32 = 24;

const OEM_ID: [u8; 6] = *b"MVMM  ";
const OEM_REVISION: u32 = 1;
/// Tables are placed on 16-byte boundaries (ACPI only needs 8; 16 keeps dumps readable).
const TABLE_ALIGN: u64 = 16;

/// Revisions of the tables we build by hand (ACPI 6.x).
const DSDT_REVISION: u8 = 2; // 2 = 64-bit AML integers
const MADT_REVISION: u8 = 5;

/// IAPC_BOOT_ARCH bits. LEGACY_DEVICES stays clear (no PnP BIOS, no ISA bus to enumerate), the
/// 8042 bit stays set because we do emulate one (it is also the guest's reset path), VGA and
/// the CMOS RTC are absent so Linux must not poke at them.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel irqchip does).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_TYPE_LAPIC_NMI: u8 = 4;
const MADT_HEADER_LEN: u32 = 44;
const ACPI_HEADER_LEN: u32 = 36;

// Both controllers sit in the 32-bit MMIO hole; the tables store 32-bit addresses.
const _: () = assert!(layout::LAPIC_START <= u32::MAX as u64);
const _: () = assert!(layout::IOAPIC_START <= u32::MAX as u64);
const LAPIC_ADDR: u32 = layout::LAPIC_START as u32;
const IOAPIC_ADDR: u32 = layout::IOAPIC_START as u32;

/// Legacy devices the VMM emulates at their PC-standard ports.
const COM1_PORT: u16 = 0x3f8;
const I8042_DATA_PORT: u16 = 0x60;
const I8042_COMMAND_PORT: u16 = 0x64;

/// SLP_TYP value the DSDT `_S5_` object hands to the OS; the VMM powers off when the guest
/// writes it with SLP_EN to the sleep control register.
pub const S5_SLEEP_TYPE: u8 = 5;

/// A finished table and where it goes in guest memory.
struct PlacedTable {
    name: &'static str,
    addr: u64,
    bytes: Vec<u8>,
}

/// Writes RSDP at layout::ACPI_START and XSDT, FADT, DSDT, MADT after it (all below
/// layout::ACPI_END and below the SMBIOS entry point). Returns the RSDP address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<GuestAddress, AcpiError> {
    let limit = layout::ACPI_END.min(SMBIOS_START);
    let tables = build_tables(vcpus, devices, layout::ACPI_START, limit)?;
    for t in &tables {
        mem.write_slice(&t.bytes, GuestAddress(t.addr))
            .map_err(|source| AcpiError::WriteTable {
                table: t.name,
                addr: t.addr,
                source,
            })?;
    }
    Ok(GuestAddress(layout::ACPI_START))
}

/// Builds every table for the area [start, limit), RSDP first at `start`.
fn build_tables(
    vcpus: u8,
    devices: &[MmioDeviceInfo],
    start: u64,
    limit: u64,
) -> Result<Vec<PlacedTable>, AcpiError> {
    let dsdt = create_dsdt(devices)?;
    let madt = create_madt(vcpus)?;
    let fadt_len = FADT::len() as u64;

    // The XSDT has a fixed number of entries, so every address is known up front.
    let xsdt_len = u64::from(ACPI_HEADER_LEN) + 2 * 8;
    let xsdt_addr = align_up(start + Rsdp::len() as u64);
    let fadt_addr = align_up(xsdt_addr + xsdt_len);
    let dsdt_addr = align_up(fadt_addr + fadt_len);
    let madt_addr = align_up(dsdt_addr + dsdt.len() as u64);
    let end = madt_addr + madt.len() as u64;
    if end > limit {
        return Err(AcpiError::TablesTooLarge { end, limit });
    }

    let mut xsdt = XSDT::new(OEM_ID, *b"MVMMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);

    Ok(vec![
        placed("RSDP", start, aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
        placed("XSDT", xsdt_addr, aml_bytes(&xsdt)),
        placed("FADT", fadt_addr, aml_bytes(&create_fadt(dsdt_addr))),
        placed("DSDT", dsdt_addr, dsdt),
        placed("MADT", madt_addr, madt),
    ])
}

fn placed(name: &'static str, addr: u64, bytes: Vec<u8>) -> PlacedTable {
    PlacedTable { name, addr, bytes }
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn align_up(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGN)
}

/// FADT for a hardware-reduced ACPI 6.x machine whose only fixed register is the sleep
/// control/status pair at `layout::ACPI_SLEEP_PORT`.
fn create_fadt(dsdt_addr: u64) -> FADT {
    // Linux only offers ACPI poweroff on reduced hardware when both sleep registers exist. It
    // writes WAK_STS (0x80) to the status register, then SLP_TYP << 2 | SLP_EN (0x20) to the
    // control register; both live on the same byte-wide port, which the VMM decodes.
    let sleep_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(layout::ACPI_SLEEP_PORT),
    );
    let mut fadt = FADTBuilder::new(OEM_ID, *b"MVMMFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // Power and sleep buttons are not fixed hardware (there are none).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    fadt.sleep_control_reg = sleep_reg;
    fadt.sleep_status_reg = sleep_reg;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"MVMM\0\0\0\0").into();
    fadt.finalize()
}

/// The DSDT: the `_S5_` sleep type, the legacy UART and i8042, and one `\_SB.VRxx` device per
/// virtio-mmio window (Linux's virtio_mmio driver matches `LNRO0005` and takes the first memory
/// and interrupt resources of `_CRS`).
pub fn create_dsdt(devices: &[MmioDeviceInfo]) -> Result<Vec<u8>, AcpiError> {
    if devices.len() > 256 {
        return Err(AcpiError::TooManyDevices(devices.len()));
    }
    let mut sb = Vec::new();
    append_legacy_devices(&mut sb);
    append_power_button(&mut sb);
    for (index, dev) in devices.iter().enumerate() {
        append_virtio_device(&mut sb, index, dev)?;
    }

    let mut body = Vec::new();
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    body.extend(aml::Scope::raw("\\_SB_".into(), sb));

    let mut dsdt = Sdt::new(
        *b"DSDT",
        ACPI_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        *b"MVMMDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

/// COM1 and the i8042 keyboard controller. Reduced-hardware Linux has no legacy PIC and maps
/// no ISA IRQs by itself, so these entries are what routes IRQ 4 and IRQ 1 to the IOAPIC (the
/// 8250 and i8042 drivers pick them up through PNP ACPI).
fn append_legacy_devices(sink: &mut Vec<u8>) {
    let edge_high_exclusive = |irq| aml::Interrupt::new(true, true, false, false, irq);

    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let irq = edge_high_exclusive(layout::SERIAL_IRQ);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
    aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);

    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303"));
    let data = aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1);
    let command = aml::IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1);
    let irq = edge_high_exclusive(layout::I8042_KBD_IRQ);
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&data, &command, &irq]),
    );
    aml::Device::new("KBD_".into(), vec![&hid, &crs]).to_aml_bytes(sink);
}

/// The power button (`PNP0C0C`) and the Generic Event Device (`ACPI0013`) that presses it.
/// Reduced hardware has no fixed power button and no GPE blocks: the GED's interrupt makes
/// Linux's evged driver run `_EVT`, which reads the VMM's event register (reading clears it)
/// and notifies the button (0x80: "pressed"); the button driver reports KEY_POWER. The
/// interrupt is the GED's only resource: evged rejects any other kind in its `_CRS`.
fn append_power_button(sink: &mut Vec<u8>) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    aml::Device::new("PWRB".into(), vec![&hid, &uid]).to_aml_bytes(sink);

    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let irq = aml::Interrupt::new(true, true, false, false, layout::GED_IRQ);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
    let port = usize::from(layout::GED_PORT);
    let len = GED_REGISTER_LEN as usize;
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &port, &len);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let button = usize::from(GED_EVENT_POWER_BUTTON);
    let gdat = aml::Path::new("GDAT");
    let read = aml::Store::new(&aml::Local(0), &gdat);
    let masked = aml::And::new(&aml::Local(1), &aml::Local(0), &button);
    let pressed = aml::Equal::new(&aml::Local(1), &button);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb, &0x80usize);
    let on_press = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &masked, &on_press]);
    aml::Device::new("GED_".into(), vec![&hid, &uid, &crs, &region, &field, &evt])
        .to_aml_bytes(sink);
}

fn append_virtio_device(
    sink: &mut Vec<u8>,
    index: usize,
    dev: &MmioDeviceInfo,
) -> Result<(), AcpiError> {
    let bad_window = || AcpiError::InvalidDeviceWindow {
        index,
        base: dev.base,
        size: dev.size,
    };
    // Memory32Fixed can only express a non-empty window that ends at or below 4 GiB.
    let end = dev.base.checked_add(dev.size).ok_or_else(bad_window)?;
    if dev.size == 0 || end > 1 << 32 {
        return Err(bad_window());
    }
    let base = u32::try_from(dev.base).map_err(|_| bad_window())?;
    let size = u32::try_from(dev.size).map_err(|_| bad_window())?;
    if dev.irq >= IOAPIC_NUM_PINS {
        return Err(AcpiError::InvalidDeviceIrq {
            index,
            irq: dev.irq,
        });
    }

    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid = aml::Name::new("_UID".into(), &index);
    let mem = aml::Memory32Fixed::new(true, base, size);
    let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&mem, &irq]));
    // index < 256 was checked by the caller, so the name is always 4 characters.
    let name = format!("VR{index:02X}");
    aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    Ok(())
}

/// The IOAPIC's ID: the first APIC ID after the vCPUs' (0..vcpus), so it never collides with
/// a local APIC. The MP table uses the same value.
pub const fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

/// The MADT: one enabled local APIC per vCPU (UID = APIC ID = index), the IOAPIC at GSI 0,
/// and NMI on LINT1 for every processor. There is deliberately no interrupt source override:
/// KVM's default routing sends GSI 0 (the in-kernel PIT) to IOAPIC pin 0, and reduced-hardware
/// guests have no SCI to describe.
fn create_madt(vcpus: u8) -> Result<Vec<u8>, AcpiError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(AcpiError::InvalidVcpuCount(vcpus));
    }
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        *b"MVMMAPIC",
        OEM_REVISION,
    );
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..vcpus {
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(ioapic_id(vcpus), IOAPIC_ADDR, 0)));
    // Local APIC NMI: all processors (UID 0xff), flags 0 (bus-default polarity/trigger), LINT1.
    madt.append_slice(&[MADT_TYPE_LAPIC_NMI, 6, 0xff, 0, 0, 1]);
    Ok(madt.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), layout::HIMEM_START as usize)]).unwrap()
    }

    fn devices(n: usize) -> Vec<MmioDeviceInfo> {
        (0..n)
            .map(|i| MmioDeviceInfo {
                base: layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_WINDOW_SIZE,
                size: layout::VIRTIO_MMIO_WINDOW_SIZE,
                // Past 19 devices IRQs repeat; only the DSDT size tests go that far.
                irq: layout::VIRTIO_IRQ_FIRST
                    + i as u32 % (layout::VIRTIO_IRQ_LAST - layout::VIRTIO_IRQ_FIRST + 1),
            })
            .collect()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Reads a table back from guest memory, checking its signature, length and checksum.
    fn read_table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let mut header = [0u8; 36];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        assert_eq!(&header[..4], signature, "signature at {addr:#x}");
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36, "{signature:?} length {len}");
        assert!(
            addr + len as u64 <= SMBIOS_START,
            "{signature:?} crosses SMBIOS"
        );
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&table), 0, "{signature:?} checksum");
        table
    }

    /// Writes the tables and returns (FADT, DSDT, MADT) as read back through RSDP and XSDT.
    fn tables_from_guest(vcpus: u8, ndev: usize) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mem = guest_mem();
        let rsdp_addr = create_acpi_tables(&mem, vcpus, &devices(ndev)).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(layout::ACPI_START));

        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP 20-byte checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");

        let xsdt = read_table(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        let fadt = read_table(&mem, u64_at(&xsdt, 36), b"FACP");
        let madt = read_table(&mem, u64_at(&xsdt, 44), b"APIC");
        assert_eq!(u32_at(&fadt, 40), 0, "32-bit DSDT pointer must be unused");
        let dsdt = read_table(&mem, u64_at(&fadt, 140), b"DSDT");
        (fadt, dsdt, madt)
    }

    /// MADT entries as (type, body) pairs.
    fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut entries = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let len = madt[off + 1] as usize;
            assert!(len >= 2 && off + len <= madt.len(), "MADT entry at {off}");
            entries.push((madt[off], &madt[off..off + len]));
            off += len;
        }
        entries
    }

    #[test]
    fn tables_read_back_through_rsdp() {
        let (fadt, dsdt, madt) = tables_from_guest(4, 2);

        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "FADT major version");
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u16_at(&fadt, 109), 0b10_0110, "IAPC_BOOT_ARCH");
        let sleep_gas = [1, 8, 0, 1, 0xc0, 0x03, 0, 0, 0, 0, 0, 0];
        assert_eq!(fadt[244..256], sleep_gas, "SLEEP_CONTROL_REG");
        assert_eq!(fadt[256..268], sleep_gas, "SLEEP_STATUS_REG");
        assert_eq!(&fadt[268..272], b"MVMM");

        assert_eq!(u32_at(&madt, 36), layout::LAPIC_START as u32);
        assert_eq!(u32_at(&madt, 40), MADT_PCAT_COMPAT);
        let entries = madt_entries(&madt);
        let lapics: Vec<_> = entries.iter().filter(|(t, _)| *t == 0).collect();
        assert_eq!(lapics.len(), 4);
        for (i, (_, e)) in lapics.iter().enumerate() {
            assert_eq!(
                (e[2], e[3]),
                (i as u8, i as u8),
                "processor UID and APIC ID"
            );
            assert_eq!(u32_at(e, 4), 1, "enabled");
        }
        let ioapics: Vec<_> = entries.iter().filter(|(t, _)| *t == 1).collect();
        assert_eq!(ioapics.len(), 1);
        let ioapic = ioapics[0].1;
        assert_eq!(ioapic[2], ioapic_id(4));
        assert_eq!(u32_at(ioapic, 4), layout::IOAPIC_START as u32);
        assert_eq!(u32_at(ioapic, 8), 0, "GSI base");
        assert!(
            entries.iter().all(|(t, _)| *t != 2),
            "no interrupt source override"
        );
        let nmis: Vec<_> = entries.iter().filter(|(t, _)| *t == 4).collect();
        assert_eq!(nmis.len(), 1);
        assert_eq!(nmis[0].1, [4, 6, 0xff, 0, 0, 1]);

        assert_eq!(count(&dsdt, b"LNRO0005"), 2);
        assert_eq!(count(&dsdt, b"_S5_"), 1);
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| w == &needle)
            .count()
    }

    #[test]
    fn madt_has_one_lapic_per_vcpu() {
        for vcpus in [1, 2, 37, MAX_VCPUS] {
            let madt = create_madt(vcpus).unwrap();
            assert_eq!(sum(&madt), 0);
            assert_eq!(u32_at(&madt, 4) as usize, madt.len());
            let ids: Vec<u8> = madt_entries(&madt)
                .iter()
                .filter(|(t, _)| *t == 0)
                .map(|(_, e)| e[3])
                .collect();
            assert_eq!(ids, (0..vcpus).collect::<Vec<_>>());
        }
    }

    #[test]
    fn dsdt_lists_every_device() {
        for n in [0, 1, 19, 256] {
            let dsdt = create_dsdt(&devices(n)).unwrap();
            assert_eq!(sum(&dsdt), 0);
            assert_eq!(u32_at(&dsdt, 4) as usize, dsdt.len());
            assert_eq!(count(&dsdt, b"LNRO0005"), n);
        }
    }

    #[test]
    fn largest_configuration_fits() {
        let tables = build_tables(MAX_VCPUS, &devices(256), layout::ACPI_START, SMBIOS_START);
        let tables = tables.unwrap();
        let last = tables.last().unwrap();
        assert!(last.addr + last.bytes.len() as u64 <= SMBIOS_START);
    }

    #[test]
    fn rejects_bad_input() {
        let mem = guest_mem();
        let bad_vcpus = [0, MAX_VCPUS + 1];
        for vcpus in bad_vcpus {
            let err = create_acpi_tables(&mem, vcpus, &[]).unwrap_err();
            assert!(matches!(err, AcpiError::InvalidVcpuCount(v) if v == vcpus));
        }
        let err = create_acpi_tables(&mem, 1, &devices(257)).unwrap_err();
        assert!(matches!(err, AcpiError::TooManyDevices(257)));

        let window = |base, size| [MmioDeviceInfo { base, size, irq: 5 }];
        let bad_windows = [
            window(0xffff_f000, 0x2000),
            window(1 << 32, 0x1000),
            window(0xd000_0000, 0),
            window(u64::MAX, 2),
        ];
        for w in bad_windows {
            let err = create_acpi_tables(&mem, 1, &w).unwrap_err();
            assert!(
                matches!(err, AcpiError::InvalidDeviceWindow { .. }),
                "{err}"
            );
        }
        // A window ending exactly at 4 GiB is fine.
        create_acpi_tables(&mem, 1, &window(0xffff_f000, 0x1000)).unwrap();

        let irq = [MmioDeviceInfo {
            irq: IOAPIC_NUM_PINS,
            ..devices(1)[0]
        }];
        let err = create_acpi_tables(&mem, 1, &irq).unwrap_err();
        assert!(matches!(
            err,
            AcpiError::InvalidDeviceIrq { index: 0, irq: 24 }
        ));
    }

    #[test]
    fn rejects_tables_past_the_limit() {
        let start = layout::ACPI_START;
        let err = build_tables(8, &devices(4), start, start + 256).map(|_| ());
        assert!(
            matches!(err, Err(AcpiError::TablesTooLarge { limit, .. }) if limit == start + 256)
        );
    }

    #[test]
    fn reports_unbacked_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = create_acpi_tables(&mem, 1, &[]).unwrap_err();
        assert!(
            matches!(err, AcpiError::WriteTable { table: "RSDP", .. }),
            "{err}"
        );
    }

    /// Disassembles `table` with iasl and returns the .dsl text.
    fn iasl_disassemble(table: &[u8], name: &str) -> String {
        let dir = std::env::temp_dir().join(format!("mvmm-acpi-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input: PathBuf = dir.join(format!("{name}.dat"));
        std::fs::write(&input, table).unwrap();
        let output = Command::new("iasl").arg("-d").arg(&input).output();
        let output = match output {
            Ok(o) => o,
            Err(e) => panic!("cannot run iasl ({e}): apt-get install acpica-tools"),
        };
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl")));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(output.status.success(), "iasl failed: {output:?}");
        dsl.unwrap()
    }

    #[test]
    fn iasl_disassembles_dsdt() {
        let devs = devices(2);
        let dsl = iasl_disassemble(&create_dsdt(&devs).unwrap(), "dsdt");
        assert!(!dsl.contains("Error"), "{dsl}");
        assert!(dsl.contains("Name (_S5, Package (0x04)"), "{dsl}");
        assert!(dsl.contains("Device (COM1)") && dsl.contains("EisaId (\"PNP0501\")"));
        assert!(dsl.contains("Device (KBD)") && dsl.contains("EisaId (\"PNP0303\")"));
        // The power button, and the GED that presses it from the VMM's event register.
        assert!(dsl.contains("Device (PWRB)") && dsl.contains("EisaId (\"PNP0C0C\")"));
        let ged = &dsl[dsl.find("Device (GED)").expect(&dsl)..];
        let ged = &ged[..ged.find("Device (VR00)").unwrap_or(ged.len())];
        for line in [
            "Name (_HID, \"ACPI0013\"",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
            &format!("0x{:08X},", layout::GED_IRQ),
            &format!(
                "OperationRegion (GDST, SystemIO, 0x{:04X}, One)",
                layout::GED_PORT
            ),
            "Method (_EVT, 1, Serialized)",
            "Local0 = GDAT",
            "Local1 = (Local0 & One)",
            "Notify (\\_SB.PWRB, 0x80)",
        ] {
            assert!(ged.contains(line), "GED lacks {line:?}:\n{ged}");
        }
        assert_eq!(GED_EVENT_POWER_BUTTON, 1, "the AML tests bit 0 (`One`)");
        for (i, d) in devs.iter().enumerate() {
            let start = dsl.find(&format!("Device (VR{i:02X})")).expect(&dsl);
            let body = &dsl[start..];
            let body = &body[..body[1..].find("Device (").map_or(body.len(), |e| e + 1)];
            assert!(body.contains("Name (_HID, \"LNRO0005\")"), "{body}");
            assert!(body.contains(&format!("0x{:08X},         // Address Base", d.base)));
            assert!(body.contains(&format!("0x{:08X},         // Address Length", d.size)));
            assert!(body.contains(&format!("0x{:08X},", d.irq)), "{body}");
            assert!(body.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive"));
        }
    }

    /// Runs the GED's `_EVT` in ACPICA's AML interpreter (acpiexec, from acpica-tools), with
    /// the event register reading `register`; returns whether it notified the power button.
    fn ged_evt_notifies_power_button(dsdt: &[u8], register: u8) -> bool {
        let dir = std::env::temp_dir().join(format!("mvmm-acpiexec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let table = dir.join(format!("dsdt-{register}.aml"));
        std::fs::write(&table, dsdt).unwrap();
        // -fv fills simulated operation regions (our SystemIO register) with the value.
        let output = Command::new("acpiexec")
            .args(["-fv", &register.to_string(), "-b"])
            .arg(format!("execute \\_SB.GED._EVT {}", layout::GED_IRQ))
            .arg(&table)
            .output();
        let _ = std::fs::remove_dir_all(&dir);
        let output = match output {
            Ok(o) => o,
            Err(e) => panic!("cannot run acpiexec ({e}): apt-get install acpica-tools"),
        };
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("Evaluating \\_SB.GED._EVT"), "{text}");
        assert!(!text.contains("AE_"), "AML error: {text}");
        text.contains("Notify on [PWRB]") && text.contains("Value 0x80")
    }

    #[test]
    fn acpiexec_runs_the_ged_event_method() {
        let dsdt = create_dsdt(&devices(1)).unwrap();
        assert!(ged_evt_notifies_power_button(&dsdt, GED_EVENT_POWER_BUTTON));
        assert!(!ged_evt_notifies_power_button(&dsdt, 0));
        assert!(
            !ged_evt_notifies_power_button(&dsdt, 0xfe),
            "other bits are not the button"
        );
    }

    #[test]
    fn iasl_disassembles_fadt_and_madt() {
        let (fadt, _, madt) = tables_from_guest(2, 1);
        let dsl = iasl_disassemble(&fadt, "facp");
        for line in [
            "Hardware Reduced (V5) : 1",
            "8042 Present on ports 60/64 (V2) : 1",
            "VGA Not Present (V4) : 1",
        ] {
            assert!(dsl.contains(line), "missing {line:?} in {dsl}");
        }
        let dsl = iasl_disassemble(&madt, "apic");
        assert_eq!(
            dsl.matches("Subtable Type : 00 [Processor Local APIC]")
                .count(),
            2
        );
        assert!(dsl.contains("Subtable Type : 01 [I/O APIC]"), "{dsl}");
        assert!(dsl.contains("Subtable Type : 04 [Local APIC NMI]"), "{dsl}");
    }
}
