//! Guest physical memory layout. One place for every fixed address the boot flow uses.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA (RAM, unused by our guests)
//! 0x0000_0500  boot GDT, then IDT
//! 0x0000_6000  PVH start_info and its memory map
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  initial boot stack top
//! 0x0000_9000  boot page tables (PML4, PDPT, PD: identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP table (reserved in the e820 map up to 1 MiB)
//! 0x000e_0000  ACPI RSDP, then the other ACPI tables (reserved)
//! 0x0010_0000  kernel load address (HIMEM_START)
//! ...          initrd, placed as high as the boot protocol allows
//! 0xb000_0000  32-bit MMIO hole: virtio-mmio windows, IOAPIC, LAPIC (no RAM)
//! 0x1_0000_0000 RAM above 4 GiB, when memory_mib does not fit below the hole
//! ```

/// Boot GDT and IDT, loaded before the first instruction runs.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map table.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux boot protocol zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Command line; the size limit is the one Linux x86 accepts.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first) in the BIOS read-only area the kernel scans.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Where protected-mode kernels are loaded and where usable high RAM begins.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: guest RAM never overlaps [MMIO_HOLE_START, 4 GiB).
pub const MMIO_HOLE_START: u64 = 0xb000_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// virtio-mmio windows, one 4 KiB page each, allocated upward in config order.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Legacy interrupt controller addresses (fixed by KVM's in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

/// IRQ lines: the i8042 keyboard is IRQ 1, the UART IRQ 4; virtio devices take 5..=23 in
/// order.
pub const I8042_KBD_IRQ: u32 = 1;
pub const SERIAL_IRQ: u32 = 4;
pub const VIRTIO_IRQ_FIRST: u32 = 5;
pub const VIRTIO_IRQ_LAST: u32 = 23;

/// I/O port of the ACPI sleep control/status register pair (S5 = poweroff).
pub const ACPI_SLEEP_PORT: u16 = 0x3c0;
/// I/O port of the ACPI Generic Event Device's event register (bit 0: power button pressed;
/// reading clears it), and the GED's interrupt line: COM2's ISA IRQ, unused here.
pub const GED_PORT: u16 = 0x3c4;
pub const GED_IRQ: u32 = 3;
