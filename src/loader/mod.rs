//! Kernel image detection and loading: bzImage (64-bit boot protocol), ELF with a PVH note,
//! ELF with only a 64-bit entry. Also the initrd and the command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::layout;
use crate::arch::regs::BootEntry;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    ElfPvh,
    Elf64,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::BzImage => "bzImage (64-bit boot protocol)",
            KernelFormat::ElfPvh => "ELF vmlinux (PVH entry)",
            KernelFormat::Elf64 => "ELF vmlinux (64-bit entry)",
        })
    }
}

/// A kernel in guest memory, ready for its boot information.
#[derive(Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: BootEntry,
    /// The bzImage's setup header, to copy into the zero page.
    pub setup_header: Option<setup_header>,
    /// First byte above the kernel, including the room a bzImage needs to decompress.
    pub end: u64,
    /// Highest address the initrd may end at (exclusive), from the boot protocol.
    pub initrd_limit: u64,
}

/// These are all the user's to fix (wrong file, too little memory): the VMM exits with 2.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a Linux kernel: it is neither an ELF file nor a bzImage (no \"HdrS\" signature at 0x202)", .0.display())]
    UnknownFormat(PathBuf),
    #[error("{} is a truncated bzImage: its header promises {expected} bytes, the file has {actual}", path.display())]
    TruncatedBzImage {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{} is a bzImage without 64-bit boot support (needs boot protocol 2.12+ with XLF_KERNEL_64)", .0.display())]
    Not64BitBzImage(PathBuf),
    #[error("cannot load kernel {}: {source} (a damaged or truncated image, or more than machine.memory_mib holds)", path.display())]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("kernel {} needs memory up to {end:#x}, more than machine.memory_mib gives", path.display())]
    KernelTooBig { path: PathBuf, end: u64 },
    #[error("initrd {} ({size} bytes) does not fit in guest memory above the kernel; raise machine.memory_mib", path.display())]
    InitrdTooBig { path: PathBuf, size: u64 },
    #[error("cannot write the command line into guest memory: {0}")]
    Cmdline(vm_memory::GuestMemoryError),
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
const HDR_MAGIC_OFFSET: usize = 0x202;
const HDR_MAGIC: &[u8; 4] = b"HdrS";
const XLF_KERNEL_64: u16 = 1 << 0;
/// The 64-bit entry sits 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 0x1000;

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Read {
        path: path.to_owned(),
        source,
    }
}

/// Looks at the first bytes of an image to tell its format.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, LoaderError> {
    let mut head = [0u8; HDR_MAGIC_OFFSET + 4];
    file.seek(SeekFrom::Start(0)).map_err(read_err(path))?;
    let n = read_up_to(file, &mut head).map_err(read_err(path))?;
    if n >= 4 && &head[..4] == ELF_MAGIC {
        // PVH or not is decided by the ELF loader, which parses the notes.
        return Ok(KernelFormat::Elf64);
    }
    if n == head.len() && &head[HDR_MAGIC_OFFSET..] == HDR_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(LoaderError::UnknownFormat(path.to_owned()))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// Loads the kernel image into guest memory and tells how to enter it.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let mut file = File::open(path).map_err(read_err(path))?;
    let load_err = |source| LoaderError::Load {
        path: path.to_owned(),
        source,
    };
    let highmem = Some(GuestAddress(layout::HIMEM_START));
    let low_ram_end = low_ram_end(mem);
    match detect_format(&mut file, path)? {
        KernelFormat::BzImage => {
            let header = read_setup_header(&mut file, path)?;
            file.seek(SeekFrom::Start(0)).map_err(read_err(path))?;
            let result = BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?;
            let load = result.kernel_load.raw_value();
            // The kernel decompresses in place and needs init_size bytes from its load address.
            let end = (load + u64::from(header.init_size)).max(result.kernel_end);
            if end > low_ram_end {
                return Err(LoaderError::KernelTooBig {
                    path: path.to_owned(),
                    end,
                });
            }
            let initrd_limit = match header.initrd_addr_max {
                0 => low_ram_end,
                max => low_ram_end.min(u64::from(max) + 1),
            };
            Ok(LoadedKernel {
                format: KernelFormat::BzImage,
                entry: BootEntry::Linux64 {
                    entry: load + BZIMAGE_64BIT_ENTRY_OFFSET,
                },
                setup_header: result.setup_header,
                end,
                initrd_limit,
            })
        }
        KernelFormat::ElfPvh | KernelFormat::Elf64 => {
            file.seek(SeekFrom::Start(0)).map_err(read_err(path))?;
            let result = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
            let (format, entry) = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (
                    KernelFormat::ElfPvh,
                    BootEntry::Pvh {
                        entry: addr.raw_value(),
                    },
                ),
                _ => (
                    KernelFormat::Elf64,
                    BootEntry::Linux64 {
                        entry: result.kernel_load.raw_value(),
                    },
                ),
            };
            Ok(LoadedKernel {
                format,
                entry,
                setup_header: None,
                end: result.kernel_end,
                initrd_limit: low_ram_end,
            })
        }
    }
}

/// Reads and checks the bzImage setup header: 64-bit capable and not truncated.
fn read_setup_header(file: &mut File, path: &Path) -> Result<setup_header, LoaderError> {
    let mut header = setup_header::default();
    file.seek(SeekFrom::Start(SETUP_HEADER_OFFSET))
        .map_err(read_err(path))?;
    file.read_exact(header.as_mut_slice())
        .map_err(read_err(path))?;
    if header.version < 0x020c || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoaderError::Not64BitBzImage(path.to_owned()));
    }
    let setup_sects = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    // syssize counts the protected-mode part in 16-byte paragraphs.
    let expected = (setup_sects + 1) * 512 + u64::from(header.syssize) * 16;
    let actual = file.metadata().map_err(read_err(path))?.len();
    if actual < expected {
        return Err(LoaderError::TruncatedBzImage {
            path: path.to_owned(),
            expected,
            actual,
        });
    }
    Ok(header)
}

/// End of the RAM region that starts at address 0 (below the MMIO hole).
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.find_region(GuestAddress(0))
        .map_or(0, |r| r.start_addr().raw_value() + r.len())
}

/// Places the initrd at the highest page-aligned address below `kernel.initrd_limit` and above
/// the kernel, as Linux boot loaders do. Returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(GuestAddress, usize), LoaderError> {
    let mut file = File::open(path).map_err(read_err(path))?;
    let size = file.metadata().map_err(read_err(path))?.len();
    let too_big = || LoaderError::InitrdTooBig {
        path: path.to_owned(),
        size,
    };
    let start = kernel
        .initrd_limit
        .checked_sub(size)
        .map(|s| s & !(PAGE_SIZE - 1))
        .filter(|&s| s >= kernel.end.max(layout::HIMEM_START))
        .ok_or_else(too_big)?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|_| too_big())?;
    Ok((GuestAddress(start), size as usize))
}

/// Writes the NUL-terminated command line at its fixed address.
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<GuestAddress, LoaderError> {
    let addr = GuestAddress(layout::CMDLINE_START);
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, addr)
        .map_err(LoaderError::Cmdline)?;
    Ok(addr)
}

#[cfg(test)]
mod tests;
