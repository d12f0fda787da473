//! An in-process vhost-user backend (vhost-user-backend crate) that records what the frontend
//! set up and answers every request with a fixed reply, like a trivial virtio-fs server.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Listener, VhostUserVirtioFeatures};
use vhost_user_backend::{
    ShutdownHandle, VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT,
};
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::virtio::VIRTIO_F_VERSION_1;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// What the backend offers.
#[derive(Clone)]
pub struct BackendConfig {
    pub num_queues: usize,
    pub max_queue_size: usize,
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    /// GET_CONFIG's answer (empty: fail it).
    pub config: Vec<u8>,
    /// Written into every request's writable buffer.
    pub reply: Vec<u8>,
}

impl BackendConfig {
    /// Like virtiofsd without a tag: two queues, MQ and REPLY_ACK, no CONFIG.
    pub fn fs() -> Self {
        BackendConfig {
            num_queues: 2,
            max_queue_size: 1024,
            features: VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            protocol: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::BACKEND_REQ,
            config: Vec::new(),
            reply: b"fixed reply from the test backend".to_vec(),
        }
    }
}

/// A region as the backend mapped it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionRecord {
    pub gpa: u64,
    pub size: u64,
    pub file_offset: u64,
    /// (st_dev, st_ino) of the file the backend received.
    pub file: (u64, u64),
}

/// A queue as the backend saw it when kicked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub queue: u16,
    /// The queue's next available index before serving it (the vring base).
    pub next_avail: u16,
    pub size: u16,
    /// Guest addresses, translated back by the backend from the frontend's host addresses.
    pub addresses: (u64, u64, u64),
    pub enabled: bool,
    pub has_call: bool,
}

#[derive(Default, Debug)]
pub struct Record {
    pub acked_features: Vec<u64>,
    pub regions: Vec<RegionRecord>,
    pub events: Vec<EventRecord>,
    pub stopped: Vec<u32>,
    pub served: usize,
    pub swallowed: usize,
}

struct TestBackend {
    cfg: BackendConfig,
    record: Arc<Mutex<Record>>,
    /// Take requests without completing them (a backend that dies mid-request).
    swallow: Arc<AtomicBool>,
    mem: Option<Mem>,
}

impl VhostUserBackendMut for TestBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.cfg.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.cfg.max_queue_size
    }

    fn features(&self) -> u64 {
        self.cfg.features
    }

    fn acked_features(&mut self, features: u64) {
        self.record.lock().unwrap().acked_features.push(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.cfg.protocol
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        if self.cfg.config.is_empty() {
            return Vec::new();
        }
        let mut config: Vec<u8> = self
            .cfg
            .config
            .iter()
            .skip(offset as usize)
            .take(size as usize)
            .copied()
            .collect();
        config.resize(size as usize, 0);
        config
    }

    fn update_memory(&mut self, mem: Mem) -> std::io::Result<()> {
        let regions = mem
            .memory()
            .iter()
            .map(|r| {
                let fo = r.file_offset().expect("the backend maps files");
                let meta =
                    std::fs::metadata(format!("/proc/self/fd/{}", fo.file().as_raw_fd())).unwrap();
                use std::os::unix::fs::MetadataExt;
                RegionRecord {
                    gpa: r.start_addr().raw_value(),
                    size: r.len(),
                    file_offset: fo.start(),
                    file: (meta.dev(), meta.ino()),
                }
            })
            .collect();
        self.record.lock().unwrap().regions = regions;
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without it the worker thread never ends once the frontend is gone.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&mut self, queue_index: u32) -> std::io::Result<()> {
        self.record.lock().unwrap().stopped.push(queue_index);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        {
            let q = state.get_queue();
            let event = EventRecord {
                queue: device_event,
                next_avail: q.next_avail(),
                size: q.size(),
                addresses: (q.desc_table(), q.avail_ring(), q.used_ring()),
                enabled: state.is_enabled(),
                has_call: state.get_call().is_some(),
            };
            self.record.lock().unwrap().events.push(event);
        }
        let swallow = self.swallow.load(Ordering::SeqCst);
        let mut served = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
            if swallow {
                self.record.lock().unwrap().swallowed += 1;
                continue;
            }
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain.writable() {
                let n = self.cfg.reply.len().min(desc.len() as usize);
                mem.write_slice(&self.cfg.reply[..n], desc.addr())
                    .map_err(std::io::Error::other)?;
                written += n as u32;
            }
            state
                .add_used(head, written)
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
            self.record.lock().unwrap().served += 1;
            served = true;
        }
        if served {
            state.signal_used_queue()?;
        }
        Ok(())
    }
}

/// A running backend: listening on its socket, then serving one frontend.
pub struct BackendProcess {
    pub record: Arc<Mutex<Record>>,
    pub swallow: Arc<AtomicBool>,
    connected: mpsc::Receiver<ShutdownHandle>,
    thread: Option<JoinHandle<()>>,
}

impl BackendProcess {
    /// Binds `path` now (the socket exists when this returns) and serves the first frontend
    /// that connects on a thread.
    pub fn spawn(path: &Path, cfg: BackendConfig) -> BackendProcess {
        let mut listener = Listener::new(path, true).unwrap();
        let record = Arc::new(Mutex::new(Record::default()));
        let swallow = Arc::new(AtomicBool::new(false));
        let backend = Arc::new(RwLock::new(TestBackend {
            cfg,
            record: record.clone(),
            swallow: swallow.clone(),
            mem: None,
        }));
        let (tx, connected) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let mut daemon = VhostUserDaemon::new("test-backend".into(), backend, mem).unwrap();
            daemon.start(&mut listener).unwrap();
            if let Some(handle) = daemon.shutdown_handle() {
                let _ = tx.send(handle);
            }
            let _ = daemon.wait();
            // Dropping the listener removes the socket file.
        });
        BackendProcess {
            record,
            swallow,
            connected,
            thread: Some(thread),
        }
    }

    /// Kills the backend: closes its connection and its listening socket.
    pub fn kill(mut self) {
        let handle = self
            .connected
            .recv_timeout(Duration::from_secs(5))
            .expect("no frontend connected to the backend");
        handle.shutdown();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }

    /// Waits for the frontend to go away (e.g. after dropping the device).
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        // A backend no frontend connected to stays blocked in accept: leave its thread.
        if let Ok(handle) = self.connected.try_recv() {
            handle.shutdown();
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}
