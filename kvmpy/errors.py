"""Every exception kvmpy raises, in one place.

All derive from :class:`KvmpyError`, so a library user can catch everything
kvmpy-specific with one ``except``. Failure is never a return value.
"""
from __future__ import annotations

import errno as _errno


class KvmpyError(Exception):
    """Base class of all kvmpy errors."""


class KvmError(KvmpyError, OSError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed.

    ``.errno`` is the C errno, ``.ioctl`` the name of the request (``"KVM_RUN"``).
    """

    def __init__(self, err: int, ioctl: str, hint: str = ""):
        msg = f"{ioctl} failed: {_errno.errorcode.get(err, err)} ({__import__('os').strerror(err)})"
        if hint:
            msg += f"; {hint}"
        OSError.__init__(self, err, msg)
        self.ioctl = ioctl

    def __str__(self) -> str:
        return self.strerror


class KvmUnavailable(KvmpyError):
    """/dev/kvm cannot be used; the message says what to do about it."""


class LoaderError(KvmpyError):
    """A guest image is malformed, truncated or does not fit in guest RAM."""


class GuestError(KvmpyError):
    """The guest stopped in a way that is a failure: triple fault, entry failure,
    emulation failure. ``.exit`` is the decoded exit, ``.regs``/``.sregs`` the vCPU
    state at the time, ``.disassembly`` the instructions at RIP (may be empty)."""

    def __init__(self, message: str, exit=None, regs=None, sregs=None, disassembly: str = ""):
        super().__init__(message)
        self.exit = exit
        self.regs = regs
        self.sregs = sregs
        self.disassembly = disassembly

    def __str__(self) -> str:
        parts = [self.args[0]]
        if self.regs is not None:
            parts.append(self.regs.dump())
        if self.sregs is not None:
            parts.append(self.sregs.dump())
        if self.disassembly:
            parts.append("code at rip:\n" + self.disassembly)
        return "\n".join(parts)


class GuestMemoryError(KvmpyError, IndexError):
    """A guest-physical access fell outside guest RAM."""


class DeviceError(KvmpyError):
    """A device was misconfigured (overlapping bus ranges, bad options)."""
