"""An image, initrd or module larger than guest RAM is refused from its size, before a byte
of it is read (issue 11, item 6: a 2 GiB image was read whole, 2.1 GB RSS, then refused)."""
import os
import stat
import threading
import tracemalloc

import pytest

from kvmpy.errors import LoaderError, read_file
from kvmpy.loader import load

from .guestram import RAM, fresh_mem

GiB = 1 << 30


def sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def peak_while(fn) -> int:
    """Peak bytes Python allocated while ``fn()`` ran (it must raise LoaderError)."""
    tracemalloc.start()
    try:
        with pytest.raises(LoaderError) as e:
            fn()
        return tracemalloc.get_traced_memory()[1], str(e.value)
    finally:
        tracemalloc.stop()


def test_a_2_gib_image_is_refused_without_reading_it(tmp_path):
    big = sparse(tmp_path / "big.img", 2 * GiB)
    mem = fresh_mem()
    peak, message = peak_while(lambda: load(mem, big, "raw", load_addr=0x10_0000))
    assert peak < 1 << 20, f"{peak} bytes allocated to refuse a 2 GiB image"
    assert message == (f"cannot load image '{big}': it is {2 * GiB} bytes, "
                       f"more than the {RAM} bytes of guest RAM")


def test_an_initrd_and_a_module_are_checked_the_same_way(tmp_path):
    big = sparse(tmp_path / "big.cpio", 2 * GiB)
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\x90" * 16)
    mem = fresh_mem()
    peak, message = peak_while(lambda: load(mem, kernel, initrd=big))
    assert peak < 1 << 20 and message.startswith(f"cannot load initrd '{big}': it is {2 * GiB} bytes")
    peak, message = peak_while(lambda: load(mem, kernel, modules=[(big, "x")]))
    assert peak < 1 << 20 and message.startswith(f"cannot load module '{big}': it is {2 * GiB} bytes")


def test_read_file_limit_at_the_boundary(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    assert read_file(p, "image", limit=100) == b"x" * 100
    with pytest.raises(LoaderError, match=r"it is 100 bytes, more than the 99 bytes of guest RAM"):
        read_file(p, "image", limit=99)


def test_a_stream_with_no_size_is_read_only_up_to_the_limit(tmp_path):
    """A pipe (say, bash's <(...)) has no size to check first: at most limit + 1 bytes are read."""
    r, w = os.pipe()
    sent = []

    def writer():
        try:
            while sum(sent) < 64 << 20:
                sent.append(os.write(w, bytes(1 << 16)))
        except BrokenPipeError:
            pass
        finally:
            os.close(w)
    t = threading.Thread(target=writer)
    t.start()
    try:
        assert stat.S_ISFIFO(os.fstat(r).st_mode)
        with pytest.raises(LoaderError, match=r"cannot load initrd '/dev/fd/\d+': it is more than the "
                                              r"1048576 bytes of guest RAM"):
            read_file(f"/dev/fd/{r}", "initrd", limit=1 << 20)
    finally:
        os.close(r)
        t.join()
    assert sum(sent) < 8 << 20


def test_bytes_are_not_limited_here(tmp_path):
    """Bytes are already in memory; the loaders refuse what does not fit, as before."""
    assert read_file(b"abc", "image", limit=1) == b"abc"
