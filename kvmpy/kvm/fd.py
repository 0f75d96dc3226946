"""What every KVM object shares: an owned fd, and ioctl(2) that raises KvmError.

Every ioctl goes through :func:`ioctl`, which turns -errno into ``KvmError`` naming
the request. Request numbers and struct layouts come from the compiled extension
(csrc/build.py copies them from <linux/kvm.h>); none is written by hand.
"""
from __future__ import annotations

import os

from ..errors import KvmError
from .abi import ffi, lib
from .regs import CpuidEntry

MAX_CPUID_ENTRIES = 256

REQUEST_NAMES = {getattr(lib, n): n for n in dir(lib) if n.startswith("KVM_") and n[4:8] in
                 ("GET_", "SET_", "CREA", "RUN", "CHEC", "IRQ_", "IOEV", "IRQF", "INTE", "NMI", "X86_")}


def ioctl(fd: int, request: int, arg=None, hint: str = "") -> int:
    """ioctl(fd, request, arg); ``arg`` is a cdata pointer, an int or None."""
    if arg is None or isinstance(arg, int):
        r = lib.kvmpy_ioctl_int(fd, request, arg or 0)
    else:
        r = lib.kvmpy_ioctl_ptr(fd, request, arg)
    if r < 0:
        raise KvmError(-r, REQUEST_NAMES.get(request, hex(request)), hint)
    return r


def cdata_bytes(p) -> bytes:
    return bytes(ffi.buffer(p))


def cdata_from(ctype: str, data: bytes):
    p = ffi.new(ctype)
    if len(data) != ffi.sizeof(p[0]):
        raise ValueError(f"{ctype}: expected {ffi.sizeof(p[0])} bytes, got {len(data)}")
    ffi.buffer(p)[:] = data
    return p


class Fd:
    """An owned file descriptor with idempotent close and ``with`` support."""

    fd: int = -1

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def get_cpuid(fd: int, request: int) -> list[CpuidEntry]:
    p = ffi.new("struct kvm_cpuid2 *", {"nent": MAX_CPUID_ENTRIES, "entries": MAX_CPUID_ENTRIES})
    ioctl(fd, request, p)
    return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in p.entries[0:p.nent]]

