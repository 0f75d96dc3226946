"""CPU state at entry for real, protected and long mode, checked against the tables it writes."""
import struct

import pytest
from hypothesis import given, strategies as st

from kvmpy.kvm.memory import GuestMemory
from kvmpy.x86 import gdt, layout, modes, paging
from kvmpy.kvm.regs import Sregs

GiB, MiB = layout.GiB, layout.MiB
CR0_PE, CR0_PG, CR4_PAE = 1 << 0, 1 << 31, 1 << 5          # SDM 2.5, written out again here
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
IOPL_MASK = 3 << 12
DATA_SEGS = ("ds", "es", "fs", "gs", "ss")


def dirty_sregs() -> Sregs:
    """A vCPU state left over from something else (paging, long mode, odd CR3)."""
    s = Sregs()
    s.cr0, s.cr4, s.efer, s.cr3 = CR0_PE | CR0_PG, CR4_PAE, EFER_LME | EFER_LMA, 0xDEAD000
    return s


def applied(setup: modes.CpuSetup) -> GuestMemory:
    mem = GuestMemory.anonymous(MiB)
    for gpa, blob in setup.writes:
        mem.write(gpa, blob)
    return mem


def descriptor_fields(raw: bytes) -> dict:
    """Decode an 8-byte descriptor (SDM fig. 3-8) into hidden-state fields."""
    lo, hi = struct.unpack("<II", raw)
    limit = (lo & 0xFFFF) | (hi & 0xF_0000)
    g = (hi >> 23) & 1
    return {"base": (lo >> 16) | (hi & 0xFF) << 16 | (hi & 0xFF00_0000),
            "limit": (limit << 12 | 0xFFF) if g else limit,
            "type": (hi >> 8) & 0xF, "s": (hi >> 12) & 1, "dpl": (hi >> 13) & 3,
            "present": (hi >> 15) & 1, "l": (hi >> 21) & 1, "db": (hi >> 22) & 1, "g": g}


def assert_segments_match_gdt(s: Sregs, mem: GuestMemory) -> None:
    """Every loaded selector, re-read from the GDT in guest memory, gives the same hidden state."""
    table = mem.read(s.gdt.base, s.gdt.limit + 1)
    for name in ("cs",) + DATA_SEGS + ("tr",):
        seg = getattr(s, name)
        off = seg.selector & ~7
        assert off and off + 8 <= len(table), name
        got = descriptor_fields(table[off:off + 8])
        want = {k: getattr(seg, k) for k in got}
        assert got == want, name


# --- real mode --------------------------------------------------------------------

@given(entry=st.integers(0, MiB - 1))
def test_real_mode_entry_splits_into_cs_base_and_ip(entry):
    """Any entry below 1 MiB becomes CS.base + IP with IP < 64 KiB and CS.base = CS.selector * 16."""
    setup = modes.setup("real", entry, dirty_sregs(), 2 * MiB)
    cs, ip = setup.sregs.cs, setup.regs.rip
    assert cs.base + ip == entry
    assert 0 <= ip <= 0xFFFF
    assert cs.base == cs.selector << 4
    for name in DATA_SEGS:
        seg = getattr(setup.sregs, name)
        assert (seg.base, seg.selector, seg.limit) == (cs.base, cs.selector, 0xFFFF), name


@pytest.mark.parametrize("entry,cs_base,ip", [
    (0x7C00, 0, 0x7C00), (0xFFFF, 0, 0xFFFF), (0x10000, 0x10000, 0), (0x12345, 0x10000, 0x2345),
    (0xFFFFF, 0xF0000, 0xFFFF),
])
def test_real_mode_entry_known_splits(entry, cs_base, ip):
    """Entries below 64 KiB keep CS=0; above it CS is the 64 KiB-aligned segment holding the entry."""
    setup = modes.setup("real", entry, Sregs(), 2 * MiB)
    assert (setup.sregs.cs.base, setup.regs.rip) == (cs_base, ip)
    assert setup.regs.rflags & 2, "RFLAGS bit 1 is always set"


def test_real_mode_clears_protection_paging_and_long_mode():
    """Real mode turns off CR0.PE, CR0.PG, EFER.LME/LMA; it is 16-bit and writes no tables."""
    setup = modes.setup("real", 0x7C00, dirty_sregs(), 2 * MiB)
    s = setup.sregs
    assert not s.cr0 & (CR0_PE | CR0_PG)
    assert not s.efer & (EFER_LME | EFER_LMA)
    assert (s.cs.db, s.cs.l) == (0, 0)
    assert setup.writes == []
    assert modes.describe(s) == "real"
    assert modes.code_bits(s) == 16


@pytest.mark.parametrize("entry", [MiB, MiB + 0x7C00, 1 << 32, -1])
def test_real_mode_rejects_entry_outside_first_mib(entry):
    """A real-mode entry at or above 1 MiB (or negative) is a ValueError."""
    with pytest.raises(ValueError, match="1 MiB"):
        modes.setup("real", entry, Sregs(), 2 * MiB)


# --- protected mode ---------------------------------------------------------------

def test_protected_mode_is_flat_32_bit_without_paging():
    """CR0.PE set, CR0.PG clear, no long mode, CS = SEL_CODE32 with D/B=1, data = SEL_DATA."""
    setup = modes.setup("protected", layout.KERNEL_START, dirty_sregs(), 64 * MiB)
    s = setup.sregs
    assert s.cr0 & CR0_PE and not s.cr0 & CR0_PG
    assert not s.efer & (EFER_LME | EFER_LMA)
    assert s.cs.selector == layout.SEL_CODE32
    assert (s.cs.db, s.cs.l, s.cs.dpl, s.cs.base, s.cs.limit) == (1, 0, 0, 0, 0xFFFF_FFFF)
    for name in DATA_SEGS:
        assert getattr(s, name).selector == layout.SEL_DATA, name
    assert setup.regs.rip == layout.KERNEL_START
    assert modes.code_bits(s) == 32
    d = modes.describe(s)
    assert d.startswith("protected") and "CPL 0" in d and "paging off" in d


def test_protected_mode_segments_match_written_gdt():
    """The GDT written to memory re-decodes to the segment state handed to KVM."""
    setup = modes.setup("protected", layout.KERNEL_START, Sregs(), 64 * MiB)
    with applied(setup) as mem:
        assert setup.sregs.gdt.base == layout.BOOT_GDT
        assert_segments_match_gdt(setup.sregs, mem)


def test_a_boot_protocol_can_fix_control_registers():
    """control= overrides the mode's CR0/CR4 (multiboot: CR0 = PE|ET, CR4 = 0); anything but a
    control register is refused."""
    reset = Sregs()
    reset.cr0 = 0x6000_0010                               # CD | NW | ET: the value at power-on
    setup = modes.setup("protected", MiB, reset, 64 * MiB, control=(("cr0", 0x11), ("cr4", 0)))
    assert (setup.sregs.cr0, setup.sregs.cr4) == (0x11, 0)
    assert modes.setup("protected", MiB, reset, 64 * MiB).sregs.cr0 == 0x6000_0033   # kvmpy's own
    with pytest.raises(ValueError, match="not one of the control registers"):
        modes.setup("protected", MiB, reset, 64 * MiB, control=(("rip", 0),))


# --- long mode --------------------------------------------------------------------

@pytest.mark.parametrize("user", [False, True])
def test_long_mode_enables_paging_pae_and_lma(user):
    """EFER.LME|LMA, CR0.PE|PG, CR4.PAE, CR3 = layout.PML4 and a 64-bit CS (L=1, D/B=0)."""
    setup = modes.setup("long", layout.KERNEL_START, Sregs(), 64 * MiB, user=user)
    s = setup.sregs
    assert s.efer & EFER_LME and s.efer & EFER_LMA
    assert s.cr0 & CR0_PE and s.cr0 & CR0_PG
    assert s.cr4 & CR4_PAE
    assert s.cr3 == layout.PML4
    assert (s.cs.l, s.cs.db) == (1, 0)
    assert s.cs.selector == (layout.SEL_USER_CODE64 if user else layout.SEL_CODE64)
    assert setup.regs.rip == layout.KERNEL_START
    assert modes.code_bits(s) == 64


def test_long_mode_kernel_is_cpl0_without_iopl():
    """Ring-0 long mode: CPL 0 in CS and SS, IOPL 0, describe() says long at CPL 0."""
    setup = modes.setup("long", layout.KERNEL_START, Sregs(), 64 * MiB)
    s = setup.sregs
    assert s.cs.selector & 3 == 0 and s.cs.dpl == 0 and s.ss.dpl == 0
    assert setup.regs.rflags & IOPL_MASK == 0
    assert modes.describe(s) == "long, CPL 0"


def test_user_mode_runs_at_cpl3_with_iopl3():
    """User mode: CS and SS have RPL and DPL 3, RFLAGS.IOPL = 3, describe() says CPL 3."""
    setup = modes.setup("long", layout.KERNEL_START, Sregs(), 64 * MiB, user=True)
    s = setup.sregs
    assert s.cs.selector & 3 == 3 and s.cs.dpl == 3
    assert s.ss.selector & 3 == 3 and s.ss.dpl == 3
    for name in DATA_SEGS:
        assert getattr(s, name).selector == layout.SEL_USER_DATA, name
    assert setup.regs.rflags & IOPL_MASK == IOPL_MASK
    assert setup.regs.rflags & 2
    assert modes.describe(s) == "long, CPL 3"


@pytest.mark.parametrize("mode", ["real", "protected"])
def test_user_outside_long_mode_is_refused(mode):
    """Ring 3 is only offered in long mode; asking for it elsewhere is a ValueError."""
    with pytest.raises(ValueError, match="long"):
        modes.setup(mode, 0x7C00 if mode == "real" else MiB, Sregs(), 64 * MiB, user=True)


def test_unknown_mode_is_refused_naming_the_choices():
    """An unknown mode name raises ValueError listing the valid modes."""
    with pytest.raises(ValueError) as e:
        modes.setup("vm86", 0, Sregs(), 64 * MiB)
    for m in modes.MODES:
        assert m in str(e.value)


@pytest.mark.parametrize("user", [False, True])
def test_long_mode_tables_in_memory_map_entry_and_match_segments(user):
    """Applied to memory, the writes give a GDT matching the segments, a TSS, and page tables mapping RIP."""
    mem_end = 64 * MiB
    setup = modes.setup("long", layout.KERNEL_START, Sregs(), mem_end, user=user)
    s = setup.sregs
    with applied(setup) as mem:
        assert_segments_match_gdt(s, mem)
        gpa, walk = paging.translate(mem.read_u64, s.cr3, setup.regs.rip)
        assert gpa == layout.KERNEL_START
        assert all(bool(e & paging.PTE_US) == user for _, _, e in walk)
        assert s.tr.base == layout.BOOT_TSS and s.tr.s == 0
        assert mem.read(s.tr.base, s.tr.limit + 1) == gdt.boot_tss()
        rsp0 = mem.read_u64(s.tr.base + 4)
        assert mem.contains(rsp0 - 8, 8), "the ring-0 stack is in RAM"


def test_compatibility_mode_is_named_and_32_bit():
    """LMA with a CS that has L=0, D/B=1 is 32-bit compatibility mode."""
    s, _ = modes.long_mode(Sregs(), 64 * MiB)
    s.cs = gdt.segment_for(layout.SEL_CODE32)
    assert modes.code_bits(s) == 32
    assert "compatibility" in modes.describe(s)


def test_protected_mode_with_paging_is_described():
    """describe() reports paging on when CR0.PG is set outside long mode."""
    s, _ = modes.protected_mode(Sregs())
    s.cr0 |= CR0_PG
    assert "paging on" in modes.describe(s)


@pytest.mark.parametrize("mode,user", [("real", False), ("protected", False), ("long", False), ("long", True)])
def test_setup_does_not_mutate_the_input_sregs(mode, user):
    """setup() returns a new Sregs; the caller's state (segments included) is unchanged."""
    before = dirty_sregs()
    snapshot = before.copy()
    after = modes.setup(mode, 0x7C00, before, 64 * MiB, user=user).sregs
    assert before == snapshot
    assert after is not before and after.cs is not before.cs


# --- where the tables go ------------------------------------------------------------

@pytest.mark.parametrize("mode,user,mem_end", [
    ("protected", False, 64 * MiB), ("long", False, 64 * MiB), ("long", True, 64 * MiB),
    ("long", False, layout.PD_MAX * GiB), ("long", True, 7 * GiB + 1),
])
def test_table_writes_stay_in_first_mib_and_do_not_collide(mode, user, mem_end):
    """Table writes lie in the first MiB, miss page 0, 0x7C00 and the RSP0 page, and never overlap."""
    writes = modes.setup(mode, MiB, Sregs(), mem_end, user=user).writes
    assert writes
    spans = sorted((gpa, gpa + len(blob)) for gpa, blob in writes)
    keep_out = [(0, 0x1000),                                                      # null page
                (layout.REAL_MODE_LOAD, layout.REAL_MODE_LOAD + 512),             # boot sector
                (layout.RING0_STACK_TOP - 0x1000, layout.RING0_STACK_TOP)]        # RSP0 stack
    for start, end in spans:
        assert 0 <= start < end <= MiB, hex(start)
        for ks, ke in keep_out:
            assert end <= ks or start >= ke, (hex(start), hex(ks))
    for (_, a_end), (b_start, _) in zip(spans, spans[1:]):
        assert a_end <= b_start, hex(b_start)
