"""Every exception kvmpy raises, in one place.

All derive from :class:`KvmpyError`, so a library user can catch everything
kvmpy-specific with one ``except``. Failure is never a return value.
:func:`read_file` is the one place a host file the user named (an image, an
initrd, a fw_cfg blob) is read, so every such error names the file and its role;
:func:`file_size` sizes a host file or block device (a disk, an image).
"""
from __future__ import annotations

import errno as _errno
import os as _os
import stat as _stat


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
    state at the time, ``.disassembly`` the instructions at RIP (may be empty).
    ``.state_lost`` is True when KVM had already reset the vCPU (kvm_amd does before
    it reports a triple fault): then ``regs``, ``sregs`` and ``disassembly`` are empty."""

    reason: str = ""
    state_lost: bool = False

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


def read_file(source, what: str, error: type[KvmpyError] = LoaderError, limit: int | None = None,
              room: str = "guest RAM") -> bytes:
    """The bytes of ``source``: a path (str or os.PathLike) is read, bytes-like is copied.

    An unreadable file raises ``error`` naming ``what`` it is, the path and the OS's
    reason: ``cannot read initrd '/x': No such file or directory``. A file larger than
    ``limit`` bytes (the ``room`` it must fit in) is refused from its size before any of
    it is read; a pipe, which has no size, is read up to ``limit + 1`` bytes at most.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not isinstance(source, (str, _os.PathLike)):
        raise TypeError(f"{what} must be a path or bytes, not {type(source).__name__}")
    name = _os.fspath(source)
    try:
        with open(name, "rb") as f:
            if limit is None:
                return f.read()
            size = _fd_size(f.fileno())
            if size is not None and size > limit:
                raise error(f"cannot load {what} {name!r}: it is {size} bytes, more than the {limit} bytes of {room}")
            data = f.read(size) if size is not None else b""
            rest = _read_at_most(f, limit + 1 - len(data))        # a pipe, or a file that grew
            if rest:
                data += rest
    except OSError as e:
        raise error(f"cannot read {what} {name!r}: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"cannot load {what} {name!r}: it is more than the {limit} bytes of {room}")
    return data


def _read_at_most(f, n: int, chunk: int = 1 << 16) -> bytes:
    """Up to ``n`` bytes of ``f``, read in chunks (``f.read(n)`` would allocate all ``n`` first)."""
    parts, got = [], 0
    while got < n:
        part = f.read(min(n - got, chunk))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _fd_size(fd: int) -> int | None:
    """The size of an open regular file or block device (st_size is 0 for the latter:
    lseek to its end, then back); None for anything else (a pipe, a terminal)."""
    mode = _os.fstat(fd).st_mode
    if _stat.S_ISREG(mode):
        return _os.fstat(fd).st_size
    if _stat.S_ISBLK(mode):
        pos = _os.lseek(fd, 0, _os.SEEK_CUR)
        end = _os.lseek(fd, 0, _os.SEEK_END)
        _os.lseek(fd, pos, _os.SEEK_SET)
        return end
    return None


def file_size(path) -> int:
    """The size in bytes of the regular file or block device at ``path``.

    ``st_size`` (``os.path.getsize``) is 0 for a block device, so one is opened read-only
    and sized with ``lseek(SEEK_END)``, as virtio-blk sizes the disk it serves (the value
    BLKGETSIZE64 gives). Anything else (a directory, a FIFO, a character device) raises
    OSError(EINVAL); an unreadable path raises the OS's error.
    """
    name = _os.fspath(path)
    st = _os.stat(name)
    if _stat.S_ISREG(st.st_mode):
        return st.st_size
    if not _stat.S_ISBLK(st.st_mode):
        raise OSError(_errno.EINVAL, "not a regular file or block device", name)
    fd = _os.open(name, _os.O_RDONLY | _os.O_CLOEXEC | _os.O_NONBLOCK)   # never waits, even if replaced by a FIFO
    try:
        size = _fd_size(fd)
    finally:
        _os.close(fd)
    if size is None:
        raise OSError(_errno.EINVAL, "not a regular file or block device", name)
    return size
