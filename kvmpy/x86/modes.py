"""CPU modes at entry: real, 32-bit protected, and 64-bit long mode (optionally ring 3).

Each function takes the vCPU's current ``Sregs`` and returns a new one, plus the
(gpa, bytes) writes of the tables that state refers to (GDT, TSS, page tables).
Nothing here touches a vCPU or guest memory: the Machine applies the result.
See Intel SDM vol. 3A, chapter 9 (processor management and initialization).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import gdt, layout, paging
from .boottables import DEFAULT, BootTables
from ..kvm.regs import CR0_ET, CR0_MP, CR0_NE, CR0_PE, CR0_PG, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_IOPL3, RFLAGS_RESERVED1, DTable, Regs, Segment, Sregs

#: The CPU modes a vCPU can start in; the one list (loader/ and cli/ import it).
MODES = ("real", "protected", "long")
#: The registers a boot protocol may fix at entry besides the mode's (``setup(control=...)``).
CONTROL_REGISTERS = ("cr0", "cr3", "cr4", "efer")


@dataclass
class CpuSetup:
    """Everything needed to start a vCPU: register state and the memory it refers to."""

    regs: Regs
    sregs: Sregs
    writes: list[tuple[int, bytes]] = field(default_factory=list)


def real_mode(sregs: Sregs, cs_base: int = 0) -> Sregs:
    """Real mode with every segment based at ``cs_base`` (a multiple of 16 below 1 MiB)."""
    s = sregs.copy()
    sel = cs_base >> 4
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, Segment(base=cs_base, limit=0xFFFF, selector=sel, type=gdt.TYPE_DATA_RW))
    s.cs = Segment(base=cs_base, limit=0xFFFF, selector=sel, type=gdt.TYPE_CODE_RX)
    s.cr0 &= ~(CR0_PE | CR0_PG)
    s.efer &= ~(EFER_LME | EFER_LMA)
    return s


def _tables(t: BootTables) -> list[tuple[int, bytes]]:
    return [(t.gdt, gdt.boot_gdt(t.tss)), (t.tss, gdt.boot_tss(t.stack_top))]


def _load_gdt(s: Sregs, code: int, data: int, t: BootTables) -> None:
    s.gdt = DTable(base=t.gdt, limit=len(gdt.boot_gdt()) - 1)
    s.idt = DTable(base=0, limit=0)       # no IDT: any exception is a triple fault the VMM reports
    s.cs = gdt.segment_for(code)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, gdt.segment_for(data))
    s.tr = gdt.segment_for(layout.SEL_TSS, t.tss)
    s.ldt = Segment(selector=0, type=2, present=1, s=0, limit=0xFFFF)   # an empty LDT


def protected_mode(sregs: Sregs, tables: BootTables = DEFAULT) -> tuple[Sregs, list[tuple[int, bytes]]]:
    """Flat 32-bit protected mode, paging off; the GDT and TSS where ``tables`` says."""
    s = sregs.copy()
    _load_gdt(s, layout.SEL_CODE32, layout.SEL_DATA, tables)
    s.cr0 = (s.cr0 | CR0_PE | CR0_ET | CR0_NE | CR0_MP) & ~CR0_PG
    s.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT
    s.efer &= ~(EFER_LME | EFER_LMA)
    return s, _tables(tables)


def long_mode(sregs: Sregs, mem_end: int, user: bool = False,
              tables: BootTables = DEFAULT) -> tuple[Sregs, list[tuple[int, bytes]]]:
    """64-bit long mode with identity-mapped 2 MiB pages; ``user`` starts at CPL 3."""
    s = sregs.copy()
    if user:
        _load_gdt(s, layout.SEL_USER_CODE64, layout.SEL_USER_DATA, tables)
    else:
        _load_gdt(s, layout.SEL_CODE64, layout.SEL_DATA, tables)
    s.cr3 = tables.pml4
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT     # SSE on: compiled C uses it
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
    s.efer |= EFER_LME | EFER_LMA
    return s, _tables(tables) + paging.identity_map_tables(
        mem_end, user=user, pml4=tables.pml4, pdpt=tables.pdpt, pd_base=tables.pd_base)


def real_mode_entry(entry: int) -> tuple[int, int]:
    """Split a linear entry address below 1 MiB into (cs_base, ip)."""
    if not 0 <= entry < layout.MiB:
        raise ValueError(f"real-mode entry {entry:#x} is not below 1 MiB")
    cs_base = 0 if entry <= 0xFFFF else entry & 0xF0000
    return cs_base, entry - cs_base


def setup(mode: str, entry: int, sregs: Sregs, mem_end: int, user: bool = False,
          control=(), tables: BootTables | None = None) -> CpuSetup:
    """CPU state to start executing at ``entry`` in ``mode``, with the GDT, TSS and page
    tables where ``tables`` says (``boottables.place``; by default their homes in layout.py).

    ``control`` is ``(name, value)`` pairs from :data:`CONTROL_REGISTERS` a boot protocol
    fixes over the mode's defaults: multiboot's kernel gets CR0 = PE|ET and CR4 = 0, what
    QEMU's option ROM leaves, not the MP, NE and SSE bits kvmpy's own guests get.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if user and mode != "long":
        raise ValueError("starting in ring 3 is supported for long mode only")
    result = _setup(mode, entry, sregs, mem_end, user, tables or DEFAULT)
    for name, value in control:
        if name not in CONTROL_REGISTERS:
            raise ValueError(f"{name!r} is not one of the control registers {CONTROL_REGISTERS}")
        setattr(result.sregs, name, value)
    return result


def _setup(mode: str, entry: int, sregs: Sregs, mem_end: int, user: bool, tables: BootTables) -> CpuSetup:
    if mode == "real":
        cs_base, ip = real_mode_entry(entry)
        sp = layout.REAL_MODE_LOAD if cs_base == 0 else 0xFFFE
        return CpuSetup(Regs(rip=ip, rsp=sp, rflags=RFLAGS_RESERVED1), real_mode(sregs, cs_base))
    if mode == "protected":
        s, writes = protected_mode(sregs, tables)
        return CpuSetup(Regs(rip=entry, rflags=RFLAGS_RESERVED1), s, writes)
    s, writes = long_mode(sregs, mem_end, user=user, tables=tables)
    rflags = RFLAGS_RESERVED1 | (RFLAGS_IOPL3 if user else 0)
    return CpuSetup(Regs(rip=entry, rflags=rflags), s, writes)


def describe(sregs: Sregs) -> str:
    """Name the CPU mode: 'real', 'protected, CPL n, paging on|off', 'long, CPL n'."""
    if not sregs.cr0 & CR0_PE:
        return "real"
    cpl = sregs.ss.dpl
    if sregs.efer & EFER_LMA:
        return f"long{'' if sregs.cs.l else ' (compatibility)'}, CPL {cpl}"
    return f"protected, CPL {cpl}, paging {'on' if sregs.cr0 & CR0_PG else 'off'}"


def code_bits(sregs: Sregs) -> int:
    """Width of the code segment in bits (16, 32 or 64), for disassembly."""
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return 64
    if sregs.cr0 & CR0_PE and sregs.cs.db:
        return 32
    return 16
