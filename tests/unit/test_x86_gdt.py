"""Segment descriptors, the boot GDT and the boot TSS, decoded independently of gdt.py.

The decoder below follows the byte layout drawn in Intel SDM vol. 3A, figure 3-8
(segment descriptor) and figure 8-4 (64-bit TSS descriptor), byte by byte, rather than
re-using the shifts in ``gdt.descriptor()``.
"""
import struct

import pytest
from hypothesis import given, strategies as st

from kvmpy.x86 import gdt, layout
from kvmpy.kvm.regs import Segment

SELECTORS = {
    "SEL_CODE64": layout.SEL_CODE64,
    "SEL_DATA": layout.SEL_DATA,
    "SEL_CODE32": layout.SEL_CODE32,
    "SEL_USER_CODE64": layout.SEL_USER_CODE64,
    "SEL_USER_DATA": layout.SEL_USER_DATA,
    "SEL_TSS": layout.SEL_TSS,
}
assert SELECTORS == {k: v for k, v in vars(layout).items() if k.startswith("SEL_")}, "a new SEL_* needs a test"


def decode(raw: bytes) -> dict:
    """Decode one 8-byte legacy descriptor (SDM fig. 3-8) into its fields."""
    assert len(raw) == 8
    b = raw
    limit = b[0] | b[1] << 8 | (b[6] & 0x0F) << 16
    base = b[2] | b[3] << 8 | b[4] << 16 | b[7] << 24
    access, flags = b[5], b[6] >> 4
    return {
        "base": base,
        "limit": limit,
        "type": access & 0x0F,
        "s": (access >> 4) & 1,
        "dpl": (access >> 5) & 3,
        "present": access >> 7,
        "avl": flags & 1,
        "l": (flags >> 1) & 1,
        "db": (flags >> 2) & 1,
        "g": (flags >> 3) & 1,
    }


def hidden_state(fields: dict) -> dict:
    """What a CPU loads into a segment register's hidden part from decoded fields."""
    limit = (fields["limit"] << 12 | 0xFFF) if fields["g"] else fields["limit"]
    return {**fields, "limit": limit}


def segment_fields(seg: Segment) -> dict:
    return {k: getattr(seg, k) for k in ("base", "limit", "type", "s", "dpl", "present", "avl", "l", "db", "g")}


def gdt_entry(table: bytes, selector: int) -> bytes:
    index = selector & ~7
    return table[index:index + 8]


@given(base=st.integers(0, 0xFFFF_FFFF), limit=st.integers(0, 0xF_FFFF), type_=st.integers(0, 15),
       s=st.integers(0, 1), dpl=st.integers(0, 3), present=st.integers(0, 1), l=st.integers(0, 1),
       db=st.integers(0, 1), g=st.integers(0, 1))
def test_descriptor_round_trips_through_independent_decoder(base, limit, type_, s, dpl, present,
                                                            l, db, g):  # noqa: E741
    """descriptor() places every field at its SDM bit position, and nothing else is set."""
    d = gdt.descriptor(base, limit, type_, s=s, dpl=dpl, present=present, l=l, db=db, g=g)
    assert 0 <= d < 1 << 64
    got = decode(d.to_bytes(8, "little"))
    assert got == {"base": base, "limit": limit, "type": type_, "s": s, "dpl": dpl, "present": present,
                   "avl": 0, "l": l, "db": db, "g": g}


def test_descriptor_known_flat_code_segment():
    """The classic flat 64-bit ring-0 code descriptor is 0x00AF9B000000FFFF."""
    assert gdt.descriptor(0, 0xFFFFF, 0xB, l=1, db=0, g=1) == 0x00AF_9B00_0000_FFFF


@pytest.mark.parametrize("field,value", [("dpl", 4), ("l", 2), ("s", 2)])
def test_descriptor_rejects_out_of_range_fields(field, value):
    """A flag wider than its field raises ValueError instead of spilling into a neighbouring bit."""
    kwargs = {"s": 1, "dpl": 0, "present": 0, "l": 0, "db": 0, "g": 0, field: value}
    with pytest.raises(ValueError):
        gdt.descriptor(0, 0, 0x3, **kwargs)


def test_boot_gdt_has_null_entry_and_fits_every_selector():
    """Entry 0 is the null descriptor and every selector's descriptor lies inside the table."""
    table = gdt.boot_gdt()
    assert len(table) % 8 == 0
    assert table[:8] == bytes(8)
    for name, sel in SELECTORS.items():
        size = 16 if sel == layout.SEL_TSS else 8
        assert (sel & ~7) + size <= len(table), name
    assert len(table) == (layout.SEL_TSS & ~7) + 16


@pytest.mark.parametrize("name", [n for n in SELECTORS if n != "SEL_TSS"])
def test_boot_gdt_entry_matches_segment_for(name):
    """Each code/data entry decodes to exactly the hidden state segment_for() gives KVM."""
    sel = SELECTORS[name]
    seg = gdt.segment_for(sel)
    got = hidden_state(decode(gdt_entry(gdt.boot_gdt(), sel)))
    assert got == segment_fields(seg)
    assert seg.selector == sel
    assert sel & 3 == seg.dpl, "RPL of the selector matches the descriptor's DPL"


@pytest.mark.parametrize("name,code,dpl,bits", [
    ("SEL_CODE64", True, 0, 64), ("SEL_DATA", False, 0, None), ("SEL_CODE32", True, 0, 32),
    ("SEL_USER_CODE64", True, 3, 64), ("SEL_USER_DATA", False, 3, None),
])
def test_boot_gdt_entries_are_flat_with_expected_kind(name, code, dpl, bits):
    """Code/data entries are flat 4 GiB, present, of the expected kind, ring and width."""
    f = hidden_state(decode(gdt_entry(gdt.boot_gdt(), SELECTORS[name])))
    assert (f["base"], f["limit"], f["present"], f["s"], f["dpl"]) == (0, 0xFFFF_FFFF, 1, 1, dpl)
    assert bool(f["type"] & 0x8) == code                 # bit 3 of type: code vs data
    if code:
        assert f["type"] & 0x2, "code is readable"
        assert (f["l"], f["db"]) == ((1, 0) if bits == 64 else (0, 1))
    else:
        assert f["type"] & 0x2, "data is writable"
        assert f["l"] == 0


def test_boot_gdt_tss_descriptor_is_16_bytes_with_layout_base_and_limit():
    """The TSS descriptor: base BOOT_TSS, limit BOOT_TSS_SIZE-1, byte granular, upper half = base>>32."""
    table = gdt.boot_gdt()
    off = layout.SEL_TSS & ~7
    low = decode(table[off:off + 8])
    upper_base, upper_rest = struct.unpack_from("<II", table, off + 8)
    full_base = low["base"] | upper_base << 32
    assert full_base == layout.BOOT_TSS
    assert upper_base == layout.BOOT_TSS >> 32
    assert upper_rest == 0, "bits 96-127 are reserved; the type bits 8-12 there must be zero"
    assert low["limit"] == layout.BOOT_TSS_SIZE - 1 and low["g"] == 0
    assert low["s"] == 0 and low["present"] == 1 and low["type"] in (0x9, 0xB)
    seg = gdt.segment_for(layout.SEL_TSS)
    assert hidden_state(low) == segment_fields(seg)
    assert seg.selector == layout.SEL_TSS


def test_segment_for_unknown_selector_fails():
    """A selector that is not in the boot GDT is not silently given some segment."""
    with pytest.raises((KeyError, ValueError)):
        gdt.segment_for(0x38)


@given(rsp0=st.integers(0, (1 << 64) - 1))
def test_boot_tss_places_rsp0_at_offset_4(rsp0):
    """RSP0 is the little-endian quadword at offset 4 (SDM fig. 8-11)."""
    tss = gdt.boot_tss(rsp0)
    assert struct.unpack_from("<Q", tss, 4)[0] == rsp0


def test_boot_tss_default_rsp0_is_ring0_stack():
    """By default RSP0 is layout.RING0_STACK_TOP."""
    assert struct.unpack_from("<Q", gdt.boot_tss(), 4)[0] == layout.RING0_STACK_TOP


def test_boot_tss_io_bitmap_allows_every_port():
    """The I/O map base at 0x66 points at 8192 zero bytes (all 65536 ports allowed) then 0xFF."""
    tss = gdt.boot_tss()
    assert len(tss) == layout.BOOT_TSS_SIZE
    iomap = struct.unpack_from("<H", tss, 0x66)[0]
    assert iomap >= 0x68, "the bitmap must not overlap the 104-byte TSS proper"
    assert tss[iomap:iomap + 8192] == bytes(8192)
    assert tss[iomap + 8192] == 0xFF
    # The descriptor's limit must cover the bitmap and its terminator byte.
    assert gdt.segment_for(layout.SEL_TSS).limit >= iomap + 8192


def test_boot_tss_reserved_and_stack_fields_are_zero():
    """Apart from RSP0 and the I/O map base, the TSS proper is zero (no IST, no RSP1/2)."""
    tss = bytearray(gdt.boot_tss())
    tss[4:12] = bytes(8)
    tss[0x66:0x68] = bytes(2)
    assert bytes(tss[:0x68]) == bytes(0x68)
