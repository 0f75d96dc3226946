"""Machine-check architecture: the IA32_MCG_CAP each vCPU gets (Intel SDM vol. 3B, ch. 16).

A guest learns of machine-check support from CPUID.1:EDX (MCE, bit 7: the #MC exception;
MCA, bit 14: the machine-check MSRs) and reads IA32_MCG_CAP (MSR 0x179) for the number of
error-reporting banks (bits 7:0) and the optional features. KVM emulates the banks once
the VMM hands it that value with KVM_X86_SETUP_MCE.

kvmpy does what QEMU does (target/i386/cpu.c ``mce_init``, target/i386/kvm/kvm.c
``kvm_arch_init_vcpu``): only for a CPU of family 6 or later whose CPUID has both MCE
and MCA, on a KVM with KVM_CAP_MCE, it asks for 10 banks with MCG_CTL_P (an IA32_MCG_CTL
register) and MCG_SER_P (software error recovery), and keeps only the feature bits
KVM_X86_GET_MCE_CAP_SUPPORTED reports. QEMU refuses to start on a KVM with fewer than
10 banks; kvmpy gives such a guest the banks KVM has (KVM has offered 32 since 2009).
"""
from __future__ import annotations

from ..kvm.regs import MCG_CAP_BANKS_MASK, MSR_IA32_MCG_CAP, CpuidEntry

IA32_MCG_CAP = MSR_IA32_MCG_CAP   # 0x179, read-only: banks and features
IA32_MCG_STATUS = 0x17A
IA32_MCG_CTL = 0x17B        # present when MCG_CTL_P

MCG_CTL_P = 1 << 8          # IA32_MCG_CTL is present
MCG_SER_P = 1 << 24         # software error recovery: the UCR error classes of MCi_STATUS
MCG_LMCE_P = 1 << 27        # local machine-check exceptions (QEMU leaves them off by default)

BANKS = 10                  # QEMU's MCE_BANKS_DEF
FEATURES = MCG_CTL_P | MCG_SER_P     # QEMU's MCE_CAP_DEF

CPUID_1_EDX_MCE = 1 << 7
CPUID_1_EDX_MCA = 1 << 14


def family(eax: int) -> int:
    """The display family of CPUID.1:EAX: bits 11:8, plus bits 27:20 when those read 0xF."""
    base = (eax >> 8) & 0xF
    return base + ((eax >> 20) & 0xFF) if base == 0xF else base


def has_mca(cpuid: list[CpuidEntry]) -> bool:
    """True when CPUID describes a family >= 6 CPU with both MCE and MCA, QEMU's condition."""
    leaf1 = next((e for e in cpuid if e.function == 1), None)
    mce_mca = CPUID_1_EDX_MCE | CPUID_1_EDX_MCA
    return leaf1 is not None and family(leaf1.eax) >= 6 and leaf1.edx & mce_mca == mce_mca


def mcg_cap(supported: int, max_banks: int) -> int:
    """IA32_MCG_CAP for a vCPU: :data:`BANKS` banks (at most ``max_banks``, what KVM_CAP_MCE
    says) and those of :data:`FEATURES` in ``supported`` (KVM_X86_GET_MCE_CAP_SUPPORTED)."""
    if max_banks <= 0:
        raise ValueError(f"KVM offers {max_banks} machine-check banks")
    return min(BANKS, max_banks, MCG_CAP_BANKS_MASK) | (FEATURES & supported & ~MCG_CAP_BANKS_MASK)
