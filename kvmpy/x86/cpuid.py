"""Guest CPUID: what KVM supports, adjusted per vCPU (Intel SDM vol. 2A, CPUID).

KVM_GET_SUPPORTED_CPUID lists what the host can virtualise; a VMM passes it on
with the per-vCPU fields filled in (initial APIC ID) and the hypervisor bit set,
so guests know they run virtualised. Without KVM_SET_CPUID2 the default guest
CPUID lacks long mode (docs/host-notes.md).

The TSC-deadline timer is KVM's own: its in-kernel LAPIC emulates it on every host
(KVM_CAP_TSC_DEADLINE_TIMER), but the supported list shows it only where the host CPU
has one, which no AMD CPU does. As QEMU does, kvmpy offers it whenever KVM emulates it;
without it in CPUID KVM ignores a guest's switch to TSC-deadline mode.
"""
from __future__ import annotations

from dataclasses import replace

from ..kvm.regs import CpuidEntry

HYPERVISOR_BIT = 1 << 31          # leaf 1 ECX bit 31: "running under a hypervisor"
TSC_DEADLINE_BIT = 1 << 24        # leaf 1 ECX bit 24: the LAPIC timer has TSC-deadline mode


def guest_cpuid(supported: list[CpuidEntry], vcpu_id: int, ncpus: int = 1,
                tsc_deadline: bool = False) -> list[CpuidEntry]:
    """Supported CPUID with the APIC ID of ``vcpu_id`` and the hypervisor bit set, and the
    TSC-deadline timer when ``tsc_deadline`` (KVM emulates it in its LAPIC)."""
    out = []
    for e in supported:
        if e.function == 1:
            ebx = (e.ebx & 0x0000FFFF) | (vcpu_id & 0xFF) << 24 | (max(ncpus, 1) & 0xFF) << 16
            ecx = e.ecx | HYPERVISOR_BIT | (TSC_DEADLINE_BIT if tsc_deadline else 0)
            e = replace(e, ebx=ebx, ecx=ecx)
        elif e.function in (0xB, 0x1F):
            e = replace(e, edx=vcpu_id)          # x2APIC ID of this logical processor
        out.append(e)
    return out
