//! Per-device status for the control socket's `status`: the counters the device models keep
//! (relaxed atomics, read without stopping anything).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use devices::virtio::block::BlockCounters;
use devices::virtio::net::NetCounters;
use devices::virtio::vhost_user::VhostUserDevice;
use serde_json::{json, Value};

/// Where a device's numbers come from.
pub enum DeviceSource {
    /// A disk mvmm serves itself.
    Block(Arc<BlockCounters>),
    /// A disk served by a vhost-user backend (which keeps its own counters).
    VhostUserBlock,
    Net(Arc<NetCounters>),
    /// A virtio-fs share; the device tells whether virtiofsd is connected.
    Fs {
        tag: String,
        device: Arc<Mutex<VhostUserDevice>>,
    },
}

/// One device as `status` lists it; `id` names its config entry (`disks[0]`, `net[1]`, ...).
pub struct DeviceReport {
    pub id: String,
    pub source: DeviceSource,
}

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl DeviceReport {
    pub fn to_json(&self) -> Value {
        let id = &self.id;
        match &self.source {
            DeviceSource::Block(c) => json!({
                "id": id, "kind": "blk",
                "reads": count(&c.reads), "writes": count(&c.writes),
                "flushes": count(&c.flushes),
                "read_bytes": count(&c.read_bytes), "write_bytes": count(&c.write_bytes),
                "errors": count(&c.errors),
            }),
            DeviceSource::VhostUserBlock => {
                json!({"id": id, "kind": "blk", "backend": "vhost-user"})
            }
            DeviceSource::Net(c) => json!({
                "id": id, "kind": "net",
                "rx_frames": count(&c.rx_frames), "rx_bytes": count(&c.rx_bytes),
                "rx_dropped": count(&c.rx_dropped),
                "tx_frames": count(&c.tx_frames), "tx_bytes": count(&c.tx_bytes),
                "tx_dropped": count(&c.tx_dropped),
            }),
            DeviceSource::Fs { tag, device } => {
                // The device's lock can be held by a vCPU talking to virtiofsd; the event loop
                // must not wait on that, so a busy device reports `null`.
                let connected = match device.try_lock() {
                    Ok(dev) => Value::Bool(dev.backend_connected()),
                    Err(TryLockError::Poisoned(p)) => {
                        Value::Bool(p.into_inner().backend_connected())
                    }
                    Err(TryLockError::WouldBlock) => Value::Null,
                };
                json!({"id": id, "kind": "fs", "tag": tag, "connected": connected})
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_reported_as_they_are_now() {
        let blk = Arc::new(BlockCounters::default());
        let report = DeviceReport {
            id: "disks[0]".into(),
            source: DeviceSource::Block(blk.clone()),
        };
        blk.reads.fetch_add(3, Ordering::Relaxed);
        blk.read_bytes.fetch_add(1536, Ordering::Relaxed);
        let v = report.to_json();
        assert_eq!(v["id"], "disks[0]");
        assert_eq!(v["kind"], "blk");
        assert_eq!(
            (v["reads"].as_u64(), v["read_bytes"].as_u64()),
            (Some(3), Some(1536))
        );
        assert_eq!(v["writes"], 0);

        let net = Arc::new(NetCounters::default());
        net.tx_frames.fetch_add(2, Ordering::Relaxed);
        net.tx_bytes.fetch_add(120, Ordering::Relaxed);
        let v = DeviceReport {
            id: "net[0]".into(),
            source: DeviceSource::Net(net),
        }
        .to_json();
        assert_eq!(v["kind"], "net");
        assert_eq!(
            (v["tx_frames"].as_u64(), v["tx_bytes"].as_u64()),
            (Some(2), Some(120))
        );
        assert_eq!(v["rx_frames"], 0);

        let v = DeviceReport {
            id: "disks[1]".into(),
            source: DeviceSource::VhostUserBlock,
        }
        .to_json();
        assert_eq!(v["backend"], "vhost-user");
    }
}
