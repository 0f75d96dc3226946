"""errors.file_size: the size of a host file or block device (os.path.getsize says 0 for
a block device, which made snapshots of machines with block-device disks unrestorable)."""
import errno
import os

import pytest

from kvmpy.errors import file_size


def test_a_regular_file_is_its_length_sparse_or_not(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 1000)
    assert file_size(p) == 1000 and file_size(str(p)) == 1000
    with open(p, "r+b") as f:
        f.truncate(3 << 30)                     # sparse: nothing is read or allocated
    assert file_size(p) == 3 << 30


def test_a_block_device_is_its_capacity_not_zero(loop_device):
    dev, _ = loop_device
    assert os.path.getsize(dev) == 0            # what the snapshot code used to trust
    assert file_size(dev) == 8 << 20


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_what_has_no_size_is_einval_without_blocking(tmp_path, kind):
    p = tmp_path / "x"
    (p.mkdir if kind == "directory" else lambda: os.mkfifo(p))()
    with pytest.raises(OSError) as e:            # a FIFO is never opened: that would block
        file_size(p)
    assert e.value.errno == errno.EINVAL and "not a regular file or block device" in str(e.value)


def test_a_missing_file_is_the_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        file_size(tmp_path / "nope")
