//! Tap (and macvtap) file descriptors carrying frames with a virtio-net header.
//!
//! The tap is configured with a 12-byte vnet header (`virtio_net_hdr_v1`, the size the guest
//! uses with VIRTIO_F_VERSION_1), so headers pass between the guest and the kernel unchanged.
//! The fd is non-blocking: the device worker polls it.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::chain::FrameIo;
use super::VNET_HDR_LEN;

const TUN_PATH: &CStr = c"/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "tap interface name {0:?} is invalid: use 1 to 15 bytes, without '/', ':', NUL or \
         whitespace"
    )]
    InvalidName(String),
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded and /dev/net/tun present?)")]
    OpenTun(io::Error),
    #[error(
        "cannot attach to tap interface {name:?}: {source} (creating a tap needs CAP_NET_ADMIN; \
         an existing tap must be a tap (not tun) device owned by this user)"
    )]
    Attach { name: String, source: io::Error },
    #[error("the inherited fd {fd} is a tun (layer 3) device: pass a tap or macvtap fd")]
    NotTap { fd: RawFd },
    #[error(
        "the inherited fd {fd} was opened without IFF_NO_PI: open the tap with IFF_NO_PI \
         (no packet information prefix)"
    )]
    PacketInfo { fd: RawFd },
    #[error(
        "the inherited fd {fd} has no virtio-net header (IFF_VNET_HDR) and it cannot be enabled: \
         {source}; open the tap with IFF_VNET_HDR"
    )]
    NoVnetHdr { fd: RawFd, source: io::Error },
    #[error("cannot query the inherited fd {fd} with TUNGETIFF: {source} (is it a tap fd?)")]
    Query { fd: RawFd, source: io::Error },
    #[error(
        "cannot set a {VNET_HDR_LEN}-byte virtio-net header on {name}: {source} (is it a tap or \
         macvtap fd opened with IFF_VNET_HDR?)"
    )]
    VnetHdrSize { name: String, source: io::Error },
    #[error("cannot set offloads {flags:#x} on {name}: {source}")]
    Offload {
        name: String,
        flags: u32,
        source: io::Error,
    },
    #[error("cannot make the tap fd of {name} non-blocking: {source}")]
    NonBlocking { name: String, source: io::Error },
}

/// An open tap or macvtap queue.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Opens (or creates, when permitted) tap interface `name` with
    /// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, sets the vnet header size to 12 and no offloads (the
    /// device sets them once the guest has negotiated), non-blocking.
    pub fn open_named(name: &str) -> Result<Tap, TapError> {
        let mut ifr = ifreq_named(name)?;
        // SAFETY: the path is a valid NUL-terminated string; the result is checked.
        let raw = unsafe {
            libc::open(
                TUN_PATH.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(TapError::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly opened fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes (the final name) an `ifreq`, which `ifr` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        // The kernel may have expanded a "%d" template.
        let tap = Tap {
            fd,
            name: ifreq_name(&ifr),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Wraps an inherited, already-configured tap or macvtap fd: checks it is a layer-2 tap
    /// without packet information, enables the vnet header if needed (macvtap allows that),
    /// then sets the header size, no offloads and non-blocking mode like `open_named`. An fd
    /// that does not answer TUNGETIFF is accepted if it takes the vnet header size.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        // SAFETY: an all-zero `ifreq` is a valid value (plain integers and arrays).
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes an `ifreq`, which `ifr` is; the result is checked.
        let name = if unsafe { libc::ioctl(raw, libc::TUNGETIFF, &mut ifr) } < 0 {
            let err = io::Error::last_os_error();
            // Not every tap-like fd implements TUNGETIFF; TUNSETVNETHDRSZ below decides.
            match err.raw_os_error() {
                Some(libc::ENOTTY) | Some(libc::EINVAL) => {
                    log::warn!("fd {raw} does not answer TUNGETIFF ({err}); assuming a tap");
                    format!("fd{raw}")
                }
                _ => {
                    return Err(TapError::Query {
                        fd: raw,
                        source: err,
                    })
                }
            }
        } else {
            // SAFETY: TUNGETIFF filled the flags member of the union.
            let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags } as u16);
            if flags & libc::IFF_TAP == 0 {
                return Err(TapError::NotTap { fd: raw });
            }
            if flags & libc::IFF_NO_PI == 0 {
                return Err(TapError::PacketInfo { fd: raw });
            }
            if flags & libc::IFF_VNET_HDR == 0 {
                // macvtap accepts TUNSETIFF on an open queue to toggle IFF_VNET_HDR; tun does not.
                ifr.ifr_ifru.ifru_flags = (flags | libc::IFF_VNET_HDR) as u16 as i16;
                // SAFETY: TUNSETIFF reads an `ifreq`, which `ifr` is; the result is checked.
                if unsafe { libc::ioctl(raw, libc::TUNSETIFF, &mut ifr) } < 0 {
                    return Err(TapError::NoVnetHdr {
                        fd: raw,
                        source: io::Error::last_os_error(),
                    });
                }
            }
            ifreq_name(&ifr)
        };
        let tap = Tap { fd, name };
        tap.configure()?;
        // The fd may have been opened blocking by whoever passed it to us.
        // SAFETY: F_GETFL on an fd we own; the result is checked.
        let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: F_SETFL with flags read just above; the result is checked.
        if fl < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(TapError::NonBlocking {
                name: tap.name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(tap)
    }

    /// Sets the offloads (TUN_F_*) the kernel may use for frames it hands us (TUNSETOFFLOAD).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the result is checked.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::Offload {
                name: self.name.clone(),
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The interface name (`fd<N>` for an inherited fd whose name cannot be queried).
    pub fn if_name(&self) -> String {
        self.name.clone()
    }

    fn configure(&self) -> Result<(), TapError> {
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer; the result is checked.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(TapError::VnetHdrSize {
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        // No offloads until the guest says what it can receive.
        self.set_offload(0)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl FrameIo for Tap {
    unsafe fn read_frame(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iovs.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the caller guarantees the iovecs describe writable memory for this call.
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), iovs.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    unsafe fn write_frame(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iovs.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the caller guarantees the iovecs describe readable memory for this call.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iovs.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Checks `name` like the kernel's dev_valid_name and puts it in a zeroed `ifreq`.
fn ifreq_named(name: &str) -> Result<libc::ifreq, TapError> {
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !bytes
            .iter()
            .any(|&b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace());
    if !valid {
        return Err(TapError::InvalidName(name.to_string()));
    }
    // SAFETY: an all-zero `ifreq` is a valid value (plain integers and arrays).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Ok(ifr)
}

fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{tun_available, unique_name, TestTap};
    use super::*;
    use std::os::fd::FromRawFd;

    #[test]
    fn rejects_bad_names() {
        for name in ["", "a/b", "a b", "a:b", ".", "..", "0123456789abcdef"] {
            assert!(matches!(
                Tap::open_named(name),
                Err(TapError::InvalidName(_))
            ));
        }
    }

    #[test]
    fn open_named_sets_vnet_header_size() {
        if !tun_available() {
            return;
        }
        let name = unique_name();
        let tap = Tap::open_named(&name).unwrap();
        assert_eq!(tap.if_name(), name);
        let mut size: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes an int.
        let ret = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut size) };
        assert_eq!(ret, 0);
        assert_eq!(size, VNET_HDR_LEN as libc::c_int);
        // SAFETY: F_GETFL on an open fd.
        let fl = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        let all = libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_UFO;
        tap.set_offload(all).unwrap();
        assert!(matches!(
            tap.set_offload(0x8000_0000),
            Err(TapError::Offload { .. })
        ));
    }

    #[test]
    fn from_fd_accepts_a_tap_and_restores_non_blocking() {
        if !tun_available() {
            return;
        }
        let t = TestTap::new();
        // A second, blocking queue-less handle: dup the tap fd and clear O_NONBLOCK.
        // SAFETY: dup of an open fd; the result is checked.
        let dup = unsafe { libc::dup(t.tap.as_raw_fd()) };
        assert!(dup >= 0);
        // SAFETY: `dup` is a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(dup) };
        // SAFETY: F_SETFL on an fd we own.
        unsafe { libc::fcntl(dup, libc::F_SETFL, 0) };
        let tap = Tap::from_fd(fd).unwrap();
        assert_eq!(tap.if_name(), t.name);
        // SAFETY: F_GETFL on an open fd.
        let fl = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(fl & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn from_fd_rejects_tun_and_non_tap_fds() {
        if !tun_available() {
            return;
        }
        // A layer-3 tun device.
        // SAFETY: valid path; the result is checked.
        let raw = unsafe { libc::open(TUN_PATH.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut ifr = ifreq_named(&unique_name()).unwrap();
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
        // SAFETY: TUNSETIFF with a valid ifreq.
        assert_eq!(unsafe { libc::ioctl(raw, libc::TUNSETIFF, &mut ifr) }, 0);
        assert!(matches!(Tap::from_fd(fd), Err(TapError::NotTap { .. })));

        // A regular file answers neither TUNGETIFF nor TUNSETVNETHDRSZ.
        let file = tempfile::tempfile().unwrap();
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(file)),
            Err(TapError::VnetHdrSize { .. })
        ));
    }
}
