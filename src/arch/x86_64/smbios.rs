//! SMBIOS 3.0 tables: BIOS information (type 0), system information (type 1) and the end
//! marker (type 127).
//!
//! Linux finds the 64-bit "_SM3_" entry point by scanning 0xf0000..0x100000 on 16-byte
//! boundaries; the structure table follows it. The main use is handing the guest a stable
//! system UUID: systemd derives /etc/machine-id from /sys/class/dmi/id/product_uuid on a VM
//! whose machine id is not yet initialised.
//!
//! UUID byte order: SMBIOS 2.6+ stores the first three UUID fields (time_low, time_mid,
//! time_hi_and_version) little-endian, and Linux prints them back swapped ("%pUl"). The
//! `[u8; 16]` taken here is in the usual RFC 4122 order, i.e. the order of the hex digits of
//! the string form, and is swapped on the way into the table. So a machine id
//! `0123456789abcdef0123456789abcdef` passed through [`parse_machine_id`] shows up in the guest
//! as `product_uuid` `01234567-89ab-cdef-0123-456789abcdef`.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout;

/// Address of the SMBIOS entry point; the ACPI tables must end below it.
pub const SMBIOS_START: u64 = 0xf_0000;

#[derive(Debug, thiserror::Error)]
pub enum SmbiosError {
    #[error("SMBIOS tables end at {end:#x}, past the end of the BIOS area at {limit:#x}")]
    TablesTooLarge { end: u64, limit: u64 },
    #[error("failed to write the SMBIOS {what} at {addr:#x}: {source}")]
    Write {
        what: &'static str,
        addr: u64,
        source: GuestMemoryError,
    },
}

const ENTRY_POINT_LEN: u8 = 24;
/// The structure table starts right after the entry point, on a 16-byte boundary.
const TABLE_START: u64 = SMBIOS_START + 32;
const SMBIOS_MAJOR: u8 = 3;
const SMBIOS_MINOR: u8 = 0;
const ENTRY_POINT_REVISION: u8 = 1; // the SMBIOS 3.0 entry point format

const TYPE_BIOS_INFO: u8 = 0;
const TYPE_SYSTEM_INFO: u8 = 1;
const TYPE_END_OF_TABLE: u8 = 127;

/// BIOS characteristics: bit 3, "BIOS characteristics are not supported".
const BIOS_CHARACTERISTICS_UNSUPPORTED: u64 = 1 << 3;
/// Characteristics extension byte 2, bit 4: "SMBIOS table describes a virtual machine".
const BIOS_EXT2_VIRTUAL_MACHINE: u8 = 1 << 4;
/// System wake-up type "Power Switch".
const WAKE_UP_POWER_SWITCH: u8 = 6;

const MANUFACTURER: &str = "mvmm";
const PRODUCT_NAME: &str = "mvmm microVM";
const BIOS_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Writes the SMBIOS entry point at [`SMBIOS_START`] and the structure table after it.
/// `uuid` is in RFC 4122 (string) byte order; `None` writes the all-zero "no UUID" value.
pub fn setup_smbios(mem: &GuestMemoryMmap, uuid: Option<[u8; 16]>) -> Result<(), SmbiosError> {
    let table = build_table(uuid);
    let end = TABLE_START + table.len() as u64;
    if end > layout::HIMEM_START {
        return Err(SmbiosError::TablesTooLarge {
            end,
            limit: layout::HIMEM_START,
        });
    }
    // Bounded by the check above, so the length fits the 32-bit field.
    let entry_point = build_entry_point(table.len() as u32, TABLE_START);
    let write = |what, bytes: &[u8], addr| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| SmbiosError::Write { what, addr, source })
    };
    write("structure table", &table, TABLE_START)?;
    write("entry point", &entry_point, SMBIOS_START)
}

/// Parses a 32-hex-digit machine id (as in /etc/machine-id, surrounding whitespace allowed)
/// into UUID bytes in string order, for [`setup_smbios`]. Returns `None` if it is malformed.
pub fn parse_machine_id(hex32: &str) -> Option<[u8; 16]> {
    let hex = hex32.trim().as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let mut uuid = [0u8; 16];
    for (byte, pair) in uuid.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(uuid)
}

fn hex_digit(c: u8) -> Option<u8> {
    char::from(c).to_digit(16).map(|d| d as u8)
}

/// RFC 4122 byte order to the SMBIOS wire order: the first three fields become little-endian.
fn uuid_to_smbios(uuid: [u8; 16]) -> [u8; 16] {
    let mut out = uuid;
    out[0..4].reverse();
    out[4..6].reverse();
    out[6..8].reverse();
    out
}

fn build_entry_point(table_len: u32, table_addr: u64) -> [u8; ENTRY_POINT_LEN as usize] {
    let mut ep = [0u8; ENTRY_POINT_LEN as usize];
    ep[0..5].copy_from_slice(b"_SM3_");
    // ep[5] is the checksum, filled in last.
    ep[6] = ENTRY_POINT_LEN;
    ep[7] = SMBIOS_MAJOR;
    ep[8] = SMBIOS_MINOR;
    ep[9] = 0; // docrev
    ep[10] = ENTRY_POINT_REVISION;
    ep[12..16].copy_from_slice(&table_len.to_le_bytes());
    ep[16..24].copy_from_slice(&table_addr.to_le_bytes());
    let sum = ep.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    ep[5] = 0u8.wrapping_sub(sum);
    ep
}

fn build_table(uuid: Option<[u8; 16]>) -> Vec<u8> {
    let mut table = Vec::new();

    let mut bios = vec![1, 2]; // vendor, version strings
    bios.extend_from_slice(&0u16.to_le_bytes()); // no BIOS segment: there is no BIOS
    bios.push(0); // no release date string
    bios.push(0); // ROM size
    bios.extend_from_slice(&BIOS_CHARACTERISTICS_UNSUPPORTED.to_le_bytes());
    bios.extend_from_slice(&[0, BIOS_EXT2_VIRTUAL_MACHINE]);
    bios.extend_from_slice(&[0, 0, 0xff, 0xff]); // BIOS release 0.0, no embedded controller
    push_structure(
        &mut table,
        TYPE_BIOS_INFO,
        0,
        &bios,
        &[MANUFACTURER, BIOS_VERSION],
    );

    let mut system = vec![1, 2, 0, 0]; // manufacturer, product; no version, no serial
    system.extend_from_slice(&uuid.map_or([0; 16], uuid_to_smbios));
    system.extend_from_slice(&[WAKE_UP_POWER_SWITCH, 0, 0]); // no SKU, no family
    push_structure(
        &mut table,
        TYPE_SYSTEM_INFO,
        1,
        &system,
        &[MANUFACTURER, PRODUCT_NAME],
    );

    push_structure(&mut table, TYPE_END_OF_TABLE, 2, &[], &[]);
    table
}

/// Appends one structure: header, formatted area, then its string set (numbered from 1),
/// terminated by an extra NUL (two NULs when there are no strings).
fn push_structure(table: &mut Vec<u8>, ty: u8, handle: u16, formatted: &[u8], strings: &[&str]) {
    // Formatted areas are fixed, small arrays built above.
    table.extend_from_slice(&[ty, (4 + formatted.len()) as u8]);
    table.extend_from_slice(&handle.to_le_bytes());
    table.extend_from_slice(formatted);
    for s in strings {
        table.extend_from_slice(s.as_bytes());
        table.push(0);
    }
    if strings.is_empty() {
        table.push(0);
    }
    table.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    /// Parses the structure table into (type, formatted area, strings).
    fn structures(table: &[u8]) -> Vec<(u8, Vec<u8>, Vec<String>)> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < table.len() {
            let (ty, len) = (table[off], usize::from(table[off + 1]));
            let formatted = table[off..off + len].to_vec();
            let strings_end = off
                + len
                + table[off + len..]
                    .windows(2)
                    .position(|w| w == [0, 0])
                    .unwrap();
            let strings = table[off + len..strings_end]
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8(s.to_vec()).unwrap())
                .collect();
            out.push((ty, formatted, strings));
            off = strings_end + 2;
        }
        out
    }

    #[test]
    fn tables_read_back() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let uuid = parse_machine_id("0123456789abcdef0123456789ABCDEF\n").unwrap();
        setup_smbios(&mem, Some(uuid)).unwrap();

        let mut ep = [0u8; 24];
        mem.read_slice(&mut ep, GuestAddress(SMBIOS_START)).unwrap();
        assert_eq!(&ep[..5], b"_SM3_");
        assert_eq!(sum(&ep), 0, "entry point checksum");
        assert_eq!((ep[6], ep[7], ep[8], ep[10]), (24, 3, 0, 1));
        let len = u32::from_le_bytes(ep[12..16].try_into().unwrap()) as usize;
        let addr = u64::from_le_bytes(ep[16..24].try_into().unwrap());
        assert_eq!(addr % 16, 0);
        assert!(addr >= SMBIOS_START + 24 && addr + len as u64 <= layout::HIMEM_START);
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();

        let s = structures(&table);
        assert_eq!(s.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 1, 127]);
        assert_eq!(s[0].2, [MANUFACTURER, BIOS_VERSION]);
        assert_eq!(s[0].1.len(), 0x18);
        assert_eq!(s[1].1.len(), 0x1b);
        assert_eq!(s[1].2, ["mvmm", "mvmm microVM"]);
        // Wire order: first three fields little-endian, the rest as written.
        let wire: [u8; 16] = s[1].1[8..24].try_into().unwrap();
        let expect = [
            0x67, 0x45, 0x23, 0x01, 0xab, 0x89, 0xef, 0xcd, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        assert_eq!(wire, expect);
        assert_eq!(s[2].1.len(), 4);
        assert_eq!(&table[table.len() - 6..], [127, 4, 2, 0, 0, 0]);
    }

    /// Mirrors Linux's "%pUl" formatting of product_uuid.
    fn linux_product_uuid(w: &[u8; 16]) -> String {
        let order = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];
        let mut s = String::new();
        for (i, idx) in order.iter().enumerate() {
            if [4, 6, 8, 10].contains(&i) {
                s.push('-');
            }
            s.push_str(&format!("{:02x}", w[*idx]));
        }
        s
    }

    #[test]
    fn machine_id_round_trips_to_product_uuid() {
        let id = "4c4c4544004d3510804ab4c04f483832";
        let wire = uuid_to_smbios(parse_machine_id(id).unwrap());
        assert_eq!(
            linux_product_uuid(&wire),
            "4c4c4544-004d-3510-804a-b4c04f483832"
        );
    }

    #[test]
    fn no_uuid_is_all_zero() {
        let table = build_table(None);
        let s = structures(&table);
        assert_eq!(s[1].1[8..24], [0; 16]);
    }

    #[test]
    fn rejects_malformed_machine_ids() {
        for bad in [
            "",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "0123456789abcdef0123456789abcdeg",
            "01234567-89ab-cdef-0123-456789abcdef",
            "+123456789abcdef0123456789abcdef",
            "é123456789abcdef0123456789abcde",
        ] {
            assert_eq!(parse_machine_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reports_unbacked_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = setup_smbios(&mem, None).unwrap_err();
        assert!(matches!(err, SmbiosError::Write { .. }), "{err}");
    }
}
