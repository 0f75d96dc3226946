"""Seeing inside a stopped guest: the CPU mode and a readable report of a vCPU.

Pure functions over guest memory (a ``GuestMemory`` or a ``read_u64(gpa)``) and the
register dataclasses, so they work on a live vCPU's state, a saved one, or tables a
test wrote by hand. Everything a guest controls (CR3, table entries, GDTR/IDTR) is
treated as hostile: a walk either succeeds or raises :class:`TranslationError`, and
the table readers and the report never raise for any register or memory contents.
Page walks live in pagewalk.py, descriptor tables in descriptors.py; their names are
re-exported here so ``kvmpy.x86.inspect`` is the one place to look.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import GuestMemoryError
from ..kvm.regs import CR0_PE, CR4_PAE, EFER_LMA, Regs, Segment, Sregs

from .descriptors import Descriptor, TableEntry, decode_descriptor, read_gdt, read_idt, segment_type_name
from .pagewalk import PAGE, PAGING_MODES, RFLAGS_VM, Level, LinearMemory, TranslationError, Walk, entry_flags, paging_mode, read_linear, translate, walk

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

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


RESET_CS_SELECTOR, RESET_CS_BASE, RESET_RIP = 0xF000, 0xFFFF_0000, 0xFFF0


def at_reset_vector(regs: Regs, sregs: Sregs) -> bool:
    """True when the vCPU holds the state of INIT or power-on (SDM 10.1.1, APM 14.1.3):
    real mode, CS 0xf000 with base 0xffff0000, RIP 0xfff0. A vCPU reported as shut
    down in this state was reset by KVM before the report (kvm_amd does that)."""
    return (regs.rip == RESET_RIP and sregs.cs.selector == RESET_CS_SELECTOR
            and sregs.cs.base == RESET_CS_BASE and not sregs.cr0 & CR0_PE)


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
    boundaries) and disassembled in the current mode (``kvmpy.x86.disasm``, capstone).
    Raises TranslationError when RIP itself is unmapped or not RAM."""
    from .disasm import disassemble          # capstone, imported when first needed
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
