"""4-level x86-64 paging: identity-mapped boot page tables and a page-table walker.

Intel SDM vol. 3A, 4.5. The boot tables map guest-virtual == guest-physical with
2 MiB pages (1 GiB pages are not offered on every host, see docs/host-notes.md).
"""
from __future__ import annotations

import struct

from ..kvm.memory import PAGE_SIZE as PAGE
from . import layout

PTE_P, PTE_RW, PTE_US, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000
PAGE_2M = 2 << 20


def identity_map_tables(mem_end: int, user: bool = False) -> list[tuple[int, bytes]]:
    """(gpa, bytes) writes that identity-map max(4 GiB, mem_end) with 2 MiB pages.

    With ``user`` every level allows CPL-3 access (the U/S bit), so a guest started
    in ring 3 can run anywhere in its RAM.
    """
    gib = max(layout.IDENTITY_MAP_MIN, mem_end + layout.GiB - 1) // layout.GiB
    if gib > layout.PD_MAX:
        raise ValueError(f"cannot identity-map {gib} GiB: the boot page directories hold {layout.PD_MAX} GiB")
    flags = PTE_P | PTE_RW | (PTE_US if user else 0)
    pml4 = struct.pack("<Q", layout.PDPT | flags) + bytes(PAGE - 8)
    pdpt = b"".join(struct.pack("<Q", (layout.PD_BASE + i * PAGE) | flags) for i in range(gib))
    pdpt += bytes(PAGE - len(pdpt))
    writes = [(layout.PML4, pml4), (layout.PDPT, pdpt)]
    for i in range(gib):
        base = i * layout.GiB
        pd = struct.pack("<512Q", *((base + j * PAGE_2M) | flags | PTE_PS for j in range(512)))
        writes.append((layout.PD_BASE + i * PAGE, pd))
    return writes


def translate(read_u64, cr3: int, vaddr: int) -> tuple[int, list[tuple[str, int, int]]]:
    """Walk 4-level paging for ``vaddr``; returns (gpa, [(level, entry_gpa, entry), ...]).

    ``read_u64(gpa)`` reads guest memory. Raises ValueError on a non-present entry.
    """
    walk = []
    table = cr3 & ADDR_MASK
    for level, shift in (("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12)):
        index = (vaddr >> shift) & 0x1FF
        entry_gpa = table + index * 8
        entry = read_u64(entry_gpa)
        walk.append((level, entry_gpa, entry))
        if not entry & PTE_P:
            raise ValueError(f"{vaddr:#x}: {level} entry {index} at {entry_gpa:#x} is not present")
        if level in ("PDPT", "PD") and entry & PTE_PS:
            size = 1 << shift
            return (entry & ADDR_MASK & ~(size - 1)) | (vaddr & (size - 1)), walk
        table = entry & ADDR_MASK
    return table | (vaddr & 0xFFF), walk
