"""Guest CPUID (x86/cpuid.py): per-vCPU APIC IDs, the hypervisor bit, and the TSC-deadline
timer offered where KVM's LAPIC emulates it, whatever the host CPU (AMD CPUs have none)."""
from hypothesis import given, strategies as st

from kvmpy.kvm.regs import CpuidEntry
from kvmpy.x86.cpuid import HYPERVISOR_BIT, TSC_DEADLINE_BIT, guest_cpuid

u32 = st.integers(0, 2**32 - 1)


@given(ebx=u32, ecx=u32, vcpu=st.integers(0, 255), ncpus=st.integers(1, 255), deadline=st.booleans())
def test_leaf_1_gets_the_apic_id_count_hypervisor_bit_and_deadline_timer(ebx, ecx, vcpu, ncpus, deadline):
    supported = [CpuidEntry(function=0, eax=0xD), CpuidEntry(function=1, ebx=ebx, ecx=ecx, edx=7),
                 CpuidEntry(function=0xB, index=0, edx=0)]
    out = guest_cpuid(supported, vcpu, ncpus, tsc_deadline=deadline)
    leaf1 = next(e for e in out if e.function == 1)
    assert leaf1.ebx == (ebx & 0xFFFF) | vcpu << 24 | ncpus << 16
    assert leaf1.ecx & HYPERVISOR_BIT
    assert bool(leaf1.ecx & TSC_DEADLINE_BIT) == (deadline or bool(ecx & TSC_DEADLINE_BIT))
    assert leaf1.ecx & ~(HYPERVISOR_BIT | TSC_DEADLINE_BIT) == ecx & ~(HYPERVISOR_BIT | TSC_DEADLINE_BIT)
    assert leaf1.edx == 7 and out[0] == supported[0]
    assert next(e for e in out if e.function == 0xB).edx == vcpu
