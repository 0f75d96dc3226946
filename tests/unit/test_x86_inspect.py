"""Introspection: page walks in every paging mode, descriptor decoding, GDT/IDT readers,
the CPU mode and the text report (kvmpy.x86.inspect; Intel SDM vol. 3A ch. 3-6)."""
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.errors import GuestMemoryError, KvmpyError
from kvmpy.kvm.memory import GuestMemory
from kvmpy.x86 import gdt, layout, modes, paging
from kvmpy.x86.inspect import (PAGING_MODES, TranslationError, cpu_mode, decode_descriptor, format_report,
                               read_gdt, read_idt, read_linear, report, translate, walk)
from kvmpy.kvm.regs import (CR0_PE, CR0_PG, CR4_PAE, CR4_PSE, EFER_LMA, EFER_LME, DTable, Regs,
                            Segment, Sregs)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# Entry bits written out again from SDM tables 4-4..4-20, independent of the module.
P, RW, US, PWT, PCD, A, D, PS, G = (1 << b for b in (0, 1, 2, 3, 4, 5, 6, 7, 8))
NX = 1 << 63
RAM = 8 * MiB


@pytest.fixture
def mem():
    with GuestMemory.anonymous(RAM) as m:
        yield m


def u32(mem, gpa, value):
    mem.write(gpa, struct.pack("<I", value))


# --- 4-level and 5-level paging -------------------------------------------------------

def test_4level_walk_through_4k_page_decodes_every_level(mem):
    """PML4 -> PDPT -> PD -> PT: each level's index, entry address, raw entry, flags and target."""
    pml4, pdpt, pd, pt = 0x10000, 0x11000, 0x12000, 0x13000
    mem.write_u64(pml4 + 8 * 1, pdpt | P | RW | US)
    mem.write_u64(pdpt + 8 * 2, pd | P | RW | US | A)
    mem.write_u64(pd + 8 * 3, pt | P | RW | PWT | PCD)
    mem.write_u64(pt + 8 * 4, 0x345000 | P | A | D | G | NX | PS)    # bit 7 of a PTE is PAT
    va = 1 << 39 | 2 << 30 | 3 << 21 | 4 << 12 | 0x567
    w = walk(mem.read_u64, pml4 | 0x18, va, "4-level")                # CR3 low bits (PWT/PCD/PCID) ignored
    assert w.phys == 0x345567 and w.page_size == 4 * KiB
    rows = [(lv.name, lv.index, lv.entry_addr, lv.target, lv.page_size) for lv in w.levels]
    assert rows == [("PML4", 1, pml4 + 8, pdpt, None), ("PDPT", 2, pdpt + 16, pd, None),
                    ("PD", 3, pd + 24, pt, None), ("PT", 4, pt + 32, 0x345000, 4 * KiB)]
    assert [lv.entry for lv in w.levels] == [pdpt | P | RW | US, pd | P | RW | US | A, pt | P | RW | PWT | PCD,
                                             0x345000 | P | A | D | G | NX | PS]
    assert w.levels[0].flags == ("P", "RW", "US")
    assert w.levels[2].flags == ("P", "RW", "PWT", "PCD")
    assert w.levels[3].flags == ("P", "A", "D", "PAT", "G", "NX")
    assert not w.writable and not w.user and not w.executable


def test_4level_2m_and_1g_pages_stop_early(mem):
    """PS in a PD entry maps 2 MiB, in a PDPT entry 1 GiB; the offset is the low 21 / 30 bits."""
    pml4, pdpt, pd = 0x10000, 0x11000, 0x12000
    mem.write_u64(pml4, pdpt | P | RW)
    mem.write_u64(pdpt, pd | P | RW)
    mem.write_u64(pd + 8 * 5, 0x4000_0000 | P | RW | PS | G | 1 << 12)   # bit 12: PAT of a large page
    mem.write_u64(pdpt + 8 * 3, 0x1_4000_0000 | P | PS)
    w = walk(mem.read_u64, pml4, 5 * 2 * MiB + 0x12345, "4-level")
    assert w.phys == 0x4001_2345 and w.page_size == 2 * MiB
    assert [lv.name for lv in w.levels] == ["PML4", "PDPT", "PD"]
    assert w.levels[-1].flags == ("P", "RW", "PS", "G", "PAT") and w.levels[-1].target == 0x4000_0000
    assert w.writable and w.executable
    w = walk(mem.read_u64, pml4, 3 * GiB + 0x1234_5678, "4-level")
    assert w.phys == 0x1_5234_5678 and w.page_size == GiB and len(w.levels) == 2


def test_5level_walk_adds_pml5(mem):
    """LA57: a PML5 indexed by bits 56:48 sits above the PML4."""
    pml5, pml4, pdpt, pd = 0x20000, 0x21000, 0x22000, 0x23000
    mem.write_u64(pml5 + 8 * 7, pml4 | P)
    mem.write_u64(pml4, pdpt | P)
    mem.write_u64(pdpt, pd | P)
    mem.write_u64(pd, 0x600000 | P | PS)
    w = walk(mem.read_u64, pml5, 7 << 48 | 0x1234, "5-level")
    assert [lv.name for lv in w.levels] == ["PML5", "PML4", "PDPT", "PD"] and w.phys == 0x601234


@pytest.mark.parametrize("mode,va", [("4-level", 1 << 47), ("4-level", 0xFFFF_0000_0000_0000),
                                     ("5-level", 1 << 56), ("4-level", 1 << 64), ("4-level", -1)])
def test_non_canonical_or_impossible_addresses_are_refused(mem, mode, va):
    """Linear addresses whose high bits do not copy the top index bit never reach the tables."""
    with pytest.raises(TranslationError) as e:
        walk(mem.read_u64, 0x10000, va, mode)
    assert e.value.reason in ("non-canonical", "bad-address") and e.value.levels == ()


def test_high_canonical_address_walks(mem):
    """0xffff8000_00000000 is canonical and indexes PML4 slot 256."""
    mem.write_u64(0x10000 + 8 * 256, 0x11000 | P)
    mem.write_u64(0x11000, 0x0 | P | PS)
    assert walk(mem.read_u64, 0x10000, 0xFFFF_8000_0000_0042, "4-level").phys == 0x42


@pytest.mark.parametrize("level", ["PML4", "PDPT", "PD", "PT"])
def test_non_present_entry_names_its_level_and_keeps_the_partial_walk(mem, level):
    """The walk stops at the first entry with P=0; the error lists the entries read so far."""
    tables = {"PML4": 0x10000, "PDPT": 0x11000, "PD": 0x12000, "PT": 0x13000}
    names = list(tables)
    for name, nxt in zip(names, names[1:] + [None]):
        if name == level:
            break
        mem.write_u64(tables[name], tables[nxt] | P | RW)
    mem.write_u64(tables[level], 0xDEAD_B000)                 # an address but no P bit
    with pytest.raises(TranslationError) as e:
        walk(mem.read_u64, tables["PML4"], 0x123, "4-level")
    err = e.value
    assert err.reason == "not-present" and f"{level} entry 0" in str(err)
    assert [lv.name for lv in err.levels] == names[:names.index(level) + 1]
    assert err.levels[-1].target is None and err.levels[-1].entry == 0xDEAD_B000


def test_table_outside_ram_is_an_outside_ram_error(mem):
    """CR3 or an entry pointing past RAM ends the walk with reason 'outside-ram', not GuestMemoryError."""
    with pytest.raises(TranslationError) as e:
        walk(mem.read_u64, 64 * GiB, 0, "4-level")
    assert e.value.reason == "outside-ram" and "PML4" in str(e.value)
    mem.write_u64(0x10000, (RAM + 0x1000) | P)
    with pytest.raises(TranslationError) as e:
        walk(mem.read_u64, 0x10000, 0, "4-level")
    assert e.value.reason == "outside-ram" and "PDPT" in str(e.value) and len(e.value.levels) == 1


def test_agrees_with_paging_translate_on_boot_tables(mem):
    """On the boot identity map, walk() and paging.translate() read the same entries."""
    for gpa, blob in paging.identity_map_tables(RAM):
        mem.write(gpa, blob)
    for va in (0, 0x7C00, MiB + 5, 3 * GiB + 17, 4 * GiB - 1):
        gpa, steps = paging.translate(mem.read_u64, layout.PML4, va)
        w = walk(mem.read_u64, layout.PML4, va, "4-level")
        assert w.phys == gpa == va
        assert [(lv.name, lv.entry_addr, lv.entry) for lv in w.levels] == steps


# --- PAE and 32-bit paging ------------------------------------------------------------

def test_pae_walk_4k_and_2m(mem):
    """PAE: a 4-entry PDPT at CR3 bits 31:5, then 512-entry PD and PT of 8-byte entries."""
    pdpt, pd, pt = 0x10020, 0x11000, 0x12000               # the PDPT only needs 32-byte alignment
    mem.write_u64(pdpt + 8 * 2, pd | P)
    mem.write_u64(pd + 8 * 1, pt | P | RW | US)
    mem.write_u64(pt + 8 * 3, 0x7000 | P | RW | US | NX)
    mem.write_u64(pd + 8 * 9, 0x40_0000 | P | PS)
    va = 2 << 30 | 1 << 21 | 3 << 12 | 0xABC
    w = walk(mem.read_u64, pdpt, va, "pae")
    assert [(lv.name, lv.index, lv.entry_addr) for lv in w.levels] == [
        ("PDPT", 2, pdpt + 16), ("PD", 1, pd + 8), ("PT", 3, pt + 24)]
    assert w.phys == 0x7ABC and w.page_size == 4 * KiB and "NX" in w.levels[-1].flags
    w = walk(mem.read_u64, pdpt, 2 << 30 | 9 << 21 | 0x1F_FFFF, "pae")
    assert w.phys == 0x5F_FFFF and w.page_size == 2 * MiB


def test_32bit_walk_4k_page(mem):
    """Non-PAE: 1024 4-byte entries per table, PD index bits 31:22, PT index 21:12."""
    pd, pt = 0x10000, 0x11000
    u32(mem, pd + 4 * 0x301, pt | P | RW | US)
    u32(mem, pt + 4 * 0x2A5, 0x0055_5000 | P | RW | D | A)
    va = 0x301 << 22 | 0x2A5 << 12 | 0x123
    w = walk(mem.read_u64, pd, va, "32-bit")
    assert [(lv.name, lv.index, lv.entry_addr, lv.entry) for lv in w.levels] == [
        ("PD", 0x301, pd + 4 * 0x301, pt | P | RW | US), ("PT", 0x2A5, pt + 4 * 0x2A5, 0x0055_5000 | P | RW | D | A)]
    assert w.phys == 0x0055_5123 and "NX" not in w.levels[-1].flags


def test_32bit_4m_page_needs_pse_and_takes_pse36_bits(mem):
    """With CR4.PSE a PD entry with PS maps 4 MiB (bits 20:13 give physical 39:32); without it PS is ignored."""
    pd = 0x10000
    u32(mem, pd + 4 * 2, 0x0040_0000 | 0x3 << 13 | P | RW | PS)
    w = walk(mem.read_u64, pd, 2 << 22 | 0x12345, "32-bit", pse=True)
    assert w.phys == 0x3_0041_2345 and w.page_size == 4 * MiB and w.levels[0].flags == ("P", "RW", "PS")
    u32(mem, 0x0040_6000 + 4 * 0x12, 0x0020_0000 | P)         # without PSE the entry points at a PT
    w = walk(mem.read_u64, pd, 2 << 22 | 0x12345, "32-bit", pse=False)
    assert w.phys == 0x0020_0345 and w.page_size == 4 * KiB and len(w.levels) == 2


def test_32bit_entry_in_the_last_bytes_of_ram_is_readable():
    """A 4-byte entry in the last 4 bytes of RAM is read (8-byte reads are aligned, never past the end)."""
    with GuestMemory.anonymous(64 * KiB) as m:
        u32(m, 0xF000 + 4 * 1023, 0x40_0000 | P | PS)
        assert walk(m.read_u64, 0xF000, 0xFFC0_0000 | 5, "32-bit").phys == 0x40_0005


@pytest.mark.parametrize("mode", ["32-bit", "pae", "none"])
def test_32bit_modes_refuse_addresses_above_4g(mem, mode):
    """Linear addresses in legacy paging modes are 32 bits."""
    with pytest.raises(TranslationError):
        walk(mem.read_u64, 0, 1 << 32, mode)


def test_paging_off_is_identity(mem):
    """Mode 'none': no tables, physical == linear."""
    w = walk(mem.read_u64, 0, 0x1234, "none")
    assert w.phys == 0x1234 and w.levels == () and "paging off" in str(w)


def test_translate_reads_mode_from_sregs(mem):
    """translate() picks 32-bit, PAE or 4-level paging from CR0.PG, CR4.PAE/PSE and EFER.LMA."""
    u32(mem, 0x10000, 0x40_0000 | P | PS)
    s = Sregs(cr0=CR0_PE | CR0_PG, cr3=0x10000, cr4=CR4_PSE)
    assert translate(mem.read_u64, s, 0x10).phys == 0x40_0010
    s.cr4 = CR4_PAE
    mem.write_u64(0x10000, 0x11000 | P)
    mem.write_u64(0x11000, 0x60_0000 | P | PS)
    assert translate(mem.read_u64, s, 0x10).mode == "pae"
    assert translate(mem.read_u64, s, 0x10).phys == 0x60_0010


# --- hostile page tables ---------------------------------------------------------------

class Recorder:
    """read_u64 that records every address asked for."""

    def __init__(self, mem):
        self.mem, self.asked = mem, []

    def __call__(self, gpa):
        self.asked.append(gpa)
        return self.mem.read_u64(gpa)


@given(tables=st.binary(min_size=0, max_size=64 * KiB), cr3=st.integers(0, (1 << 64) - 1),
       va=st.integers(0, (1 << 64) - 1), mode=st.sampled_from(PAGING_MODES), pse=st.booleans(),
       pointers=st.lists(st.tuples(st.integers(0, 64 * KiB // 8 - 1), st.integers(0, 64 * KiB // 4096 + 2),
                                   st.integers(0, 0xFFF)), max_size=40))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_tables_raise_only_translation_error_and_stay_in_ram(tables, cr3, va, mode, pse, pointers):
    """Any CR3, address and table contents: a Walk or a TranslationError, and every read that
    ran past RAM is the one the error names (it is never silently used)."""
    with GuestMemory.anonymous(64 * KiB) as m:
        m.write(0, tables)
        for slot, page, flags in pointers:               # entries that point back into the tables
            m.write_u64(slot * 8, page << 12 | flags)
        read = Recorder(m)
        if mode not in ("4-level", "5-level"):
            va &= (1 << 32) - 1
        try:
            w = walk(read, cr3, va, mode, pse=pse)
        except TranslationError as e:
            outside = [a for a in read.asked if not m.contains(a, 8)]
            if e.reason == "outside-ram":
                assert outside == [read.asked[-1]]
            else:
                assert outside == []
            return
        assert all(m.contains(a, 8) for a in read.asked)
        assert len(w.levels) == len(read.asked) <= 5
        assert w.page_size is None or w.phys % w.page_size == va % w.page_size


SMALL = 64 * KiB
FOUR = [(39, 9), (30, 9), (21, 9), (12, 9)]
INDEX_BITS = {"32-bit": [(22, 10), (12, 10)], "pae": [(30, 2), (21, 9), (12, 9)], "4-level": FOUR,
              "5-level": [(48, 9)] + FOUR}      # (lowest address bit, width) of each level's index


@given(mode=st.sampled_from(PAGING_MODES[1:]), seed=st.integers(0, 1 << 32),
       cr3=st.integers(0, SMALL + 0x2000), va=st.integers(0, (1 << 64) - 1), pse=st.booleans())
@settings(max_examples=300, deadline=None)
def test_walks_through_dense_random_tables_are_consistent(mode, seed, cr3, va, pse):
    """Every entry present and pointing at one of 18 pages (two past RAM): each level's index
    comes from the address bits, each table is the previous entry's target, and the physical
    address is the last target plus the page offset."""
    wide = mode != "32-bit"
    top = 64 if mode in ("4-level", "5-level") else 32
    if top == 64:       # make it canonical: sign-extend from the top index bit
        bit = 47 if mode == "4-level" else 56
        va &= (1 << (bit + 1)) - 1
        if va >> bit & 1:
            va |= ((1 << 64) - 1) ^ ((1 << (bit + 1)) - 1)
    else:
        va &= (1 << 32) - 1
    rng = random.Random(seed)
    with GuestMemory.anonymous(SMALL) as m:
        fmt, n = ("<Q", 8) if wide else ("<I", 4)
        m.write(0, b"".join(struct.pack(fmt, rng.randrange(18) << 12 | rng.randrange(0x1000) | P)
                            for _ in range(SMALL // n)))
        try:
            w = walk(m.read_u64, cr3, va, mode, pse=pse)
        except TranslationError as e:
            assert e.reason == "outside-ram"
            return
    table = cr3 & ((0xFFFF_FFE0 if mode == "pae" else 0xFFFF_F000) if top == 32 else 0xF_FFFF_FFFF_F000)
    assert len(w.levels) <= len(INDEX_BITS[mode])
    for lv, (shift, bits) in zip(w.levels, INDEX_BITS[mode]):
        assert lv.index == (va >> shift) & ((1 << bits) - 1)
        assert lv.entry_addr == table + lv.index * n and "P" in lv.flags
        table = lv.target
    leaf = w.levels[-1]
    assert leaf.page_size == w.page_size and w.phys == leaf.target + (va & (w.page_size - 1))
    assert w.page_size == 4 * KiB or "PS" in leaf.flags


# --- linear reads ---------------------------------------------------------------------

def test_read_linear_follows_pages_across_a_boundary(mem):
    """Two virtually adjacent 4 KiB pages backed by far-apart frames read as one buffer."""
    for gpa, blob in ((0x10000, struct.pack("<Q", 0x11000 | P)), (0x11000, struct.pack("<Q", 0x12000 | P)),
                      (0x12000, struct.pack("<Q", 0x13000 | P))):
        mem.write(gpa, blob)
    mem.write_u64(0x13000 + 8 * 0, 0x50_0000 | P)
    mem.write_u64(0x13000 + 8 * 1, 0x30_0000 | P)
    mem.write(0x50_0FFE, b"ab")
    mem.write(0x30_0000, b"cd")
    s = Sregs(cr0=CR0_PE | CR0_PG, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA, cr3=0x10000)
    assert read_linear(mem, s, 0xFFE, 4) == b"abcd"
    with pytest.raises(TranslationError):
        read_linear(mem, s, 0x1FFE, 4)                      # the third page is not mapped


# --- descriptors ----------------------------------------------------------------------

descriptor_fields = st.fixed_dictionaries({
    "base": st.integers(0, (1 << 32) - 1), "limit": st.integers(0, (1 << 20) - 1),
    "type_": st.integers(0, 15), "dpl": st.integers(0, 3), "present": st.integers(0, 1),
    "l": st.integers(0, 1), "db": st.integers(0, 1), "g": st.integers(0, 1)})


@given(f=descriptor_fields)
def test_code_and_data_descriptors_round_trip_with_gdt_descriptor(f):
    """decode_descriptor(gdt.descriptor(...)) gives back every field gdt.descriptor packed."""
    raw = gdt.descriptor(f["base"], f["limit"], f["type_"], s=1, dpl=f["dpl"], present=f["present"],
                         l=f["l"], db=f["db"], g=f["g"])
    d = decode_descriptor(raw.to_bytes(8, "little"))
    assert (d.base, d.limit, d.type, d.s, d.dpl, d.present, d.l, d.db, d.g) == (
        f["base"], f["limit"], f["type_"], 1, f["dpl"], f["present"], f["l"], f["db"], f["g"])
    assert d.kind == ("code" if f["type_"] & 8 else "data") and d.size == 8 and d.raw == raw
    assert d.byte_limit == (f["limit"] << 12 | 0xFFF if f["g"] else f["limit"])
    assert decode_descriptor(raw) == d                      # an int decodes as its 8 bytes


@given(f=descriptor_fields, high=st.integers(0, (1 << 32) - 1),
       type_=st.sampled_from([2, 9, 0xB]))
def test_long_mode_system_descriptors_round_trip_with_upper_base(f, high, type_):
    """A 16-byte LDT/TSS descriptor: gdt.descriptor() low half plus base bits 63:32 in the next 8 bytes."""
    lo = gdt.descriptor(f["base"], f["limit"], type_, s=0, dpl=f["dpl"], present=f["present"], g=f["g"])
    d = decode_descriptor(struct.pack("<QQ", lo, high))
    assert d.size == 16 and d.kind == ("ldt" if type_ == 2 else "tss")
    assert d.base == high << 32 | f["base"] and d.limit == f["limit"] and d.dpl == f["dpl"]
    assert d.name == {2: "LDT", 9: "64-bit TSS (available)", 0xB: "64-bit TSS (busy)"}[type_]


def test_boot_gdt_decodes_slot_by_slot():
    """The host's boot GDT read back: null, code64, data, code32, user code64, user data, TSS."""
    blob = gdt.boot_gdt()
    slots = [decode_descriptor(blob[i:i + 8]) for i in range(0, 48, 8)]
    assert [d.kind for d in slots] == ["null", "code", "data", "code", "code", "data"]
    assert [d.name for d in slots[1:]] == [
        "64-bit code, execute/read, accessed", "data, read/write, accessed", "32-bit code, execute/read, accessed",
        "64-bit code, execute/read, accessed", "data, read/write, accessed"]
    assert [d.dpl for d in slots[1:]] == [0, 0, 0, 3, 3]
    assert all(d.byte_limit == 0xFFFF_FFFF and d.base == 0 and d.present for d in slots[1:])
    tss = decode_descriptor(blob[48:64])
    assert (tss.kind, tss.base, tss.limit, tss.g, tss.size) == ("tss", layout.BOOT_TSS, layout.BOOT_TSS_SIZE - 1, 0, 16)


def gate(offset, selector, type_, dpl=0, present=1, ist=0, params=0) -> int:
    """An 8-byte gate, packed by hand per SDM figure 6-2 / 5-8."""
    return ((offset & 0xFFFF) | selector << 16 | (ist or params) << 32 | type_ << 40 | dpl << 45 | present << 47
            | (offset >> 16 & 0xFFFF) << 48)


def test_32bit_gates():
    """Interrupt, trap and call gates carry selector:offset; a task gate only a TSS selector."""
    d = decode_descriptor(gate(0x1234_5678, 0x08, 0xE, dpl=3).to_bytes(8, "little"))
    assert (d.kind, d.name, d.selector, d.offset, d.dpl, d.present) == (
        "interrupt-gate", "32-bit interrupt gate", 8, 0x1234_5678, 3, 1)
    assert decode_descriptor(gate(0x10, 0x08, 0xF)).name == "32-bit trap gate"
    assert decode_descriptor(gate(0x10, 0x08, 0x6)).name == "16-bit interrupt gate"
    c = decode_descriptor(gate(0xABCD, 0x18, 0xC, params=5))
    assert (c.kind, c.params, c.offset, c.selector) == ("call-gate", 5, 0xABCD, 0x18)
    t = decode_descriptor(gate(0xFFFF_FFFF, 0x30, 0x5))
    assert (t.kind, t.selector, t.offset) == ("task-gate", 0x30, 0)
    assert "0x0030" in str(t) and "not present" in str(decode_descriptor(gate(0x10, 8, 0xE, present=0)))


def test_64bit_interrupt_gate_has_ist_and_64bit_offset():
    """A 16-byte gate: offset bits 63:32 in the second quadword, IST in bits 34:32."""
    target = 0xFFFF_8000_1234_5678
    raw = struct.pack("<QQ", gate(target & 0xFFFF_FFFF, 0x08, 0xE, ist=2), target >> 32)
    d = decode_descriptor(raw)
    assert (d.kind, d.name, d.offset, d.ist, d.size) == ("interrupt-gate", "64-bit interrupt gate", target, 2, 16)
    assert "ist=2" in str(d)


@pytest.mark.parametrize("type_,long_mode,name", [
    (0, False, "reserved system type 0x0"), (8, False, "reserved system type 0x8"),
    (1, True, "reserved system type 0x1"), (5, True, "reserved system type 0x5"),
    (3, False, "16-bit TSS (busy)"), (2, True, "LDT")])
def test_system_type_names_follow_the_mode(type_, long_mode, name):
    """Types valid in legacy mode are reserved in IA-32e mode and the other way round."""
    raw = gdt.descriptor(0x1000, 0x67, type_, s=0, g=0) | (1 << 127 if long_mode else 0)
    assert decode_descriptor(raw, long_mode=long_mode).name == name


def test_null_and_wrong_sizes():
    """All-zero is the null descriptor; sizes other than 8 or 16 bytes are a caller error."""
    assert decode_descriptor(bytes(8)).kind == "null" and decode_descriptor(bytes(16)).kind == "null"
    for bad in (b"", bytes(4), bytes(9), bytes(17)):
        with pytest.raises(ValueError):
            decode_descriptor(bad)
    with pytest.raises(ValueError):
        decode_descriptor(1 << 128)


@given(raw=st.one_of(st.binary(min_size=8, max_size=8), st.binary(min_size=16, max_size=16)),
       long_mode=st.sampled_from([None, False, True]))
def test_any_descriptor_bytes_decode(raw, long_mode):
    """Garbage decodes to some kind without raising, and str() works on it."""
    d = decode_descriptor(raw, long_mode=long_mode)
    assert d.size in (8, 16) and d.kind in ("null", "code", "data", "tss", "ldt", "call-gate", "task-gate",
                                            "interrupt-gate", "trap-gate", "reserved")
    assert str(d)


# --- GDT and IDT readers --------------------------------------------------------------

def long_sregs(mem, user=False) -> Sregs:
    """The long-mode boot state, its tables written to ``mem``."""
    s, writes = modes.long_mode(Sregs(), mem.end, user=user)
    for gpa, blob in writes:
        mem.write(gpa, blob)
    return s


def test_read_gdt_long_mode_lists_tss_once(mem):
    """In long mode the 16-byte TSS descriptor takes slots 6 and 7; slot 7 is not listed."""
    s = long_sregs(mem)
    entries = read_gdt(mem, s)
    assert [e.index for e in entries] == [0, 1, 2, 3, 4, 5, 6]
    assert [e.selector for e in entries][1:3] == [0x08, 0x10]
    assert entries[6].descriptor.name == "64-bit TSS (busy)" and entries[6].descriptor.base == layout.BOOT_TSS
    assert all(e.error is None and e.address == layout.BOOT_GDT + 8 * e.index for e in entries)


def test_read_gdt_protected_mode_reads_8_byte_slots(mem):
    """Outside long mode every slot is 8 bytes: the TSS's upper half reads as a null slot 7."""
    s, writes = modes.protected_mode(Sregs())
    for gpa, blob in writes:
        mem.write(gpa, blob)
    entries = read_gdt(mem, s)
    assert len(entries) == 8 and entries[6].descriptor.name == "32-bit TSS (busy)"
    assert entries[7].descriptor.kind == "null"


def test_read_gdt_through_paging(mem):
    """GDTR.base is linear: a GDT at a virtual address is found through the page tables."""
    s = long_sregs(mem)
    s.gdt = DTable(base=0x7F_0004_0000, limit=15)          # PML4 slot 0, PDPT slot 0x1FC: unmapped so far
    assert [("PDPT entry 508" in e.error) for e in read_gdt(mem, s)] == [True, True]
    mem.write_u64(layout.PDPT + 8 * 0x1FC, layout.PD_BASE | P | RW)   # alias GiB 0 there
    assert [e.descriptor.kind for e in read_gdt(mem, s)] == ["null", "null"]
    mem.write(0x40000, gdt.boot_gdt()[:16])
    assert read_gdt(mem, s)[1].descriptor.name.startswith("64-bit code")


def test_read_gdt_is_bounded_by_limit_and_ram():
    """A 64 KiB limit is at most 8192 slots; slots past RAM carry an error instead of raising."""
    with GuestMemory.anonymous(64 * KiB) as m:
        s = Sregs(cr0=CR0_PE, gdt=DTable(base=60 * KiB, limit=0xFFFF))
        entries = read_gdt(m, s)
        assert len(entries) == 8192
        assert all(e.error is None for e in entries[:512]) and all(e.error for e in entries[512:])
        s.gdt = DTable(base=0, limit=6)                  # less than one whole slot
        assert read_gdt(m, s) == []


def test_read_idt_protected_long_and_real(mem):
    """8-byte gates in protected mode, 16-byte in long mode, 4-byte seg:off vectors in real mode."""
    mem.write(0x3000, struct.pack("<QQ", gate(0x10_0040, 0x18, 0xE), gate(0x10_0080, 0x18, 0xF)))
    s = Sregs(cr0=CR0_PE, idt=DTable(base=0x3000, limit=15))
    idt = read_idt(mem, s)
    assert [(e.index, e.descriptor.name, e.descriptor.offset) for e in idt] == [
        (0, "32-bit interrupt gate", 0x10_0040), (1, "32-bit trap gate", 0x10_0080)]
    s = long_sregs(mem)
    mem.write(0x5000, struct.pack("<QQ", gate(0x5678, 0x08, 0xE, ist=1), 0xFFFF_FFFF))
    s.idt = DTable(base=0x5000, limit=16 * 256 - 1)
    idt = read_idt(mem, s)
    assert len(idt) == 256 and idt[0].descriptor.offset == 0xFFFF_FFFF_0000_5678 and idt[0].descriptor.ist == 1
    mem.write(0x20, struct.pack("<HH", 0x1234, 0xF000))      # vector 8: F000:1234
    s = Sregs(idt=DTable(base=0, limit=0x3FF))
    idt = read_idt(mem, s)
    assert len(idt) == 256 and (idt[8].descriptor.selector, idt[8].descriptor.offset) == (0xF000, 0x1234)
    assert str(idt[8].descriptor) == "f000:1234"


def test_empty_idt_has_no_entries(mem):
    """The boot state's IDTR limit 0 holds no whole gate."""
    assert read_idt(mem, long_sregs(mem)) == []


segments = st.builds(Segment, base=st.integers(0, (1 << 64) - 1), limit=st.integers(0, (1 << 32) - 1),
                     selector=st.integers(0, 0xFFFF), type=st.integers(0, 255), present=st.integers(0, 1),
                     dpl=st.integers(0, 3), db=st.integers(0, 1), s=st.integers(0, 1), l=st.integers(0, 1),
                     g=st.integers(0, 1), avl=st.integers(0, 1), unusable=st.integers(0, 1))
dtables = st.builds(DTable, base=st.integers(0, (1 << 64) - 1) | st.integers(0, 64 * KiB),
                    limit=st.integers(0, 0xFFFF))
u64 = st.integers(0, (1 << 64) - 1)
sregs_st = st.builds(Sregs, cs=segments, ds=segments, ss=segments, tr=segments, ldt=segments,
                     gdt=dtables, idt=dtables, cr0=st.sampled_from([0, CR0_PE, CR0_PE | CR0_PG]) | u64,
                     cr3=st.integers(0, 64 * KiB) | u64, cr4=st.sampled_from([0, CR4_PAE, CR4_PSE]) | u64,
                     efer=st.sampled_from([0, EFER_LMA | EFER_LME]) | u64)
regs_st = st.builds(Regs, rip=st.integers(0, 64 * KiB) | u64, rsp=st.integers(0, 64 * KiB) | u64, rflags=u64)


@given(s=sregs_st, r=regs_st, contents=st.binary(max_size=8 * KiB), at=st.integers(0, 56 * KiB))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_state_never_breaks_readers_or_the_report(s, r, contents, at):
    """Random registers and memory: read_gdt, read_idt, cpu_mode and format_report all return."""
    with GuestMemory.anonymous(64 * KiB) as m:
        m.write(at, contents)
        assert len(read_gdt(m, s)) <= 8192 and len(read_idt(m, s)) <= 256
        mode = cpu_mode(s, r.rflags)
        text = format_report(r, s, m)
        assert str(mode) in text and "== page walks ==" in text


# --- the CPU mode and the report ------------------------------------------------------

def test_cpu_mode_of_each_entry_state(mem):
    """The states modes.setup() builds are named real / protected / long, with CPL, paging and width."""
    real = modes.setup("real", 0x7C00, Sregs(), RAM).sregs
    prot = modes.setup("protected", MiB, Sregs(), RAM).sregs
    lng = modes.setup("long", MiB, Sregs(), RAM).sregs
    user = modes.setup("long", MiB, Sregs(), RAM, user=True).sregs
    got = [cpu_mode(x) for x in (real, prot, lng, user)]
    assert [(m.name, m.cpl, m.paging, m.pae, m.long, m.bits, m.paging_mode) for m in got] == [
        ("real", 0, False, False, False, 16, "none"), ("protected", 0, False, False, False, 32, "none"),
        ("long", 0, True, True, True, 64, "4-level"), ("long", 3, True, True, True, 64, "4-level")]
    assert str(got[2]) == "long mode (64-bit), CPL 0, paging on (4-level)"
    assert str(got[0]) == "real mode (16-bit), CPL 0, paging off"


def test_cpu_mode_compatibility_pae_32bit_and_vm86():
    """Long mode with a 32-bit CS is compatibility mode; PAE and 32-bit paging are named; VM=1 is vm86."""
    s = modes.setup("long", MiB, Sregs(), RAM).sregs
    s.cs = gdt.segment_for(layout.SEL_CODE32)
    assert cpu_mode(s).bits == 32 and "compatibility" in str(cpu_mode(s))
    p = modes.setup("protected", MiB, Sregs(), RAM).sregs
    p.cr0 |= CR0_PG
    assert cpu_mode(p).paging_mode == "32-bit"
    p.cr4 |= CR4_PAE
    assert (cpu_mode(p).paging_mode, cpu_mode(p).pae) == ("pae", True)
    assert (cpu_mode(p, rflags=1 << 17).name, cpu_mode(p, rflags=1 << 17).cpl) == ("virtual-8086", 3)


def test_report_of_long_mode_boot_state(mem):
    """The report names the mode, decodes CS, lists the GDT and walks RIP and RSP to physical."""
    s = long_sregs(mem)
    mem.write(MiB, bytes.fromhex("b02ae6e9f4"))
    text = format_report(Regs(rip=MiB, rsp=2 * MiB - 8, rax=42), s, mem)
    for needle in ("long mode (64-bit), CPL 0, paging on (4-level)", "rax=000000000000002a",
                   "cs 0008 GDT[1] RPL0", "64-bit code, execute/read", "[   6] sel 0x0030  64-bit TSS (busy)",
                   "no complete entry", "RIP linear 0x100000:", "PML4[0]", "PD[0]",
                   "=> physical 0x100000 (2 MiB page", "RSP linear 0x1ffff8:", "b0 2a e6 e9 f4"):
        assert needle in text, needle
    assert format_report(Regs(rip=MiB), s, mem, rip_code="  my code").endswith("  my code")


def test_report_shows_the_failing_level_of_an_unmapped_rip(mem):
    """A RIP past the mapped range shows the entries read and the non-present one."""
    s = long_sregs(mem)
    text = format_report(Regs(rip=1 << 40), s, mem)
    assert "!! 0x10000000000: PML4 entry 2 at 0x9010 is not present" in text
    assert "cannot read" in text                            # the code section says so instead of raising


def test_report_of_real_mode_uses_segment_bases(mem):
    """Real mode: CS.base + IP is the linear (= physical) address; the GDT is not consulted."""
    s = modes.real_mode(Sregs(), cs_base=0x10000)
    text = format_report(Regs(rip=0x123, rsp=0xFFFE), s, mem)
    assert "real mode (16-bit)" in text and "RIP linear 0x10123: paging off, physical 0x10123" in text
    assert "(not used in real mode)" in text and "RSP linear 0x1fffe" in text


def test_report_disassembles_in_the_current_mode(mem):
    """report() adds capstone's decoding of the code at RIP, 16-bit in real mode."""
    pytest.importorskip("capstone")
    mem.write(0x7C00, bytes.fromhex("b82a00f4"))            # mov ax, 42; hlt
    text = report(Regs(rip=0x7C00), modes.real_mode(Sregs()), mem, title="vCPU 0")
    assert text.startswith("=== vCPU 0 ===") and "mov ax, 0x2a" in text and "hlt" in text


def test_translation_error_is_a_kvmpy_value_error():
    """Callers can catch it as KvmpyError or, like paging.translate's errors, as ValueError."""
    assert issubclass(TranslationError, KvmpyError) and issubclass(TranslationError, ValueError)
    assert not issubclass(TranslationError, GuestMemoryError)
