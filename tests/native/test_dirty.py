"""The C virtio-blk marks the guest pages it writes in the region's dirty bitmap, and
takes never lose a mark made concurrently (csrc/dirty.c atomics)."""
import struct
import threading

import pytest

from kvmpy.kvm.memory import PAGE_SIZE, GuestMemory

from .test_virtio_differential import AVAIL, DESC, DISK, USED, Side


def pages(mem: GuestMemory) -> set[int]:
    """Take region 0's bitmap and decode it: page p is bit p%64 of little-endian u64 word p//64."""
    bits = int.from_bytes(mem.regions[0].take_dirty(), "little")
    return {p for p in range(bits.bit_length()) if bits >> p & 1}


def offer(side: Side, bufs: list[tuple[int, int, bool]]) -> None:
    """Descriptors 0.. for (gpa, len, device-writable) buffers, offered at the next avail slot."""
    for i, (addr, n, w) in enumerate(bufs):
        last = i == len(bufs) - 1
        side.mem.write(DESC + 16 * i, struct.pack("<QIHH", addr, n, (2 if w else 0) | (0 if last else 1), i + 1))
    side.mem.write(AVAIL + 4 + 2 * (side.avail_idx % 16), b"\0\0")
    side.avail_idx += 1
    side.mem.write(AVAIL + 2, struct.pack("<H", side.avail_idx))


@pytest.fixture(params=[True, "engine", False], ids=["native", "engine", "python"])
def side(request, tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (DISK // 256))
    s = Side(path, native=request.param)
    s.apply(("init", True))
    yield s
    s.close()


HDR, DATA1, DATA2, STATUS = 0x8000, 0xA800, 0xD000, 0xF000


def test_a_read_marks_exactly_data_status_and_used_ring(side):
    """IN served by the device: the data buffers' pages, the status byte's and the used ring's."""
    side.mem.write(HDR, struct.pack("<IIQ", 0, 0, 2))
    offer(side, [(HDR, 16, False), (DATA1, 0x1000, True), (DATA2, 512, True), (STATUS, 1, True)])
    pages(side.mem)                                  # forget the driver's own writes
    side.dev.write(0x050, 4, 0)                      # QueueNotify
    assert side.mem.read(STATUS, 1) == b"\0"
    assert side.mem.read(DATA1, 4) == bytes([0, 1, 2, 3])
    assert pages(side.mem) == {USED // PAGE_SIZE, 0xA, 0xB, 0xD, 0xF}


def test_a_write_marks_only_status_and_used_ring(side):
    """OUT only reads the data buffers: just the status byte and the used ring are dirty."""
    side.mem.write(HDR, struct.pack("<IIQ", 1, 0, 2))
    offer(side, [(HDR, 16, False), (DATA1, 0x1000, False), (STATUS, 1, True)])
    pages(side.mem)
    side.dev.write(0x050, 4, 0)
    assert side.mem.read(STATUS, 1) == b"\0"
    assert pages(side.mem) == {USED // PAGE_SIZE, 0xF}


def test_get_id_marks_the_id_bytes_pages(side):
    """GET_ID copies the ID into guest RAM: those pages are dirty (here across a page boundary)."""
    side.mem.write(HDR, struct.pack("<IIQ", 8, 0, 0))
    offer(side, [(HDR, 16, False), (0xAFF8, 20, True), (STATUS, 1, True)])
    pages(side.mem)
    side.dev.write(0x050, 4, 0)
    assert pages(side.mem) == {USED // PAGE_SIZE, 0xA, 0xB, 0xF}


def test_a_read_on_a_closed_disk_marks_only_status_and_used_ring(side):
    """A read refused with IOERR before any I/O moves no data: only status and used ring are dirty."""
    (side.blk if hasattr(side, "blk") else side.dev).close()
    side.mem.write(HDR, struct.pack("<IIQ", 0, 0, 0))
    offer(side, [(HDR, 16, False), (DATA1, 512, True), (STATUS, 1, True)])
    pages(side.mem)
    side.dev.write(0x050, 4, 0)
    assert side.mem.read(STATUS, 1) == b"\1"
    assert pages(side.mem) == {USED // PAGE_SIZE, 0xF}


def test_concurrent_takes_lose_no_marks():
    """C threads and Python mark every page exactly once while another thread keeps taking:
    the union of all takes is every page (a read-then-clear take would drop some)."""
    from kvmpy._native import lib
    npages, nthreads = 64 * 64, 4
    with GuestMemory.anonymous(npages * PAGE_SIZE) as mem:
        region = mem.regions[0]
        ptr = region._dirty_ptr
        seen, done = set(), threading.Event()

        def taker():
            while not done.is_set():
                bits = int.from_bytes(region.take_dirty(), "little")
                seen.update(p for p in range(bits.bit_length()) if bits >> p & 1)

        def marker(k):
            for p in range(k, npages, nthreads + 1):
                if k == nthreads:
                    mem.mark_dirty(p * PAGE_SIZE, 1)     # the Python path, through the lock
                else:
                    lib.kvmpy_dirty_mark(ptr, p, 1)      # C, GIL released

        t = threading.Thread(target=taker)
        t.start()
        markers = [threading.Thread(target=marker, args=(k,)) for k in range(nthreads + 1)]
        for m in markers:
            m.start()
        for m in markers:
            m.join()
        done.set()
        t.join()
        bits = int.from_bytes(region.take_dirty(), "little")
        seen.update(p for p in range(bits.bit_length()) if bits >> p & 1)
        assert seen == set(range(npages))


def test_native_device_marks_while_python_takes(tmp_path):
    """A C virtio-blk serving reads in one thread and takes in another: no page is lost."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK))
    side = Side(path, native=True)
    side.apply(("init", True))
    try:
        seen, done = set(), threading.Event()

        def taker():
            while not done.is_set():
                seen.update(pages(side.mem))

        t = threading.Thread(target=taker)
        t.start()
        for i in range(200):
            data = 0x10000 + (i % 32) * PAGE_SIZE
            side.mem.write(HDR, struct.pack("<IIQ", 0, 0, 0))
            offer(side, [(HDR, 16, False), (data, 512, True), (STATUS, 1, True)])
            side.dev.write(0x050, 4, 0)
        done.set()
        t.join()
        seen.update(pages(side.mem))
        assert {0x10 + j for j in range(32)} <= seen
        assert {USED // PAGE_SIZE, 0xF} <= seen
    finally:
        side.close()
