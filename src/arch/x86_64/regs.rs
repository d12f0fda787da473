//! Initial vCPU state for the two entry protocols: MSRs, FPU, segments, paging, LAPIC LINTs.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

/// How the first instruction of the guest is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = zero page.
    Linux64 { entry: u64 },
    /// PVH: 32-bit protected mode without paging, EBX = hvm_start_info.
    Pvh { entry: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM rejected vCPU {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {total} boot MSRs (first refused: {first:#x})")]
    Msrs {
        set: usize,
        total: usize,
        first: u32,
    },
    #[error("cannot write {what} into guest memory: {source}")]
    Memory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Access byte and G/DB/L nibble of a descriptor, as one 16-bit value (access in bits 0-7,
/// flags in bits 12-15).
const CODE64: u16 = 0xa09b;
const CODE32: u16 = 0xc09b;
const DATA: u16 = 0xc093;
const TSS: u16 = 0x808b;

const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// Encodes a GDT descriptor.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((flags & 0xff) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((flags >> 12) & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// The KVM view of the segment a descriptor describes.
fn segment(flags: u16, base: u32, limit: u32, selector: u16) -> kvm_segment {
    let bit = |n: u16| ((flags >> n) & 1) as u8;
    let granular = bit(15) == 1;
    kvm_segment {
        base: u64::from(base),
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector,
        type_: (flags & 0xf) as u8,
        present: bit(7),
        dpl: ((flags >> 5) & 3) as u8,
        db: bit(14),
        s: bit(4),
        l: bit(13),
        g: bit(15),
        avl: bit(12),
        unusable: 0,
        padding: 0,
    }
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))
}

/// MSRs a kernel expects zeroed or set as firmware leaves them.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    // MTRRs enabled with write-back as the default memory type: otherwise guests treat all of
    // RAM as uncached.
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).expect("a handful of MSRs fits a FAM struct");
    let set = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            total: entries.len(),
            first: entries[set].index,
        });
    }
    Ok(())
}

pub fn setup_regs(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), RegsError> {
    let regs = match entry {
        BootEntry::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rsi: layout::ZERO_PAGE_START,
            ..Default::default()
        },
        BootEntry::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: layout::PVH_INFO_START,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(kvm("registers"))
}

/// Writes the boot GDT (and an empty IDT) and loads segments, paging and mode for `entry`.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    entry: BootEntry,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    let code = match entry {
        BootEntry::Linux64 { .. } => CODE64,
        BootEntry::Pvh { .. } => CODE32,
    };
    let gdt = [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA, 0, 0xfffff),
        gdt_entry(TSS, 0, 0xfffff),
    ];
    write_gdt_and_idt(mem, &gdt, &mut sregs)?;

    sregs.cs = segment(code, 0, 0xfffff, CODE_SELECTOR);
    let data = segment(DATA, 0, 0xfffff, DATA_SELECTOR);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(TSS, 0, 0xfffff, TSS_SELECTOR);

    match entry {
        BootEntry::Linux64 { .. } => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))
}

fn write_gdt_and_idt(
    mem: &GuestMemoryMmap,
    gdt: &[u64],
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(layout::BOOT_GDT_START))
        .map_err(|source| RegsError::Memory {
            what: "the GDT",
            source,
        })?;
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(|source| RegsError::Memory {
            what: "the IDT",
            source,
        })?;
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (bytes.len() - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages, as the 64-bit boot protocol requires for
/// the kernel image, zero page and command line.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE_PAGE: u64 = 0x80;
    let err = |source| RegsError::Memory {
        what: "the boot page tables",
        source,
    };
    mem.write_obj(
        layout::PDPT_START | PRESENT_WRITABLE,
        GuestAddress(layout::PML4_START),
    )
    .map_err(err)?;
    mem.write_obj(
        layout::PD_START | PRESENT_WRITABLE,
        GuestAddress(layout::PDPT_START),
    )
    .map_err(err)?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | HUGE_PAGE | PRESENT_WRITABLE).to_le_bytes())
        .collect();
    mem.write_slice(&pd, GuestAddress(layout::PD_START))
        .map_err(err)
}

/// Wires LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware does on a PC.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7;
    const DELIVERY_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC state"))?;
    for (reg, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC state"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_architectural_encoding() {
        assert_eq!(gdt_entry(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(CODE32, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(
            gdt_entry(0x0093, 0x1234_5678, 0xabcde),
            0x120a_9334_5678_bcde
        );
    }

    #[test]
    fn segments_decode_the_descriptor_flags() {
        let cs = segment(CODE64, 0, 0xfffff, CODE_SELECTOR);
        assert_eq!(
            (cs.type_, cs.present, cs.s, cs.l, cs.db, cs.g),
            (0xb, 1, 1, 1, 0, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let cs32 = segment(CODE32, 0, 0xfffff, CODE_SELECTOR);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let tss = segment(TSS, 0, 0xfffff, TSS_SELECTOR);
        assert_eq!((tss.type_, tss.s, tss.g), (0xb, 0, 1));
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_identity_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPT_START | 3);
        let last: u64 = mem
            .read_obj(GuestAddress(layout::PD_START + 511 * 8))
            .unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn boot_msrs_are_unique() {
        let msrs = boot_msrs();
        let mut indices: Vec<u32> = msrs.iter().map(|m| m.index).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), msrs.len());
    }
}
