"""GuestMemory: bounds-checked access to guest-physical RAM across one or more regions."""
import ctypes

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.errors import GuestMemoryError, KvmpyError
from kvmpy.kvm.memory import HUGE_PAGE, PAGE_SIZE, GuestMemory, MemoryRegion

LOW = (0, 0x10000)                  # [0, 64 KiB)
HIGH = (0x100000, 0x20000)          # [1 MiB, 1 MiB + 128 KiB); a gap in between


@pytest.fixture
def mem():
    with GuestMemory([MemoryRegion.anonymous(*HIGH), MemoryRegion.anonymous(*LOW)]) as m:
        yield m


def inside_one_region(gpa: int, length: int) -> bool:
    """The test's own oracle: [gpa, gpa+length) lies within LOW or HIGH."""
    return length >= 0 and any(base <= gpa and gpa + length <= base + size for base, size in (LOW, HIGH))


# --- bounds -----------------------------------------------------------------------

@pytest.mark.parametrize("gpa,length", [
    (-1, 1), (-0x1000, 0x2000),                          # negative address
    (0x10000 - 4, 8), (HIGH[0] + HIGH[1] - 1, 2),        # straddles a region's end
    (0x10000, 1), (0x80000, 4), (HIGH[0] - 1, 1),        # in the gap between regions
    (HIGH[0] - 4, 8),                                    # straddles the gap into HIGH
    (0, 1 << 64), (8, (1 << 64) - 8), (0x1000, (1 << 64) - 1),   # lengths that wrap 64-bit arithmetic
    ((1 << 64) - 4, 8), ((1 << 64) - 1, 1),              # addresses near 2**64
    (0, -1), (0x100, -0x100),                            # negative length
])
def test_out_of_bounds_access_raises_guest_memory_error(mem, gpa, length):
    """read, view, fill and contains all refuse a range not wholly inside one region."""
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.fill(gpa, length, 0xAA)
    with pytest.raises(GuestMemoryError):
        mem.region_for(gpa, length)
    assert not mem.contains(gpa, length)


@pytest.mark.parametrize("gpa,size", [(0x10000 - 4, 8), (HIGH[0] - 1, 2), (-1, 1), (0x20000, 1)])
def test_out_of_bounds_write_raises_and_changes_nothing(mem, gpa, size):
    """A refused write leaves every in-bounds byte it would have touched unchanged."""
    with pytest.raises(GuestMemoryError):
        mem.write(gpa, b"\xEE" * size)
    for a in range(gpa, gpa + size):
        if mem.contains(a):
            assert mem.read(a, 1) == b"\x00"


def test_guest_memory_error_is_a_kvmpy_error_and_names_the_range(mem):
    """The error is catchable as KvmpyError and says which range was refused."""
    with pytest.raises(KvmpyError, match="0x10000"):
        mem.read(0x10000, 4)


def test_write_u64_out_of_bounds_raises(mem):
    """The u64 helpers are bounds-checked too (7 bytes left is not enough)."""
    with pytest.raises(GuestMemoryError):
        mem.write_u64(0x10000 - 7, 1)
    with pytest.raises(GuestMemoryError):
        mem.read_u64(0x10000 - 7)


@given(gpa=st.one_of(st.integers(-0x20000, 0x140000), st.integers(-(1 << 66), 1 << 66)),
       length=st.one_of(st.integers(-16, 0x21000), st.integers(-(1 << 66), 1 << 66)))
@settings(max_examples=300, deadline=None)
def test_random_ranges_are_inside_one_region_or_refused(gpa, length):
    """Every (gpa, length) either lies inside one region and works, or raises GuestMemoryError."""
    with GuestMemory([MemoryRegion.anonymous(*LOW), MemoryRegion.anonymous(*HIGH)]) as m:
        if inside_one_region(gpa, length):
            assert m.contains(gpa, length)
            data = bytes((gpa + i) & 0xFF for i in range(length))
            m.write(gpa, data)
            assert m.read(gpa, length) == data
            v = m.view(gpa, length)
            assert len(v) == length and bytes(v) == data
            v.release()
        else:
            assert not m.contains(gpa, length)
            for op in (lambda: m.read(gpa, length), lambda: m.fill(gpa, length),
                       lambda: m.view(gpa, length)):
                with pytest.raises(GuestMemoryError):
                    op()


# --- regions ----------------------------------------------------------------------

@pytest.mark.parametrize("gpa,size", [
    (0x100000, 0x1000), (0x0F_F000, 0x2000), (0x11_F000, 0x1000), (0x0F_0000, 0x40000),
    (0x108000, 0x1000), (0x100000, 0x20000),
])
def test_overlapping_region_is_rejected(mem, gpa, size):
    """Any region sharing a byte with an existing one is refused and the set is unchanged."""
    before = [(r.gpa, r.size) for r in mem.regions]
    new = MemoryRegion.anonymous(gpa, size)
    try:
        with pytest.raises(ValueError, match="overlaps"):
            mem.add(new)
        assert [(r.gpa, r.size) for r in mem.regions] == before
    finally:
        new.close()


def test_overlapping_regions_in_constructor_are_rejected():
    """GuestMemory([...]) with two overlapping regions raises ValueError."""
    a, b = MemoryRegion.anonymous(0, 0x2000), MemoryRegion.anonymous(0x1000, 0x2000)
    try:
        with pytest.raises(ValueError):
            GuestMemory([a, b])
    finally:
        a.close()
        b.close()


def test_adjacent_regions_are_allowed_but_accesses_do_not_span_them(mem):
    """A region touching another is accepted; a single access across the seam is refused."""
    mem.add(MemoryRegion.anonymous(0x10000, 0x1000))
    assert [r.gpa for r in mem.regions] == [0, 0x10000, 0x100000]
    mem.write(0x10000, b"ok")
    assert mem.read(0x10000, 2) == b"ok"
    with pytest.raises(GuestMemoryError):
        mem.read(0x10000 - 2, 4)


@pytest.mark.parametrize("gpa,size", [(0, 0), (0, -4096), (0x800, 0x1000), (0, 0x1001)])
def test_region_must_be_page_aligned_and_non_empty(gpa, size):
    """MemoryRegion.anonymous refuses empty or unaligned regions."""
    with pytest.raises(ValueError):
        MemoryRegion.anonymous(gpa, size)


@pytest.mark.parametrize("gpa,length,inside", [
    (0x2000, 0, True), (0x2000, 0x1000, True), (0x2FFF, 1, True), (0x3000, 0, True),
    (0x3000, 1, False), (0x1FFF, 1, False), (0x2000, 0x1001, False), (0x2800, -1, False), (0x2800, -0x800, False),
])
def test_region_contains_is_exact_at_its_edges(gpa, length, inside):
    """MemoryRegion.contains() accepts exactly the ranges within [gpa, end) and no negative length."""
    r = MemoryRegion.anonymous(0x2000, 0x1000)
    try:
        assert r.end == 0x3000
        assert r.contains(gpa, length) is inside
    finally:
        r.close()


def test_size_and_end_cover_all_regions(mem):
    """size sums the regions; end is one past the highest RAM byte; regions are sorted by gpa."""
    assert mem.size == LOW[1] + HIGH[1]
    assert mem.end == HIGH[0] + HIGH[1]
    assert [r.gpa for r in mem.regions] == [LOW[0], HIGH[0]]
    assert GuestMemory().end == 0 and GuestMemory().size == 0


def test_region_for_names_the_right_region(mem):
    """region_for() returns the region holding the range, at both edges of each region."""
    low, high = mem.regions
    assert mem.region_for(0) is low and mem.region_for(LOW[1] - 1) is low
    assert mem.region_for(HIGH[0]) is high and mem.region_for(HIGH[0] + HIGH[1] - 8, 8) is high


# --- data -------------------------------------------------------------------------

def test_two_regions_are_addressed_independently(mem):
    """The same offset in two regions holds different bytes; each lands in its own mmap."""
    mem.write(0x10, b"low!")
    mem.write(HIGH[0] + 0x10, b"HIGH")
    assert mem.read(0x10, 4) == b"low!"
    assert mem.read(HIGH[0] + 0x10, 4) == b"HIGH"
    low, high = mem.regions
    assert low.mm[0x10:0x14] == b"low!" and high.mm[0x10:0x14] == b"HIGH"


def test_region_at_nonzero_gpa_is_offset_correctly():
    """A single region at 1 MiB: guest 1 MiB + n is byte n of the mapping; below it is unmapped."""
    with GuestMemory.anonymous(0x2000, gpa=0x100000) as m:
        m.write(0x100FFF, b"\x5A")
        assert m.regions[0].mm[0xFFF] == 0x5A
        with pytest.raises(GuestMemoryError):
            m.read(0xFFFFF, 1)


@given(offset=st.integers(0, LOW[1] - 1), data=st.binary(min_size=0, max_size=512))
def test_write_read_round_trip(offset, data):
    """What write() stores, read() returns, and the neighbours are untouched."""
    offset = min(offset, LOW[1] - len(data))
    with GuestMemory.anonymous(LOW[1]) as m:
        m.fill(0, LOW[1], 0x11)
        m.write(offset, data)
        assert m.read(offset, len(data)) == data
        if offset:
            assert m.read(offset - 1, 1) == b"\x11"
        if offset + len(data) < LOW[1]:
            assert m.read(offset + len(data), 1) == b"\x11"


def test_fill_sets_exactly_the_range(mem):
    """fill() writes the byte over [gpa, gpa+length) and nothing else."""
    mem.fill(HIGH[0] + 0x100, 0x20, 0xCC)
    assert mem.read(HIGH[0] + 0xFF, 0x22) == b"\x00" + b"\xCC" * 0x20 + b"\x00"


def test_view_is_a_live_writable_window(mem):
    """Writing through view() is visible to read(), and write() is visible through the view."""
    v = mem.view(HIGH[0] + 0x40, 8)
    try:
        v[:] = b"ABCDEFGH"
        assert mem.read(HIGH[0] + 0x40, 8) == b"ABCDEFGH"
        mem.write(HIGH[0] + 0x44, b"xy")
        assert bytes(v) == b"ABCDxyGH"
        assert len(v) == 8
    finally:
        v.release()


@given(value=st.integers(0, (1 << 64) - 1))
def test_u64_is_little_endian(value):
    """write_u64/read_u64 round-trip and store the least significant byte first."""
    with GuestMemory.anonymous(PAGE_SIZE) as m:
        m.write_u64(8, value)
        assert m.read_u64(8) == value
        assert m.read(8, 8) == value.to_bytes(8, "little")


def test_close_is_idempotent_and_leaves_no_ram():
    """After close() every access is refused, and closing again is harmless."""
    m = GuestMemory.anonymous(PAGE_SIZE)
    m.close()
    m.close()
    assert m.size == 0
    with pytest.raises(GuestMemoryError):
        m.read(0, 1)


# --- dirty tracking of the VMM's own writes -----------------------------------------

def pages_of(take: bytes) -> set[int]:
    """The test's own decoding of a bitmap: page p is bit p%64 of little-endian u64 word p//64."""
    out = set()
    for w in range(len(take) // 8):
        word = int.from_bytes(take[8 * w:8 * w + 8], "little")
        out |= {64 * w + b for b in range(64) if word >> b & 1}
    return out


@pytest.fixture(params=["native", "python"])
def backend(request, monkeypatch):
    """Run a dirty test through csrc/dirty.c (if built) and through the pure-Python fallback."""
    import kvmpy.kvm.memory as memory
    if request.param == "native":
        if memory._ffi is None:
            pytest.skip("kvmpy._native is not built")
    else:
        monkeypatch.setattr(memory, "_ffi", None)     # regions made now have no C pointer
        monkeypatch.setattr(memory, "_lib", None)
    return request.param


def test_a_new_region_is_clean_and_its_bitmap_is_whole_words(backend):
    """A fresh region has no dirty page; take_dirty gives ceil(pages/64) u64 words."""
    for size, words in ((PAGE_SIZE, 1), (64 * PAGE_SIZE, 1), (65 * PAGE_SIZE, 2), (0x20000, 1)):
        r = MemoryRegion.anonymous(0, size)
        try:
            assert r.dirty_words == words
            assert r.take_dirty() == bytes(8 * words)
        finally:
            r.close()


def test_bitmap_is_page_aligned_for_c_atomics():
    """The bitmap's host address is page-aligned (so 64-bit atomics on it are aligned)."""
    r = MemoryRegion.anonymous(0, 0x10000)
    try:
        if r.dirty_address:
            assert r.dirty_address % PAGE_SIZE == 0
    finally:
        r.close()


def test_write_fill_and_view_mark_their_pages(backend, mem):
    """write, fill and a writable view mark every page they touch, each in its own region."""
    low, high = mem.regions
    assert (low._dirty_ptr is None) == (backend == "python")
    mem.write(0x0FFF, b"ab")                       # straddles pages 0 and 1
    mem.fill(0x5000, 0x2001, 0xCC)                 # pages 5, 6 and 7
    v = mem.view(HIGH[0] + 3 * PAGE_SIZE, 1)       # one byte of page 3 of HIGH
    v.release()
    assert pages_of(low.take_dirty()) == {0, 1, 5, 6, 7}
    assert pages_of(high.take_dirty()) == {3}


def test_reads_readonly_views_and_empty_writes_mark_nothing(backend, mem):
    """read(), a read-only view and zero-length writes leave the bitmap clean."""
    mem.read(0x3000, 0x2000)
    v = mem.view(0x3000, 0x2000, writable=False)
    assert v.readonly
    v.release()
    mem.write(0x4000, b"")
    mem.fill(0x4000, 0)
    assert all(r.take_dirty() == bytes(8 * r.dirty_words) for r in mem.regions)


@pytest.mark.parametrize("gpa,length,pages", [
    (0, 1, {0}), (PAGE_SIZE - 1, 1, {0}), (PAGE_SIZE, 1, {1}), (PAGE_SIZE - 1, 2, {0, 1}),
    (0, PAGE_SIZE, {0}), (0, PAGE_SIZE + 1, {0, 1}), (63 * PAGE_SIZE, 2 * PAGE_SIZE, {63, 64}),
    (0, 0x10000, set(range(16))),
])
def test_mark_dirty_page_boundaries(backend, gpa, length, pages):
    """Exactly the pages holding [gpa, gpa+length) are marked, across word boundaries too."""
    with GuestMemory.anonymous(128 * PAGE_SIZE) as m:
        m.mark_dirty(gpa, length)
        assert pages_of(m.regions[0].take_dirty()) == pages


def test_take_dirty_clears_and_mark_outside_ram_is_refused(backend, mem):
    """take_dirty returns the marks once; a second take is clean; marks outside RAM raise."""
    mem.mark_dirty(0x2000, 1)
    low = mem.regions[0]
    assert pages_of(low.take_dirty()) == {2}
    assert low.take_dirty() == bytes(8)
    with pytest.raises(GuestMemoryError):
        mem.mark_dirty(0x10000 - 1, 2)


def test_bit_order_is_little_endian_u64_words(backend):
    """Page p is bit p%64 of u64 word p//64, stored little-endian (page 65 = byte 8, bit 1)."""
    with GuestMemory.anonymous(128 * PAGE_SIZE) as m:
        m.write(65 * PAGE_SIZE, b"x")
        assert m.regions[0].take_dirty() == bytes(8) + b"\x02" + bytes(7)


def test_regions_of_one_guest_share_one_lock(mem):
    """GuestMemory serialises all its regions' Python markers with one lock."""
    low, high = mem.regions
    assert low.dirty_lock is high.dirty_lock is mem.dirty_lock


def test_closed_region_takes_clean_and_ignores_marks():
    """After close(), marking is a no-op and take_dirty returns zeros (no use after unmap)."""
    r = MemoryRegion.anonymous(0, PAGE_SIZE)
    r.mark_dirty(0, 1)
    r.close()
    r.mark_dirty(0, 1)
    assert r.take_dirty() == bytes(8) and r.dirty_address == 0


@given(ops=st.lists(st.tuples(st.sampled_from(["write", "fill", "view", "mark", "take"]),
                              st.integers(0, 100 * PAGE_SIZE), st.integers(0, 3 * PAGE_SIZE)),
                    max_size=30),
       python=st.booleans())
@settings(max_examples=200, deadline=None)
def test_random_writes_mark_the_model_pages(ops, python):
    """Against a model set of pages: marks accumulate from every writer and take() empties them."""
    import kvmpy.kvm.memory as memory
    saved = memory._ffi, memory._lib
    if python:
        memory._ffi = memory._lib = None
    try:
        m = GuestMemory.anonymous(100 * PAGE_SIZE + PAGE_SIZE)
    finally:
        memory._ffi, memory._lib = saved
    with m:
        region, model = m.regions[0], set()
        for kind, gpa, length in ops:
            length = min(length, region.size - gpa)
            if kind == "take":
                assert pages_of(region.take_dirty()) == model
                model = set()
                continue
            if kind == "write":
                m.write(gpa, b"\x01" * length)
            elif kind == "fill":
                m.fill(gpa, length, 2)
            elif kind == "view":
                m.view(gpa, length).release()
            else:
                m.mark_dirty(gpa, length)
            if length:
                model |= set(range(gpa // PAGE_SIZE, (gpa + length - 1) // PAGE_SIZE + 1))
        assert pages_of(region.take_dirty()) == model


@pytest.mark.parametrize("size", [2 << 20, 6 << 20, (64 << 20) + 4096])
def test_ram_of_2_mib_or_more_starts_2_mib_aligned_so_the_host_can_use_huge_pages(size):
    region = MemoryRegion.anonymous(0, size)
    try:
        anchor = ctypes.c_char.from_buffer(region.mm)
        assert ctypes.addressof(anchor) % HUGE_PAGE == 0
        del anchor
        assert len(region.mm) == size
        region.mm[size - 1:size] = b"\x7f"              # the last byte is the region's, and writable
        assert region.mm[size - 1] == 0x7f
    finally:
        region.close()
    assert region.closed


def test_closing_ram_while_a_view_is_held_keeps_the_view_valid():
    mem = GuestMemory.anonymous(4 << 20)
    view = mem.view(0x1000, 4)
    view[:] = b"abcd"
    mem.close()
    assert bytes(view) == b"abcd"                       # the mapping goes with the last view
    view.release()
