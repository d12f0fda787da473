//! The symlinks the supervisor maintains: `<vm>/booted` (the generation that is running, as
//! in microvm.nix: `current`, `booted`) and the host journal link for a `journal` share.

use std::io;
use std::path::{Path, PathBuf};

/// Points `link` at `target`, atomically: a symlink under a temporary name renamed over
/// `link`, so readers see the old link or the new one, never none.
pub fn replace_symlink(target: &Path, link: &Path) -> io::Result<()> {
    let name = link
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "link has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = link.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// `<vm>/booted` → what `<vm>/current` pointed at when the VM started.
pub struct BootedLink {
    pub link: PathBuf,
    pub target: PathBuf,
}

impl BootedLink {
    pub fn write(&self) -> io::Result<()> {
        replace_symlink(&self.target, &self.link)
    }

    /// At stop, as microvm.nix's unit does: nothing is booted any more. Left alone if someone
    /// re-pointed it meanwhile.
    pub fn remove(&self) {
        if std::fs::read_link(&self.link).ok().as_deref() == Some(self.target.as_path()) {
            if let Err(e) = std::fs::remove_file(&self.link) {
                log::warn!("cannot remove {}: {e}", self.link.display());
            }
        }
    }
}

/// `<journal dir>/<machine_id>` → `<journal share source>/<machine_id>`: the guest's journald
/// writes there, and `journalctl -m` on the host then merges it (microvm.nix's FAQ rule
/// `L+ /var/log/journal/<id> - - - - <source>/<id>`, done for the user).
pub struct JournalLink {
    pub link: PathBuf,
    pub target: PathBuf,
}

impl JournalLink {
    pub fn write(&self) -> io::Result<()> {
        if let Some(dir) = self.link.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Never replace a real journal directory of that id.
        match std::fs::symlink_metadata(&self.link) {
            Ok(meta) if !meta.file_type().is_symlink() => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a symlink; remove it to let the host read the guest's journal",
                        self.link.display()
                    ),
                ))
            }
            _ => {}
        }
        replace_symlink(&self.target, &self.link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booted_link_is_replaced_and_removed_only_if_ours() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("booted");
        std::os::unix::fs::symlink("/nix/store/old", &link).unwrap();
        let booted = BootedLink {
            link: link.clone(),
            target: "/nix/store/new".into(),
        };
        booted.write().unwrap();
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("/nix/store/new")
        );
        // Only the link remains: the temporary name was renamed away.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        booted.remove();
        assert!(std::fs::symlink_metadata(&link).is_err());

        booted.write().unwrap();
        replace_symlink(Path::new("/nix/store/other"), &link).unwrap();
        booted.remove();
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("/nix/store/other")
        );
    }

    #[test]
    fn journal_link_creates_its_directory_and_spares_real_journals() {
        let dir = tempfile::tempdir().unwrap();
        let journal = JournalLink {
            link: dir.path().join("var/log/journal/0123"),
            target: dir.path().join("share/0123"),
        };
        journal.write().unwrap();
        assert_eq!(std::fs::read_link(&journal.link).unwrap(), journal.target);
        journal.write().unwrap();

        std::fs::remove_file(&journal.link).unwrap();
        std::fs::create_dir(&journal.link).unwrap();
        let err = journal.write().unwrap_err();
        assert!(err.to_string().contains("not a symlink"), "{err}");
        assert!(journal.link.is_dir());
    }
}
