"""Guest-physical memory: anonymous host mappings handed to KVM as memory slots.

A :class:`MemoryRegion` is one ``mmap`` of host memory that backs the guest
physical range ``[gpa, gpa + size)``. :class:`GuestMemory` is the set of regions
of a VM and the only way the VMM reads or writes guest RAM: every access is
bounds-checked against the regions, because guest-supplied addresses are hostile.

Nothing here needs /dev/kvm, so devices and loaders can be tested on a plain
``GuestMemory.anonymous(size)``.

Dirty tracking of the VMM's own writes. KVM's dirty log records only writes made
by guest CPUs; what the VMM writes through its host mapping (loaders, device
models, the C virtio-blk) is invisible to it, yet live migration must resend those
pages too. So every region carries ``region.dirty``: one bit per 4 KiB page in an
anonymous mmap (page-aligned, so C can use 64-bit atomics on it), page ``p`` being
bit ``p % 64`` of the little-endian u64 word ``p // 64``. ``GuestMemory.write`` and
``fill`` mark the pages they touched after writing; ``view`` hands out a writable
window and so marks its range conservatively when it is made (a writer through a
view whose data must not be missed by a concurrent take calls ``mark_dirty`` again
when done, as virtio-blk does). ``MemoryRegion.take_dirty`` returns and clears the
bitmap. With the compiled extension both go through csrc/dirty.c (atomic OR,
atomic exchange per word), so marks from Python and from C threads are never lost;
without it the same bit layout is kept in pure Python under the lock.

Flushing a page (``GuestMemory.flush_page``, for QEMU's pc-testdev port 0xe4). Changing
the protection of a host range makes the kernel tell KVM (an MMU-notifier invalidation),
which drops its mappings of those guest pages; the next guest access faults them in again,
contents untouched. QEMU does it with PROT_NONE and back, which leaves a moment in which
another host thread touching the page (a second vCPU's virtio-blk request, a live
migration reading RAM) dies of SIGSEGV. kvmpy adds PROT_EXEC and takes it away instead:
a change of protection all the same (the same invalidation: VM statistic ``pages_4k``
drops), and the page stays readable and writable all along.

Huge pages. A region of 2 MiB or more starts at a 2 MiB-aligned host address (the
mapping is made 2 MiB - 4 KiB larger and ``mm`` is the aligned window of it) and is
advised MADV_HUGEPAGE, as QEMU does with guest RAM: only then can the host back it
with transparent huge pages and KVM map guest memory with 2 MiB page-table entries.
Unaligned, every 4 KiB of guest RAM costs its own nested page fault: in the nested
testbed a quiet Linux boot took 17,400 more of them than QEMU's (benchmarks/README.md).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
from dataclasses import dataclass, field

from ..errors import GuestMemoryError

try:                            # L0, optional: memory.py works without the extension
    from .._native import ffi as _ffi, lib as _lib
except ImportError:             # pragma: no cover - exercised by the pure-Python tests
    _ffi = _lib = None

PAGE_SIZE = 4096                # the one home of the 4 KiB page size (x86 paging, KVM slots, dirty logs)
HUGE_PAGE = 2 << 20             # where anonymous RAM starts, and what it is advised to be backed with
_RW = mmap.PROT_READ | mmap.PROT_WRITE      # how every region is mapped
_libc = None                    # ctypes' libc, for mprotect (loaded on the first flush_page)


def _mprotect(addr: int, length: int, prot: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if _libc.mprotect(addr, length, prot) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mprotect: {os.strerror(e)}")


def _bitmap_bytes(size: int) -> int:
    """Bytes of a dirty bitmap for ``size`` bytes of RAM: whole u64 words."""
    pages = -(-size // PAGE_SIZE)
    return -(-pages // 64) * 8


def _check_range(gpa: int, size: int) -> None:
    if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
        raise ValueError(f"region gpa={gpa:#x} size={size:#x} must be page-aligned and non-empty")


def all_zero(data) -> bool:
    """True if the buffer (whole pages of RAM, or any length that is a multiple of 8) is all
    zero bytes; at memory speed, where comparing in Python would go byte by byte."""
    if len(data) % 8 or _ffi is None:
        return not any(data)
    buf = _ffi.from_buffer(data)
    try:
        return bool(_lib.kvmpy_all_zero(buf, len(data)))
    finally:
        _ffi.release(buf)


@dataclass(eq=False)
class MemoryRegion:
    """Host memory backing guest-physical ``[gpa, gpa + size)``."""

    gpa: int
    size: int
    readonly: bool = False
    slot: int = -1
    mm: mmap.mmap | memoryview = field(default=None, repr=False)   # exactly the region's bytes
    owner: mmap.mmap | None = field(default=None, repr=False)       # the mapping ``mm`` is a window of
    dirty: mmap.mmap = field(default=None, repr=False)       # made in __post_init__
    dirty_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # (GuestMemory.add replaces dirty_lock with the one lock of the whole guest)

    def __post_init__(self) -> None:
        if self.dirty is None:
            self.dirty = mmap.mmap(-1, max(_bitmap_bytes(self.size), 8),
                                   flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._dirty_ptr = None
        if _ffi is not None:
            buf = _ffi.from_buffer(self.dirty)
            self._dirty_ptr = _ffi.cast("uint64_t *", buf)   # valid while the mapping is
            _ffi.release(buf)

    @classmethod
    def anonymous(cls, gpa: int, size: int, readonly: bool = False, slot: int = -1) -> "MemoryRegion":
        _check_range(gpa, size)
        extra = HUGE_PAGE - PAGE_SIZE if size >= HUGE_PAGE else 0
        try:
            owner = mmap.mmap(-1, size + extra, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, OverflowError) as e:
            raise GuestMemoryError(f"cannot map {size:#x} bytes of guest RAM: "
                                   f"{getattr(e, 'strerror', None) or e}") from None
        if not extra:
            return cls(gpa=gpa, size=size, readonly=readonly, slot=slot, mm=owner)
        anchor = ctypes.c_char.from_buffer(owner)
        pad = -ctypes.addressof(anchor) % HUGE_PAGE     # a multiple of PAGE_SIZE: mmap gives pages
        del anchor
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                owner.madvise(mmap.MADV_HUGEPAGE, pad, size)
            except OSError:         # a kernel without transparent huge pages: 4 KiB pages it is
                pass
        return cls(gpa=gpa, size=size, readonly=readonly, slot=slot,
                   mm=memoryview(owner)[pad:pad + size], owner=owner)

    @classmethod
    def from_file(cls, path: str, gpa: int, size: int, readonly: bool = False,
                  slot: int = -1) -> "MemoryRegion":
        """A private copy-on-write mapping of the first ``size`` bytes of file ``path``:
        pages are read on first touch and writes stay in this process (a snapshot's RAM)."""
        _check_range(gpa, size)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_size < size:
                    raise GuestMemoryError(f"{path}: shorter than the {size:#x} bytes of RAM it should hold")
                mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        except OSError as e:
            raise GuestMemoryError(f"cannot map guest RAM from {path}: {e.strerror or e}") from None
        return cls(gpa=gpa, size=size, readonly=readonly, slot=slot, mm=mm)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return length >= 0 and self.gpa <= gpa and gpa + length <= self.end

    @property
    def dirty_words(self) -> int:
        """u64 words of the dirty bitmap (``ceil(pages / 64)``)."""
        return _bitmap_bytes(self.size) // 8

    @property
    def dirty_address(self) -> int:
        """Host address of the dirty bitmap, for C (0 once closed or without the extension)."""
        if self._dirty_ptr is None or self.dirty.closed:
            return 0
        return int(_ffi.cast("uintptr_t", self._dirty_ptr))

    def mark_dirty(self, offset: int, length: int) -> None:
        """Set the dirty bits of the pages holding region bytes ``[offset, offset+length)``."""
        if length <= 0:
            return
        if offset < 0 or offset + length > self.size:
            raise GuestMemoryError(f"dirty range {offset:#x}+{length:#x} is outside the region")
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        with self.dirty_lock:
            ptr = self._dirty_ptr            # None once closed (set under this lock)
            if ptr is not None:
                _lib.kvmpy_dirty_mark(ptr, first, last - first + 1)
                return
            if self.dirty.closed:
                return
            for w in range(first // 64, last // 64 + 1):
                lo = first - 64 * w if w == first // 64 else 0
                hi = last - 64 * w if w == last // 64 else 63
                mask = ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)
                word = int.from_bytes(self.dirty[8 * w:8 * w + 8], "little") | mask
                self.dirty[8 * w:8 * w + 8] = word.to_bytes(8, "little")

    def take_dirty(self) -> bytes:
        """The dirty bitmap (``dirty_words * 8`` bytes), cleared in the same step.

        Atomic per word against markers in C and in Python: a bit set concurrently
        is either in the result or still in the bitmap, never lost.
        """
        n = self.dirty_words * 8
        with self.dirty_lock:
            if self.dirty.closed:
                return bytes(n)
            if self._dirty_ptr is not None:
                out = _ffi.new("uint64_t[]", self.dirty_words)
                _lib.kvmpy_dirty_take(self._dirty_ptr, out, self.dirty_words)
                return bytes(_ffi.buffer(out))
            data = self.dirty[:n]
            self.dirty[:n] = bytes(n)
            return data

    def dirty_pages(self) -> list[int]:
        """Take the bitmap (clearing it) and return the dirty page numbers, lowest first."""
        bits = int.from_bytes(self.take_dirty(), "little")
        return [p for p in range(self.dirty_words * 64) if bits >> p & 1]

    def flush_page(self, offset: int) -> None:
        """Change the protection of the page at region offset ``offset`` (page-aligned) and
        change it back, so KVM drops its mapping of it (module docstring); OSError if the
        kernel refuses (e.g. PROT_EXEC on a file mapped from a noexec mount)."""
        if offset % PAGE_SIZE or not 0 <= offset < self.size:
            raise GuestMemoryError(f"page offset {offset:#x} is not a page of this region")
        if self.closed:
            raise GuestMemoryError("the region is closed")
        anchor = ctypes.c_char.from_buffer(self.mm)      # the mapping's address; pins it while held
        try:
            addr = ctypes.addressof(anchor) + offset
            try:
                _mprotect(addr, PAGE_SIZE, _RW | mmap.PROT_EXEC)
            finally:
                _mprotect(addr, PAGE_SIZE, _RW)
        finally:
            del anchor

    @property
    def closed(self) -> bool:
        return self.mm is None or self._released or (self.owner or self.mm).closed

    _released = False               # ``mm`` is a window that close() released

    def close(self) -> None:
        if self.closed:
            pass
        elif self.owner is None:
            try:
                self.mm.close()
            except BufferError:
                # A caller still holds a view(); the mapping goes when the last view does.
                pass
        else:
            try:
                self.mm.release()
                self._released = True
                self.owner.close()
            except BufferError:     # as above: a view of the window, or of the mapping, is held
                pass
        with self.dirty_lock:
            if self.dirty is not None and not self.dirty.closed:
                self._dirty_ptr = None
                self.dirty.close()


class GuestMemory:
    """All RAM regions of one guest, addressed by guest-physical address."""

    def __init__(self, regions: list[MemoryRegion] | None = None):
        self.regions: list[MemoryRegion] = []
        self.dirty_lock = threading.Lock()      # serialises Python dirty markers and takes
        for r in regions or []:
            self.add(r)

    @classmethod
    def anonymous(cls, size: int, gpa: int = 0) -> "GuestMemory":
        """One private anonymous region at ``gpa``; handy for tests and loaders."""
        return cls([MemoryRegion.anonymous(gpa, size)])

    def add(self, region: MemoryRegion) -> MemoryRegion:
        for r in self.regions:
            if region.gpa < r.end and r.gpa < region.end:
                raise ValueError(f"region {region.gpa:#x}+{region.size:#x} overlaps {r.gpa:#x}+{r.size:#x}")
        region.dirty_lock = self.dirty_lock
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        return region

    @property
    def size(self) -> int:
        """Total bytes of RAM (sum of the regions)."""
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest guest-physical RAM address."""
        return max((r.end for r in self.regions), default=0)

    def region_for(self, gpa: int, length: int = 1) -> MemoryRegion:
        """The region holding all of ``[gpa, gpa+length)``, or GuestMemoryError."""
        if gpa >= 0 and length >= 0:
            for r in self.regions:
                if r.contains(gpa, length):
                    return r
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self.region_for(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int, writable: bool = True) -> memoryview:
        """A view of ``[gpa, gpa+length)``; must lie within one region.

        A writable view marks its pages dirty now (we cannot see the writes made
        through it); ``writable=False`` gives a read-only view and marks nothing.
        """
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        v = memoryview(r.mm)[off:off + length]
        if not writable:
            return v.toreadonly()
        r.mark_dirty(off, length)
        return v

    def read(self, gpa: int, length: int) -> bytes:
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        return bytes(r.mm[off:off + length])

    def write(self, gpa: int, data: bytes) -> None:
        r = self.region_for(gpa, len(data))
        off = gpa - r.gpa
        r.mm[off:off + len(data)] = data
        r.mark_dirty(off, len(data))

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        r.mm[off:off + length] = bytes([byte]) * length
        r.mark_dirty(off, length)

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Record that the VMM wrote ``[gpa, gpa+length)`` (one region) some other way."""
        r = self.region_for(gpa, length)
        r.mark_dirty(gpa - r.gpa, length)

    def flush_page(self, gpa: int) -> bool:
        """Make KVM drop its mapping of the RAM page holding ``gpa``: the guest's next access
        faults it in again, contents kept (module docstring). False, and nothing done, if
        ``gpa`` is not RAM; OSError if the kernel refuses the protection change."""
        page = gpa - gpa % PAGE_SIZE
        try:
            r = self.region_for(page, PAGE_SIZE)
        except GuestMemoryError:
            return False
        r.flush_page(page - r.gpa)
        return True

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions.clear()

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
