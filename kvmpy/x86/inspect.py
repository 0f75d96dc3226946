"""Seeing inside a stopped guest: page walks, descriptor tables, segments and the CPU mode.

Pure functions over guest memory (a ``GuestMemory`` or a ``read_u64(gpa)``) and the
register dataclasses, so they work on a live vCPU's state, a saved one, or tables a
test wrote by hand. Everything a guest controls (CR3, table entries, GDTR/IDTR) is
treated as hostile: a walk either succeeds or raises :class:`TranslationError`, and
the table readers and the report never raise for any register or memory contents.

Spec: Intel SDM vol. 3A, chapter 4 (paging: 4.3 32-bit, 4.4 PAE, 4.5 4/5-level),
3.4-3.5 (segment and system descriptors), 6.10-6.14 (IDT and gates), 20.1 (the
real-mode interrupt vector table). AMD APM vol. 2 chapter 5 says the same for AMD.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import GuestMemoryError, KvmpyError
from .regs import CR0_PE, CR0_PG, CR4_PAE, CR4_PSE, EFER_LMA, Regs, Segment, Sregs

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
PAGE = 4096
CR4_LA57 = 1 << 12
RFLAGS_VM = 1 << 17

# --- errors ---------------------------------------------------------------------------


class TranslationError(KvmpyError, ValueError):
    """A linear address does not lead to guest RAM.

    ``reason`` is "not-present" (the CPU would raise #PF), "non-canonical" (#GP in
    64-bit mode), "outside-ram" (a table entry, or the data, lies outside guest RAM)
    or "bad-address" (not a linear address of this mode). ``levels`` holds the
    entries read before the walk stopped, the failing one last.
    """

    def __init__(self, message: str, reason: str, vaddr: int, levels: tuple = ()):
        super().__init__(message)
        self.reason, self.vaddr, self.levels = reason, vaddr, tuple(levels)


# --- page walks -----------------------------------------------------------------------

PAGING_MODES = ("none", "32-bit", "pae", "4-level", "5-level")

# Per mode: each level's name, the lowest linear-address bit its index uses, and the
# index width; and whether an entry at that level may map a page (PS=1) instead of
# pointing at the next table. PAE's PDPT has 4 entries; 32-bit tables hold 1024 4-byte
# entries; everything else 512 8-byte entries.
_LEVELS = {
    "32-bit": (("PD", 22, 10, True), ("PT", 12, 10, False)),
    "pae": (("PDPT", 30, 2, False), ("PD", 21, 9, True), ("PT", 12, 9, False)),
    "4-level": (("PML4", 39, 9, False), ("PDPT", 30, 9, True), ("PD", 21, 9, True), ("PT", 12, 9, False)),
}
_LEVELS["5-level"] = (("PML5", 48, 9, False),) + _LEVELS["4-level"]
# Where CR3 keeps the top table's address: bits 31:12; PAE 31:5 (a 32-byte PDPT); 51:12.
_CR3_MASK = {"32-bit": 0xFFFF_F000, "pae": 0xFFFF_FFE0, "4-level": 0x000F_FFFF_FFFF_F000,
             "5-level": 0x000F_FFFF_FFFF_F000}
ADDR_MASK = 0x000F_FFFF_FFFF_F000       # bits 51:12 of a 64-bit entry: the next table or frame

# Entry bits (SDM tables 4-4..4-20). Bit 7 is PS above the last level and PAT in a PTE;
# D and G only mean something in an entry that maps a page; NX exists in 8-byte entries.
_FLAG_BITS = ((0, "P"), (1, "RW"), (2, "US"), (3, "PWT"), (4, "PCD"), (5, "A"))
_SIZE_NAMES = {1 << 12: "4 KiB", 1 << 21: "2 MiB", 1 << 22: "4 MiB", 1 << 30: "1 GiB"}


def entry_flags(entry: int, *, leaf: bool, last_level: bool, wide: bool = True) -> tuple[str, ...]:
    """Names of the set flag bits of a paging-structure entry (P RW US PWT PCD A D PS G NX)."""
    names = [n for bit, n in _FLAG_BITS if entry >> bit & 1]
    if leaf and entry >> 6 & 1:
        names.append("D")
    if entry >> 7 & 1:
        names.append("PAT" if last_level else "PS")
    if leaf and entry >> 8 & 1:
        names.append("G")
    if leaf and not last_level and entry >> 12 & 1:
        names.append("PAT")                 # a large page keeps PAT in bit 12
    if wide and entry >> 63 & 1:
        names.append("NX")
    return tuple(names)


@dataclass(frozen=True)
class Level:
    """One paging-structure entry the walk read.

    ``target`` is the next table's address, or the page frame's when ``page_size``
    is set (this entry maps a page), or None when the entry is not present.
    """

    name: str
    index: int
    entry_addr: int
    entry: int
    flags: tuple[str, ...]
    target: int | None
    page_size: int | None = None

    def __str__(self) -> str:
        if self.target is None:
            where = "not present"
        elif self.page_size:
            where = f"{_SIZE_NAMES.get(self.page_size, hex(self.page_size))} page at {self.target:#x}"
        else:
            where = f"table at {self.target:#x}"
        return (f"{self.name + f'[{self.index}]':<10} @{self.entry_addr:#010x} = {self.entry:#018x}  "
                f"{' '.join(self.flags):<18} -> {where}")


@dataclass(frozen=True)
class Walk:
    """A completed translation: the entries read, the physical address and the page size."""

    vaddr: int
    mode: str
    levels: tuple[Level, ...]
    phys: int
    page_size: int | None       # None when paging is off

    @property
    def writable(self) -> bool:
        """Every level allows writes (CR0.WP decides whether that binds CPL 0)."""
        return all("RW" in lv.flags for lv in self.levels)

    @property
    def user(self) -> bool:
        """Every level allows CPL-3 access."""
        return all("US" in lv.flags for lv in self.levels)

    @property
    def executable(self) -> bool:
        """No level sets NX (which only counts when EFER.NXE is on)."""
        return not any("NX" in lv.flags for lv in self.levels)

    def __str__(self) -> str:
        if self.mode == "none":
            return f"{self.vaddr:#x}: paging off, physical = linear = {self.phys:#x}"
        access = " ".join(n for n, ok in (("RW", self.writable), ("US", self.user), ("X", self.executable)) if ok)
        lines = [str(lv) for lv in self.levels]
        lines.append(f"=> physical {self.phys:#x} ({_SIZE_NAMES.get(self.page_size, '?')} page; "
                     f"access {access or 'read-only, supervisor, no-exec'})")
        return "\n".join(lines)


def paging_mode(sregs: Sregs) -> str:
    """Which of PAGING_MODES the CPU uses (SDM 4.1.1, table 4-1)."""
    if not sregs.cr0 & CR0_PG:
        return "none"
    if not sregs.cr4 & CR4_PAE:
        return "32-bit"
    if sregs.efer & EFER_LMA:
        return "5-level" if sregs.cr4 & CR4_LA57 else "4-level"
    return "pae"


def walk(read_u64, cr3: int, vaddr: int, mode: str = "4-level", *, pse: bool = True) -> Walk:
    """Translate linear ``vaddr`` through the page tables at ``cr3`` in paging ``mode``.

    ``read_u64(gpa)`` reads guest RAM (``GuestMemory.read_u64``) and raises
    GuestMemoryError outside it. ``pse`` is CR4.PSE: in 32-bit paging it lets a PD
    entry map a 4 MiB page. Raises TranslationError, never anything else for any
    ``cr3``, ``vaddr`` or table contents. PAE's four PDPT entries are read from memory
    here; a real CPU caches them when CR3 is loaded (SDM 4.4.1).
    """
    if mode not in PAGING_MODES:
        raise ValueError(f"unknown paging mode {mode!r}; expected one of {', '.join(PAGING_MODES)}")
    width = 64 if mode in ("4-level", "5-level") else 32
    if not 0 <= vaddr < 1 << width:
        raise TranslationError(f"{vaddr:#x} is not a {width}-bit linear address", "bad-address", vaddr)
    if mode == "none":
        return Walk(vaddr, mode, (), vaddr, None)
    if width == 64:
        top = 48 if mode == "4-level" else 57           # bits above the top index copy its last bit
        high = vaddr >> (top - 1)
        if high not in (0, (1 << (65 - top)) - 1):
            raise TranslationError(f"{vaddr:#x} is not canonical for {mode} paging (a #GP, not a #PF)",
                                   "non-canonical", vaddr)
    wide = mode != "32-bit"
    levels: list[Level] = []
    table = cr3 & _CR3_MASK[mode]
    plan = _LEVELS[mode]
    for depth, (name, shift, bits, may_map) in enumerate(plan):
        last = depth == len(plan) - 1
        index = (vaddr >> shift) & ((1 << bits) - 1)
        entry_addr = table + index * (8 if wide else 4)
        entry = _read_entry(read_u64, entry_addr, wide, name, index, vaddr, levels)
        if not entry & 1:
            levels.append(Level(name, index, entry_addr, entry, entry_flags(entry, leaf=False, last_level=last,
                                                                            wide=wide), None))
            raise TranslationError(f"{vaddr:#x}: {name} entry {index} at {entry_addr:#x} is not present "
                                   f"({entry:#x}; a #PF)", "not-present", vaddr, levels)
        maps = last or (may_map and entry >> 7 & 1 and (wide or pse))
        if maps:
            size = 1 << shift
            frame = _frame(entry, size, wide)
            levels.append(Level(name, index, entry_addr, entry,
                                entry_flags(entry, leaf=True, last_level=last, wide=wide), frame, size))
            return Walk(vaddr, mode, tuple(levels), frame | (vaddr & (size - 1)), size)
        table = entry & ADDR_MASK if wide else entry & 0xFFFF_F000
        levels.append(Level(name, index, entry_addr, entry,
                            entry_flags(entry, leaf=False, last_level=False, wide=wide), table))
    raise AssertionError("unreachable: the last level always maps a page")


def _read_entry(read_u64, addr: int, wide: bool, name: str, index: int, vaddr: int, levels) -> int:
    """One table entry; 4-byte entries come from the aligned 8 bytes around them
    (same page, so inside RAM exactly when the entry is: RAM is page-granular)."""
    try:
        if wide:
            return read_u64(addr) & U64
        return (read_u64(addr & ~7) >> (32 if addr & 4 else 0)) & U32
    except GuestMemoryError:
        raise TranslationError(f"{vaddr:#x}: {name} entry {index} at {addr:#x} is outside guest RAM",
                               "outside-ram", vaddr, levels) from None


def _frame(entry: int, size: int, wide: bool) -> int:
    if wide:
        return entry & ADDR_MASK & ~(size - 1)
    if size == 1 << 22:     # PSE-36: a 4 MiB page takes physical bits 39:32 from entry bits 20:13
        return (entry & 0xFFC0_0000) | ((entry >> 13) & 0xFF) << 32
    return entry & 0xFFFF_F000


def translate(read_u64, sregs: Sregs, vaddr: int) -> Walk:
    """walk() with the paging mode, CR3 and CR4.PSE of ``sregs``."""
    return walk(read_u64, sregs.cr3, vaddr, paging_mode(sregs), pse=bool(sregs.cr4 & CR4_PSE))


class LinearMemory:
    """Guest memory as the CPU sees it through segmentation-free linear addresses.

    Translations are cached per 4 KiB page for the lifetime of the object (make a
    new one after the guest runs again).
    """

    def __init__(self, mem, sregs: Sregs):
        self.mem, self.sregs = mem, sregs
        self.mask = U64 if sregs.efer & EFER_LMA else U32      # 32-bit linear addresses wrap
        self._pages: dict[int, int | TranslationError] = {}

    def phys(self, linear: int) -> int:
        """The physical address of ``linear``, or TranslationError."""
        linear &= self.mask
        page = linear & ~(PAGE - 1)
        hit = self._pages.get(page)
        if hit is None:
            try:
                w = translate(self.mem.read_u64, self.sregs, page)
                hit = w.phys
            except TranslationError as e:
                hit = e
            self._pages[page] = hit
        if isinstance(hit, TranslationError):
            raise hit
        return hit + (linear & (PAGE - 1))

    def read(self, linear: int, n: int) -> bytes:
        """``n`` bytes at ``linear``, page by page; TranslationError if any is unmapped or not RAM."""
        out = bytearray()
        while len(out) < n:
            addr = (linear + len(out)) & self.mask
            chunk = min(n - len(out), PAGE - (addr & (PAGE - 1)))
            p = self.phys(addr)
            try:
                out += self.mem.read(p, chunk)
            except GuestMemoryError:
                raise TranslationError(f"linear {addr:#x} maps to {p:#x}, outside guest RAM",
                                       "outside-ram", addr) from None
        return bytes(out)


def read_linear(mem, sregs: Sregs, linear: int, n: int) -> bytes:
    """``n`` bytes of guest memory at linear address ``linear`` (through paging if on)."""
    return LinearMemory(mem, sregs).read(linear, n)


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


# --- the CPU mode ---------------------------------------------------------------------


@dataclass(frozen=True)
class CpuMode:
    """What mode the CPU is in: ``name`` is "real", "virtual-8086", "protected" or
    "long"; ``bits`` the code width (16, 32, 64; 32 or 16 in long mode means
    compatibility mode); ``paging_mode`` one of PAGING_MODES."""

    name: str
    cpl: int
    paging: bool
    pae: bool
    long: bool
    bits: int
    paging_mode: str = "none"

    def __str__(self) -> str:
        if self.name == "real":
            return "real mode (16-bit), CPL 0, paging off"
        what = f"{self.name} mode"
        if self.long:
            what += " (64-bit)" if self.bits == 64 else f" (compatibility, {self.bits}-bit code)"
        elif self.name == "protected":
            what += f" ({self.bits}-bit code)"
        paging = f"paging on ({self.paging_mode})" if self.paging else "paging off"
        return f"{what}, CPL {self.cpl}, {paging}"


def cpu_mode(sregs: Sregs, rflags: int = 0) -> CpuMode:
    """Name the CPU mode from CR0.PE/PG, CR4.PAE, EFER.LMA and CS (plus RFLAGS.VM if given).

    CPL is SS.DPL (SDM 5.5: SS.DPL always equals CPL; KVM reports it there on
    Intel and AMD alike); it is 0 in real mode and 3 in virtual-8086 mode.
    """
    pe, long = bool(sregs.cr0 & CR0_PE), bool(sregs.efer & EFER_LMA)
    pmode = paging_mode(sregs)
    paging, pae = pmode != "none", bool(sregs.cr4 & CR4_PAE)
    if not pe:
        return CpuMode("real", 0, False, pae, False, 16, "none")
    if long:
        bits = 64 if sregs.cs.l else 32 if sregs.cs.db else 16
        return CpuMode("long", sregs.ss.dpl & 3, paging, pae, True, bits, pmode)
    if rflags & RFLAGS_VM:
        return CpuMode("virtual-8086", 3, paging, pae, False, 16, pmode)
    return CpuMode("protected", sregs.ss.dpl & 3, paging, pae, False, 32 if sregs.cs.db else 16, pmode)


# --- the report -----------------------------------------------------------------------

_CR0 = ((0, "PE"), (1, "MP"), (2, "EM"), (3, "TS"), (4, "ET"), (5, "NE"), (16, "WP"), (18, "AM"),
        (29, "NW"), (30, "CD"), (31, "PG"))
_CR4 = ((0, "VME"), (1, "PVI"), (2, "TSD"), (3, "DE"), (4, "PSE"), (5, "PAE"), (6, "MCE"), (7, "PGE"),
        (8, "PCE"), (9, "OSFXSR"), (10, "OSXMMEXCPT"), (11, "UMIP"), (12, "LA57"), (13, "VMXE"),
        (16, "FSGSBASE"), (17, "PCIDE"), (18, "OSXSAVE"), (20, "SMEP"), (21, "SMAP"), (22, "PKE"))
_EFER = ((0, "SCE"), (8, "LME"), (10, "LMA"), (11, "NXE"), (12, "SVME"), (14, "FFXSR"))
_RFLAGS = ((0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"), (10, "DF"),
           (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"), (20, "VIP"), (21, "ID"))
# Exception vectors 0-31 (SDM table 6-1), for the IDT listing.
EXCEPTIONS = ("#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "", "#TS", "#NP", "#SS",
              "#GP", "#PF", "", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP") + ("",) * 10
MAX_TABLE_LINES = 16


def _bits(value: int, names) -> str:
    return " ".join(n for bit, n in names if value >> bit & 1) or "-"


def _selector(sel: int) -> str:
    return f"{'LDT' if sel & 4 else 'GDT'}[{sel >> 3}] RPL{sel & 3}"


def segment_line(name: str, seg: Segment, *, real: bool = False, long_mode: bool = False) -> str:
    """One segment register, visible selector and hidden (cached) part, in words."""
    head = f"{name:>3} {seg.selector & 0xFFFF:04x}"
    if real:
        return f"{head}               base={seg.base:#07x} limit={seg.limit:#x}"
    if seg.unusable:
        null = " (null selector)" if not seg.selector & ~3 else ""
        return f"{head} {_selector(seg.selector):<14} unusable{null}"
    _, words = segment_type_name(seg.type, seg.s, l=seg.l, db=seg.db, long_mode=long_mode)
    return (f"{head} {_selector(seg.selector):<14} base={seg.base:#x} limit={seg.limit:#x} "
            f"{words}, DPL{seg.dpl & 3}{'' if seg.present else ', not present'}")


def _linear_ip(regs: Regs, sregs: Sregs, mode: CpuMode) -> int:
    if mode.bits == 64:
        return regs.rip & U64
    ip = regs.rip & (0xFFFF if mode.bits == 16 else U32)
    return (sregs.cs.base + ip) & U32


def _linear_sp(regs: Regs, sregs: Sregs, mode: CpuMode) -> tuple[int, int]:
    """(linear stack pointer, stack slot width in bytes)."""
    if mode.bits == 64:
        return regs.rsp & U64, 8
    if mode.name == "real" or mode.name == "virtual-8086" or not sregs.ss.db:
        return (sregs.ss.base + (regs.rsp & 0xFFFF)) & U32, 2
    return (sregs.ss.base + (regs.rsp & U32)) & U32, 4


def _section(title: str, body) -> str:
    try:
        text = body()
    except (TranslationError, GuestMemoryError) as e:       # hostile state must not break the report
        text = f"  (cannot read: {e})"
    return f"== {title} ==\n{text}"


def _walk_text(lin: LinearMemory, what: str, linear: int) -> str:
    try:
        w = translate(lin.mem.read_u64, lin.sregs, linear & lin.mask)
    except TranslationError as e:
        steps = [f"    {lv}" for lv in e.levels]
        return "\n".join([f"  {what} linear {linear:#x}:"] + steps + [f"    !! {e}"])
    ram = "" if lin.mem.contains(w.phys) else "  (not RAM: MMIO or nothing)"
    if w.mode == "none":
        return f"  {what} linear {linear:#x}: paging off, physical {w.phys:#x}{ram}"
    return "\n".join([f"  {what} linear {linear:#x}:"] + [f"    {line}" for line in str(w).splitlines()]) + ram


def _gdt_text(mem, sregs: Sregs, mode: CpuMode) -> str:
    head = f"  GDTR base={sregs.gdt.base:#x} limit={sregs.gdt.limit:#x}"
    if mode.name == "real":
        return head + " (not used in real mode)"
    entries = [e for e in read_gdt(mem, sregs) if e.descriptor is None or e.descriptor.kind != "null"]
    lines = [head + f": {len(entries)} non-null entries"]
    for e in entries[:MAX_TABLE_LINES]:
        lines.append(f"  [{e.index:>4}] sel {e.selector:#06x}  {e.descriptor if e.descriptor else '!! ' + e.error}")
    if len(entries) > MAX_TABLE_LINES:
        lines.append(f"  ... {len(entries) - MAX_TABLE_LINES} more")
    return "\n".join(lines)


def _idt_text(mem, sregs: Sregs, mode: CpuMode) -> str:
    real = mode.name == "real"
    head = f"  IDTR base={sregs.idt.base:#x} limit={sregs.idt.limit:#x}"
    entries = read_idt(mem, sregs)
    if not entries:
        return head + ": no complete entry (any exception or interrupt triple-faults)"
    shown = [e for e in entries if e.descriptor is None or
             (e.descriptor.raw != 0 if real else e.descriptor.kind != "null")]
    lines = [head + f": {len(entries)} vectors, {len(shown)} set"]
    for e in shown[:MAX_TABLE_LINES]:
        name = EXCEPTIONS[e.index] if e.index < 32 else ""
        lines.append(f"  [{e.index:>3}] {name:<4} {e.descriptor if e.descriptor else '!! ' + e.error}")
    if len(shown) > MAX_TABLE_LINES:
        lines.append(f"  ... {len(shown) - MAX_TABLE_LINES} more")
    return "\n".join(lines)


def _stack_text(lin: LinearMemory, sp: int, width: int, count: int = 4) -> str:
    data = lin.read(sp, width * count)
    words = [int.from_bytes(data[i:i + width], "little") for i in range(0, len(data), width)]
    return "\n".join(f"  {(sp + i * width) & lin.mask:#x}: {w:#0{2 * width + 2}x}" for i, w in enumerate(words))


def format_report(regs: Regs, sregs: Sregs, mem, rip_code: str | None = None) -> str:
    """A readable report of one vCPU: mode, registers, segments, GDT and IDT, the page
    walks of RIP and RSP, the stack and the code at RIP (``rip_code`` if given, else
    the raw bytes there). Never raises for any register or memory contents."""
    mode = cpu_mode(sregs, regs.rflags)
    lin = LinearMemory(mem, sregs)
    ip, (sp, width) = _linear_ip(regs, sregs, mode), _linear_sp(regs, sregs, mode)
    real = mode.name == "real"
    iopl = regs.rflags >> 12 & 3

    def registers():
        return "\n".join([
            "\n".join("  " + line for line in regs.dump().splitlines()),
            f"  rflags: {_bits(regs.rflags, _RFLAGS)} IOPL={iopl}",
            f"  cr0={sregs.cr0:#x} [{_bits(sregs.cr0, _CR0)}]  cr2={sregs.cr2:#x}  cr3={sregs.cr3:#x}",
            f"  cr4={sregs.cr4:#x} [{_bits(sregs.cr4, _CR4)}]  cr8={sregs.cr8:#x}",
            f"  efer={sregs.efer:#x} [{_bits(sregs.efer, _EFER)}]  apic_base={sregs.apic_base:#x}"])

    def segments():
        return "\n".join("  " + segment_line(n, getattr(sregs, n), real=real and n not in ("tr", "ldt"),
                                              long_mode=mode.long) for n in Sregs.SEGMENTS)

    def code():
        if rip_code is not None:
            return rip_code
        return f"  {ip:#x}: {lin.read(ip, 16).hex(' ')}"

    sections = [
        f"== mode ==\n  {mode}",
        _section("registers", registers),
        _section("segments (selector, descriptor slot, hidden part)", segments),
        _section("GDT", lambda: _gdt_text(mem, sregs, mode)),
        _section("IDT" if not real else "IVT (real-mode IDT)", lambda: _idt_text(mem, sregs, mode)),
        _section("page walks", lambda: _walk_text(lin, "RIP", ip) + "\n" + _walk_text(lin, "RSP", sp)),
        _section(f"stack at {sp:#x}", lambda: _stack_text(lin, sp, width)),
        _section(f"code at {ip:#x}", code),
    ]
    return "\n".join(sections)


def code_at(regs: Regs, sregs: Sregs, mem, count: int = 6) -> str:
    """Up to ``count`` instructions at RIP, read through the page tables (across page
    boundaries) and disassembled in the current mode (``kvmpy.disasm``, capstone).
    Raises TranslationError when RIP itself is unmapped or not RAM."""
    from ..disasm import disassemble          # capstone, imported when first needed
    mode = cpu_mode(sregs, regs.rflags)
    lin = LinearMemory(mem, sregs)
    code = _readable_prefix(lin, _linear_ip(regs, sregs, mode), 16 * count)
    ip = regs.rip if mode.bits == 64 else regs.rip & (0xFFFF if mode.bits == 16 else U32)
    return disassemble(code, ip, mode.bits, count)


def report(regs: Regs, sregs: Sregs, mem, *, title: str | None = None, count: int = 6) -> str:
    """format_report() with the code at RIP disassembled: what ``--inspect`` prints when a
    run stops, and what ``Machine.inspect()`` returns. Never raises for guest state."""
    try:
        rip_code = "\n".join("  " + line for line in code_at(regs, sregs, mem, count).splitlines())
    except TranslationError:
        rip_code = None                        # format_report says why it cannot read there
    text = format_report(regs, sregs, mem, rip_code=rip_code)
    return f"=== {title} ===\n{text}" if title else text


def _readable_prefix(lin: LinearMemory, addr: int, n: int) -> bytes:
    """As many of ``n`` bytes at ``addr`` as are readable (code may end at an unmapped page)."""
    out = b""
    while len(out) < n:
        chunk = min(n - len(out), PAGE - ((addr + len(out)) & (PAGE - 1)))
        try:
            out += lin.read(addr + len(out), chunk)
        except TranslationError:
            if not out:
                raise
            break
    return out


__all__ = ["TranslationError", "PAGING_MODES", "Level", "Walk", "paging_mode", "walk", "translate",
           "entry_flags", "LinearMemory", "read_linear", "Descriptor", "decode_descriptor",
           "segment_type_name", "TableEntry", "read_gdt", "read_idt", "CpuMode", "cpu_mode",
           "segment_line", "format_report", "code_at", "report"]
