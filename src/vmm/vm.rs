//! The KVM VM: in-kernel irqchip and PIT, guest memory slots, irqfds.

use std::ffi::CString;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Three pages just below the 4 GiB boundary, inside the MMIO hole, where KVM keeps the TSS
/// Intel's VMX needs for real mode.
const TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: {source} (is KVM enabled, and may this user open {path}? Or pass it as `\"kvm\": \"fd:N\"`)")]
    OpenKvm {
        path: String,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("config field `kvm`: {0} does not answer KVM_GET_API_VERSION; pass /dev/kvm")]
    NotKvm(String),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("this host's KVM allows at most {max} vCPUs per VM; machine.vcpus asks for {wanted}")]
    TooManyVcpus { max: usize, wanted: u32 },
    #[error("KVM failed to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

impl VmError {
    /// Whether the error is the user's to fix (a wrong `kvm` setting or too many vCPUs).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            VmError::Config(_) | VmError::NotKvm(_) | VmError::TooManyVcpus { .. }
        )
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Creates a VM with the interrupt controllers and timer every PC guest expects, on the
    /// KVM device at `kvm_path` (or the inherited descriptor it names as `fd:N`).
    pub fn new(vcpus: u32, kvm_path: &Path) -> Result<Self, VmError> {
        let kvm = open_kvm(kvm_path)?;
        let version = kvm.get_api_version();
        if version < 0 {
            return Err(VmError::NotKvm(kvm_path.display().to_string()));
        }
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::ApiVersion(kvm.get_api_version()));
        }
        let max = kvm.get_max_vcpus();
        if vcpus as usize > max {
            return Err(VmError::TooManyVcpus { max, wanted: vcpus });
        }
        let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(kvm_err("set the TSS address"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("create the in-kernel IOAPIC/PIC"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(kvm_err("create the in-kernel PIT"))?;
        Ok(Self { kvm, fd })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// CPUID entries this host's KVM can expose.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report its supported CPUID"))
    }

    /// Hands every guest RAM region to KVM, one memory slot each.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host_addr = mem
                .get_host_address(region.start_addr())
                .expect("a region's start is inside guest memory");
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host_addr as u64,
                flags: 0,
            };
            // SAFETY: the region describes a live mapping owned by `mem`, which outlives the VM
            // (both are kept until the process exits).
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(kvm_err("register guest memory"))?;
        }
        Ok(())
    }

    /// Routes writes to `evt` straight into the guest as interrupt `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("register an interrupt eventfd"))
    }
}

/// Opens the KVM device, or takes over the inherited descriptor `fd:N` (validated with the
/// config: open, a read-write character device).
fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    if let Some(fd) = crate::config::parse_fd("kvm", path)? {
        // SAFETY: the config hands this inherited descriptor to mvmm and names it once
        // (checked at validation), so the Kvm object may own and close it.
        return Ok(unsafe { Kvm::from_raw_fd(fd) });
    }
    let open_err = |source| VmError::OpenKvm {
        path: path.display().to_string(),
        source,
    };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| open_err(kvm_ioctls::Error::new(libc::EINVAL)))?;
    Kvm::new_with_path(c_path).map_err(open_err)
}
