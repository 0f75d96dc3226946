"""virtio-rng on a real machine: the rng-read guest, its place among the virtio-mmio devices,
the sandbox, rate limits and snapshots."""
import json
import subprocess
import sys
import time

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.devices.ratelimit import Limits
from kvmpy.devices.virtio.rng import DEFAULT_LIMITS
from kvmpy.lifecycle.snapshot import SnapshotError
from kvmpy.x86 import layout

from . import lab
from .lab import rewrite_manifest, wait_until

G = guests.get("rng-read")
DONE = b"rng-read: 2 x 4096 random bytes, different and not all zero\n"
LOOPS = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])


def start(**machine_options):
    m = kvmpy.Machine(mem_size=16 << 20, **machine_options)
    m.load(G.path, G.format, mode=G.mode, user=G.user)
    return m


@LOOPS
def test_the_guest_reads_two_different_random_pages(native):
    with start(native=native, rng=True) as m:
        result = m.run(timeout=20)
        assert (result.reason, result.status) == ("exit", G.disk_status)
        assert m.serial_output == b"rng-read: reading 4096 random bytes twice\n" + DONE
        slot = m.platform.slot("virtio-rng")
        assert slot.backend.state()["requests"] == 2 and slot.backend.bytes_served == 8192
        assert slot.backend.limiter.limits == DEFAULT_LIMITS
        assert m.stats.devices["virtio-rng"] > 10             # its MMIO exits reach Python


def test_without_rng_there_is_no_device():
    with start(rng=False) as m:
        result = m.run(timeout=20)
        assert (result.status, m.serial_output) == (G.expect_status, G.expect_output)
        assert "rng" not in m.shape() and m.platform.virtio_mmio == []
        assert m.mmio.lookup(layout.VIRTIO_MMIO_BASE) is None


def test_the_rng_takes_the_window_after_the_disks(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    with kvmpy.Machine(mem_size=16 << 20, disks=[str(disk)] * 2, rng=True) as m:
        slots = m.platform.virtio_mmio
        assert [(s.name, s.base, s.length, s.irq, s.virtio) for s in slots] == [
            ("virtio-blk0", 0xD0000000, 0x1000, 5, 2), ("virtio-blk1", 0xD0001000, 0x1000, 6, 2),
            ("virtio-rng", 0xD0002000, 0x1000, 7, 4)]
        assert m.virtio_mmio_cmdline() == ("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 "
                                           "virtio_mmio.device=4K@0xd0002000:7")
        assert m.shape()["rng"] is True
    with pytest.raises(ValueError, match="at most 6 virtio devices"):
        kvmpy.Machine(mem_size=16 << 20, disks=[str(disk)] * 6, rng=True)


def test_kvmpy_run_rng_works_in_the_sandbox():
    """getrandom is in the seccomp filter: the guest gets its bytes under the default sandbox."""
    r = subprocess.run([sys.executable, "-m", "kvmpy", "run", str(G.path), "--user", "--rng", "--timeout", "20"],
                       capture_output=True, timeout=60, env=lab.CHILD_ENV, cwd="/", stdin=subprocess.DEVNULL)
    assert r.returncode == G.disk_status & 0xFF, r.stderr
    assert r.stdout.endswith(DONE)


@LOOPS
def test_a_throttled_read_is_served_by_the_timer(native):
    """4096 bytes a second: the first read empties the bucket, the second waits in the ring
    for about a second and the platform's timer serves it (the guest only polls)."""
    with start(native=native, rng=Limits(bps=4096)) as m:
        t0 = time.monotonic()
        result = m.run(timeout=20)
        assert result.status == G.disk_status and m.serial_output.endswith(DONE)
        assert time.monotonic() - t0 > 0.8
        assert m.platform.slot("virtio-rng").backend.limiter.throttled >= 1


def test_a_snapshot_with_a_throttled_read_continues_after_a_restore(tmp_path):
    """Paused while its second read waits for tokens, saved, restored: the restored machine
    (default limits) serves the chain still in the ring and the guest finishes."""
    snap = tmp_path / "snap"
    m = start(rng=Limits(bps=4096))
    with m:
        m.start(timeout=20)
        rng = m.platform.slot("virtio-rng").backend
        wait_until(lambda: rng.limiter.throttled >= 1, what="the second read to be throttled")
        assert m.pause()
        m.snapshot(snap)
        m.request_stop("test")
        m.wait(5)
    body = json.loads((snap / "manifest.json").read_text())
    assert body["machine"]["rng"] is True
    saved = body["devices"]["virtio_rng"]
    assert saved["queues"][0]["ready"] and saved["queues"][0]["used_idx"] == 1
    with kvmpy.Machine.restore(snap) as r:
        assert r.rng and r.platform.slot("virtio-rng").model.save_state() == saved
        result = r.run(timeout=20)
        assert result.status == G.disk_status and r.serial_output.endswith(DONE)


def test_snapshots_without_the_rng_state_or_with_a_bad_one(tmp_path):
    snap = tmp_path / "snap"
    with start(rng=True) as m:
        m.run(timeout=20)
        m.snapshot(snap)
    rewrite_manifest(snap, lambda b: b["devices"].pop("virtio_rng"))    # an older kvmpy's state
    with kvmpy.Machine.restore(snap) as r:
        assert r.platform.slot("virtio-rng").model.save_state()["status"] == 0   # power-on
    rewrite_manifest(snap, lambda b: b["machine"].update(rng="yes"))
    with pytest.raises(SnapshotError, match="rng must be true or false"):
        kvmpy.Machine.restore(snap)
    with start(rng=True) as m:
        m.run(timeout=20)
        m.snapshot(tmp_path / "bad")
    rewrite_manifest(tmp_path / "bad", lambda b: b["devices"]["virtio_rng"].update(driver_features=1 << 9 | 1 << 32))
    with pytest.raises(SnapshotError, match="virtio-rng: bad virtio state"):
        kvmpy.Machine.restore(tmp_path / "bad")


def test_restore_takes_no_rng_option(tmp_path):
    with start(rng=True) as m:
        m.snapshot(tmp_path / "s")
    with pytest.raises(TypeError, match="rng"):
        kvmpy.Machine.restore(tmp_path / "s", rng=False)
