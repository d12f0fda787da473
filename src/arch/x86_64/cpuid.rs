//! CPUID for each vCPU: KVM's supported set, with this vCPU's topology and APIC ID filled in.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Topology level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM's CPUID list is full; cannot add the KVM paravirt leaves")]
    Full,
}

/// Bits needed to number `count` items (the APIC ID shift for a topology level).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Presents the vCPUs as one socket of single-thread cores, APIC ID = vCPU index.
pub fn filter_cpuid(cpuid: &mut CpuId, vcpu_index: u8, vcpu_count: u8) -> Result<(), CpuidError> {
    let apic_id = u32::from(vcpu_index);
    let count = u32::from(vcpu_count);
    let mut has_kvm_signature = false;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC ID, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size in 8-byte units.
                entry.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                let (shift, logical, level_type) = match entry.index {
                    0 => (0, 1, LEVEL_TYPE_SMT),
                    1 => (id_bits(count), count, LEVEL_TYPE_CORE),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = logical;
                entry.ecx = (level_type << 8) | (entry.index & 0xff);
                entry.edx = apic_id;
            }
            LEAF_KVM_SIGNATURE => has_kvm_signature = true,
            _ => {}
        }
    }
    if !has_kvm_signature {
        add_kvm_leaves(cpuid)?;
    }
    Ok(())
}

/// Older kernels omit the paravirt leaves from the supported list; guests need the signature
/// to find kvmclock.
fn add_kvm_leaves(cpuid: &mut CpuId) -> Result<(), CpuidError> {
    let signature = kvm_cpuid_entry2 {
        function: LEAF_KVM_SIGNATURE,
        eax: LEAF_KVM_FEATURES,
        ebx: KVM_SIGNATURE[0],
        ecx: KVM_SIGNATURE[1],
        edx: KVM_SIGNATURE[2],
        ..Default::default()
    };
    cpuid.push(signature).map_err(|_| CpuidError::Full)?;
    let features = kvm_cpuid_entry2 {
        function: LEAF_KVM_FEATURES,
        ..Default::default()
    };
    cpuid.push(features).map_err(|_| CpuidError::Full)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn sample() -> CpuId {
        let entries = [
            entry(0x1, 0),
            kvm_cpuid_entry2 {
                eax: (3 << 5) | 0x1,
                ..entry(0x4, 3)
            },
            kvm_cpuid_entry2 {
                eax: (1 << 5) | 0x1,
                ..entry(0x4, 0)
            },
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn apic_ids_and_counts_follow_the_vcpu() {
        let mut cpuid = sample();
        filter_cpuid(&mut cpuid, 3, 4).unwrap();
        let leaf1 = find(&cpuid, 0x1, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
        for index in 0..3 {
            assert_eq!(find(&cpuid, 0xb, index).edx, 3);
        }
        let core_level = find(&cpuid, 0xb, 1);
        assert_eq!(core_level.eax, 2, "4 cores need 2 APIC ID bits");
        assert_eq!(core_level.ebx, 4);
        assert_eq!((core_level.ecx >> 8) & 0xff, LEVEL_TYPE_CORE);
        assert_eq!((find(&cpuid, 0xb, 2).ecx >> 8) & 0xff, 0, "no level 2");
        let l3 = find(&cpuid, 0x4, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3, "L3 shared by all cores");
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((find(&cpuid, 0x4, 0).eax >> 14) & 0xfff, 0, "L1 private");
    }

    #[test]
    fn single_vcpu_has_no_htt_and_gets_kvm_leaves() {
        let mut cpuid = sample();
        filter_cpuid(&mut cpuid, 0, 1).unwrap();
        assert_eq!(find(&cpuid, 0x1, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&cpuid, 0xb, 1).eax, 0);
        let sig = find(&cpuid, LEAF_KVM_SIGNATURE, 0);
        let bytes: Vec<u8> = [sig.ebx, sig.ecx, sig.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&bytes[..9], b"KVMKVMKVM");
        assert_eq!(sig.eax, LEAF_KVM_FEATURES);
    }

    #[test]
    fn id_bits_rounds_up_to_powers_of_two() {
        assert_eq!([1, 2, 3, 4, 5, 254].map(id_bits), [0, 1, 2, 2, 3, 8]);
    }
}
