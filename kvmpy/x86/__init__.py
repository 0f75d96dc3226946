"""x86 CPU set-up as pure functions: registers, descriptor tables, paging, modes, CPUID.

Nothing in this package touches /dev/kvm: functions take and return dataclasses
(``Regs``, ``Sregs``) and bytes, and the Machine hands the results to a vCPU.
"""
from ..kvm.regs import DTable, Regs, Segment, Sregs

__all__ = ["Regs", "Sregs", "Segment", "DTable"]
