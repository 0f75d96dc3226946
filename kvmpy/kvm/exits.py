"""VM exits as values: the ``kvm_run`` page decoded once into an immutable value.

After ``KVM_RUN`` returns, ``exit_reason`` says which member of the kvm_run union
the kernel filled in (Documentation/virt/kvm/api.rst, "The kvm_run structure").
``decode()`` turns that into one of the classes below; everything else in kvmpy
dispatches on these values with a single ``match``. Reasons kvmpy does not handle
become ``Unsupported(reason)`` rather than being silently ignored.

Exits with fields are ``NamedTuple``s: built in about half the time of a frozen
dataclass, which matters at one exit every few microseconds, and their classes are made
in a sixth of the time, which matters to a command's start-up. The exits without fields
(``Hlt``, ``Shutdown``, ``Interrupted``) are values of a class with no state: any two of
one kind are equal. The fixed-size headers are read with ``struct`` formats built from
the compiler's offsets (``layout()``), never typed in.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from .abi import IO_OUT, ExitReason, InternalErrorKind, ffi


class IoOut(NamedTuple):
    """The guest executed OUT/OUTS: ``count`` items of ``size`` bytes to ``port``."""
    port: int
    size: int
    count: int
    data: bytes


class IoIn(NamedTuple):
    """The guest executed IN/INS: the VMM must supply ``count * size`` bytes."""
    port: int
    size: int
    count: int
    data_offset: int


class MmioWrite(NamedTuple):
    """A guest store to an address with no RAM behind it (or a read-only slot)."""
    addr: int
    size: int
    data: bytes


class MmioRead(NamedTuple):
    """A guest load from an address with no RAM behind it: the VMM supplies ``size`` bytes."""
    addr: int
    size: int


class _Bare:
    """An exit that carries nothing: equal to any other of its kind, and immutable."""
    __slots__ = ()
    __match_args__ = ()

    def __eq__(self, other) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Hlt(_Bare):
    """The guest executed HLT (only exits to user space without an in-kernel irqchip)."""


class Shutdown(_Bare):
    """The guest triple-faulted (or otherwise shut down the CPU)."""


class FailEntry(NamedTuple):
    """KVM could not enter the guest: invalid CPU state."""
    hardware_entry_failure_reason: int
    cpu: int


class InternalError(NamedTuple):
    """KVM gave up, e.g. an instruction it could not emulate (suberror 1)."""
    suberror: int
    data: tuple[int, ...]

    @property
    def kind(self) -> str:
        try:
            return InternalErrorKind(self.suberror).name.lower()
        except ValueError:
            return f"suberror {self.suberror}"


class SystemEvent(NamedTuple):
    """A PSCI-style system event (shutdown, reset, crash)."""
    type: int
    data: tuple[int, ...]


class Debug(NamedTuple):
    """A debug exit: single step or hardware breakpoint (``KVM_SET_GUEST_DEBUG``)."""
    exception: int
    pc: int
    dr6: int
    dr7: int


class Interrupted(_Bare):
    """KVM_RUN returned early (EINTR or immediate_exit): a signal or a stop request."""


class Unsupported(NamedTuple):
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

#: Each kind of exit's one name: run statistics count by it, traces show it and filter on it.
KIND = {IoOut: "io-out", IoIn: "io-in", MmioRead: "mmio-read", MmioWrite: "mmio-write", Hlt: "hlt",
        Shutdown: "shutdown", Debug: "debug", Interrupted: "interrupted", InternalError: "internal-error",
        FailEntry: "fail-entry", SystemEvent: "system-event", Unsupported: "other"}


def kind(ex) -> str:
    """The name of ``ex``'s kind (``KIND``)."""
    return KIND.get(type(ex), "other")

_HLT, _SHUTDOWN, _INTERRUPTED = Hlt(), Shutdown(), Interrupted()
_IO, _MMIO, _HLT_R = int(ExitReason.IO), int(ExitReason.MMIO), int(ExitReason.HLT)
_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}


def layout(*parts: tuple[str, int, list[str]]) -> struct.Struct:
    """A little-endian ``struct`` reading, for each ``(ctype, base, fields)`` of ``parts``,
    ``fields`` of C type ``ctype`` placed at ``base`` bytes into a buffer, all in offset
    order; offsets and sizes come from the compiler via cffi."""
    placed = []
    for ctype, base, fields in parts:
        members = dict(ffi.typeof(ctype).fields)
        placed += [(base + members[f].offset, ffi.sizeof(members[f].type)) for f in fields]
    fmt, pos = "<", 0
    for off, size in sorted(placed):
        fmt += "x" * (off - pos) + _FORMATS[size]
        pos = off + size
    return struct.Struct(fmt)


_IO_FIELDS = ["direction", "size", "port", "count", "data_offset"]
_MMIO_FIELDS = ["phys_addr", "len", "is_write"]
_RUN_IO = ffi.offsetof("struct kvm_run", "io")
#: ``(exit_reason, direction, size, port, count, data_offset)`` in one unpack: the header of
#: the hottest exit, read before anything is known about the exit (the bytes past
#: ``exit_reason`` mean something else for other reasons, and are then not looked at)
IO_EXIT = layout(("struct kvm_run", 0, ["exit_reason"]), ("kvmpy_run_io_t", _RUN_IO, _IO_FIELDS))
_MMIO_HDR = layout(("kvmpy_run_mmio_t", ffi.offsetof("struct kvm_run", "mmio"), _MMIO_FIELDS))
_MMIO_DATA = ffi.offsetof("struct kvm_run", "mmio") + ffi.offsetof("kvmpy_run_mmio_t", "data")
#: builds a NamedTuple exit from a tuple of its fields in C: the class's own ``__new__`` is a
#: Python function, a third of the cost of decoding an exit
_tuple = tuple.__new__


def decode(run, run_size: int, page=None) -> Exit:
    """Decode the exit in ``run`` (a ``struct kvm_run *`` over a mapping of ``run_size`` bytes).

    ``page`` is that mapping as a buffer (the vCPU's mmap); with it the hot exits are
    read with ``struct`` instead of field by field through cffi.
    """
    if page is None:
        page = ffi.buffer(run, run_size)
    reason, direction, size, port, count, off = IO_EXIT.unpack_from(page)
    if reason == _IO:
        n = size * count
        if off + n > run_size:                  # kernel-provided, but never trust an offset
            return Unsupported(reason)
        if direction == IO_OUT:
            return _tuple(IoOut, (port, size, count, page[off:off + n]))
        return _tuple(IoIn, (port, size, count, off))
    if reason == _MMIO:
        addr, n, is_write = _MMIO_HDR.unpack_from(page)
        n = min(n, 8)
        if is_write:
            return _tuple(MmioWrite, (addr, n, page[_MMIO_DATA:_MMIO_DATA + n]))
        return _tuple(MmioRead, (addr, n))
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
