"""VM exits as values: the ``kvm_run`` page decoded once into a frozen dataclass.

After ``KVM_RUN`` returns, ``exit_reason`` says which member of the kvm_run union
the kernel filled in (Documentation/virt/kvm/api.rst, "The kvm_run structure").
``decode()`` turns that into one of the classes below; everything else in kvmpy
dispatches on these values with a single ``match``. Reasons kvmpy does not handle
become ``Unsupported(reason)`` rather than being silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

from .abi import IO_OUT, ExitReason, InternalErrorKind, ffi


@dataclass(frozen=True, slots=True)
class IoOut:
    """The guest executed OUT/OUTS: ``count`` items of ``size`` bytes to ``port``."""
    port: int
    size: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class IoIn:
    """The guest executed IN/INS: the VMM must supply ``count * size`` bytes."""
    port: int
    size: int
    count: int
    data_offset: int


@dataclass(frozen=True, slots=True)
class MmioWrite:
    """A guest store to an address with no RAM behind it (or a read-only slot)."""
    addr: int
    size: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MmioRead:
    """A guest load from an address with no RAM behind it: the VMM supplies ``size`` bytes."""
    addr: int
    size: int


@dataclass(frozen=True, slots=True)
class Hlt:
    """The guest executed HLT (only exits to user space without an in-kernel irqchip)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The guest triple-faulted (or otherwise shut down the CPU)."""


@dataclass(frozen=True, slots=True)
class FailEntry:
    """KVM could not enter the guest: invalid CPU state."""
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM gave up, e.g. an instruction it could not emulate (suberror 1)."""
    suberror: int
    data: tuple[int, ...]

    @property
    def kind(self) -> str:
        try:
            return InternalErrorKind(self.suberror).name.lower()
        except ValueError:
            return f"suberror {self.suberror}"


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """A PSCI-style system event (shutdown, reset, crash)."""
    type: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Debug:
    """A debug exit: single step or hardware breakpoint (``KVM_SET_GUEST_DEBUG``)."""
    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned early (EINTR or immediate_exit): a signal or a stop request."""


@dataclass(frozen=True, slots=True)
class Unsupported:
    """An exit reason kvmpy does not handle."""
    reason: int

    @property
    def name(self) -> str:
        try:
            return ExitReason(self.reason).name
        except ValueError:
            return f"reason {self.reason}"


Exit = (IoOut | IoIn | MmioWrite | MmioRead | Hlt | Shutdown | FailEntry | InternalError
        | SystemEvent | Debug | Interrupted | Unsupported)

_HLT, _SHUTDOWN, _INTERRUPTED = Hlt(), Shutdown(), Interrupted()
_IO, _MMIO, _HLT_R = int(ExitReason.IO), int(ExitReason.MMIO), int(ExitReason.HLT)


def decode(run, run_size: int) -> Exit:
    """Decode the exit in ``run`` (a ``struct kvm_run *`` over a mapping of ``run_size`` bytes)."""
    reason = run.exit_reason
    if reason == _IO:
        io = run.io
        size, count, off = io.size, io.count, io.data_offset
        if off + size * count > run_size:       # kernel-provided, but never trust an offset
            return Unsupported(reason)
        if io.direction == IO_OUT:
            data = ffi.buffer(ffi.cast("char *", run) + off, size * count)[:]
            return IoOut(io.port, size, count, data)
        return IoIn(io.port, size, count, off)
    if reason == _MMIO:
        m = run.mmio
        n = min(m.len, 8)
        if m.is_write:
            return MmioWrite(m.phys_addr, n, bytes(m.data[0:n]))
        return MmioRead(m.phys_addr, n)
    if reason == _HLT_R:
        return _HLT
    if reason == ExitReason.SHUTDOWN:
        return _SHUTDOWN
    if reason == ExitReason.FAIL_ENTRY:
        return FailEntry(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
    if reason == ExitReason.INTERNAL_ERROR:
        ie = run.internal
        return InternalError(ie.suberror, tuple(ie.data[0:min(ie.ndata, 16)]))
    if reason == ExitReason.SYSTEM_EVENT:
        se = run.system_event
        return SystemEvent(se.type, tuple(se.data[0:min(se.ndata, 16)]))
    if reason == ExitReason.DEBUG:
        a = run.debug.arch
        return Debug(a.exception, a.pc, a.dr6, a.dr7)
    if reason == ExitReason.INTR:
        return _INTERRUPTED
    return Unsupported(reason)
