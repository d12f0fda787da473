//! x86-64: memory layout, CPUID, vCPU registers, boot information and firmware tables.

pub mod acpi;
pub mod boot_info;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod smbios;
