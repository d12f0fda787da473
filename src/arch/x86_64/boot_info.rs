//! What the kernel is told at entry: the e820 memory map, the Linux zero page (boot_params)
//! and the PVH start_info. Both protocols get the same memory map.

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
/// Linux reads at most this many e820 entries from the zero page.
const E820_MAX_ENTRIES: usize = 128;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// The boot protocol's "undefined" loader id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const BOOT_FLAG: u16 = 0xaa55;
const HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_ALIGNMENT: u32 = 0x100_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BootInfoError {
    #[error("guest memory starts at {0:#x}; it must start at 0")]
    MemoryNotAtZero(u64),
    #[error(
        "guest memory is too small: it must extend past {:#x}",
        layout::HIMEM_START
    )]
    MemoryTooSmall,
    #[error("cannot write {what} into guest memory: {source}")]
    Memory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// Builds the memory map from the RAM regions: the legacy BIOS area (EBDA, VGA hole, ROMs,
/// where the MP and ACPI tables live) is reserved; everything else that is RAM is usable.
/// The entries add up to exactly the guest's RAM.
pub fn e820_map(ram: &[(GuestAddress, usize)]) -> Result<Vec<E820Entry>, BootInfoError> {
    let mut entries = Vec::with_capacity(ram.len() + 2);
    for (i, &(start, size)) in ram.iter().enumerate() {
        let (start, size) = (start.raw_value(), size as u64);
        if i == 0 {
            if start != 0 {
                return Err(BootInfoError::MemoryNotAtZero(start));
            }
            if size <= layout::HIMEM_START {
                return Err(BootInfoError::MemoryTooSmall);
            }
            entries.push(E820Entry {
                addr: 0,
                size: layout::EBDA_START,
                kind: E820_RAM,
            });
            entries.push(E820Entry {
                addr: layout::EBDA_START,
                size: layout::HIMEM_START - layout::EBDA_START,
                kind: E820_RESERVED,
            });
            entries.push(E820Entry {
                addr: layout::HIMEM_START,
                size: size - layout::HIMEM_START,
                kind: E820_RAM,
            });
        } else {
            entries.push(E820Entry {
                addr: start,
                size,
                kind: E820_RAM,
            });
        }
    }
    Ok(entries)
}

/// Everything the zero page or start_info points at.
pub struct BootInfo<'a> {
    pub e820: &'a [E820Entry],
    pub cmdline_addr: GuestAddress,
    /// Length of the command line without its NUL terminator.
    pub cmdline_len: usize,
    pub initrd: Option<(GuestAddress, usize)>,
    pub rsdp: Option<GuestAddress>,
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootInfoError {
    move |source| BootInfoError::Memory { what, source }
}

/// Builds the Linux zero page. `header` is the bzImage's setup header; ELF kernels get a
/// synthesized one, as they have none.
pub fn zero_page(header: Option<setup_header>, info: &BootInfo) -> boot_params {
    let mut params = boot_params {
        hdr: header.unwrap_or(setup_header {
            boot_flag: BOOT_FLAG,
            header: HDR_MAGIC,
            kernel_alignment: KERNEL_ALIGNMENT,
            ..Default::default()
        }),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = info.cmdline_addr.raw_value() as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(rsdp) = info.rsdp {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }
    let count = info.e820.len().min(E820_MAX_ENTRIES);
    for (slot, entry) in params.e820_table.iter_mut().zip(&info.e820[..count]) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind;
    }
    params.e820_entries = count as u8;
    params
}

pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    info: &BootInfo,
) -> Result<(), BootInfoError> {
    mem.write_obj(
        zero_page(header, info),
        GuestAddress(layout::ZERO_PAGE_START),
    )
    .map_err(mem_err("the zero page"))
}

/// Writes hvm_start_info, its memory map and (for an initrd) its module list.
pub fn write_pvh_start_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootInfoError> {
    let memmap_addr = GuestAddress(layout::PVH_MEMMAP_START);
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: info.cmdline_addr.raw_value(),
        memmap_paddr: memmap_addr.raw_value(),
        memmap_entries: info.e820.len() as u32,
        rsdp_paddr: info.rsdp.map_or(0, |a| a.raw_value()),
        ..Default::default()
    };
    let mut addr = memmap_addr;
    for entry in info.e820 {
        let table_entry = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        };
        mem.write_obj(table_entry, addr)
            .map_err(mem_err("the PVH memory map"))?;
        addr = addr.unchecked_add(std::mem::size_of::<hvm_memmap_table_entry>() as u64);
    }
    if let Some((initrd_addr, size)) = info.initrd {
        let module = hvm_modlist_entry {
            paddr: initrd_addr.raw_value(),
            size: size as u64,
            ..Default::default()
        };
        mem.write_obj(module, addr)
            .map_err(mem_err("the PVH module list"))?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = addr.raw_value();
    }
    mem.write_obj(start_info, GuestAddress(layout::PVH_INFO_START))
        .map_err(mem_err("the PVH start_info"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn e820_adds_up_to_ram_and_reserves_the_bios_area() {
        let ram = [(GuestAddress(0), (64 * MIB) as usize)];
        let map = e820_map(&ram).unwrap();
        assert_eq!(map.iter().map(|e| e.size).sum::<u64>(), 64 * MIB);
        assert_eq!(map[1].kind, E820_RESERVED);
        assert!(map[1].addr <= layout::ACPI_START && layout::ACPI_END <= map[2].addr);
        // Contiguous and sorted.
        for pair in map.windows(2) {
            assert_eq!(pair[0].addr + pair[0].size, pair[1].addr);
        }
    }

    #[test]
    fn e820_covers_ram_above_the_mmio_hole() {
        let low = layout::MMIO_HOLE_START;
        let ram = [
            (GuestAddress(0), low as usize),
            (GuestAddress(layout::FOUR_GIB), (3072 * MIB - low) as usize),
        ];
        let map = e820_map(&ram).unwrap();
        assert_eq!(map.iter().map(|e| e.size).sum::<u64>(), 3072 * MIB);
        let last = map.last().unwrap();
        assert_eq!((last.addr, last.kind), (layout::FOUR_GIB, E820_RAM));
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= low || e.addr >= layout::FOUR_GIB));
    }

    #[test]
    fn e820_rejects_unusable_layouts() {
        assert!(e820_map(&[(GuestAddress(0x1000), 0x100_0000)]).is_err());
        assert!(e820_map(&[(GuestAddress(0), 0x8_0000)]).is_err());
    }

    fn sample_info(e820: &[E820Entry]) -> BootInfo<'_> {
        BootInfo {
            e820,
            cmdline_addr: GuestAddress(layout::CMDLINE_START),
            cmdline_len: 11,
            initrd: Some((GuestAddress(0x200_0000), 0x1234)),
            rsdp: Some(GuestAddress(layout::ACPI_START)),
        }
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_rsdp_and_map() {
        let e820 = e820_map(&[(GuestAddress(0), 0x400_0000)]).unwrap();
        let params = zero_page(None, &sample_info(&e820));
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ hdr.header }, HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ hdr.ramdisk_image }, 0x200_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ params.acpi_rsdp_addr }, layout::ACPI_START);
        assert_eq!(params.e820_entries as usize, e820.len());
        let third = params.e820_table[2];
        assert_eq!(
            ({ third.addr }, { third.r#type }),
            (layout::HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn zero_page_keeps_the_bzimage_header() {
        let e820 = e820_map(&[(GuestAddress(0), 0x400_0000)]).unwrap();
        let header = setup_header {
            header: HDR_MAGIC,
            version: 0x020f,
            code32_start: 0x10_0000,
            ..Default::default()
        };
        let params = zero_page(Some(header), &sample_info(&e820));
        assert_eq!({ params.hdr.version }, 0x020f);
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
    }

    #[test]
    fn pvh_start_info_points_at_map_cmdline_and_module() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x400_0000)]).unwrap();
        let e820 = e820_map(&[(GuestAddress(0), 0x400_0000)]).unwrap();
        write_pvh_start_info(&mem, &sample_info(&e820)).unwrap();
        let si: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC);
        assert_eq!(si.cmdline_paddr, layout::CMDLINE_START);
        assert_eq!(si.memmap_entries as usize, e820.len());
        assert_eq!(si.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x200_0000, 0x1234));
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(si.memmap_paddr)).unwrap();
        assert_eq!((first.addr, first.type_), (0, E820_RAM));
        // The map and module list must not run into the zero page.
        assert!(si.modlist_paddr + 32 <= layout::ZERO_PAGE_START);
    }
}
