"""Linux zero page and e820 map: fields land at bootparam.h's offsets, RAM is described exactly."""
import struct

import pytest
from hypothesis import given, strategies as st

from kvmpy.x86 import bootparams as bp
from kvmpy.x86.bootparams import E820Entry, boot_params, e820_map

MiB, GiB = 1 << 20, 1 << 30


def header(end=0x26C, **fields) -> bytes:
    """Setup-header bytes 0x1f1..end with a few fields set (offsets from the image start)."""
    h = bytearray(end - 0x1F1)
    for off, (fmt, value) in fields.items():
        struct.pack_into(fmt, h, int(off, 16) - 0x1F1, value)
    return bytes(h)


def test_e820_cuts_the_legacy_hole_out_of_low_ram():
    """RAM from 0 is reported as 0..0x9FC00 and 1 MiB..end: the EBDA, VGA and BIOS area are left out."""
    assert e820_map([(0, 512 * MiB)]) == [E820Entry(0, 0x9FC00), E820Entry(MiB, 511 * MiB)]


def test_e820_keeps_ram_above_4g_separate_and_merges_adjacent_ranges():
    """Adjacent regions merge; the MMIO hole below 4 GiB stays a gap."""
    got = e820_map([(4 * GiB, GiB), (MiB, MiB), (2 * MiB, MiB)])
    assert got == [E820Entry(MiB, 2 * MiB), E820Entry(4 * GiB, GiB)]


@pytest.mark.parametrize("ram", [[(0, MiB), (MiB // 2, MiB)], [(0, 0)], [(-4096, 8192)]])
def test_e820_rejects_bad_ram(ram):
    """Overlapping, empty or negative ranges are a bug in the caller: ValueError."""
    with pytest.raises(ValueError):
        e820_map(ram)


def test_e820_rejects_more_entries_than_the_zero_page_holds():
    """boot_params has room for 128 entries."""
    ram = [(i * 2 * MiB + 16 * MiB, MiB) for i in range(129)]
    with pytest.raises(ValueError, match="128"):
        e820_map(ram)


@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 12)), min_size=1, max_size=20))
def test_e820_covers_exactly_the_ram_outside_the_hole(pages):
    """For disjoint RAM ranges, the map covers the same bytes minus the legacy hole, sorted, disjoint."""
    ranges, cursor = [], 0
    for gap, size in pages:            # build disjoint ranges from (gap, size) page counts
        start = cursor + gap * 4096
        ranges.append((start, size * 4096))
        cursor = start + size * 4096
    got = e820_map(ranges)
    for a, b in zip(got, got[1:]):
        assert a.end < b.addr           # sorted, disjoint, not adjacent (adjacent ones merge)
    lo, hi = bp.LEGACY_HOLE
    for probe in {r[0] for r in ranges} | {r[0] + r[1] - 1 for r in ranges} | {lo - 1, lo, hi - 1, hi}:
        in_ram = any(a <= probe < a + n for a, n in ranges) and not lo <= probe < hi
        assert in_ram == any(e.addr <= probe < e.end for e in got)


def test_boot_params_copies_the_header_and_sets_the_loader_fields():
    """The image's header is copied to 0x1f1; loader, cmdline, initrd, code32_start and e820 are filled in."""
    hdr = header(**{"0x202": ("4s", b"HdrS"), "0x206": ("<H", 0x20F), "0x230": ("<I", 0x200000)})
    e820 = [E820Entry(0, 0x9FC00), E820Entry(MiB, 63 * MiB)]
    page = boot_params(hdr, cmd_line_ptr=0x80000, e820=e820, ramdisk_image=0x3F00000, ramdisk_size=0x1234,
                       code32_start=0x1000000)
    assert len(page) == 4096
    assert page[0x202:0x206] == b"HdrS" and struct.unpack_from("<I", page, 0x230)[0] == 0x200000
    assert page[0x210] == 0xFF                                          # type_of_loader: undefined
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x80000          # cmd_line_ptr
    assert struct.unpack_from("<II", page, 0x218) == (0x3F00000, 0x1234)  # ramdisk_image, ramdisk_size
    assert struct.unpack_from("<I", page, 0x214)[0] == 0x1000000        # code32_start
    assert struct.unpack_from("<III", page, 0xC0) == (0, 0, 0)          # ext_* fields
    assert page[0x1E8] == 2 and page[0x1EF] == 0                        # e820_entries, sentinel
    assert struct.unpack_from("<QQI", page, 0x2D0) == (0, 0x9FC00, 1)
    assert struct.unpack_from("<QQI", page, 0x2D0 + 20) == (MiB, 63 * MiB, 1)


def test_boot_params_splits_64_bit_addresses_into_the_ext_fields():
    """Addresses above 4 GiB go half in the header field, half in ext_* (protocol 2.12)."""
    page = boot_params(header(), cmd_line_ptr=0x1_0000_2000, e820=[], ramdisk_image=0x2_0000_0000,
                       ramdisk_size=0x1_0000_0001)
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x2000
    assert struct.unpack_from("<III", page, 0xC0) == (2, 1, 1)
    assert struct.unpack_from("<I", page, 0x218)[0] == 0 and struct.unpack_from("<I", page, 0x21C)[0] == 1


@pytest.mark.parametrize("size", [0, 0x228 + 4 - 0x1F1 - 1, 0x290 - 0x1F1 + 1])
def test_boot_params_rejects_a_header_of_impossible_size(size):
    """Shorter than cmd_line_ptr or longer than the header area: ValueError."""
    with pytest.raises(ValueError):
        boot_params(bytes(size), cmd_line_ptr=0, e820=[])


def test_boot_params_carries_the_acpi_rsdp_address():
    """acpi_rsdp_addr is the u64 at 0x070 (zero-page.rst); 0 when none is given."""
    assert struct.unpack_from("<Q", boot_params(header(), cmd_line_ptr=0, e820=[]), 0x70)[0] == 0
    page = boot_params(header(), cmd_line_ptr=0, e820=[], acpi_rsdp_addr=0xE0000)
    assert struct.unpack_from("<Q", page, 0x70)[0] == 0xE0000


def test_e820_lists_extra_entries_in_address_order_and_cuts_them_out_of_ram():
    """An ACPI range in the legacy hole sits between the two low RAM entries; one in RAM splits it."""
    acpi = E820Entry(0xE0000, 0x1000, bp.E820_ACPI)
    assert e820_map([(0, 64 * MiB)], extra=[acpi]) == [E820Entry(0, 0x9FC00), acpi, E820Entry(MiB, 63 * MiB)]
    high = E820Entry(8 * MiB, 0x2000, bp.E820_ACPI)
    assert e820_map([(0, 64 * MiB)], extra=[high, acpi]) == [
        E820Entry(0, 0x9FC00), acpi, E820Entry(MiB, 7 * MiB), high, E820Entry(8 * MiB + 0x2000, 56 * MiB - 0x2000)]
    with pytest.raises(ValueError, match="overlap"):
        e820_map([(0, 64 * MiB)], extra=[acpi, E820Entry(0xE0800, 0x1000, bp.E820_RESERVED)])
