"""Named views of the <linux/kvm.h> constants kvmpy uses.

The numbers are not written here: each enum is filled from ``kvmpy._native.lib``,
where the C compiler put the values from the kernel header at build time.
"""
from __future__ import annotations

from enum import IntEnum, IntFlag

from .._native import ffi, lib


def _enum(cls, name: str, prefix: str, names: list[str]):
    return cls(name, {n: getattr(lib, prefix + n) for n in names})


ExitReason = _enum(IntEnum, "ExitReason", "KVM_EXIT_", [
    "UNKNOWN", "EXCEPTION", "IO", "HYPERCALL", "DEBUG", "HLT", "MMIO", "IRQ_WINDOW_OPEN",
    "SHUTDOWN", "FAIL_ENTRY", "INTR", "SET_TPR", "TPR_ACCESS", "NMI", "INTERNAL_ERROR",
    "SYSTEM_EVENT", "IOAPIC_EOI", "X86_RDMSR", "X86_WRMSR", "DIRTY_RING_FULL",
    "X86_BUS_LOCK", "NOTIFY",
])

InternalErrorKind = _enum(IntEnum, "InternalErrorKind", "KVM_INTERNAL_ERROR_", [
    "EMULATION", "SIMUL_EX", "DELIVERY_EV", "UNEXPECTED_EXIT_REASON",
])

SystemEventType = _enum(IntEnum, "SystemEventType", "KVM_SYSTEM_EVENT_", ["SHUTDOWN", "RESET", "CRASH"])

Cap = _enum(IntEnum, "Cap", "KVM_CAP_", [
    "IRQCHIP", "HLT", "USER_MEMORY", "SET_TSS_ADDR", "EXT_CPUID", "NR_VCPUS", "MAX_VCPUS",
    "NR_MEMSLOTS", "PIT2", "IRQ_ROUTING", "IOEVENTFD", "IRQFD", "SET_IDENTITY_MAP_ADDR",
    "ADJUST_CLOCK", "VCPU_EVENTS", "DEBUGREGS", "XSAVE", "XCRS", "SET_GUEST_DEBUG",
    "READONLY_MEM", "IMMEDIATE_EXIT", "GET_MSR_FEATURES", "MP_STATE", "SYNC_MMU",
    "IRQ_INJECT_STATUS", "XSAVE2", "TSC_CONTROL", "MANUAL_DIRTY_LOG_PROTECT2", "DIRTY_LOG_RING", "MCE",
    "TSC_DEADLINE_TIMER",
])

MemFlag = _enum(IntFlag, "MemFlag", "KVM_MEM_", ["LOG_DIRTY_PAGES", "READONLY"])

MpState = _enum(IntEnum, "MpState", "KVM_MP_STATE_", [
    "RUNNABLE", "UNINITIALIZED", "INIT_RECEIVED", "HALTED", "SIPI_RECEIVED",
])

GuestDebug = _enum(IntFlag, "GuestDebug", "KVM_GUESTDBG_", ["ENABLE", "SINGLESTEP", "USE_SW_BP", "USE_HW_BP"])

IoeventfdFlag = _enum(IntFlag, "IoeventfdFlag", "KVM_IOEVENTFD_FLAG_", ["DATAMATCH", "PIO", "DEASSIGN"])
IrqfdFlag = _enum(IntFlag, "IrqfdFlag", "KVM_IRQFD_FLAG_", ["DEASSIGN", "RESAMPLE"])
Irqchip = _enum(IntEnum, "Irqchip", "KVM_IRQCHIP_", ["PIC_MASTER", "PIC_SLAVE", "IOAPIC"])

IO_IN = lib.KVM_EXIT_IO_IN
IO_OUT = lib.KVM_EXIT_IO_OUT
API_VERSION = lib.KVM_API_VERSION

__all__ = ["ffi", "lib", "ExitReason", "InternalErrorKind", "SystemEventType", "Cap", "MemFlag",
           "MpState", "GuestDebug", "IoeventfdFlag", "IrqfdFlag", "Irqchip", "IO_IN", "IO_OUT",
           "API_VERSION"]
