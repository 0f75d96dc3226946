"""The x86 register file as KVM exchanges it: ``struct kvm_regs`` and ``struct kvm_sregs``.

Plain dataclasses so set-up code can build CPU state without a vCPU and tests can
compare states. ``kvmpy.kvm`` converts them to and from the C structs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# Bits named as in the Intel SDM, vol. 3A, chapter 2.5 (control registers) and 2.2.1 (EFER).
CR0_PE, CR0_MP, CR0_EM, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = (
    1 << 0, 1 << 1, 1 << 2, 1 << 4, 1 << 5, 1 << 16, 1 << 18, 1 << 31)
CR4_PSE, CR4_PAE, CR4_PGE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 4, 1 << 5, 1 << 7, 1 << 9, 1 << 10
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11
RFLAGS_RESERVED1 = 1 << 1       # bit 1 always reads as 1
RFLAGS_TF, RFLAGS_IF = 1 << 8, 1 << 9
RFLAGS_IOPL3 = 3 << 12
# The TSC-deadline timer MSR (SDM vol. 3A, 11.5.4.1): KVM ignores a write to it unless the
# LAPIC timer is in deadline mode, so restoring a vCPU sets it again after the LAPIC.
MSR_IA32_TSC_DEADLINE = 0x6E0
# The machine-check banks (SDM vol. 3B, 16.3.2): bank i has CTL, STATUS, ADDR and MISC at
# IA32_MC0_CTL + 4 * i. KVM's MSR index list leaves them out; a vCPU set up with banks
# (Vcpu.setup_mce) saves them with its other MSRs, as QEMU does.
MSR_IA32_MC0_CTL = 0x400
MSR_IA32_MCG_CAP = 0x179
MCG_CAP_BANKS_MASK = 0xFF      # IA32_MCG_CAP bits 7:0: the number of banks


@dataclass
class Regs:
    """General-purpose registers, RIP and RFLAGS (``struct kvm_regs``)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = RFLAGS_RESERVED1

    def to_dict(self) -> dict:
        """Plain data (JSON-able); ``Regs(**d)`` is the way back."""
        return asdict(self)

    def dump(self) -> str:
        names = GPRS + ("rip", "rflags")
        cells = [f"{n:>6}={getattr(self, n):016x}" for n in names]
        return "\n".join("  ".join(cells[i:i + 4]) for i in range(0, len(cells), 4))


@dataclass
class Segment:
    """A segment register with its hidden part (``struct kvm_segment``)."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 (the kernel's name)
    g: int = 0
    avl: int = 0
    unusable: int = 0

    def __str__(self) -> str:
        return (f"sel={self.selector:04x} base={self.base:x} limit={self.limit:x} type={self.type:x} "
                f"p={self.present} dpl={self.dpl} db={self.db} s={self.s} l={self.l} g={self.g}")


@dataclass
class DTable:
    """A descriptor-table register, GDTR or IDTR (``struct kvm_dtable``)."""

    base: int = 0
    limit: int = 0xFFFF


def _seg() -> Segment:
    return Segment()


@dataclass
class Sregs:
    """Segment, control and descriptor-table registers (``struct kvm_sregs``)."""

    cs: Segment = field(default_factory=_seg)
    ds: Segment = field(default_factory=_seg)
    es: Segment = field(default_factory=_seg)
    fs: Segment = field(default_factory=_seg)
    gs: Segment = field(default_factory=_seg)
    ss: Segment = field(default_factory=_seg)
    tr: Segment = field(default_factory=_seg)
    ldt: Segment = field(default_factory=_seg)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, ...] = (0, 0, 0, 0)

    SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")

    def dump(self) -> str:
        lines = [f"{n:>4}: {getattr(self, n)}" for n in self.SEGMENTS]
        lines.append(f" gdt: base={self.gdt.base:x} limit={self.gdt.limit:x}   "
                     f"idt: base={self.idt.base:x} limit={self.idt.limit:x}")
        lines.append(f" cr0={self.cr0:x} cr2={self.cr2:x} cr3={self.cr3:x} cr4={self.cr4:x} "
                     f"efer={self.efer:x} apic_base={self.apic_base:x}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain data (JSON-able): segments and tables as dicts, the bitmap as a list."""
        d = asdict(self)
        d["interrupt_bitmap"] = list(self.interrupt_bitmap)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Sregs":
        """The inverse of ``to_dict``; a missing or unknown field raises (KeyError, TypeError)."""
        s = cls(**{n: Segment(**d[n]) for n in cls.SEGMENTS})
        s.gdt, s.idt = DTable(**d["gdt"]), DTable(**d["idt"])
        for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            setattr(s, n, d[n])
        s.interrupt_bitmap = tuple(d["interrupt_bitmap"])
        return s

    def copy(self) -> "Sregs":
        return replace(self, **{n: replace(getattr(self, n)) for n in self.SEGMENTS + ("gdt", "idt")})


SEGMENT_FIELDS = tuple(f.name for f in fields(Segment))
REGS_FIELDS = tuple(f.name for f in fields(Regs))


@dataclass(frozen=True)
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2``."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
