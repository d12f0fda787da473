//! Where device threads come from, so the VMM can sandbox each kind of thread.
//!
//! Device worker threads are started when the driver activates a device, which happens on a
//! vCPU thread. A thread inherits its creator's seccomp filters, so a worker created directly by
//! a vCPU thread could never use a system call the vCPU filter forbids (and the vCPU filter would
//! have to allow `clone`). Instead, once [`install_starter`] has run, [`spawn`] hands the job to a
//! dedicated starter thread, whose only work is creating threads; every new thread then calls the
//! installed hook with its [`ThreadRole`] (the VMM installs that role's filter there) before it
//! runs any device code.
//!
//! Without a starter (unit tests, benchmarks, the vhost-user backends, which filter the whole
//! process), [`spawn`] starts the thread directly and no hook runs.

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};

/// The kinds of threads the device crate starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// The I/O worker of one virtio-blk device.
    BlockWorker,
    /// The I/O worker of one virtio-net device.
    NetWorker,
    /// The thread that watches a vhost-user backend's socket and reconnects it.
    VhostUserWatcher,
}

/// Runs at the start of every thread [`spawn`] creates, before any device code.
pub type StartHook = Arc<dyn Fn(ThreadRole) + Send + Sync>;

type Job = Box<dyn FnOnce() + Send>;

struct Starter {
    jobs: Mutex<mpsc::Sender<Job>>,
    hook: StartHook,
}

static STARTER: OnceLock<Starter> = OnceLock::new();

/// Starts the starter thread. `setup` runs first on it (the VMM installs the starter's own
/// filter there); `hook` runs at the start of each thread it creates. Only the first call
/// installs a starter.
pub fn install_starter(
    setup: impl FnOnce() + Send + 'static,
    hook: StartHook,
) -> io::Result<JoinHandle<()>> {
    let (jobs, queue) = mpsc::channel::<Job>();
    let thread = thread::Builder::new()
        .name("thread-starter".into())
        .spawn(move || {
            setup();
            // Ends when every sender is gone, i.e. never while the process runs.
            for job in queue {
                job();
            }
        })?;
    let starter = Starter {
        jobs: Mutex::new(jobs),
        hook,
    };
    if STARTER.set(starter).is_err() {
        return Err(io::Error::other("a thread starter is already installed"));
    }
    Ok(thread)
}

/// Starts a device thread named `name` that runs `body`; through the starter when there is one.
pub fn spawn<T, F>(role: ThreadRole, name: String, body: F) -> io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let Some(starter) = STARTER.get() else {
        return thread::Builder::new().name(name).spawn(body);
    };
    let hook = starter.hook.clone();
    let (reply, handle) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let result = thread::Builder::new().name(name).spawn(move || {
            hook(role);
            body()
        });
        // The requester waits for this; if it is gone, the thread just runs detached.
        let _ = reply.send(result);
    });
    starter
        .jobs
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send(job)
        .map_err(|_| io::Error::other("the thread starter has exited"))?;
    handle
        .recv()
        .map_err(|_| io::Error::other("the thread starter dropped a request"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // One test only: the starter is process-wide and installed once.
    #[test]
    fn threads_come_from_the_starter_and_run_the_hook_first() {
        let direct = spawn(ThreadRole::NetWorker, "direct".into(), || 7).unwrap();
        assert_eq!(direct.join().unwrap(), 7);

        let hooks = Arc::new(AtomicUsize::new(0));
        let seen = hooks.clone();
        let (started_on, setup_ran) = mpsc::channel();
        install_starter(
            move || {
                started_on
                    .send(thread::current().name().map(str::to_owned))
                    .unwrap()
            },
            // Other tests in this process spawn workers too, through the same starter.
            Arc::new(move |role| {
                if role == ThreadRole::VhostUserWatcher {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            }),
        )
        .unwrap();
        assert_eq!(setup_ran.recv().unwrap().as_deref(), Some("thread-starter"));
        let counted = hooks.clone();
        let worker = spawn(ThreadRole::VhostUserWatcher, "vhu-test".into(), move || {
            // The hook ran on this thread before the body.
            (
                counted.load(Ordering::SeqCst),
                thread::current().name().map(str::to_owned),
            )
        })
        .unwrap();
        let (hooks_before_body, name) = worker.join().unwrap();
        assert!(hooks_before_body >= 1);
        assert_eq!(name.as_deref(), Some("vhu-test"));
        assert!(install_starter(|| {}, Arc::new(|_| {})).is_err());
    }
}
