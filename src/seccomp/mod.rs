//! Per-thread seccomp filters.
//!
//! Each kind of thread gets its own allow-list, written in `resources/seccomp/<kind>.json`
//! (seccompiler's JSON format) and compiled to BPF by build.rs, so nothing is parsed at run
//! time. A thread installs its filter before it touches anything the guest controls:
//! - vCPU threads, first thing on the thread ([`install`] from `vcpu.rs`);
//! - device threads (blk, net workers, vhost-user watchers), which are created by one
//!   "thread-starter" thread ([`start_thread_starter`]) and install their filter in the
//!   start hook, before device code runs;
//! - the main thread, right before it enters the event loop;
//! - `mvmm backend …`, once for the whole process before it serves the socket.
//!
//! A forbidden call raises SIGSYS; the handler writes one line naming the thread and the
//! system call number, then exits with [`EXIT_SECCOMP`].

mod sigsys;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use devices::threads::{self, ThreadRole};

pub use sigsys::EXIT_SECCOMP;

#[allow(clippy::type_complexity)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

/// Makes a thread of this kind call a forbidden system call right after installing its
/// filter: how the tests prove each kind is filtered and the failure is reported.
pub const TEST_VIOLATION_ENV: &str = "MVMM_SECCOMP_TEST_VIOLATION";

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("no seccomp policy named `{0}` was compiled in (resources/seccomp/{0}.json)")]
    MissingPolicy(&'static str),
    #[error(
        "cannot install the `{kind}` seccomp filter: {source} (a kernel without seccomp? \
         --no-seccomp runs without filters, for debugging only)"
    )]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("cannot catch SIGSYS for seccomp reports: {0}")]
    Handler(std::io::Error),
    #[error("cannot start the device thread starter: {0}")]
    Starter(std::io::Error),
}

/// The kinds of threads, each with its own policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread running the event loop.
    Main,
    Vcpu,
    /// Creates the device threads (see `devices::threads`).
    ThreadStarter,
    BlockWorker,
    NetWorker,
    VhostUserWatcher,
    /// `mvmm backend blk`, every thread.
    BackendBlk,
    /// `mvmm backend net`, every thread.
    BackendNet,
    /// With a jail's PID namespace: the parent that waits for the VM process.
    JailParent,
}

impl ThreadKind {
    /// The policy's name: its file in `resources/seccomp/`.
    pub fn policy(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::ThreadStarter => "thread-starter",
            ThreadKind::BlockWorker => "blk",
            ThreadKind::NetWorker => "net",
            ThreadKind::VhostUserWatcher => "vhost-user",
            ThreadKind::BackendBlk => "backend-blk",
            ThreadKind::BackendNet => "backend-net",
            ThreadKind::JailParent => "jail-parent",
        }
    }

    fn of_role(role: ThreadRole) -> ThreadKind {
        match role {
            ThreadRole::BlockWorker => ThreadKind::BlockWorker,
            ThreadRole::NetWorker => ThreadKind::NetWorker,
            ThreadRole::VhostUserWatcher => ThreadKind::VhostUserWatcher,
        }
    }
}

static DISABLED: AtomicBool = AtomicBool::new(false);
static TEST_VIOLATION: OnceLock<Option<String>> = OnceLock::new();

/// Sets the process up for filtering; call once from main, before any other thread exists.
/// With `enabled` false (`--no-seccomp`), every later call does nothing.
pub fn init(enabled: bool) -> Result<(), SeccompError> {
    DISABLED.store(!enabled, Ordering::SeqCst);
    if !enabled {
        log::warn!(
            "seccomp filters are OFF (--no-seccomp): a compromised device model or vCPU thread \
             can make any system call; use this for debugging only"
        );
        return Ok(());
    }
    TEST_VIOLATION.get_or_init(|| std::env::var(TEST_VIOLATION_ENV).ok());
    sigsys::install_handler().map_err(SeccompError::Handler)
}

/// Installs the filter of `kind` on the calling thread.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if DISABLED.load(Ordering::SeqCst) {
        return Ok(());
    }
    let program = program(kind.policy())?;
    sigsys::set_thread_label(kind.policy());
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install {
        kind: kind.policy(),
        source,
    })?;
    if TEST_VIOLATION.get().and_then(|v| v.as_deref()) == Some(kind.policy()) {
        violate_on_purpose();
    }
    Ok(())
}

/// Starts the thread that creates device threads, filtered as `thread-starter`; each thread
/// it creates installs its own kind's filter before running device code.
pub fn start_thread_starter() -> Result<(), SeccompError> {
    if DISABLED.load(Ordering::SeqCst) {
        return Ok(());
    }
    let setup = || install_or_exit(ThreadKind::ThreadStarter);
    let hook = Arc::new(|role| install_or_exit(ThreadKind::of_role(role)));
    threads::install_starter(setup, hook).map_err(SeccompError::Starter)?;
    Ok(())
}

/// For threads that cannot return an error: running unfiltered is not an option.
fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        log::error!("{e}");
        std::process::exit(crate::EXIT_FAILURE);
    }
}

fn program(policy: &'static str) -> Result<Vec<seccompiler::sock_filter>, SeccompError> {
    let (_, insns) = generated::FILTERS
        .iter()
        .find(|(name, _)| *name == policy)
        .ok_or(SeccompError::MissingPolicy(policy))?;
    Ok(insns
        .iter()
        .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
        .collect())
}

#[inline(never)]
fn violate_on_purpose() {
    // acct(2) is in no policy, and harmless: without privileges or with a NULL path it fails.
    // SAFETY: acct with a NULL pointer only asks the kernel to turn accounting off.
    unsafe { libc::syscall(libc::SYS_acct, std::ptr::null::<libc::c_char>()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ThreadKind; 9] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::ThreadStarter,
        ThreadKind::BlockWorker,
        ThreadKind::NetWorker,
        ThreadKind::VhostUserWatcher,
        ThreadKind::BackendBlk,
        ThreadKind::BackendNet,
        ThreadKind::JailParent,
    ];

    #[test]
    fn every_thread_kind_has_a_compiled_policy() {
        for kind in ALL {
            let program = program(kind.policy()).unwrap();
            assert!(
                program.len() > 20,
                "{kind:?}: {} instructions",
                program.len()
            );
        }
        assert_eq!(generated::FILTERS.len(), ALL.len());
    }

    /// Runs `body` in a forked child with the `blk` policy installed; returns its wait status.
    fn in_filtered_child(body: fn()) -> libc::c_int {
        let program = program("blk").unwrap();
        // SAFETY: the child only makes system calls (no allocation, no locks) and then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: leaving the child at once.
                unsafe { libc::_exit(99) };
            }
            body();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    #[test]
    fn a_filter_allows_its_calls_and_traps_the_others() {
        let allowed = in_filtered_child(|| {
            // SAFETY: a zero-length write to stderr.
            unsafe { libc::write(2, std::ptr::null(), 0) };
        });
        assert!(libc::WIFEXITED(allowed) && libc::WEXITSTATUS(allowed) == 0);
        // SIGSYS is at its default action in the child: the forbidden call kills it.
        let forbidden = in_filtered_child(violate_on_purpose);
        assert!(
            libc::WIFSIGNALED(forbidden) && libc::WTERMSIG(forbidden) == libc::SIGSYS,
            "status {forbidden:#x}"
        );
    }
}
