"""Faults from the host (issue 11, item 14): a backing file that runs out of space gives the
guest IOERR, the VMM keeps running, and every write the guest saw acknowledged is in the file.

The disk lives on a 64 KiB tmpfs, so writes past the first 64 KiB fail with ENOSPC. The
blk-write guest writes its pattern in 8 KiB requests and stops at the first one refused
(exit 0x45), so every request before that one was acknowledged to it.
"""
import struct
import subprocess

import pytest

import kvmpy
from kvmpy import guests

NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
SECTOR, REQUEST = 512, 8192
GOLDEN = 0x9E3779B97F4A7C15


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs mounted under tmp_path (root only; skipped where mount is refused)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def pattern_word(k: int) -> bytes:
    return struct.pack("<Q", ((k + 1) * GOLDEN) & (2**64 - 1))


@NATIVE
def test_a_full_backing_file_gives_the_guest_ioerr_and_keeps_what_it_acknowledged(kvm_required, tiny_fs, native):
    disk = tiny_fs / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)                     # sparse: 1 MiB on a 64 KiB file system
    g = guests.get("blk-write")
    with kvmpy.Machine(disks=[str(disk)], native=native) as m:
        m.load(g.path, g.format, mode=g.mode, user=True)
        result = m.run(timeout=60)
        out = m.serial_output
    assert result.reason == "exit" and result.status == (0x45 << 1) | 1, out   # the guest got IOERR
    assert b"write failed" in out
    data = disk.read_bytes()
    good = 0                                    # whole 8 KiB requests holding the pattern, from the start
    while good * REQUEST < len(data) and all(
            data[off:off + 8] == pattern_word(off // 8) for off in range(good * REQUEST, (good + 1) * REQUEST, 8)):
        good += 1
    assert 1 <= good < 16                      # some writes were acknowledged before the file system filled
    assert not any(data[(good + 1) * REQUEST:])    # nothing past the refused request was written
