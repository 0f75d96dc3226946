"""Rate-limited disks with a real guest: slowed, still stoppable, pausable and snapshotable.

Bounds are generous (pytest is not a benchmark: `kvmpy bench blk --limits` measures the
rates); each test checks the guest's known result too.
"""
import os
import time

import pytest

import kvmpy
from kvmpy import guests

from .test_disks import fnv1a64

LOOPS = [True, False]
LOOP_IDS = ["native", "python"]
SECTORS = 300                   # blk-read reads the whole disk: 153600 bytes


@pytest.fixture
def disk(tmp_path):
    data = os.urandom(SECTORS * 512)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, f"blk-read: {SECTORS} sectors, checksum {fnv1a64(data):#x}\n".encode()


@pytest.mark.parametrize("native", LOOPS, ids=LOOP_IDS)
def test_a_bps_limited_disk_slows_the_guest_and_loses_nothing(disk, native):
    """64 KiB/s with a 64 KiB bucket: the other 86 KiB take at least ~1.3 s."""
    path, line = disk
    g = guests.get("blk-read")
    with kvmpy.Machine(disks=[kvmpy.Disk(str(path), bps="64K")], native=native, irqchip=True) as m:
        m.load(g.path, user=g.user)
        t0 = time.monotonic()
        result = m.run(timeout=30)
        took = time.monotonic() - t0
        assert result.status == g.disk_status, m.serial_output
        assert line in m.serial_output
    assert 1.0 <= took <= 15, took


@pytest.mark.parametrize("native", LOOPS, ids=LOOP_IDS)
def test_a_stop_is_obeyed_on_a_throttled_disk(disk, native):
    """A guest waiting on a starved disk (8 bytes per second) stops within a second, by
    request_stop and by the run's timeout; close() does not wait for the disk either."""
    path, _ = disk
    g = guests.get("blk-read")
    with kvmpy.Machine(disks=[kvmpy.Disk(str(path), bps=8)], native=native, irqchip=True) as m:
        m.load(g.path, user=g.user)
        m.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        m.request_stop("interrupted")
        result = m.wait(5)
        assert result.reason == "interrupted"
        assert time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        assert m.run(timeout=0.3).reason == "timeout"
        assert time.monotonic() - t0 < 1.3
        m.start()
        time.sleep(0.2)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 1.0          # __exit__: close() of a running, throttled machine


@pytest.mark.parametrize("native", LOOPS, ids=LOOP_IDS)
def test_a_snapshot_of_a_throttled_disk_restores_and_finishes(disk, tmp_path, native):
    """Requests a limit left in the ring are in guest RAM, not in the device: the restored
    machine (without limits here) serves them at its first run and the checksum is right."""
    path, line = disk
    g = guests.get("blk-read")
    snap = tmp_path / "snap"
    with kvmpy.Machine(disks=[kvmpy.Disk(str(path), bps="32K")], native=native, irqchip=True) as m:
        m.load(g.path, user=g.user)
        m.start()
        time.sleep(1.5)                          # the 32 KiB bucket is spent: requests wait in the ring
        m.snapshot(snap)
        m.request_stop("interrupted")
        m.wait(5)
    with kvmpy.Machine.restore(snap, native=native) as r:
        result = r.run(timeout=30)
        assert result.status == g.disk_status, r.serial_output
        assert line in r.serial_output


def test_serial_output_is_limited_by_serial_bps(tmp_path):
    """hello-long's output through a stream at 200 B/s: the writer lags the guest, never
    the vCPU; the bytes that made it are a prefix of the full output."""
    g = guests.get("hello-long")
    with kvmpy.Machine() as free:
        free.load(g.path, user=g.user)
        free.run(timeout=10)
        full = free.serial_output
    out = tmp_path / "out"
    with open(out, "wb") as f:
        with kvmpy.Machine(serial=f, serial_bps=1) as m:
            m.load(g.path, user=g.user)
            t0 = time.monotonic()
            m.run(timeout=10)
            assert time.monotonic() - t0 < 5       # the run never waited for the limit
        dropped = m.console.dropped
    got = out.read_bytes()
    assert full.startswith(got)
    assert len(got) + dropped == len(full)
    assert len(got) <= 2                           # one second's bucket, then 1 B/s
