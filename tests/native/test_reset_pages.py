"""csrc/reset.c against its Python models: the page copy (copy_pages_model) and the disk
overlay's copy-back of written blocks; both with hypothesis-chosen bitmaps and contents."""
import mmap
import os

from hypothesis import given, settings, strategies as st

from kvmpy._native import ffi, lib
from kvmpy.devices.virtio.blk import mark_blocks
from kvmpy.kvm.memory import PAGE_SIZE
from kvmpy.lifecycle.reset import copy_pages_model, hot_mask_model

from .test_virtio_differential import DISK, Side


def _pages(draw, n: int) -> bytes:
    seeds = draw(st.lists(st.integers(0, 255), min_size=n, max_size=n))
    return b"".join(bytes([s]) * PAGE_SIZE for s in seeds)


@st.composite
def cases(draw):
    pages = draw(st.integers(1, 200))
    words = (pages + 63) // 64
    bitmap = st.binary(min_size=8 * words, max_size=8 * words)
    log = draw(st.none() | bitmap)
    vmm = draw(st.none() | bitmap)
    return pages, _pages(draw, pages), _pages(draw, pages), log, vmm


@settings(max_examples=150, deadline=None)
@given(cases())
def test_c_copy_matches_the_model(case):
    """Same RAM after, same count, the VMM bitmap taken (zero) in both, the log untouched;
    bits past the last page (the tail of the last word) copy nothing."""
    pages, ram0, saved, log, vmm = case
    model_ram, model_vmm = bytearray(ram0), bytearray(vmm) if vmm is not None else None
    n_model = copy_pages_model(model_ram, saved, pages, log, model_vmm)

    c_ram = mmap.mmap(-1, len(ram0))
    c_ram[:] = ram0
    c_saved = ffi.new("uint8_t[]", saved)
    c_log = ffi.new("uint64_t[]", len(log) // 8) if log is not None else ffi.NULL
    if log is not None:
        ffi.memmove(c_log, log, len(log))
    c_vmm = ffi.new("uint64_t[]", len(vmm) // 8) if vmm is not None else ffi.NULL
    if vmm is not None:
        ffi.memmove(c_vmm, vmm, len(vmm))
    buf = ffi.from_buffer(c_ram)
    n_c = lib.kvmpy_reset_copy_pages(ffi.cast("uint8_t *", buf), c_saved, pages, c_log, c_vmm)
    ffi.release(buf)

    assert n_c == n_model
    assert c_ram[:] == bytes(model_ram)
    if vmm is not None:
        assert bytes(ffi.buffer(c_vmm)) == bytes(model_vmm) == bytes(len(vmm))
    if log is not None:
        assert bytes(ffi.buffer(c_log)) == log


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 40000), writes=st.lists(st.tuples(st.integers(0, 39999), st.integers(1, 9000)),
                                                  max_size=6))
def test_disk_copy_back_restores_the_written_blocks(tmp_path_factory, size, writes):
    """Writes marked with mark_blocks (the Python virtio-blk's marker) into an overlay, then
    kvmpy_reset_disk: the overlay equals the backing file again, a short last block included,
    and the bitmap is empty."""
    d = tmp_path_factory.mktemp("disk")
    backing = os.urandom(size)
    (d / "file").write_bytes(backing)
    fd_file = os.open(d / "file", os.O_RDONLY)
    fd_over = os.memfd_create("t")
    try:
        os.pwrite(fd_over, backing, 0)
        blocks = -(-size // 4096)
        written = bytearray(-(-blocks // 64) * 8)
        for pos, n in writes:
            pos, n = min(pos, size - 1), min(n, size - min(pos, size - 1))
            os.pwrite(fd_over, b"\xa5" * n, pos)
            mark_blocks(written, pos, n)
        c_written = ffi.new("uint64_t[]", len(written) // 8)
        ffi.memmove(c_written, bytes(written), len(written))
        n = lib.kvmpy_reset_disk(fd_file, fd_over, c_written, size, ffi.new("uint8_t[]", 4096))
        assert n == sum(bin(b).count("1") for b in written)
        assert os.pread(fd_over, size + 10, 0) == backing
        assert bytes(ffi.buffer(c_written)) == bytes(len(written))
    finally:
        os.close(fd_file)
        os.close(fd_over)


@settings(max_examples=40, deadline=None)
@given(reqs=st.lists(st.tuples(st.sampled_from([0, 1]), st.integers(0, 140), st.integers(1, 16),
                               st.integers(1, 3)), min_size=1, max_size=4))
def test_both_virtio_blk_twins_mark_the_same_blocks_and_spare_the_file(tmp_path_factory, reqs):
    """With an overlay (use_overlay), the C virtio-blk, the C request queue behind the Python
    transport and the Python model send writes to the overlay, never to the file, mark the
    same 4 KiB blocks (reads mark nothing), and read back what was written."""
    d = tmp_path_factory.mktemp("twins")
    content = os.urandom(DISK)
    results = []
    for native in (True, "engine", False):
        path = d / f"disk-{native}.img"
        path.write_bytes(content)
        side = Side(path, native)
        side.apply(("init", True))
        over = os.memfd_create("overlay")
        os.pwrite(over, content, 0)
        written = mmap.mmap(-1, 8 * (-(-DISK // 4096 // 64) or 1))
        (side.dev if native is True else side.blk).use_overlay(over, written)
        try:
            statuses = [side.request(t, sector, 512 * n, t == 0, 1, split, 16) for t, sector, n, split in reqs]
            results.append((statuses, bytes(written), os.pread(over, DISK, 0)))
            assert path.read_bytes() == content             # the file is never written
        finally:
            side.close()
            os.close(over)
    assert results[0] == results[1] == results[2]
    statuses, bits, data = results[0]
    expect = bytearray(len(bits))
    for (t, sector, n, _), status in zip(reqs, statuses):
        if t == 1 and status == b"\0":
            mark_blocks(expect, 512 * sector, 512 * n)
    assert bits == bytes(expect)


@st.composite
def hot_cases(draw):
    pages = draw(st.integers(1, 200))
    nbytes = 8 * ((pages + 63) // 64)
    bitmap = st.binary(min_size=nbytes, max_size=nbytes)
    hot_max = draw(st.integers(0, 40))
    return pages, draw(st.lists(bitmap, min_size=1, max_size=6)), hot_max


@settings(max_examples=150, deadline=None)
@given(hot_cases())
def test_c_hot_pages_match_the_model(case):
    """kvmpy_reset_hot_mask over a run of resets' logs: the same mask to protect again, the same
    hot pages and count as hot_mask_model, never more than hot_max, never a page past the end,
    and a hot page never protected again."""
    pages, logs, hot_max = case
    n = len(logs[0])
    prev, hot, count = bytearray(n), bytearray(n), 0
    c_prev, c_hot, c_mask = (ffi.new("uint64_t[]", n // 8) for _ in range(3))
    c_count = ffi.new("uint64_t *")
    for log in logs:
        mask, count, made = hot_mask_model(log, prev, hot, pages, count, hot_max)
        c_log = ffi.new("uint64_t[]", n // 8)
        ffi.memmove(c_log, log, n)
        c_made = lib.kvmpy_reset_hot_mask(c_log, c_prev, c_hot, c_mask, pages, c_count, hot_max)
        assert (c_made, c_count[0]) == (made, count)
        assert bytes(ffi.buffer(c_mask)) == mask
        assert bytes(ffi.buffer(c_hot)) == bytes(hot) and bytes(ffi.buffer(c_prev)) == bytes(prev)
        assert count <= hot_max and not int.from_bytes(hot, "little") >> pages
        assert not int.from_bytes(mask, "little") & int.from_bytes(hot, "little")
