"""Model-specific registers as a PC's firmware leaves them at boot (Intel SDM vol. 4).

KVM resets most MSRs to zero; a few matter to guests that check them, so a VMM sets
them the way firmware would. The same values Firecracker and QEMU use: fast strings
enabled in IA32_MISC_ENABLE, MTRRs on with write-back as the default memory type,
and the syscall/sysenter MSRs zeroed.
"""
from __future__ import annotations

IA32_TSC = 0x10
IA32_SYSENTER_CS = 0x174
IA32_SYSENTER_ESP = 0x175
IA32_SYSENTER_EIP = 0x176
IA32_MISC_ENABLE = 0x1A0
IA32_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRITE_BACK = 6


def boot_msrs() -> dict[int, int]:
    """MSR index -> value for every vCPU at power-on."""
    return {
        IA32_SYSENTER_CS: 0, IA32_SYSENTER_ESP: 0, IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0, MSR_LSTAR: 0, MSR_CSTAR: 0, MSR_SYSCALL_MASK: 0, MSR_KERNEL_GS_BASE: 0,
        IA32_TSC: 0,
        IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        IA32_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRITE_BACK,
    }
