//! The VM's tap interfaces, opened as root for mvmm. A missing tap is created by opening it
//! (a non-persistent tap: the kernel removes it when the last descriptor closes, i.e. when
//! mvmm and the supervisor are gone, even after a crash) and brought up, as microvm.nix's
//! tap-up does.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use devices::virtio::net::{Tap, TapError};

#[derive(Debug, thiserror::Error)]
pub enum TapSetupError {
    #[error("net[{index}]: {source}")]
    Open { index: usize, source: TapError },
    #[error("net[{index}]: cannot bring up the new tap {name}: {source}")]
    Up {
        index: usize,
        name: String,
        source: io::Error,
    },
}

/// An open tap, and whether the supervisor created it.
pub struct TapHandle {
    pub name: String,
    pub created: bool,
    tap: Tap,
}

impl TapHandle {
    pub fn raw_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }
}

pub fn interface_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Opens (creating if missing) tap `name`, the interface of `net[index]`.
pub fn open(index: usize, name: &str) -> Result<TapHandle, TapSetupError> {
    let existed = interface_exists(name);
    let tap = Tap::open_named(name).map_err(|source| TapSetupError::Open { index, source })?;
    if !existed {
        set_up(name).map_err(|source| TapSetupError::Up {
            index,
            name: name.to_owned(),
            source,
        })?;
        log::info!("created tap {name}");
    }
    Ok(TapHandle {
        name: name.to_owned(),
        created: !existed,
        tap,
    })
}

/// Sets IFF_UP on interface `name` (SIOCGIFFLAGS/SIOCSIFFLAGS on a throwaway socket).
fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket creation; the result is checked and owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    // SAFETY: an all-zero ifreq is valid; the name (checked by Tap::open_named to fit) is
    // copied in below.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS writes the flags member of the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_up(name: &str) -> bool {
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        flags & libc::IFF_UP as u32 != 0
    }

    #[test]
    fn a_missing_tap_is_created_up_and_goes_away_with_its_descriptor() {
        let name = format!("mvst{}", std::process::id() % 100_000);
        assert!(!interface_exists(&name));
        let tap = open(0, &name).unwrap();
        assert!(tap.created);
        assert!(interface_exists(&name) && is_up(&name));

        drop(tap);
        assert!(!interface_exists(&name), "the tap outlived its descriptor");

        // A tap someone else made (persistent) is used but not claimed, and stays.
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(ok.success(), "ip {args:?}");
        };
        ip(&["tuntap", "add", "dev", &name, "mode", "tap", "vnet_hdr"]);
        let theirs = open(1, &name);
        let still_there = interface_exists(&name);
        ip(&["link", "del", &name]);
        let theirs = theirs.unwrap();
        assert!(!theirs.created && still_there);

        let err = open(2, "bad/name").err().unwrap();
        assert!(err.to_string().starts_with("net[2]: "), "{err}");
    }
}
