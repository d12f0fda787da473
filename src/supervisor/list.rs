//! `mvmm list`: each VM of the state directory, its `current` and `booted` generations, and
//! whether a restart would change what runs.

use std::path::{Path, PathBuf};

use crate::cli::ListArgs;

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("cannot read the state directory {path}: {source} (give --state-dir)")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One VM: the targets of its links and how they compare.
#[derive(Debug, PartialEq, Eq)]
pub struct VmEntry {
    pub name: String,
    pub current: String,
    pub booted: Option<String>,
    pub status: &'static str,
}

pub const UP_TO_DATE: &str = "up to date";
pub const OUTDATED: &str = "outdated, restart to apply";
pub const NOT_BOOTED: &str = "not booted";

pub fn run(args: &ListArgs) -> i32 {
    match entries(&args.state_dir) {
        Ok(vms) => {
            print!("{}", format_table(&vms));
            crate::EXIT_OK
        }
        Err(e) => {
            log::error!("{e}");
            crate::EXIT_USAGE
        }
    }
}

/// The VMs under `state_dir`: directories with a `current` link, sorted by name.
pub fn entries(state_dir: &Path) -> Result<Vec<VmEntry>, ListError> {
    let dir_err = |source| ListError::StateDir {
        path: state_dir.to_owned(),
        source,
    };
    let mut vms = Vec::new();
    for entry in std::fs::read_dir(state_dir).map_err(dir_err)? {
        let entry = entry.map_err(dir_err)?;
        let vm_dir = entry.path();
        let current = vm_dir.join("current");
        if !vm_dir.is_dir() || std::fs::symlink_metadata(&current).is_err() {
            continue;
        }
        let booted = vm_dir.join("booted");
        let booted_exists = std::fs::symlink_metadata(&booted).is_ok();
        let status = if !booted_exists {
            NOT_BOOTED
        } else if same_generation(&current, &booted) {
            UP_TO_DATE
        } else {
            OUTDATED
        };
        vms.push(VmEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            current: link_text(&current),
            booted: booted_exists.then(|| link_text(&booted)),
            status,
        });
    }
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(vms)
}

/// Two links name the same generation if they resolve to the same place (or, when one
/// dangles, have the same text).
fn same_generation(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => std::fs::read_link(a).ok() == std::fs::read_link(b).ok(),
    }
}

/// Where a link points (or the path itself, when it is a plain directory).
fn link_text(path: &Path) -> String {
    match std::fs::read_link(path) {
        Ok(target) => target.display().to_string(),
        Err(_) => path.display().to_string(),
    }
}

/// Aligned columns: name, current, booted ("-" when none), status.
pub fn format_table(vms: &[VmEntry]) -> String {
    let width = |f: &dyn Fn(&VmEntry) -> usize| vms.iter().map(f).max().unwrap_or(0);
    let name_w = width(&|v| v.name.len());
    let current_w = width(&|v| v.current.len());
    let booted_w = width(&|v| v.booted.as_deref().unwrap_or("-").len());
    let mut out = String::new();
    for vm in vms {
        let booted = vm.booted.as_deref().unwrap_or("-");
        out.push_str(&format!(
            "{:name_w$}  {:current_w$}  {:booted_w$}  {}\n",
            vm.name, vm.current, booted, vm.status
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn compares_current_and_booted() {
        let state = tempfile::tempdir().unwrap();
        let gens = tempfile::tempdir().unwrap();
        let (g1, g2) = (gens.path().join("gen1"), gens.path().join("gen2"));
        std::fs::create_dir(&g1).unwrap();
        std::fs::create_dir(&g2).unwrap();
        for (name, current, booted) in [
            ("web", &g1, Some(&g1)),
            ("db", &g2, Some(&g1)),
            ("new", &g1, None),
        ] {
            let vm = state.path().join(name);
            std::fs::create_dir(&vm).unwrap();
            symlink(current, vm.join("current")).unwrap();
            if let Some(booted) = booted {
                symlink(booted, vm.join("booted")).unwrap();
            }
        }
        // Not VMs: a file, and a directory without `current`.
        std::fs::write(state.path().join("notes.txt"), b"").unwrap();
        std::fs::create_dir(state.path().join("empty")).unwrap();

        let vms = entries(state.path()).unwrap();
        let summary: Vec<_> = vms.iter().map(|v| (v.name.as_str(), v.status)).collect();
        assert_eq!(
            summary,
            [("db", OUTDATED), ("new", NOT_BOOTED), ("web", UP_TO_DATE)]
        );
        assert_eq!(vms[0].current, g2.display().to_string());
        assert_eq!(vms[0].booted.as_deref(), Some(g1.to_str().unwrap()));
        let table = format_table(&vms);
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        let words = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let g1 = g1.display().to_string();
        assert_eq!(words(lines[1]), ["new", &g1, "-", "not", "booted"]);
        assert_eq!(words(lines[2]), ["web", &g1, &g1, "up", "to", "date"]);
    }

    #[test]
    fn a_missing_state_dir_is_named() {
        let err = entries(Path::new("/nonexistent/microvms")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/microvms"), "{err}");
    }
}
