//! Everything the supervisor reads and checks before it starts anything: the state directory,
//! `current`, vm.json, share sources, virtiofsd, the user. Every problem found here is the
//! user's to fix (exit 2) and is reported with the path to look at.

use std::ffi::{CStr, CString, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::links::{BootedLink, JournalLink};
use crate::cli::SuperviseArgs;
use crate::config::{ConfigError, VmConfig, FD_PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("state directory {path}: {message}")]
    StateDir { path: PathBuf, message: String },
    #[error("{name:?} is not a VM name: give the name of a directory under the state directory")]
    BadName { name: String },
    #[error("{path}: {message}")]
    Current { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Config { path: PathBuf, source: ConfigError },
    #[error("{path}: `{field}` is an inherited descriptor; under the supervisor give a path or tap name: it opens them itself and passes them to mvmm")]
    InheritedFd { path: PathBuf, field: String },
    #[error("{path}: `{field}`: {message}")]
    Share {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{0}")]
    Virtiofsd(String),
    #[error("--user {name}: {message}")]
    User { name: String, message: String },
}

/// How to start one share's virtiofsd.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    pub tag: String,
    pub socket: PathBuf,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// How long to wait for its socket at start.
    pub socket_timeout: Duration,
}

/// The user mvmm runs as: no supplementary groups, primary group only.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// The primary group's name (the default `--socket-group` for virtiofsd).
    pub group: Option<String>,
}

/// The checked description of one supervised VM.
pub struct Plan {
    pub name: String,
    pub vm_dir: PathBuf,
    pub config: VmConfig,
    /// vm.json as written, to derive mvmm's config from without losing fields.
    pub raw: serde_json::Value,
    pub api_socket: PathBuf,
    pub booted: BootedLink,
    pub journal: Option<JournalLink>,
    pub daemons: Vec<DaemonSpec>,
    pub user: Option<User>,
}

/// The share whose directory the guest mounts on /var/log/journal, by microvm.nix's
/// convention (its FAQ names the share `journal`).
pub const JOURNAL_TAG: &str = "journal";
/// How long virtiofsd gets to create its socket when the share does not say.
const DEFAULT_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

pub fn plan(args: &SuperviseArgs) -> Result<Plan, PlanError> {
    let state_dir = &args.state_dir;
    if !state_dir.is_dir() {
        return Err(PlanError::StateDir {
            path: state_dir.clone(),
            message: "does not exist or is not a directory (give --state-dir)".to_owned(),
        });
    }
    let name = &args.name;
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(PlanError::BadName { name: name.clone() });
    }
    let vm_dir = state_dir.join(name);
    if !vm_dir.is_dir() {
        return Err(PlanError::StateDir {
            path: state_dir.clone(),
            message: format!("has no VM directory {name}/"),
        });
    }
    let current = vm_dir.join("current");
    let current_target = current_target(&current)?;
    let config_path = current.join("vm.json");
    // Descriptors first: validation would check them against this process's own fds.
    let raw: Option<serde_json::Value> = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    if let Some(raw) = &raw {
        refuse_inherited_fds(raw, &config_path)?;
    }
    let config = VmConfig::load(&config_path).map_err(|source| PlanError::Config {
        path: config_path.clone(),
        source,
    })?;
    // Loading succeeded, so the file was readable JSON (unless it changed in between).
    let raw = raw.ok_or_else(|| PlanError::Config {
        path: config_path.clone(),
        source: ConfigError::Parse("changed while being read; try again".to_owned()),
    })?;

    let user = args.user.as_deref().map(lookup_user).transpose()?;
    let daemons = daemon_specs(&config, &config_path, args, user.as_ref())?;
    let journal = journal_link(&config, &args.journal_dir);
    let api_socket = config
        .api_socket
        .clone()
        .unwrap_or_else(|| vm_dir.join("mvmm.sock"));
    Ok(Plan {
        name: name.clone(),
        booted: BootedLink {
            link: vm_dir.join("booted"),
            target: current_target,
        },
        vm_dir,
        config,
        raw,
        api_socket,
        journal,
        daemons,
        user,
    })
}

/// What `current` points at (its link text, as microvm.nix's `readlink current`), checked
/// to resolve to a directory.
fn current_target(current: &Path) -> Result<PathBuf, PlanError> {
    let err = |message: String| PlanError::Current {
        path: current.to_owned(),
        message,
    };
    let link = match std::fs::symlink_metadata(current) {
        Err(_) => {
            return Err(err(
                "is missing: link it to the VM's generation (a directory holding vm.json)"
                    .to_owned(),
            ))
        }
        Ok(meta) if meta.file_type().is_symlink() => std::fs::read_link(current).ok(),
        Ok(_) => None,
    };
    match std::fs::metadata(current) {
        Ok(meta) if meta.is_dir() => Ok(link.unwrap_or_else(|| current.to_owned())),
        Ok(_) => Err(err("is not a directory".to_owned())),
        Err(e) => Err(err(format!(
            "is a dangling link to {} ({e}); point it at the VM's generation",
            link.unwrap_or_default().display()
        ))),
    }
}

/// The supervisor opens disks, taps, the console file and KVM itself (checked on the raw
/// JSON, before validation looks at descriptors).
fn refuse_inherited_fds(raw: &serde_json::Value, path: &Path) -> Result<(), PlanError> {
    let is_fd = |v: &serde_json::Value| v.as_str().is_some_and(|p| p.starts_with(FD_PREFIX));
    let mut fields = Vec::new();
    if is_fd(&raw["kvm"]) {
        fields.push("kvm".to_owned());
    }
    if is_fd(&raw["serial"]["path"]) {
        fields.push("serial.path".to_owned());
    }
    let entries = |key: &str| raw[key].as_array().cloned().unwrap_or_default();
    for (i, disk) in entries("disks").iter().enumerate() {
        if is_fd(&disk["path"]) {
            fields.push(format!("disks[{i}].path"));
        }
    }
    for (i, net) in entries("net").iter().enumerate() {
        if !net["fd"].is_null() {
            fields.push(format!("net[{i}].fd"));
        }
    }
    match fields.into_iter().next() {
        Some(field) => Err(PlanError::InheritedFd {
            path: path.to_owned(),
            field,
        }),
        None => Ok(()),
    }
}

/// One virtiofsd per share with a `source`, with microvm.nix's options by default.
fn daemon_specs(
    config: &VmConfig,
    config_path: &Path,
    args: &SuperviseArgs,
    user: Option<&User>,
) -> Result<Vec<DaemonSpec>, PlanError> {
    let mut specs = Vec::new();
    for (i, share) in config.shares.iter().enumerate() {
        let Some(source) = &share.source else {
            continue;
        };
        let err = |field: &str, message: String| PlanError::Share {
            path: config_path.to_owned(),
            field: format!("shares[{i}].{field}"),
            message,
        };
        if source.is_relative() {
            return Err(err(
                "source",
                format!(
                    "{} is relative; give the host directory as an absolute path",
                    source.display()
                ),
            ));
        }
        if !source.is_dir() {
            return Err(err(
                "source",
                format!(
                    "{} does not exist or is not a directory; create it or fix the path",
                    source.display()
                ),
            ));
        }
        check_socket_path(&share.socket).map_err(|m| err("socket", m))?;
        let options = share.virtiofsd.clone().unwrap_or_default();
        let mut daemon_args: Vec<OsString> = vec![
            format!("--socket-path={}", share.socket.display()).into(),
            format!("--shared-dir={}", source.display()).into(),
        ];
        let group = options
            .socket_group
            .clone()
            .or_else(|| user.and_then(|u| u.group.clone()));
        if let Some(group) = group {
            daemon_args.push(format!("--socket-group={group}").into());
        }
        daemon_args.push(format!("--cache={}", options.cache.as_arg()).into());
        if options.posix_acl.unwrap_or(true) {
            daemon_args.push("--posix-acl".into());
        }
        if options.xattr.unwrap_or(true) {
            daemon_args.push("--xattr".into());
        }
        daemon_args.extend(options.extra_args.iter().map(OsString::from));
        specs.push(DaemonSpec {
            tag: share.tag.clone(),
            socket: share.socket.clone(),
            program: PathBuf::new(),
            args: daemon_args,
            socket_timeout: share
                .connect_timeout_secs
                .map(|s| Duration::from_secs(s.into()))
                .unwrap_or(DEFAULT_SOCKET_TIMEOUT),
        });
    }
    if !specs.is_empty() {
        let program = find_virtiofsd(args.virtiofsd.as_deref())?;
        for spec in &mut specs {
            spec.program = program.clone();
        }
    }
    Ok(specs)
}

/// virtiofsd creates the socket: its directory must exist, and a leftover file there must be
/// a socket (which the supervisor replaces), never something else.
fn check_socket_path(socket: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = socket.parent() {
        if !dir.is_dir() {
            return Err(format!(
                "the directory of {} does not exist; create it",
                socket.display()
            ));
        }
    }
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if !meta.file_type().is_socket() => Err(format!(
            "{} exists and is not a socket; remove it or choose another path",
            socket.display()
        )),
        _ => Ok(()),
    }
}

fn find_virtiofsd(given: Option<&Path>) -> Result<PathBuf, PlanError> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if let Some(path) = given {
        return if executable(path) {
            Ok(path.to_owned())
        } else {
            Err(PlanError::Virtiofsd(format!(
                "--virtiofsd {} is not an executable file",
                path.display()
            )))
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join("virtiofsd"))
        .find(|p| executable(p))
        .ok_or_else(|| {
            PlanError::Virtiofsd(
                "virtiofsd is not in PATH; shares with a `source` need it: install it or give --virtiofsd PATH".to_owned(),
            )
        })
}

/// `<journal dir>/<machine_id>` → `<journal share's source>/<machine_id>`, when both exist.
fn journal_link(config: &VmConfig, journal_dir: &Path) -> Option<JournalLink> {
    let id = config.machine_id.as_deref()?.to_ascii_lowercase();
    let share = config.shares.iter().find(|s| s.tag == JOURNAL_TAG)?;
    let source = share.source.as_deref()?;
    Some(JournalLink {
        link: journal_dir.join(&id),
        target: source.join(&id),
    })
}

/// Looks `name` up in the user database (getpwnam_r), and its primary group's name.
pub fn lookup_user(name: &str) -> Result<User, PlanError> {
    let err = |message: String| PlanError::User {
        name: name.to_owned(),
        message,
    };
    let c_name = CString::new(name).map_err(|_| err("contains a NUL byte".to_owned()))?;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: passwd is plain data that getpwnam_r fills in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; strings in `pwd` point into `buf`.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 {
        return Err(err(format!(
            "cannot read the user database: {}",
            std::io::Error::from_raw_os_error(rc)
        )));
    }
    if result.is_null() {
        return Err(err("no such user; create it or give another".to_owned()));
    }
    Ok(User {
        name: name.to_owned(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        group: group_name(pwd.pw_gid),
    })
}

fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: group is plain data that getgrgid_r fills in.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; strings in `grp` point into `buf`.
    let rc = unsafe {
        libc::getgrgid_r(
            gid,
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: getgrgid_r succeeded, so gr_name is a NUL-terminated string inside `buf`.
    let name = unsafe { CStr::from_ptr(grp.gr_name) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        /// A state dir with VM `vm` whose current generation holds `vm_json` and a kernel.
        fn new(vm_json: serde_json::Value) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let gen = dir.path().join("gen");
            std::fs::create_dir_all(&gen).unwrap();
            std::fs::write(gen.join("bzImage"), b"k").unwrap();
            std::fs::write(gen.join("vm.json"), vm_json.to_string()).unwrap();
            std::fs::create_dir_all(dir.path().join("state/vm")).unwrap();
            std::os::unix::fs::symlink(&gen, dir.path().join("state/vm/current")).unwrap();
            Self { dir }
        }

        fn args(&self, user: Option<&str>) -> SuperviseArgs {
            SuperviseArgs {
                name: "vm".to_owned(),
                state_dir: self.dir.path().join("state"),
                user: user.map(str::to_owned),
                virtiofsd: Some("/bin/true".into()),
                journal_dir: self.dir.path().join("journal"),
            }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }
    }

    fn vm_json(shares: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "kernel": {"path": "bzImage"},
            "machine": {"vcpus": 1, "memory_mib": 64},
            "shares": shares,
            "machine_id": "5C2A9B0E7D3F4E1A8B6C0D9E8F7A6B5C",
        })
    }

    fn err_text(r: Result<Plan, PlanError>) -> String {
        match r {
            Ok(_) => panic!("plan accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_good_vm_gets_microvm_nix_virtiofsd_options_and_links() {
        let sources = tempfile::tempdir().unwrap();
        let src = sources.path();
        let fx = Fixture::new(vm_json(serde_json::json!([
            {"tag": "journal", "socket": "/tmp/j.sock", "source": src},
            {"tag": "store", "socket": "/tmp/s.sock", "source": src,
             "virtiofsd": {"cache": "never", "xattr": false, "posix_acl": false,
                           "socket_group": "kvm", "extra_args": ["--readonly"]}},
            {"tag": "manual", "socket": "/tmp/m.sock"},
        ])));
        let plan = plan(&fx.args(Some("nobody"))).unwrap();

        assert_eq!(
            plan.daemons.len(),
            2,
            "a share without source gets no daemon"
        );
        let args = |i: usize| -> Vec<String> {
            let d: &DaemonSpec = &plan.daemons[i];
            d.args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            args(0),
            [
                "--socket-path=/tmp/j.sock".to_owned(),
                format!("--shared-dir={}", src.display()),
                "--socket-group=nogroup".to_owned(),
                "--cache=auto".to_owned(),
                "--posix-acl".to_owned(),
                "--xattr".to_owned(),
            ]
        );
        assert_eq!(
            args(1)[2..],
            ["--socket-group=kvm", "--cache=never", "--readonly"]
        );
        assert_eq!(plan.daemons[0].program, Path::new("/bin/true"));
        assert_eq!(plan.user.as_ref().map(|u| u.uid), Some(65534));

        // Links: booted -> current's target; the journal link uses the lower-case id.
        assert_eq!(plan.booted.target, fx.path("gen"));
        assert_eq!(plan.booted.link, fx.path("state/vm/booted"));
        let journal = plan.journal.unwrap();
        let id = "5c2a9b0e7d3f4e1a8b6c0d9e8f7a6b5c";
        assert_eq!(journal.link, fx.path("journal").join(id));
        assert_eq!(journal.target, src.join(id));
        assert_eq!(plan.api_socket, fx.path("state/vm/mvmm.sock"));
    }

    #[test]
    fn problems_name_what_to_fix() {
        let fx = Fixture::new(vm_json(serde_json::json!([])));
        let mut args = fx.args(None);
        args.state_dir = fx.path("nope");
        assert!(err_text(plan(&args)).contains("nope: does not exist"));
        let mut args = fx.args(None);
        args.name = "../vm".to_owned();
        assert!(err_text(plan(&args)).contains("is not a VM name"));
        let mut args = fx.args(None);
        args.name = "other".to_owned();
        assert!(err_text(plan(&args)).contains("has no VM directory other/"));
        let err = err_text(plan(&fx.args(Some("no-such-user-mvmm"))));
        assert!(
            err.contains("--user no-such-user-mvmm: no such user"),
            "{err}"
        );

        // `current` dangling.
        let current = fx.path("state/vm/current");
        std::fs::remove_file(&current).unwrap();
        std::os::unix::fs::symlink(fx.path("gone"), &current).unwrap();
        let err = err_text(plan(&fx.args(None)));
        assert!(
            err.contains("is a dangling link to") && err.contains("gone"),
            "{err}"
        );

        let with = |shares: serde_json::Value| {
            let fx = Fixture::new(vm_json(shares));
            err_text(plan(&fx.args(None)))
        };
        let err = with(serde_json::json!([{"tag": "a", "socket": "/tmp/a.sock", "source": "rel"}]));
        assert!(err.contains("`shares[0].source`: rel is relative"), "{err}");
        let err = with(serde_json::json!([
            {"tag": "a", "socket": "/nonexistent-dir/a.sock", "source": "/"}
        ]));
        assert!(
            err.contains("`shares[0].socket`: the directory of"),
            "{err}"
        );
    }

    #[test]
    fn inherited_descriptors_and_a_missing_virtiofsd_are_refused() {
        let mut json = vm_json(serde_json::json!([]));
        json["kvm"] = "fd:3".into();
        let fx = Fixture::new(json);
        let err = err_text(plan(&fx.args(None)));
        assert!(err.contains("`kvm` is an inherited descriptor"), "{err}");

        let fx = Fixture::new(vm_json(serde_json::json!([
            {"tag": "a", "socket": "/tmp/a.sock", "source": "/"}
        ])));
        let mut args = fx.args(None);
        args.virtiofsd = Some(fx.path("no-virtiofsd"));
        let err = err_text(plan(&args));
        assert!(err.contains("is not an executable file"), "{err}");
    }
}
