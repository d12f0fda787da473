//! `jail`: confinement mvmm applies to itself, for hosts without systemd's sandboxing.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// An existing directory mvmm chroots into once everything is open (best empty and not
    /// writable by `uid`). The directories of vhost-user and control sockets are bind-mounted
    /// into it at the same paths, so reconnecting still works.
    pub root: PathBuf,
    /// Switch to this user (and `gid`, no supplementary groups) after opening everything.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// New mount, IPC, UTS and PID namespaces (default true). The mount namespace is needed
    /// for the socket bind mounts; with a PID namespace the VM runs as PID 1 of its own
    /// namespace under a small parent that forwards signals and the exit code.
    #[serde(default = "default_true")]
    pub namespaces: bool,
    #[serde(default)]
    pub rlimits: RlimitConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlimitConfig {
    /// RLIMIT_NOFILE: open descriptors.
    pub nofile: Option<u64>,
    /// RLIMIT_FSIZE: largest file size in bytes (disk images cannot grow past it).
    pub fsize: Option<u64>,
    /// RLIMIT_NPROC: processes and threads of `uid`.
    pub nproc: Option<u64>,
    /// RLIMIT_CORE: core dump size (0 keeps guest memory out of core files).
    pub core: Option<u64>,
}

fn default_true() -> bool {
    true
}
