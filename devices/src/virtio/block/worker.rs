//! The I/O worker thread of one virtio-blk device.
//!
//! It sleeps in `epoll_wait` on the queue's kick eventfd and a stop eventfd, and serves the
//! queue with synchronous I/O on the disk file. Syscalls it makes, for the per-worker seccomp
//! filter:
//! - `epoll_wait` (`epoll_pwait` on aarch64): wait for a kick or stop;
//! - `read`: consume the kick eventfd;
//! - `preadv`, `pwritev`: data, straight into/from guest memory;
//! - `fdatasync`: FLUSH (and every write when the driver did not negotiate FLUSH);
//! - `fallocate`: DISCARD / WRITE_ZEROES on regular files;
//! - `ioctl(BLKDISCARD | BLKZEROOUT)`: DISCARD / WRITE_ZEROES on block devices;
//! - whatever `VirtioInterrupt::signal_used_queue` uses (an eventfd `write` for an irqfd);
//! - `write` to stderr for log lines, and `futex`, `mmap`/`munmap`/`madvise`, `brk`
//!   (allocator), `sigaltstack`, `exit` from the Rust runtime.
//!
//! The epoll set and the stop eventfd are created before the thread starts, so the thread
//! itself never creates descriptors.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ratelimit::LogLimiter;
use super::request::RequestHandler;
use crate::threads::{self, ThreadRole};
use crate::virtio::VirtioInterrupt;

const KICK: u64 = 0;
const STOP: u64 = 1;

/// Everything the worker owns while it runs; handed back when it stops.
struct State {
    name: String,
    handler: RequestHandler,
    mem: GuestMemoryMmap,
    queue: Queue,
    queue_index: u16,
    kick: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    epoll: Epoll,
    log: LogLimiter,
}

/// A running worker.
pub struct Worker {
    stop: EventFd,
    thread: JoinHandle<Option<RequestHandler>>,
}

/// What `spawn` could not start, with the handler so the device keeps its disk.
pub struct SpawnError {
    pub error: io::Error,
    pub handler: Box<RequestHandler>,
}

impl Worker {
    pub fn spawn(
        name: String,
        handler: RequestHandler,
        mem: GuestMemoryMmap,
        queue: Queue,
        queue_index: u16,
        kick: EventFd,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Worker, SpawnError> {
        let setup = || -> io::Result<(Epoll, EventFd)> {
            let stop = EventFd::new(EFD_NONBLOCK)?;
            let epoll = Epoll::new()?;
            epoll.ctl(
                ControlOperation::Add,
                kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, KICK),
            )?;
            epoll.ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )?;
            Ok((epoll, stop))
        };
        let (epoll, stop) = match setup() {
            Ok(v) => v,
            Err(error) => {
                return Err(SpawnError {
                    error,
                    handler: Box::new(handler),
                })
            }
        };
        // The state goes over a channel once the thread exists: if spawning fails, the closure
        // is dropped but the handler (and its disk) stays with us.
        let (tx, rx) = mpsc::sync_channel::<State>(1);
        let thread = threads::spawn(ThreadRole::BlockWorker, name, move || {
            rx.recv().ok().map(State::run)
        });
        let thread = match thread {
            Ok(t) => t,
            Err(error) => {
                return Err(SpawnError {
                    error,
                    handler: Box::new(handler),
                })
            }
        };
        let state = State {
            name: thread.thread().name().unwrap_or("blk").to_owned(),
            handler,
            mem,
            queue,
            queue_index,
            kick,
            interrupt,
            epoll,
            log: LogLimiter::new(),
        };
        if let Err(mpsc::SendError(state)) = tx.send(state) {
            // Only if the thread died before receiving: the state comes back with the error.
            let _ = thread.join();
            return Err(SpawnError {
                error: io::Error::other("the worker thread exited at start"),
                handler: Box::new(state.handler),
            });
        }
        Ok(Worker { stop, thread })
    }

    /// Stops the thread and takes the handler back; None if the thread panicked.
    pub fn stop(self) -> Option<RequestHandler> {
        if let Err(e) = self.stop.write(1) {
            log::error!("virtio-blk: cannot signal the worker to stop: {e}");
            return None;
        }
        self.thread.join().ok().flatten()
    }
}

impl State {
    fn run(mut self) -> RequestHandler {
        let mut events = [EpollEvent::default(); 2];
        // Requests made available before the worker existed get served right away.
        let mut pending = true;
        loop {
            // With work pending, only peek at the events (a stop must not wait behind a driver
            // that keeps the queue full).
            let timeout = if pending { 0 } else { -1 };
            let count = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-blk: epoll_wait failed, stopping the worker: {e}");
                    return self.handler;
                }
            };
            for event in &events[..count] {
                match event.data() {
                    STOP => return self.handler,
                    _ => {
                        // Reading resets the counter; EAGAIN just means no new kick.
                        let _ = self.kick.read();
                        pending = true;
                    }
                }
            }
            if pending {
                pending = self.serve();
            }
        }
    }

    /// One round: notifications off, handle a queue's worth, notifications back on.
    /// Returns whether requests arrived meanwhile (the driver may not kick for those).
    fn serve(&mut self) -> bool {
        let mem = &self.mem;
        let queue = &mut self.queue;
        let name = &self.name;
        if let Err(e) = queue.disable_notification(mem) {
            self.log
                .warn(name, format_args!("cannot disable notifications: {e}"));
        }
        let (notify, mut more) = match self.handler.process_queue(mem, queue) {
            Ok(notify) => (notify, true),
            Err(e) => {
                // Wait for the next kick (likely after a reset) rather than spin on it.
                self.log
                    .warn(name, format_args!("the queue is unusable: {e}"));
                (true, false)
            }
        };
        match queue.enable_notification(mem) {
            Ok(pending) => more &= pending,
            Err(e) => {
                self.log
                    .warn(name, format_args!("cannot enable notifications: {e}"));
                more = false;
            }
        }
        if notify {
            if let Err(e) = self.interrupt.signal_used_queue(self.queue_index) {
                self.log
                    .warn(name, format_args!("cannot signal the used queue: {e}"));
            }
        }
        more
    }
}
