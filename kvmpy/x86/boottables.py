"""Where the VMM writes what a protected- or long-mode entry refers to, clear of the image.

Entering an image in protected mode needs a GDT and a TSS in guest memory (the segment
registers and TR point into them); long mode also needs the identity-mapping page
tables and, for a ring-3 start, the ring-0 stack RSP0 names. Their homes are fixed in
layout.py: GDT 0x1000, TSS 0x2000-0x4069, ring-0 stack 0x6000-0x6FFF, PML4 0x9000,
PDPT 0xA000, page directories from 0x10000.

An image may load there: QEMU loads a multiboot kernel linked at 0x8000, so kvmpy must
too. :func:`place` keeps the homes when the image leaves their pages free; otherwise
it moves everything, laid out compactly from one page (:meth:`BootTables.at`), to the
lowest page-aligned place in RAM clear of the image: first in base memory
(``layout.BASE_MEMORY``, 0x500-0x9FC00: never the real-mode IVT and BIOS data area or
the EBDA), then above 1 MiB, below 4 GiB (where a 32-bit GDTR, TR and CR3 reach).
:func:`first_fit` is the search, also used by the multiboot loader for its
information block and modules.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import gdt, layout, paging

PAGE = layout.PAGE
GDT_SIZE = len(gdt.boot_gdt())
_4GiB = 4 * layout.GiB
#: Where a moved set of tables may go, in order of preference.
WINDOWS = (layout.BASE_MEMORY, (layout.MiB, _4GiB))


def align_up(value: int, align: int = PAGE) -> int:
    return (value + align - 1) // align * align


def pages(ranges) -> list[tuple[int, int]]:
    """Each ``(start, end)`` widened to whole pages."""
    return [(start // PAGE * PAGE, align_up(end)) for start, end in ranges if end > start]


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@dataclass(frozen=True)
class BootTables:
    """The guest-physical addresses of the boot GDT, TSS, ring-0 stack top and page tables."""

    gdt: int = layout.BOOT_GDT
    tss: int = layout.BOOT_TSS
    stack_top: int = layout.RING0_STACK_TOP      # RSP0; the page below it is the ring-0 stack
    pml4: int = layout.PML4
    pdpt: int = layout.PDPT
    pd_base: int = layout.PD_BASE                # one page directory a GiB from here

    @classmethod
    def at(cls, base: int) -> BootTables:
        """The compact layout from page ``base``: the GDT's page, the TSS (3 pages), the ring-0
        stack page, the PML4, the PDPT, then the page directories."""
        return cls(gdt=base, tss=base + PAGE, stack_top=base + 5 * PAGE, pml4=base + 5 * PAGE,
                   pdpt=base + 6 * PAGE, pd_base=base + 7 * PAGE)

    def ranges(self, mode: str, mem_end: int) -> list[tuple[int, int]]:
        """``(start, end)`` of what entering in ``mode`` writes or uses: none for real mode;
        GDT and TSS for protected mode; and the stack, PML4, PDPT, directories for long mode."""
        if mode == "real":
            return []
        out = [(self.gdt, self.gdt + GDT_SIZE), (self.tss, self.tss + layout.BOOT_TSS_SIZE)]
        if mode == "long":
            out += [(self.stack_top - PAGE, self.stack_top), (self.pml4, self.pml4 + PAGE),
                    (self.pdpt, self.pdpt + PAGE),
                    (self.pd_base, self.pd_base + paging.directories(mem_end) * PAGE)]
        return out


DEFAULT = BootTables()


def first_fit(size: int, ram, avoid, windows=WINDOWS, start: int = 0) -> int | None:
    """The lowest page-aligned address at or above ``start`` for ``size`` bytes: inside one
    ``(start, end)`` of ``ram`` and of ``windows`` (tried in order), overlapping nothing in
    ``avoid``. None if there is no such place."""
    avoid = sorted(avoid)
    for low, high in windows:
        for r_start, r_end in sorted(ram):
            lo, hi = max(low, r_start, start), min(high, r_end)
            pos = align_up(lo)
            while pos + size <= hi:
                clash = [end for s, end in avoid if overlaps((pos, pos + max(size, 1)), (s, end))]
                if not clash:
                    return pos
                pos = align_up(max(clash))
    return None


def place(mode: str, mem_end: int, ram, avoid) -> BootTables:
    """Where the tables for ``mode`` go: :data:`DEFAULT` unless a page they use overlaps
    ``avoid`` (the image and anything reserved) or lies outside ``ram``; else the lowest
    free place (:func:`first_fit`) for :meth:`BootTables.at`. ValueError if there is none."""
    avoid = pages(avoid)
    wanted = pages(DEFAULT.ranges(mode, mem_end))
    in_ram = all(any(s <= start and end <= e for s, e in ram) for start, end in wanted)
    if in_ram and not any(overlaps(w, a) for w in wanted for a in avoid):
        return DEFAULT
    extent = BootTables.at(0).ranges(mode, mem_end)
    size = max(end for _, end in extent)
    base = first_fit(size, ram, avoid)
    if base is None:
        raise ValueError(f"no room in guest RAM for the {mode}-mode boot tables ({size:#x} bytes, "
                         "page-aligned, below 4 GiB) clear of the image")
    return BootTables.at(base)
