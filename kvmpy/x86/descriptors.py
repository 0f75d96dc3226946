"""Segment and system descriptors, the GDT and the IDT (Intel SDM vol. 3A, 3.4-3.5,
6.10-6.14; 20.1 for the real-mode interrupt vector table).

The table readers treat GDTR/IDTR and the tables as hostile: they stop at the limit and
at the architectural maximum, and an unreadable slot becomes an entry with an ``error``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..kvm.regs import CR0_PE, EFER_LMA, Sregs

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
from .pagewalk import LinearMemory, TranslationError

# --- descriptors ----------------------------------------------------------------------

# System descriptor types (S=0), SDM table 3-2: legacy and IA-32e mode differ.
_SYSTEM_LEGACY = {1: ("tss", "16-bit TSS (available)"), 2: ("ldt", "LDT"), 3: ("tss", "16-bit TSS (busy)"),
                  4: ("call-gate", "16-bit call gate"), 5: ("task-gate", "task gate"),
                  6: ("interrupt-gate", "16-bit interrupt gate"), 7: ("trap-gate", "16-bit trap gate"),
                  9: ("tss", "32-bit TSS (available)"), 0xB: ("tss", "32-bit TSS (busy)"),
                  0xC: ("call-gate", "32-bit call gate"), 0xE: ("interrupt-gate", "32-bit interrupt gate"),
                  0xF: ("trap-gate", "32-bit trap gate")}
_SYSTEM_LONG = {2: ("ldt", "LDT"), 9: ("tss", "64-bit TSS (available)"), 0xB: ("tss", "64-bit TSS (busy)"),
                0xC: ("call-gate", "64-bit call gate"), 0xE: ("interrupt-gate", "64-bit interrupt gate"),
                0xF: ("trap-gate", "64-bit trap gate")}
GATES = ("call-gate", "task-gate", "interrupt-gate", "trap-gate")


@dataclass(frozen=True)
class Descriptor:
    """A decoded descriptor. ``kind`` is one of "null", "code", "data", "tss", "ldt",
    "call-gate", "task-gate", "interrupt-gate", "trap-gate", "reserved" (or "ivt" for
    a real-mode vector); ``name`` says it in words. Segments fill base/limit (``limit``
    is the raw 20-bit field), gates fill selector/offset/ist/params. ``size`` is the
    bytes the descriptor occupies in its table (4, 8 or 16)."""

    raw: int
    size: int
    kind: str
    name: str
    type: int = 0
    s: int = 0
    dpl: int = 0
    present: int = 0
    base: int = 0
    limit: int = 0
    avl: int = 0
    l: int = 0  # noqa: E741 (the SDM's name)
    db: int = 0
    g: int = 0
    selector: int = 0
    offset: int = 0
    ist: int = 0
    params: int = 0

    @property
    def byte_limit(self) -> int:
        """The limit in bytes: G=1 counts 4 KiB units (the low 12 bits read as ones)."""
        return (self.limit << 12 | 0xFFF) if self.g else self.limit

    def __str__(self) -> str:
        if self.kind in ("null", "ivt"):
            return self.name if self.kind == "null" else f"{self.selector:04x}:{self.offset:04x}"
        tail = "" if self.present else ", not present"
        if self.kind in GATES:
            target = f"{self.selector:#06x}" if self.kind == "task-gate" else f"{self.selector:#06x}:{self.offset:#x}"
            extra = f" ist={self.ist}" if self.ist else ""
            extra += f" params={self.params}" if self.kind == "call-gate" and self.params else ""
            return f"{self.name} -> {target} DPL{self.dpl}{extra}{tail}"
        return f"{self.name} base={self.base:#x} limit={self.byte_limit:#x} DPL{self.dpl}{tail}"


def segment_type_name(type_: int, s: int, *, l: int = 0, db: int = 0, long_mode: bool = False) -> tuple[str, str]:  # noqa: E741
    """(kind, words) for a descriptor's type field: '64-bit code, execute/read, accessed'."""
    type_ &= 0xF
    if not s:
        kind, name = (_SYSTEM_LONG if long_mode else _SYSTEM_LEGACY).get(
            type_, ("reserved", f"reserved system type {type_:#x}"))
        return kind, name
    accessed = ", accessed" if type_ & 1 else ""
    if type_ & 8:
        width = "64-bit" if l else "32-bit" if db else "16-bit"     # L counts in IA-32e mode only
        how = "execute/read" if type_ & 2 else "execute-only"
        return "code", f"{width} code, {how}{', conforming' if type_ & 4 else ''}{accessed}"
    how = "read/write" if type_ & 2 else "read-only"
    return "data", f"data, {how}{', expand-down' if type_ & 4 else ''}{accessed}"


def decode_descriptor(raw: int | bytes, long_mode: bool | None = None) -> Descriptor:
    """Decode an 8-byte descriptor, or a 16-byte IA-32e system descriptor or gate.

    ``raw`` is bytes (8 or 16, little-endian) or the same as an integer. ``long_mode``
    picks the IA-32e type table and 16-byte forms; by default it is inferred from the
    length (16 bytes, or an integer of more than 64 bits). Code and data descriptors
    are 8 bytes in every mode; an 8-byte system descriptor in long mode decodes with
    an upper half of zero. Raises ValueError only for a wrong size, never for contents.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        if len(raw) not in (8, 16):
            raise ValueError(f"a descriptor is 8 or 16 bytes, got {len(raw)}")
        wide_input = len(raw) == 16
        raw = int.from_bytes(raw, "little")
    else:
        if not 0 <= raw < 1 << 128:
            raise ValueError(f"descriptor {raw:#x} does not fit in 16 bytes")
        wide_input = raw >> 64 != 0
    if long_mode is None:
        long_mode = wide_input
    lo, hi = raw & U64, raw >> 64
    type_, s, dpl, present = lo >> 40 & 0xF, lo >> 44 & 1, lo >> 45 & 3, lo >> 47 & 1
    size = 16 if long_mode and not s else 8         # IA-32e system descriptors and gates: 16 bytes
    if lo == 0 and (size == 8 or hi == 0):
        return Descriptor(0, 8, "null", "null descriptor")
    kind, name = segment_type_name(type_, s, l=lo >> 53 & 1, db=lo >> 54 & 1, long_mode=long_mode)
    common = dict(raw=raw & ((1 << (8 * size)) - 1), size=size, kind=kind, name=name, type=type_, s=s,
                  dpl=dpl, present=present)
    if kind in GATES:
        offset = (lo & 0xFFFF) | (lo >> 48 & 0xFFFF) << 16
        if size == 16:
            offset |= (hi & U32) << 32
        ist = lo >> 32 & 7 if size == 16 and kind in ("interrupt-gate", "trap-gate") else 0
        params = lo >> 32 & 0x1F if kind == "call-gate" and size == 8 else 0
        return Descriptor(**common, selector=lo >> 16 & 0xFFFF, offset=0 if kind == "task-gate" else offset,
                          ist=ist, params=params)
    base = (lo >> 16 & 0xFF_FFFF) | (lo >> 56 & 0xFF) << 24
    if size == 16:
        base |= (hi & U32) << 32
    return Descriptor(**common, base=base, limit=(lo & 0xFFFF) | (lo >> 48 & 0xF) << 16,
                      avl=lo >> 52 & 1, l=lo >> 53 & 1, db=lo >> 54 & 1, g=lo >> 55 & 1)


@dataclass(frozen=True)
class TableEntry:
    """One slot of the GDT or IDT: its index (GDT slot or vector), linear address, and
    the decoded descriptor, or ``error`` saying why it could not be read."""

    index: int
    address: int
    descriptor: Descriptor | None
    error: str | None = None

    @property
    def selector(self) -> int:
        """The GDT selector of this slot (index << 3, TI=0, RPL=0)."""
        return self.index << 3


def _read_table(lin: LinearMemory, base: int, limit: int, slot: int, count: int, decode) -> list[TableEntry]:
    out: list[TableEntry] = []
    i = 0
    while i < count and (i + 1) * slot - 1 <= limit:
        addr = (base + i * slot) & lin.mask
        try:
            d = decode(lin, addr, i, limit)
        except TranslationError as e:
            out.append(TableEntry(i, addr, None, str(e)))
            i += 1
            continue
        out.append(TableEntry(i, addr, d))
        i += max(1, d.size // slot)
    return out


def read_gdt(mem, sregs: Sregs) -> list[TableEntry]:
    """Every slot of the GDT that fits under GDTR.limit (at most 8192), decoded.

    GDTR.base is a linear address, so the table is read through paging. In long mode
    a system descriptor takes two slots; the second is not listed. Never raises.
    """
    lin = LinearMemory(mem, sregs)
    long_mode = bool(sregs.efer & EFER_LMA)

    def decode(lin, addr, i, limit):
        d = decode_descriptor(lin.read(addr, 8), long_mode=long_mode)
        if d.size == 16 and (i + 2) * 8 - 1 <= limit:       # else: upper half past the limit, read as 0
            d = decode_descriptor(lin.read(addr, 16), long_mode=True)
        return d

    return _read_table(lin, sregs.gdt.base, sregs.gdt.limit & 0xFFFF, 8, 8192, decode)


def read_idt(mem, sregs: Sregs) -> list[TableEntry]:
    """Every vector of the IDT under IDTR.limit (at most 256), decoded. Never raises.

    Real mode uses the IDTR as the interrupt vector table: 4-byte offset:segment
    pointers (kind "ivt"). Protected mode has 8-byte gates, long mode 16-byte ones.
    """
    lin = LinearMemory(mem, sregs)
    if not sregs.cr0 & CR0_PE:
        def ivt(lin, addr, i, limit):
            raw = int.from_bytes(lin.read(addr, 4), "little")
            return Descriptor(raw, 4, "ivt", "real-mode vector", selector=raw >> 16, offset=raw & 0xFFFF)
        return _read_table(lin, sregs.idt.base, sregs.idt.limit & 0xFFFF, 4, 256, ivt)
    long_mode = bool(sregs.efer & EFER_LMA)
    slot = 16 if long_mode else 8
    return _read_table(lin, sregs.idt.base, sregs.idt.limit & 0xFFFF, slot, 256,
                       lambda lin, addr, i, limit: decode_descriptor(lin.read(addr, slot), long_mode=long_mode))
