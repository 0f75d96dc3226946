"""Snapshots (first slice of issue 5): a stopped machine saved and continued elsewhere."""
import json
import os
import subprocess
import sys

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.snapshot import SnapshotError

ENV = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(kvmpy.__file__)))}


def snapshot_echo(path, native=True):
    """The echo guest, stopped while it waits for input after echoing 'abc'."""
    g = guests.get("echo")
    with kvmpy.Machine(native=native) as m:
        m.load(g.path)
        m.feed_serial(b"abc\n")
        assert m.run(timeout=0.5).reason == "timeout"
        before = m.serial_output
        m.feed_serial(b"x")                          # input still in the UART's FIFO is saved too
        m.snapshot(path)
    return before


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_restore_in_a_new_process_continues_the_guest(tmp_path, native):
    """A snapshot restored in a fresh process carries on: pending serial input, then new input, then exit."""
    snap = tmp_path / "snap"
    assert snapshot_echo(str(snap), native).endswith(b"abc\n")
    code = ("import sys, kvmpy\n"
            f"m = kvmpy.Machine.restore({str(snap)!r}, native={native})\n"
            "m.feed_serial(b'yz\\nquit\\n')\n"
            "r = m.run(timeout=20)\n"
            "sys.stdout.buffer.write(m.serial_output); sys.exit(r.status & 0xff)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=ENV, cwd="/", timeout=60)
    assert r.stdout == b"xyz\nquit\nbye\n", r.stderr
    assert r.returncode == guests.get("echo").expect_status & 0xFF


def test_damaged_snapshots_are_refused(tmp_path):
    """A corrupted manifest or RAM file, a truncated RAM file, or another version is refused clearly."""
    snap = tmp_path / "snap"
    snapshot_echo(str(snap))
    manifest = snap / "manifest.json"
    body = json.loads(manifest.read_text())
    ram = snap / body["ram"][0]["file"]
    good_ram = ram.read_bytes()

    ram.write_bytes(good_ram[:-4096])
    with pytest.raises(SnapshotError, match="has .* bytes"):
        kvmpy.Machine.restore(str(snap))
    ram.write_bytes(good_ram[:100] + b"\x01" + good_ram[101:])
    with pytest.raises(SnapshotError, match="corrupted"):
        kvmpy.Machine.restore(str(snap))
    ram.write_bytes(good_ram)

    body["vcpus"][0]["regs"]["rip"] += 1               # edited without fixing the checksum
    manifest.write_text(json.dumps(body))
    with pytest.raises(SnapshotError, match="checksum"):
        kvmpy.Machine.restore(str(snap))
    body["version"] = 99
    manifest.write_text(json.dumps(body))
    with pytest.raises(SnapshotError, match="version"):
        kvmpy.Machine.restore(str(snap))
    manifest.write_text("{}")
    with pytest.raises(SnapshotError, match="magic"):
        kvmpy.Machine.restore(str(snap))


def test_snapshot_refuses_a_disk_that_changed_size(tmp_path):
    """A snapshot refers to its disks by path: a file of another size is refused, nothing starts."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(8192))
    with kvmpy.Machine(disks=[str(disk)]) as m:
        m.snapshot(str(tmp_path / "snap"))
    disk.write_bytes(bytes(4096))
    with pytest.raises(SnapshotError, match="changed size: 8192 bytes .* 4096 now"):
        kvmpy.Machine.restore(str(tmp_path / "snap"))
