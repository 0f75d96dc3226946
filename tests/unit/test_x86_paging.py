"""Identity-map page tables and the 4-level walker (Intel SDM vol. 3A, 4.5)."""
import re
import struct

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.kvm.memory import GuestMemory
from kvmpy.x86 import layout, paging

GiB, MiB = layout.GiB, layout.MiB
P, RW, US, PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7     # SDM table 4-15..4-18, written out again here
LOW_MEM = MiB                                        # the tables all live in the first MiB


def build(mem_end: int, user: bool = False) -> GuestMemory:
    """Guest memory holding identity_map_tables(mem_end, user)."""
    mem = GuestMemory.anonymous(LOW_MEM)
    for gpa, blob in paging.identity_map_tables(mem_end, user=user):
        mem.write(gpa, blob)
    return mem


def entries(blob: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(blob) // 8}Q", blob))


def mapped_gib(mem_end: int) -> int:
    """GiB the tables must cover: all of RAM, and never less than 4 GiB."""
    return max(4 * GiB, -(-mem_end // GiB) * GiB) // GiB


@given(gib=st.integers(1, layout.PD_MAX), data=st.data(), user=st.booleans())
@settings(max_examples=60, deadline=None)
def test_addresses_below_mapped_end_translate_to_themselves(gib, data, user):
    """Every address below max(4 GiB, mem_end) is identity-mapped by the boot tables."""
    mem_end = data.draw(st.integers((gib - 1) * GiB + 1, gib * GiB), label="mem_end")
    top = max(4 * GiB, mem_end)
    addrs = data.draw(st.lists(st.integers(0, top - 1), min_size=1, max_size=20), label="addrs")
    addrs += [0, top - 1, mem_end - 1]
    with build(mem_end, user) as mem:
        for va in addrs:
            gpa, walk = paging.translate(mem.read_u64, layout.PML4, va)
            assert gpa == va
            assert [lvl for lvl, _, _ in walk] == ["PML4", "PDPT", "PD"]


@pytest.mark.parametrize("user", [False, True])
@pytest.mark.parametrize("mem_end", [0x20_0000, 4 * GiB, 4 * GiB + 1, 9 * GiB - 4096])
def test_user_bit_present_iff_user_at_every_level(mem_end, user):
    """U/S is set in the PML4, PDPT and PD entries of every walk exactly when user=True."""
    with build(mem_end, user) as mem:
        for va in (0, 0x7C00, MiB, 4 * GiB - 1, max(4 * GiB, mem_end) - 1):
            _, walk = paging.translate(mem.read_u64, layout.PML4, va)
            for level, _, entry in walk:
                assert bool(entry & US) == user, (level, hex(va))
                assert entry & P and entry & RW, (level, hex(va))


@pytest.mark.parametrize("user", [False, True])
def test_tables_decode_to_identity_2m_pages(user):
    """Decoded by hand: PML4[0] -> PDPT, PDPT[i] -> PD i, PD i entry j maps i GiB + j * 2 MiB."""
    mem_end = 5 * GiB + 123
    writes = dict(paging.identity_map_tables(mem_end, user=user))
    flags = P | RW | (US if user else 0)
    pml4 = entries(writes[layout.PML4])
    assert len(pml4) == 512
    assert pml4[0] == layout.PDPT | flags and not any(pml4[1:])
    pdpt = entries(writes[layout.PDPT])
    gib = mapped_gib(mem_end)
    assert gib == 6
    assert pdpt[:gib] == [(layout.PD_BASE + i * 4096) | flags for i in range(gib)]
    assert not any(pdpt[gib:])
    for i in range(gib):
        pd = entries(writes[layout.PD_BASE + i * 4096])
        assert pd == [(i * GiB + j * 2 * MiB) | flags | PS for j in range(512)]
    assert set(writes) == {layout.PML4, layout.PDPT} | {layout.PD_BASE + i * 4096 for i in range(gib)}


@given(mem_end=st.integers(0, layout.PD_MAX * GiB))
@settings(max_examples=30, deadline=None)
def test_number_of_page_directories_covers_ram(mem_end):
    """One page directory per GiB of max(4 GiB, mem_end), rounded up."""
    writes = paging.identity_map_tables(mem_end)
    pds = [gpa for gpa, _ in writes if gpa >= layout.PD_BASE]
    assert len(pds) == mapped_gib(mem_end)
    assert all(len(blob) == 4096 for _, blob in writes)


def test_largest_size_is_accepted_and_one_byte_more_is_refused():
    """PD_MAX GiB can be mapped; anything beyond it raises ValueError naming the limit."""
    writes = paging.identity_map_tables(layout.PD_MAX * GiB)
    assert max(gpa for gpa, _ in writes) + 4096 <= 0x80000
    with pytest.raises(ValueError, match=str(layout.PD_MAX)):
        paging.identity_map_tables(layout.PD_MAX * GiB + 1)
    with pytest.raises(ValueError):
        paging.identity_map_tables(1 << 60)


def _level_in(message: str) -> str:
    m = re.search(r"\b(PML4|PDPT|PD|PT) entry", message)
    assert m, message
    return m.group(1)


def test_non_present_pml4_entry_names_pml4():
    """An address past the first 512 GiB hits an empty PML4 slot."""
    with build(4 * GiB) as mem, pytest.raises(ValueError) as e:
        paging.translate(mem.read_u64, layout.PML4, 1 << 39)
    assert _level_in(str(e.value)) == "PML4"


def test_non_present_pdpt_entry_names_pdpt():
    """The first address past the mapped GiBs hits an empty PDPT slot."""
    with build(4 * GiB) as mem, pytest.raises(ValueError) as e:
        paging.translate(mem.read_u64, layout.PML4, 4 * GiB)
    assert _level_in(str(e.value)) == "PDPT"


def test_non_present_pd_entry_names_pd():
    """Clearing one PD entry makes exactly that 2 MiB page fault at the PD level."""
    with build(4 * GiB) as mem:
        mem.write_u64(layout.PD_BASE + 8 * 3, 0)            # 6 MiB .. 8 MiB
        with pytest.raises(ValueError) as e:
            paging.translate(mem.read_u64, layout.PML4, 6 * MiB + 5)
        assert _level_in(str(e.value)) == "PD"
        assert paging.translate(mem.read_u64, layout.PML4, 6 * MiB - 1)[0] == 6 * MiB - 1
        assert paging.translate(mem.read_u64, layout.PML4, 8 * MiB)[0] == 8 * MiB


def test_non_present_pt_entry_names_pt():
    """A PD entry without PS points at a page table; an empty PT slot faults at PT."""
    with build(4 * GiB) as mem:
        pt = 0x90000
        mem.fill(pt, 4096)
        mem.write_u64(layout.PD_BASE, pt | P | RW)          # first 2 MiB now via a 4 KiB table
        with pytest.raises(ValueError) as e:
            paging.translate(mem.read_u64, layout.PML4, 0x1234)
        assert _level_in(str(e.value)) == "PT"


def test_walk_through_4k_page_table_uses_pt_entry():
    """With a PT, the 4 KiB frame comes from the PT entry and the low 12 bits from the address."""
    with GuestMemory.anonymous(LOW_MEM) as mem:
        pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
        mem.write_u64(pml4 + 8 * 1, pdpt | P)                # va bits 47:39 = 1
        mem.write_u64(pdpt + 8 * 2, pd | P)                  # bits 38:30 = 2
        mem.write_u64(pd + 8 * 3, pt | P)                    # bits 29:21 = 3
        mem.write_u64(pt + 8 * 4, 0xABCDE000 | P | (1 << 63))  # bits 20:12 = 4; NX bit ignored
        va = 1 << 39 | 2 << 30 | 3 << 21 | 4 << 12 | 0x567
        gpa, walk = paging.translate(mem.read_u64, pml4, va)
        assert gpa == 0xABCDE567
        assert [(lvl, at) for lvl, at, _ in walk] == [
            ("PML4", pml4 + 8), ("PDPT", pdpt + 16), ("PD", pd + 24), ("PT", pt + 32)]


def test_walk_through_1g_page_in_pdpt():
    """A PDPT entry with PS maps a 1 GiB page: the low 30 bits come from the address."""
    with GuestMemory.anonymous(LOW_MEM) as mem:
        mem.write_u64(0x1000, 0x2000 | P)
        mem.write_u64(0x2000 + 8 * 5, (7 * GiB) | P | PS)
        gpa, walk = paging.translate(mem.read_u64, 0x1000 | 0x18, 5 * GiB + 0x1234_5678)  # CR3 flag bits ignored
        assert gpa == 7 * GiB + 0x1234_5678
        assert len(walk) == 2
