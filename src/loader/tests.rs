use std::io::Write;
use std::path::PathBuf;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MIB: usize = 1 << 20;

fn guest_image(name: &str) -> PathBuf {
    std::path::Path::new(env!("MVMM_TESTGUEST_DIR")).join(name)
}

fn memory(mib: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib * MIB)]).unwrap()
}

fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f
}

#[test]
fn each_image_form_gets_its_entry_protocol() {
    let mem = memory(16);
    let pvh = load_kernel(&mem, &guest_image("testguest-pvh.elf")).unwrap();
    assert_eq!(pvh.format, KernelFormat::ElfPvh);
    assert_eq!(pvh.entry, BootEntry::Pvh { entry: 0x10_0000 });

    let elf = load_kernel(&mem, &guest_image("testguest-elf64.elf")).unwrap();
    assert_eq!(elf.format, KernelFormat::Elf64);
    assert_eq!(elf.entry, BootEntry::Linux64 { entry: 0x10_0200 });
    assert!(elf.setup_header.is_none());

    let bz = load_kernel(&mem, &guest_image("testguest.bzImage")).unwrap();
    assert_eq!(bz.format, KernelFormat::BzImage);
    assert_eq!(bz.entry, BootEntry::Linux64 { entry: 0x10_0200 });
    let header = bz.setup_header.unwrap();
    // The kernel's decompression room (init_size) counts as used.
    assert!(bz.end >= 0x10_0000 + u64::from(header.init_size));
}

#[test]
fn garbage_and_tiny_files_are_not_kernels() {
    let mem = memory(16);
    for bytes in [&b""[..], b"\x7fEL", &[0u8; 4096]] {
        let f = temp_file(bytes);
        assert!(
            matches!(
                load_kernel(&mem, f.path()),
                Err(LoaderError::UnknownFormat(_))
            ),
            "{} bytes",
            bytes.len()
        );
    }
}

#[test]
fn truncated_bzimage_is_detected_before_loading() {
    let mem = memory(16);
    let image = std::fs::read(guest_image("testguest.bzImage")).unwrap();
    let f = temp_file(&image[..image.len() - 100]);
    match load_kernel(&mem, f.path()) {
        Err(LoaderError::TruncatedBzImage {
            expected, actual, ..
        }) => {
            assert_eq!(expected, image.len() as u64);
            assert_eq!(actual, image.len() as u64 - 100);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn old_bzimage_without_64bit_entry_is_refused() {
    let mem = memory(16);
    let mut image = std::fs::read(guest_image("testguest.bzImage")).unwrap();
    // xloadflags lives at 0x236 in the setup header.
    image[0x236] = 0;
    let f = temp_file(&image);
    assert!(matches!(
        load_kernel(&mem, f.path()),
        Err(LoaderError::Not64BitBzImage(_))
    ));
}

#[test]
fn kernel_larger_than_memory_is_an_error() {
    // 2 MiB of RAM cannot hold the kernel's decompression area above 1 MiB... but the test
    // guest is tiny, so shrink memory to just past 1 MiB.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_4000)]).unwrap();
    assert!(load_kernel(&mem, &guest_image("testguest-pvh.elf")).is_err());
    assert!(load_kernel(&mem, &guest_image("testguest.bzImage")).is_err());
}

#[test]
fn initrd_goes_high_page_aligned_and_above_the_kernel() {
    let mem = memory(16);
    let kernel = load_kernel(&mem, &guest_image("testguest.bzImage")).unwrap();
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let f = temp_file(&data);
    let (addr, size) = load_initrd(&mem, f.path(), &kernel).unwrap();
    assert_eq!(size, data.len());
    assert_eq!(addr.0 % 4096, 0);
    assert!(addr.0 + size as u64 <= kernel.initrd_limit);
    assert!(
        addr.0 + size as u64 > kernel.initrd_limit - 4096,
        "placed as high as it fits"
    );
    let mut back = vec![0u8; size];
    mem.read_slice(&mut back, addr).unwrap();
    assert_eq!(back, data);
}

#[test]
fn initrd_larger_than_memory_is_refused() {
    let mem = memory(16);
    let kernel = load_kernel(&mem, &guest_image("testguest-pvh.elf")).unwrap();
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(16 * MIB as u64).unwrap();
    assert!(matches!(
        load_initrd(&mem, f.path(), &kernel),
        Err(LoaderError::InitrdTooBig { .. })
    ));
}

#[test]
fn cmdline_is_nul_terminated() {
    let mem = memory(16);
    let addr = load_cmdline(&mem, "console=ttyS0 x=1").unwrap();
    let mut buf = [0xffu8; 18];
    mem.read_slice(&mut buf, addr).unwrap();
    assert_eq!(&buf, b"console=ttyS0 x=1\0");
}
