//! `shares[].source` and `shares[].virtiofsd`: what `mvmm supervise` needs to start virtiofsd
//! for a share. mvmm itself only connects to the share's socket and ignores both.

use serde::Deserialize;

/// virtiofsd's `--cache` policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// virtiofsd's default: cache until the file changes on the host (close-to-open).
    #[default]
    Auto,
    Always,
    Never,
    Metadata,
}

impl CacheMode {
    pub fn as_arg(self) -> &'static str {
        match self {
            CacheMode::Auto => "auto",
            CacheMode::Always => "always",
            CacheMode::Never => "never",
            CacheMode::Metadata => "metadata",
        }
    }
}

/// Options for the virtiofsd the supervisor starts for a share. The defaults are what
/// microvm.nix passes: `--xattr --posix-acl`, virtiofsd's default cache, and the socket's
/// group set to the VM user's group (so mvmm, running as that user, may connect).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtiofsdOptions {
    #[serde(default)]
    pub cache: CacheMode,
    /// Extended attributes (`--xattr`); default true.
    pub xattr: Option<bool>,
    /// POSIX ACLs (`--posix-acl`, implies xattr); default true.
    pub posix_acl: Option<bool>,
    /// The socket's group (`--socket-group`); default: the primary group of `--user`.
    pub socket_group: Option<String>,
    /// Further arguments, passed last, as is.
    #[serde(default)]
    pub extra_args: Vec<String>,
}
