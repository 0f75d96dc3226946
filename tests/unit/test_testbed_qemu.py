"""The nested testbed's choice of L0 QEMU (tests/nested/testbed.py l0_qemu): a QEMU unpacked
from .debs (tests/nested/l0qemu.py) brings its own firmware; a missing one is a clear error."""
import os
import sys
from pathlib import Path

import pytest

NESTED = Path(__file__).parents[1] / "nested"
sys.path.insert(0, str(NESTED))
try:
    import testbed
finally:
    sys.path.remove(str(NESTED))


def test_an_unpacked_qemu_gets_its_own_data_and_seabios_directories(tmp_path):
    binary = tmp_path / "usr" / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    os.chmod(binary, 0o755)
    (tmp_path / "usr" / "share" / "qemu").mkdir(parents=True)
    assert testbed.l0_qemu(str(binary)) == [str(binary), "-L", str(tmp_path / "usr" / "share" / "qemu")]
    (tmp_path / "usr" / "share" / "seabios").mkdir()
    assert testbed.l0_qemu(str(binary))[3:] == ["-L", str(tmp_path / "usr" / "share" / "seabios")]


def test_a_qemu_that_is_not_there_says_what_to_do(tmp_path):
    with pytest.raises(testbed.TestbedError, match="is missing"):
        testbed.l0_qemu(str(tmp_path / "qemu-system-x86_64"))
