"""GuestMemory.flush_page: the host side of pc-testdev's port 0xe4.

A change of protection and back makes the kernel tell KVM to drop its mapping of the page
(tests/integration/test_testdev.py watches KVM's pages_4k statistic for that); here: the
contents stay, the page never stops being readable and writable, the mapping is left as it
was (no split left behind), and addresses that are not RAM are refused.
"""
import ctypes

import pytest

from kvmpy.errors import GuestMemoryError
from kvmpy.kvm.memory import PAGE_SIZE, GuestMemory, MemoryRegion

def _vmas_of(region: MemoryRegion) -> list[str]:
    base = _address(region)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo < base + region.size and base < hi:
                out.append(line.split()[1])
    return out


def _address(region: MemoryRegion) -> int:
    anchor = ctypes.c_char.from_buffer(region.mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def test_flush_page_keeps_contents_and_leaves_the_mapping_as_it_was():
    with GuestMemory([MemoryRegion.anonymous(0, 16 * PAGE_SIZE), MemoryRegion.anonymous(0x100000, 4 * PAGE_SIZE)]) as mem:
        mem.write(0x3000, b"\xa5" * PAGE_SIZE)
        mem.write(0x100FFC, b"edge")
        before = [_vmas_of(r) for r in mem.regions]
        assert mem.flush_page(0x3123) is True
        assert mem.flush_page(0x100FFF) is True
        assert mem.read(0x3000, PAGE_SIZE) == b"\xa5" * PAGE_SIZE and mem.read(0x100FFC, 4) == b"edge"
        mem.write(0x3000, b"still writable")
        assert [_vmas_of(r) for r in mem.regions] == before == [["rw-p"], ["rw-p"]]   # merged back, no x


@pytest.mark.parametrize("gpa", [0x10000, 0xFFFFF, 0x104000, -1, -PAGE_SIZE, 1 << 64, 0xFF000000])
def test_flush_page_outside_ram_does_nothing(gpa):
    with GuestMemory([MemoryRegion.anonymous(0, 16 * PAGE_SIZE), MemoryRegion.anonymous(0x100000, 4 * PAGE_SIZE)]) as mem:
        assert mem.flush_page(gpa) is False


def test_flush_page_of_a_file_backed_region(tmp_path):
    """A restored snapshot's RAM is a private mapping of its file: flushing keeps the private copy."""
    f = tmp_path / "ram"
    f.write_bytes(b"\x11" * (4 * PAGE_SIZE))
    with GuestMemory([MemoryRegion.from_file(str(f), 0, 4 * PAGE_SIZE)]) as mem:
        mem.write(PAGE_SIZE, b"mine")
        assert mem.flush_page(PAGE_SIZE) is True
        assert mem.read(PAGE_SIZE, 5) == b"mine\x11"
    assert f.read_bytes() == b"\x11" * (4 * PAGE_SIZE)


def test_flush_page_of_a_closed_region_is_refused():
    region = MemoryRegion.anonymous(0, PAGE_SIZE)
    region.close()
    with pytest.raises(GuestMemoryError, match="closed"):
        region.flush_page(0)
    with pytest.raises(GuestMemoryError):
        MemoryRegion.anonymous(0, PAGE_SIZE).flush_page(PAGE_SIZE)       # not a page of it
