"""Segment descriptors and the boot GDT (Intel SDM vol. 3A, 3.4.5 and 7.2.3).

``boot_gdt()`` builds the table the host writes at ``layout.BOOT_GDT`` (or wherever
``boottables.place`` moved it, with the TSS at ``tss``);
``segment_for()`` gives the matching hidden segment state for ``kvm_sregs``, so
the CPU state and the in-memory table always agree (a guest that reloads a
segment register gets what it already had).
"""
from __future__ import annotations

import struct

from . import layout
from ..kvm.regs import Segment

# Descriptor type field values (S=1 code/data, SDM table 3-1).
TYPE_DATA_RW = 0x3        # read/write, accessed
TYPE_CODE_RX = 0xB        # execute/read, accessed
TYPE_TSS64_BUSY = 0xB     # system descriptor (S=0): 64-bit (or 32-bit) busy TSS


def descriptor(base: int, limit: int, type_: int, *, s: int = 1, dpl: int = 0, present: int = 1,
               l: int = 0, db: int = 0, g: int = 1) -> int:  # noqa: E741
    """Pack an 8-byte segment descriptor; ``limit`` is the 20-bit raw limit."""
    for name, value, bits in (("base", base, 32), ("limit", limit, 20), ("type", type_, 4), ("s", s, 1),
                              ("dpl", dpl, 2), ("present", present, 1), ("l", l, 1), ("db", db, 1),
                              ("g", g, 1)):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"descriptor field {name}={value:#x} does not fit in {bits} bit(s)")
    d = limit & 0xFFFF
    d |= (base & 0xFFFFFF) << 16
    d |= (type_ & 0xF) << 40
    d |= s << 44 | dpl << 45 | present << 47
    d |= ((limit >> 16) & 0xF) << 48
    d |= l << 53 | db << 54 | g << 55
    d |= ((base >> 24) & 0xFF) << 56
    return d


def _flat(selector: int, type_: int, *, dpl: int = 0, l: int = 0, db: int = 1) -> Segment:  # noqa: E741
    return Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1, dpl=dpl,
                   db=db, s=1, l=l, g=1)


def segment_for(selector: int, tss: int = layout.BOOT_TSS) -> Segment:
    """Hidden segment state for one of the boot GDT's selectors (the TSS's at ``tss``)."""
    table = {
        layout.SEL_CODE64: _flat(layout.SEL_CODE64, TYPE_CODE_RX, l=1, db=0),
        layout.SEL_DATA: _flat(layout.SEL_DATA, TYPE_DATA_RW),
        layout.SEL_CODE32: _flat(layout.SEL_CODE32, TYPE_CODE_RX),
        layout.SEL_USER_CODE64: _flat(layout.SEL_USER_CODE64, TYPE_CODE_RX, dpl=3, l=1, db=0),
        layout.SEL_USER_DATA: _flat(layout.SEL_USER_DATA, TYPE_DATA_RW, dpl=3),
    }
    if selector == layout.SEL_TSS:
        return Segment(base=tss, limit=layout.BOOT_TSS_SIZE - 1, selector=layout.SEL_TSS,
                       type=TYPE_TSS64_BUSY, present=1, dpl=0, db=0, s=0, l=0, g=0)
    if selector not in table:
        raise ValueError(f"selector {selector:#x} is not in the boot GDT")
    return table[selector]


def _entry(seg: Segment) -> int:
    limit = seg.limit >> 12 if seg.g else seg.limit
    return descriptor(seg.base, limit, seg.type, s=seg.s, dpl=seg.dpl, present=seg.present,
                      l=seg.l, db=seg.db, g=seg.g)


def boot_gdt(tss: int = layout.BOOT_TSS) -> bytes:
    """The boot GDT as bytes: null, code64, data, code32, user code64, user data, and the
    descriptor (16 bytes) of the TSS at ``tss``."""
    entries = [0]
    for sel in (layout.SEL_CODE64, layout.SEL_DATA, layout.SEL_CODE32,
                layout.SEL_USER_CODE64, layout.SEL_USER_DATA):
        entries.append(_entry(segment_for(sel)))
    tss_segment = segment_for(layout.SEL_TSS, tss)
    entries.append(_entry(tss_segment))
    entries.append(tss_segment.base >> 32)  # upper half of a 16-byte system descriptor
    return struct.pack(f"<{len(entries)}Q", *entries)


def boot_tss(rsp0: int = layout.RING0_STACK_TOP) -> bytes:
    """A 64-bit TSS (SDM 7.7) with RSP0 set and an I/O bitmap that allows every port."""
    tss = bytearray(layout.BOOT_TSS_SIZE)
    struct.pack_into("<Q", tss, 4, rsp0)                          # RSP0 at offset 4
    struct.pack_into("<H", tss, 0x66, layout.TSS_IOMAP_OFFSET)    # I/O map base address
    tss[-1] = 0xFF              # bitmap terminator; the zero bits before it allow each port
    return bytes(tss)
