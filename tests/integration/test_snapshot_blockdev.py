"""Snapshots (and so live migration, which restores through the same disk_list) of a machine
whose disk is a block device: its size is its capacity, not st_size's 0 (issue 11, item 5)."""
import json

import pytest

import kvmpy
from kvmpy.lifecycle.snapshot import SnapshotError

from .lab import rewrite_manifest




@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_a_snapshot_with_a_block_device_disk_restores(tmp_path, loop_device, native):
    dev, _ = loop_device
    with kvmpy.Machine(mem_size=1 << 20, disks=[dev], native=native) as m:
        m.snapshot(str(tmp_path / "snap"))
    disk = json.loads((tmp_path / "snap" / "manifest.json").read_text())["devices"]["disks"][0]
    assert (disk["path"], disk["size"]) == (dev, 8 << 20)
    with kvmpy.Machine.restore(str(tmp_path / "snap")) as r:
        assert [d.path for d in r.disks] == [dev]


@pytest.mark.parametrize("claimed", [0, 4 << 20])
def test_a_block_device_of_another_size_is_refused(tmp_path, loop_device, claimed):
    """A manifest claiming 0 bytes used to match any block device (st_size is 0)."""
    dev, _ = loop_device
    with kvmpy.Machine(mem_size=1 << 20, disks=[dev]) as m:
        m.snapshot(str(tmp_path / "snap"))
    rewrite_manifest(tmp_path / "snap", lambda b: b["devices"]["disks"][0].update(size=claimed))
    with pytest.raises(SnapshotError, match=f"changed size: {claimed} bytes .* {8 << 20} now"):
        kvmpy.Machine.restore(str(tmp_path / "snap"))


def test_a_disk_that_is_no_longer_a_file_is_refused(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(8192))
    with kvmpy.Machine(mem_size=1 << 20, disks=[str(disk)]) as m:
        m.snapshot(str(tmp_path / "snap"))
    disk.unlink()
    disk.mkdir()
    with pytest.raises(SnapshotError, match="disk 0 .*not a regular file or block device"):
        kvmpy.Machine.restore(str(tmp_path / "snap"))
