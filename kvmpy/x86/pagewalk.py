"""Page walks over hostile guest memory: every x86 paging mode, level by level.

``walk()`` translates a linear address the way the CPU would (Intel SDM vol. 3A,
chapter 4: 4.3 32-bit, 4.4 PAE, 4.5 4/5-level paging) and returns each level's entry
with its flags; a walk either succeeds or raises :class:`TranslationError`.
``LinearMemory`` reads guest memory through the page tables, across pages.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import GuestMemoryError, KvmpyError
from ..kvm.memory import PAGE_SIZE
from ..kvm.regs import CR0_PG, CR4_PAE, CR4_PSE, EFER_LMA, Sregs

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
PAGE = PAGE_SIZE
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
