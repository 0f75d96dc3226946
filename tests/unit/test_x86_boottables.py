"""Where the boot GDT, TSS and page tables go: their homes, or out of an image's way."""
import pytest
from hypothesis import given, strategies as st

from kvmpy.kvm.memory import GuestMemory
from kvmpy.kvm.regs import Sregs
from kvmpy.x86 import boottables, layout, modes, paging
from kvmpy.x86.boottables import DEFAULT, BootTables, first_fit, overlaps, pages, place

MiB, GiB, PAGE = layout.MiB, layout.GiB, layout.PAGE
RAM = [(0, 64 * MiB)]


def test_the_homes_are_layout_py_s():
    assert DEFAULT.ranges("protected", 64 * MiB) == [(0x1000, 0x1040), (0x2000, 0x4069)]
    assert DEFAULT.ranges("long", 64 * MiB)[2:] == [(0x6000, 0x7000), (0x9000, 0xA000), (0xA000, 0xB000),
                                                    (0x10000, 0x14000)]
    assert DEFAULT.ranges("real", 64 * MiB) == []


@pytest.mark.parametrize("mode", ["protected", "long"])
def test_an_image_clear_of_their_pages_keeps_the_homes(mode):
    assert place(mode, 64 * MiB, RAM, [(MiB, 2 * MiB), (0x8000, 0x9000 if mode == "protected" else 0x8800)]) \
        == DEFAULT


def test_an_image_sharing_a_page_with_them_moves_them():
    """Byte-disjoint is not enough: a table and an image never share a page (memory maps are paged)."""
    assert place("protected", 64 * MiB, RAM, [(0x4100, 0x4200)]) == BootTables.at(0x5000)


def test_they_move_to_the_lowest_free_pages_of_base_memory_then_above_1_mib():
    assert place("long", 64 * MiB, RAM, [(0x1000, 0x2000)]) == BootTables.at(0x2000)
    assert place("protected", 64 * MiB, RAM, [(0, 0x9F000)]) == BootTables.at(MiB)
    assert place("protected", 64 * MiB, RAM, [(0, 0x9F000), (MiB, MiB + 1)]) == BootTables.at(MiB + PAGE)


def test_never_in_the_ivt_bda_or_the_legacy_hole_and_none_left_is_a_value_error():
    t = place("protected", 64 * MiB, [(0, MiB)], [(0x1000, 0x9C000)])
    assert t == BootTables.at(0x9C000) and t.tss + layout.BOOT_TSS_SIZE <= layout.LEGACY_HOLE[0]
    with pytest.raises(ValueError, match=r"no room in guest RAM for the protected-mode boot tables \(0x3069"):
        place("protected", 64 * MiB, [(0, MiB)], [(0x1000, 0x9D000)])


def test_tables_outside_ram_move_into_it():
    """A machine whose RAM starts at 1 MiB has no room at their homes."""
    assert place("protected", 3 * MiB, [(MiB, 3 * MiB)], [(MiB, MiB + 0x5000)]) == BootTables.at(MiB + 0x5000)


@given(st.lists(st.tuples(st.integers(0, 0x120000), st.integers(1, 0x40000)), max_size=6),
       st.sampled_from(["protected", "long"]))
def test_placed_tables_are_in_ram_and_clear_of_every_page_to_avoid(holes, mode):
    avoid = [(s, s + n) for s, n in holes]
    ram = [(0, 8 * MiB)]
    t = place(mode, 8 * MiB, ram, avoid)
    for r in pages(t.ranges(mode, 8 * MiB)):
        assert 0 <= r[0] < r[1] <= 8 * MiB
        assert not any(overlaps(r, a) for a in pages(avoid))
        assert not overlaps(r, layout.LEGACY_HOLE) and not overlaps(r, (0, 0x1000))


def test_first_fit_is_page_aligned_in_ram_and_window_from_start():
    assert first_fit(0x100, [(0, MiB)], [], windows=[(0x500, 0x9FC00)]) == 0x1000
    assert first_fit(0x100, [(0, MiB)], [(0x1000, 0x1001)], windows=[(0x500, 0x9FC00)]) == 0x2000
    assert first_fit(0x2000, [(0, 2 * MiB)], [], start=0x100123) == 0x101000
    assert first_fit(0x2000, [(0, 0x2000)], []) is None                    # no window has room
    assert first_fit(0, [(0, MiB)], [(0x1000, 0x2000)], windows=[(0x1000, MiB)]) == 0x2000


@pytest.mark.parametrize("mode,user", [("protected", False), ("long", False), ("long", True)])
def test_moved_tables_are_what_the_cpu_state_points_at(mode, user):
    """GDTR, TR (and the TSS descriptor in the GDT), RSP0 and CR3 follow the tables; the page
    tables still identity-map RAM."""
    t = BootTables.at(0x30000)
    setup = modes.setup(mode, MiB, Sregs(), 64 * MiB, user=user, tables=t)
    s = setup.sregs
    assert s.gdt.base == t.gdt and s.tr.base == t.tss
    written = {gpa for gpa, _ in setup.writes}
    assert {t.gdt, t.tss} <= written
    used = t.ranges(mode, 64 * MiB)
    for gpa, blob in setup.writes:
        assert any(lo <= gpa and gpa + len(blob) <= hi for lo, hi in used), hex(gpa)
    with GuestMemory.anonymous(2 * MiB) as mem:
        for gpa, blob in setup.writes:
            mem.write(gpa, blob)
        gdt = mem.read(t.gdt, s.gdt.limit + 1)
        tss_lo = int.from_bytes(gdt[0x30:0x38], "little")
        assert (tss_lo >> 16) & 0xFFFFFF | (tss_lo >> 56) << 24 == t.tss
        assert int.from_bytes(mem.read(t.tss + 4, 8), "little") == t.stack_top
        if mode == "long":
            assert s.cr3 == t.pml4
            assert paging.translate(mem.read_u64, s.cr3, 0x12345678)[0] == 0x12345678


def test_the_default_is_used_when_no_tables_are_given():
    assert modes.setup("long", MiB, Sregs(), 64 * MiB).sregs.cr3 == layout.PML4
    assert boottables.GDT_SIZE == 64
