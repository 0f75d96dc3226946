"""Disks: virtio-blk data reaches the guest and the file, read-only holds, nothing is lost."""
import hashlib
import os
import signal
import struct
import subprocess
import sys

import pytest

import kvmpy
from kvmpy import guests
from . import lab

PATTERN_MUL = 0x9E3779B97F4A7C15
LOOPS = [True, False]
LOOP_IDS = ["native", "python"]


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def pattern(nbytes: int) -> bytes:
    return b"".join(struct.pack("<Q", ((k + 1) * PATTERN_MUL) & 0xFFFFFFFFFFFFFFFF) for k in range(nbytes // 8))


def run(name, disks, native=True, irqchip=False):
    g = guests.get(name)
    with kvmpy.Machine(disks=disks, native=native, irqchip=irqchip) as m:
        m.load(g.path, user=g.user)
        result = m.run(timeout=60)
        return g, result, m.serial_output


@pytest.mark.parametrize("irqchip", [False, True], ids=["no-irqchip", "irqchip"])
@pytest.mark.parametrize("native", LOOPS, ids=LOOP_IDS)
def test_guest_reads_the_whole_disk(tmp_path, native, irqchip):
    """blk-read's checksum equals FNV-1a of the file's whole sectors; the partial tail is ignored."""
    data = os.urandom(300 * 512 + 100)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    g, result, out = run("blk-read", [str(path)], native, irqchip)
    assert result.status == g.disk_status
    assert f"blk-read: 300 sectors, checksum {fnv1a64(data[:300 * 512]):#x}\n".encode() in out


@pytest.mark.parametrize("native", LOOPS, ids=LOOP_IDS)
def test_guest_writes_reach_the_file(tmp_path, native):
    """blk-write's pattern lands in the file at the right offsets; the rest and the size are unchanged."""
    rest = os.urandom(64 * 512 + 7)
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(256 * 512) + rest)
    g, result, out = run("blk-write", [str(path)], native)
    assert result.status == g.disk_status, out
    body = path.read_bytes()
    assert body[:256 * 512] == pattern(256 * 512)
    assert body[256 * 512:] == rest


@pytest.mark.parametrize("native", LOOPS, ids=LOOP_IDS)
def test_read_only_disk_refuses_writes(tmp_path, native):
    """On a ',ro' disk the guest's writes fail with IOERR and the file is untouched."""
    data = os.urandom(64 * 512)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    os.chmod(path, 0o444)                      # opened O_RDONLY: works even without write permission
    g, result, out = run("blk-write", [f"{path},ro"], native)
    assert b"write failed (read-only?)" in out
    assert result.status == (0x45 << 1) | 1
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_flushed_writes_survive_kill_9(tmp_path):
    """Writes the guest saw flushed are in the file even if the VMM is killed with SIGKILL right after."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 512))
    g = guests.get("blk-durable")
    env = lab.CHILD_ENV
    p = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", str(g.path), "--user", "--disk", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd="/")
    try:
        seen = b""
        while b"flushed" not in seen:
            line = p.stdout.readline()
            assert line, f"VMM ended early: {seen!r} {p.stderr.read()!r}"
            seen += line
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    assert b"64 sectors flushed" in seen
    assert path.read_bytes() == pattern(64 * 512)


def test_several_disks_get_their_own_window_and_irq(tmp_path):
    """Each disk gets a virtio-mmio window and IRQ from layout.py, announced for Linux's command line."""
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"d{i}.img")
        paths[-1].write_bytes(bytes(4096 * (i + 1)))
    with kvmpy.Machine(disks=[str(paths[0]), kvmpy.Disk(str(paths[1]), readonly=True)]) as m:
        names = [a.name for a in m.mmio.devices]
        cmdline = m.virtio_mmio_cmdline()
    assert names == ["virtio-blk0", "virtio-blk1"]
    assert cmdline == "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"


def test_bad_disk_options_are_clear_errors(tmp_path):
    """A missing disk file or an unknown option is a clear error, and nothing is created."""
    with pytest.raises(kvmpy.DeviceError, match="cannot open"):
        kvmpy.Machine(disks=[str(tmp_path / "missing.img")])
    assert not (tmp_path / "missing.img").exists()
    with pytest.raises(ValueError, match="unknown option"):
        kvmpy.Disk.parse("x.img,rw,fast")
