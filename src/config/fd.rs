//! `fd:N` where the config takes a path that mvmm opens itself (`kvm`, `disks[].path`,
//! `serial.path`): a descriptor inherited from the process that started mvmm, so mvmm can run
//! as a user that may not open the files itself. mvmm takes ownership of such descriptors.

use std::os::fd::RawFd;
use std::path::Path;

use super::{ConfigError, SerialMode, VmConfig};

/// The prefix that marks an inherited descriptor. A file really named like this is written
/// `./fd:N`.
pub const FD_PREFIX: &str = "fd:";

/// `Some(N)` when `path` is `fd:N`; an error when it starts with `fd:` but N is not a
/// descriptor number an inheriting process can pass (3 and above: 0 to 2 are stdio).
pub fn parse_fd(field: &str, path: &Path) -> Result<Option<RawFd>, ConfigError> {
    let Some(number) = path.to_str().and_then(|p| p.strip_prefix(FD_PREFIX)) else {
        return Ok(None);
    };
    let fd = number
        .parse::<RawFd>()
        .ok()
        .filter(|_| number.bytes().all(|b| b.is_ascii_digit()));
    match fd {
        Some(fd) if fd >= 3 => Ok(Some(fd)),
        Some(fd) => Err(ConfigError::invalid(
            field,
            format!("fd:{fd} is stdin, stdout or stderr; inherited descriptors start at 3"),
        )),
        None => Err(ConfigError::invalid(
            field,
            format!(
                "{:?} is not `fd:N` with N a decimal descriptor number (write ./{} for a file of that name)",
                path.display().to_string(),
                path.display()
            ),
        )),
    }
}

/// Whether `path` is an `fd:N` reference (well-formed or not): such paths are never resolved
/// against the config's directory.
pub fn is_fd_path(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.starts_with(FD_PREFIX))
}

/// What an inherited descriptor must be for its field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdUse {
    /// A disk image: a regular file or block device, readable, and writable unless read-only.
    Disk { read_only: bool },
    /// The serial console's output: writable.
    Output,
    /// /dev/kvm: a character device, read-write.
    Kvm,
}

/// Checks that inherited descriptor `fd` is open and fits `usage`, without taking it over.
pub fn check_fd(field: &str, fd: RawFd, usage: FdUse) -> Result<(), ConfigError> {
    let invalid = |message: String| ConfigError::invalid(field, format!("fd:{fd} {message}"));
    // SAFETY: F_GETFL only reads the descriptor's status flags; a closed fd gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(invalid(
            "is not open in mvmm; the process that starts mvmm must open it and pass it \
             without close-on-exec"
                .to_owned(),
        ));
    }
    // SAFETY: an all-zero `stat` is a valid value (plain integers).
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes a `stat` through the pointer, which points at one.
    if unsafe { libc::fstat(fd, &mut stat) } < 0 {
        return Err(invalid(format!(
            "cannot be inspected: {}",
            std::io::Error::last_os_error()
        )));
    }
    let kind = stat.st_mode & libc::S_IFMT;
    let access = flags & libc::O_ACCMODE;
    let readable = access == libc::O_RDONLY || access == libc::O_RDWR;
    let writable = access == libc::O_WRONLY || access == libc::O_RDWR;
    match usage {
        FdUse::Disk { read_only } => {
            if kind != libc::S_IFREG && kind != libc::S_IFBLK {
                return Err(invalid(
                    "is neither a regular file nor a block device; pass the disk image".to_owned(),
                ));
            }
            if !readable {
                return Err(invalid(
                    "is open write-only; open the disk image for reading (and writing)".to_owned(),
                ));
            }
            if !read_only && !writable {
                return Err(invalid(
                    "is open read-only; open the disk image read-write or set `read_only: true`"
                        .to_owned(),
                ));
            }
        }
        FdUse::Output if !writable => {
            return Err(invalid(
                "is not open for writing; open the console output file for writing".to_owned(),
            ))
        }
        FdUse::Output => {}
        FdUse::Kvm => {
            if kind != libc::S_IFCHR {
                return Err(invalid(
                    "is not a character device; pass /dev/kvm".to_owned(),
                ));
            }
            if access != libc::O_RDWR {
                return Err(invalid(
                    "must be open read-write (O_RDWR), as /dev/kvm".to_owned(),
                ));
            }
        }
    }
    Ok(())
}

/// Checks every `fd:N` in `config`: well-formed, open, of the right kind and access mode, and
/// each descriptor (including `net[].fd`) named once.
pub fn validate_fds(config: &VmConfig) -> Result<(), ConfigError> {
    let mut fds = Vec::new();
    let mut check = |field: String, path: &Path, usage: FdUse| -> Result<(), ConfigError> {
        if let Some(fd) = parse_fd(&field, path)? {
            check_fd(&field, fd, usage)?;
            fds.push((field, fd));
        }
        Ok(())
    };
    if let Some(kvm) = &config.kvm {
        check("kvm".to_owned(), kvm, FdUse::Kvm)?;
    }
    if let (SerialMode::File, Some(path)) = (config.serial.mode, &config.serial.path) {
        check("serial.path".to_owned(), path, FdUse::Output)?;
    }
    for (i, disk) in config.disks.iter().enumerate() {
        if let Some(path) = &disk.path {
            let usage = FdUse::Disk {
                read_only: disk.read_only,
            };
            check(format!("disks[{i}].path"), path, usage)?;
        }
    }
    for (i, net) in config.net.iter().enumerate() {
        if let Some(fd) = net.fd {
            fds.push((format!("net[{i}].fd"), fd));
        }
    }
    check_unique(&fds)
}

/// Every inherited descriptor may be named once: mvmm owns (and eventually closes) each.
pub fn check_unique(fds: &[(String, RawFd)]) -> Result<(), ConfigError> {
    for (i, (field, fd)) in fds.iter().enumerate() {
        if let Some((other, _)) = fds[..i].iter().find(|(_, f)| f == fd) {
            return Err(ConfigError::invalid(
                field.clone(),
                format!("fd:{fd} is also given to `{other}`; pass each descriptor to one field"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::fd::AsRawFd;

    fn field_of(r: Result<impl std::fmt::Debug, ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid { field, message }) => format!("{field}: {message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_fd_numbers_strictly() {
        let p = |s: &str| parse_fd("disks[0].path", Path::new(s));
        assert_eq!(p("fd:3").unwrap(), Some(3));
        assert_eq!(p("fd:1024").unwrap(), Some(1024));
        assert_eq!(p("disk.img").unwrap(), None);
        assert_eq!(p("./fd:3").unwrap(), None);
        assert!(field_of(p("fd:2")).contains("start at 3"));
        for bad in ["fd:", "fd:x", "fd:+4", "fd:-4", "fd: 4", "fd:99999999999"] {
            assert!(field_of(p(bad)).starts_with("disks[0].path: "), "{bad}");
        }
        assert!(is_fd_path(Path::new("fd:x")));
        assert!(!is_fd_path(Path::new("/dev/fd:3")));
    }

    #[test]
    fn disk_fds_must_match_read_only() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let ro = std::fs::File::open(tmp.path()).unwrap();
        let rw = tmp.reopen().unwrap();
        let wo = OpenOptions::new().write(true).open(tmp.path()).unwrap();
        let disk = |read_only| FdUse::Disk { read_only };
        check_fd("d", ro.as_raw_fd(), disk(true)).unwrap();
        check_fd("d", rw.as_raw_fd(), disk(false)).unwrap();
        check_fd("d", rw.as_raw_fd(), disk(true)).unwrap();
        assert!(field_of(check_fd("d", ro.as_raw_fd(), disk(false))).contains("read-only"));
        assert!(field_of(check_fd("d", wo.as_raw_fd(), disk(true))).contains("write-only"));
        let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
        assert!(field_of(check_fd("d", dir.as_raw_fd(), disk(true))).contains("neither"));
    }

    #[test]
    fn closed_fds_and_wrong_kinds_are_refused() {
        // Far above any descriptor the test process has open (a just-closed one could be
        // reused by another test thread).
        assert!(field_of(check_fd("kvm", 999_999, FdUse::Kvm)).contains("is not open"));
        let null = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        // /dev/null is a character device: accepted as the KVM fd here; the KVM API version
        // check at VM creation refuses it.
        check_fd("kvm", null.as_raw_fd(), FdUse::Kvm).unwrap();
        let file = tempfile::tempfile().unwrap();
        assert!(field_of(check_fd("kvm", file.as_raw_fd(), FdUse::Kvm)).contains("character"));
        let ro = std::fs::File::open("/dev/null").unwrap();
        assert!(
            field_of(check_fd("serial.path", ro.as_raw_fd(), FdUse::Output)).contains("writing")
        );
        check_fd("serial.path", null.as_raw_fd(), FdUse::Output).unwrap();
    }

    #[test]
    fn each_fd_is_given_once() {
        let ok = [("kvm".to_owned(), 3), ("disks[0].path".to_owned(), 4)];
        check_unique(&ok).unwrap();
        let twice = [
            ("kvm".to_owned(), 3),
            ("disks[0].path".to_owned(), 4),
            ("net[0].fd".to_owned(), 3),
        ];
        let err = field_of(check_unique(&twice));
        assert!(
            err.starts_with("net[0].fd: fd:3 is also given to `kvm`"),
            "{err}"
        );
    }

    #[test]
    fn configs_keep_fd_paths_and_check_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kernel"), b"k").unwrap();
        let disk = tempfile::NamedTempFile::new().unwrap();
        let rw = disk.reopen().unwrap();
        let null = OpenOptions::new().write(true).open("/dev/null").unwrap();
        let config = |kvm: &str, disk_fd: RawFd, serial: RawFd| {
            let json = serde_json::json!({
                "kernel": {"path": "kernel"},
                "machine": {"vcpus": 1, "memory_mib": 64},
                "kvm": kvm,
                "serial": {"mode": "file", "path": format!("fd:{serial}")},
                "disks": [{"path": format!("fd:{disk_fd}")}],
            });
            VmConfig::from_json(&json.to_string(), dir.path())
        };
        let ok = config("/dev/kvm", rw.as_raw_fd(), null.as_raw_fd()).unwrap();
        let disk_path = ok.disks[0].path.as_deref().unwrap();
        assert_eq!(disk_path, Path::new(&format!("fd:{}", rw.as_raw_fd())));
        assert_eq!(
            ok.serial.path.as_deref(),
            Some(Path::new(&format!("fd:{}", null.as_raw_fd())))
        );
        assert_eq!(ok.kvm_path(), Path::new("/dev/kvm"));

        let err = field_of(config("fd:999999", rw.as_raw_fd(), null.as_raw_fd()));
        assert!(err.starts_with("kvm: fd:999999 is not open"), "{err}");
        let err = field_of(config("/dev/kvm", rw.as_raw_fd(), rw.as_raw_fd()));
        assert!(err.starts_with("disks[0].path: fd:"), "{err}");
        assert!(err.contains("also given to `serial.path`"), "{err}");
    }
}
