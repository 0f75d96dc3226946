"""An address bus: non-overlapping ``[base, base + length)`` ranges mapped to devices.

One ``Bus`` serves port I/O and another MMIO (after Firecracker's ``Bus`` and
rust-vmm's ``vm-device``). ``attach`` keeps the ranges sorted by base and refuses
overlaps and empty ranges, so ``lookup`` is a binary search (``bisect``) and an
address belongs to at most one device. A device only ever sees the offset from its
base. What an unclaimed access does is the caller's policy, not the bus's.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import NamedTuple, Protocol, runtime_checkable

from ..errors import DeviceError


@runtime_checkable
class Device(Protocol):
    """A register machine: little-endian integer values of ``size`` bytes."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class Attachment(NamedTuple):
    """One claimed range of a bus."""

    base: int
    length: int
    name: str
    device: Device

    @property
    def end(self) -> int:
        """One past the last address of the range."""
        return self.base + self.length


class Bus:
    """Sorted, non-overlapping address ranges; ``lookup(addr)`` by bisection."""

    CACHE_LIMIT = 4096        # remembered lookups; a guest probing many addresses only evicts

    def __init__(self, name: str):
        self.name = name
        self._starts: list[int] = []          # sorted bases, parallel to _entries
        self._entries: list[Attachment] = []
        #: addr -> lookup()'s answer, for the addresses asked about since the last attach. The
        #: same dict for the bus's life (cleared, never replaced): a run loop may keep ``memo.get``
        #: and ask ``lookup()`` only on a miss.
        self.memo: dict[int, tuple[Device, int, str] | None] = {}
        self.generation = 0                   # bumped on every attach: tables built from the bus know when to rebuild

    def attach(self, base: int, length: int, device: Device, name: str | None = None) -> None:
        """Claim ``[base, base + length)`` for ``device``; overlap -> DeviceError."""
        name = name or type(device).__name__
        if base < 0 or length <= 0:
            raise DeviceError(
                f"{self.name} bus: cannot attach {name} at {base:#x} with length {length}: "
                "the range must be non-empty and start at a non-negative address")
        new = Attachment(base, length, name, device)
        i = bisect_right(self._starts, base)
        # Only the neighbours can overlap: the range starting at or before base,
        # and the one starting after it.
        for j in (i - 1, i):
            if 0 <= j < len(self._entries):
                old = self._entries[j]
                if old.base < new.end and new.base < old.end:
                    raise DeviceError(
                        f"{self.name} bus: {name} at [{new.base:#x}, {new.end:#x}) overlaps "
                        f"{old.name} at [{old.base:#x}, {old.end:#x})")
        self._starts.insert(i, base)
        self._entries.insert(i, new)
        self.memo.clear()
        self.generation += 1

    def lookup(self, addr: int) -> tuple[Device, int, str] | None:
        """``(device, offset, name)`` of the range holding ``addr``, or None.

        Answers are remembered per address (the run loop asks about the same few
        ports and registers over and over); the memo is bounded and reset on attach.
        """
        try:
            return self.memo[addr]
        except KeyError:
            pass
        hit = self._find(addr)
        if len(self.memo) >= self.CACHE_LIMIT:
            self.memo.clear()
        self.memo[addr] = hit
        return hit

    def _find(self, addr: int) -> tuple[Device, int, str] | None:
        i = bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        entry = self._entries[i]
        if addr >= entry.base + entry.length:
            return None
        return entry.device, addr - entry.base, entry.name

    @property
    def devices(self) -> list[Attachment]:
        """All attachments, sorted by base address."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        ranges = ", ".join(f"{e.name}@[{e.base:#x},{e.end:#x})" for e in self._entries)
        return f"Bus({self.name!r}: {ranges})"
