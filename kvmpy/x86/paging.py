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


def directories(mem_end: int) -> int:
    """How many page directories (one per GiB) identity-map max(4 GiB, mem_end)."""
    gib = max(layout.IDENTITY_MAP_MIN, mem_end + layout.GiB - 1) // layout.GiB
    if gib > layout.PD_MAX:
        raise ValueError(f"cannot identity-map {gib} GiB: the boot page directories hold {layout.PD_MAX} GiB")
    return gib


def identity_map_tables(mem_end: int, user: bool = False, *, pml4: int = layout.PML4,
                        pdpt: int = layout.PDPT, pd_base: int = layout.PD_BASE) -> list[tuple[int, bytes]]:
    """(gpa, bytes) writes that identity-map max(4 GiB, mem_end) with 2 MiB pages: the PML4
    at ``pml4``, the PDPT at ``pdpt`` and one page directory a GiB from ``pd_base`` on.

    With ``user`` every level allows CPL-3 access (the U/S bit), so a guest started
    in ring 3 can run anywhere in its RAM.
    """
    gib = directories(mem_end)
    flags = PTE_P | PTE_RW | (PTE_US if user else 0)
    top = struct.pack("<Q", pdpt | flags) + bytes(PAGE - 8)
    middle = b"".join(struct.pack("<Q", (pd_base + i * PAGE) | flags) for i in range(gib))
    middle += bytes(PAGE - len(middle))
    writes = [(pml4, top), (pdpt, middle)]
    for i in range(gib):
        base = i * layout.GiB
        pd = struct.pack("<512Q", *((base + j * PAGE_2M) | flags | PTE_PS for j in range(512)))
        writes.append((pd_base + i * PAGE, pd))
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
