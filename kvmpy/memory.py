"""Guest-physical memory: anonymous host mappings handed to KVM as memory slots.

A :class:`MemoryRegion` is one ``mmap`` of host memory that backs the guest
physical range ``[gpa, gpa + size)``. :class:`GuestMemory` is the set of regions
of a VM and the only way the VMM reads or writes guest RAM: every access is
bounds-checked against the regions, because guest-supplied addresses are hostile.

Nothing here needs /dev/kvm, so devices and loaders can be tested on a plain
``GuestMemory.anonymous(size)``.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass, field

from .errors import GuestMemoryError

PAGE_SIZE = 4096


@dataclass(eq=False)
class MemoryRegion:
    """Host memory backing guest-physical ``[gpa, gpa + size)``."""

    gpa: int
    size: int
    readonly: bool = False
    slot: int = -1
    mm: mmap.mmap = field(default=None, repr=False)

    @classmethod
    def anonymous(cls, gpa: int, size: int, readonly: bool = False, slot: int = -1) -> "MemoryRegion":
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise ValueError(f"region gpa={gpa:#x} size={size:#x} must be page-aligned and non-empty")
        try:
            mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, OverflowError) as e:
            raise GuestMemoryError(f"cannot map {size:#x} bytes of guest RAM: "
                                   f"{getattr(e, 'strerror', None) or e}") from None
        return cls(gpa=gpa, size=size, readonly=readonly, slot=slot, mm=mm)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return length >= 0 and self.gpa <= gpa and gpa + length <= self.end

    def close(self) -> None:
        if self.mm is not None and not self.mm.closed:
            try:
                self.mm.close()
            except BufferError:
                # A caller still holds a view(); the mapping goes when the last view does.
                pass


class GuestMemory:
    """All RAM regions of one guest, addressed by guest-physical address."""

    def __init__(self, regions: list[MemoryRegion] | None = None):
        self.regions: list[MemoryRegion] = []
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

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa+length)``; must lie within one region."""
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        return memoryview(r.mm)[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        return r.mm[off:off + length]

    def write(self, gpa: int, data: bytes) -> None:
        r = self.region_for(gpa, len(data))
        off = gpa - r.gpa
        r.mm[off:off + len(data)] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        r.mm[off:off + length] = bytes([byte]) * length

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
