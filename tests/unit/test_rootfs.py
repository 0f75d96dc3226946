"""kvmpy.images.rootfs without the Debian packages: its scripts parse as shell, sizes parse, the
sparse copy is exact, the size limits and the missing-mke2fs error. The build itself (Debian's
kernel modules, mke2fs) is checked in tests/integration/test_linux_disk.py."""
import argparse
import os
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.images import rootfs


@pytest.mark.parametrize("name", ["INITRAMFS_INIT", "RCS", "UDHCPC_SCRIPT"])
def test_the_scripts_are_valid_shell(name):
    """`sh -n` parses each script the guest runs (busybox ash is POSIX sh plus a little)."""
    r = subprocess.run(["sh", "-n"], input=getattr(rootfs, name), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_rcs_loads_each_device_list_and_prints_the_marker():
    assert rootfs.READY_MARKER in rootfs.RCS and "kvmpy-load/$(($(cat \"$dev/device\")))" in rootfs.RCS
    assert set(rootfs.DEVICE_MODULES) == {1, 4, 19}     # net, entropy, vsock (virtio 1.2 §5)
    assert "root=/dev/vda" in rootfs.CMDLINE and "console=ttyS0" in rootfs.CMDLINE


@pytest.mark.parametrize("text, size", [("64M", 64 << 20), ("1G", 1 << 30), ("512k", 512 << 10),
                                        ("2MiB", 2 << 20), ("9437184", 9 << 20)])
def test_sizes(text, size):
    assert rootfs.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1M", "1.5G", "12X", "lots"])
def test_bad_sizes_say_so(text):
    with pytest.raises(argparse.ArgumentTypeError, match="invalid size"):
        rootfs.parse_size(text)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3 << 16)), max_size=6))
def test_sparse_copy_is_byte_exact(tmp_path_factory, runs):
    d = tmp_path_factory.mktemp("copy")
    data = b"".join((bytes(n) if zero else os.urandom(n)) for zero, n in runs)
    (d / "src").write_bytes(data)
    rootfs.copy_sparse(d / "src", d / "dst")
    assert (d / "dst").read_bytes() == data


def test_sparse_copy_leaves_holes(tmp_path):
    with open(tmp_path / "src", "wb") as f:
        f.truncate(32 << 20)
        f.write(b"start")
    rootfs.copy_sparse(tmp_path / "src", tmp_path / "dst")
    assert os.path.getsize(tmp_path / "dst") == 32 << 20
    assert os.stat(tmp_path / "dst").st_blocks * 512 < 1 << 20


@pytest.mark.parametrize("size", [rootfs.MIN_SIZE - 1, rootfs.MAX_SIZE + 1])
def test_sizes_outside_the_limits_are_refused_before_anything_is_fetched(size, tmp_path):
    with pytest.raises(rootfs.RootfsError, match="outside"):
        rootfs.build(size=size, cache=tmp_path)
    assert not list(tmp_path.iterdir())


def test_missing_mke2fs_names_the_package(monkeypatch):
    monkeypatch.setattr(rootfs.shutil, "which", lambda *a, **k: None)
    with pytest.raises(rootfs.RootfsError, match=r"apt-get install e2fsprogs"):
        rootfs.find_mke2fs()


def test_busybox_mke2fs_is_passed_over(tmp_path, monkeypatch):
    """A mke2fs that is not e2fsprogs' (busybox's applet: no -d) is not used; the error says why."""
    fake = tmp_path / "mke2fs"
    fake.write_text("#!/bin/sh\necho 'BusyBox v1.35.0 multi-call binary.' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    real = rootfs.shutil.which
    monkeypatch.setattr(rootfs.shutil, "which",
                        lambda name, path=None: real(name, path=path) if path == str(tmp_path) else None)
    with pytest.raises(rootfs.RootfsError, match=r"e2fsprogs.*busybox's mke2fs cannot write a directory"):
        rootfs.find_mke2fs()


def test_pruning_keeps_the_disks_built_or_used_last(tmp_path):
    """Only the three most recently built or used disks stay: a disk served from the cache
    counts as used then, so a build beside a run that uses an older disk leaves it alone."""
    import os
    from kvmpy.images import rootfs
    slots = [tmp_path / f"k{i}" for i in range(5)]
    for i, d in enumerate(slots):
        d.mkdir()
        os.utime(d, (1000 + i, 1000 + i))
    rootfs._touch(slots[0])                 # the oldest, served from the cache just now
    rootfs._prune(slots[4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k0", "k3", "k4"]
