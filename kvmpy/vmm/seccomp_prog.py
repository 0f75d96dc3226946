"""The seccomp filter as a BPF program: compiled by libseccomp once, kept, installed by us.

libseccomp turns confine.py's rules into a BPF program in ~9 ms here (every refused call has
an errno of its own, so the decision tree is big), ~12 ms with the rules added: a tenth of a
small guest's whole ``kvmpy run``. The program depends only on its inputs, so, as
Firecracker loads filters compiled ahead of time, the compiled program is kept in the cache
(``$KVMPY_CACHE`` or ``~/.cache/kvmpy``, ``seccomp/KEY.bpf``) under a hash of everything it
was compiled from: the rules, the priorities, libseccomp's version and the kernel's release.
Later runs read it back and install it with seccomp(2) themselves, as libseccomp's
``seccomp_load`` would (SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC: every thread).

A kept program is checked before use: its header names its length and the SHA-256 of its
instructions, and the kernel checks the program itself. A file that fails either is
compiled again and replaced; the cache is best effort (an unwritable one costs the compile).
The cache has the trust of the user's own files, like the rest of kvmpy's installation.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

MAGIC = b"kvmpy-seccomp-bpf-1\n"
_SYS_SECCOMP = 317                      # x86-64
_SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC = 1, 1
_INSN = 8                               # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
_MAX_INSNS = 4096                       # BPF_MAXINSNS
_libc = ctypes.CDLL(None, use_errno=True)


class _Fprog(ctypes.Structure):
    """struct sock_fprog: the number of instructions and where they are."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Version(ctypes.Structure):
    """struct scmp_version."""

    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


def key(lib, plan) -> str:
    """The hash of everything the program is compiled from: ``plan`` (confine.py's rules,
    priorities and attributes, as plain data), libseccomp's version and the kernel release."""
    try:
        lib.seccomp_version.restype = ctypes.POINTER(_Version)
        v = lib.seccomp_version().contents
        version = (v.major, v.minor, v.micro)
    except AttributeError:              # libseccomp before 2.3 has no seccomp_version()
        version = ("before 2.3",)
    text = repr((plan, version, os.uname().release, MAGIC))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_path(k: str) -> Path:
    env = os.environ.get("KVMPY_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "kvmpy") / "seccomp" / f"{k}.bpf"


def read(path: Path) -> bytes | None:
    """The kept program at ``path``, or None if there is none or it does not check out."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = len(MAGIC) + 4 + 32
    if len(data) < head or not data.startswith(MAGIC):
        return None
    n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
    prog = data[head:]
    if not 0 < n <= _MAX_INSNS or len(prog) != n * _INSN or hashlib.sha256(prog).digest() != data[head - 32:head]:
        return None
    return prog


def store(path: Path, prog: bytes) -> None:
    """Keep ``prog`` at ``path``, whole or not at all (a temporary file renamed); best effort."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(MAGIC + (len(prog) // _INSN).to_bytes(4, "little") + hashlib.sha256(prog).digest() + prog)
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def export(lib, ctx) -> bytes:
    """The BPF program libseccomp compiles from the filter ``ctx`` (seccomp_export_bpf)."""
    lib.seccomp_export_bpf.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    fd = os.memfd_create("kvmpy-seccomp", os.MFD_CLOEXEC)
    try:
        rc = lib.seccomp_export_bpf(ctx, fd)
        if rc < 0:
            raise OSError(-rc, f"seccomp_export_bpf failed: {os.strerror(-rc)}")
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def install(prog: bytes) -> None:
    """seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, prog): into every thread.
    OSError if the kernel refuses it (EINVAL: not a valid program) or a thread cannot take it."""
    if not prog or len(prog) % _INSN or len(prog) // _INSN > _MAX_INSNS:
        raise OSError(22, f"a seccomp program of {len(prog)} bytes")
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _Fprog(len(prog) // _INSN, ctypes.addressof(buf))
    rc = _libc.syscall(ctypes.c_long(_SYS_SECCOMP), ctypes.c_ulong(_SECCOMP_SET_MODE_FILTER),
                       ctypes.c_ulong(_SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(fprog))
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(e)}")
    if rc > 0:                          # TSYNC: the thread that could not take the filter
        raise OSError(1, f"seccomp(SECCOMP_SET_MODE_FILTER): thread {rc} cannot take the filter")
