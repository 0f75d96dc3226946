"""Port 0x92 bit 0 and 0xcf9 end the run as a reset, like the i8042's 0xFE (issue 12).

Before they were wired, a guest resetting through either port hung until its timeout.
"""
import subprocess
import sys

import pytest

import kvmpy
from kvmpy.cli import EXIT_RESET

from .lab import rewrite_manifest
from . import lab

# in al,0x92; or al,1; out 0x92,al; jmp $  (the usual fast reset: keep A20, set bit 0)
FAST_RESET = bytes.fromhex("e492 0c01 e692 ebfe")
# mov dx,0xcf9; mov al,2; out dx,al; mov al,6; out dx,al; jmp $  (Linux's reboot=pci)
CF9_RESET = bytes.fromhex("baf90c b002 ee b006 ee ebfe")
# mov dx,0xcf9; mov al,0x0a; out dx,al; in al,dx; mov bl,al; in al,0x92; mov bh,al;
# mov dx,0xcf8; in eax,dx; out 0xf4,al  (latched values, and CONFIG_ADDRESS stays unclaimed)
READ_BACK = bytes.fromhex("baf90c b00a ee ec 88c3 e492 88c7 baf80c 66ed e6f4")


def run_raw(m, code: bytes, timeout: float = 10):
    """Run real-mode ``code`` on ``small_machine`` (conftest.py: 1 MiB, each loop, reset per test)."""
    m.load(code, format="raw", mode="real")
    return m.run(timeout=timeout)


@pytest.mark.parametrize("code", [FAST_RESET, CF9_RESET], ids=["port92", "cf9"])
def test_a_reset_through_the_port_ends_the_run_as_reset(kvm_required, small_machine, code):
    result = run_raw(small_machine, code)
    assert result.reason == "reset"


def test_latched_bits_read_back_and_cf8_dword_is_unclaimed(kvm_required, small_machine):
    result = run_raw(small_machine, READ_BACK)
    assert result.reason == "exit"
    assert result.regs.rbx & 0xFFFF == 0x02_0A         # bh: 0x92 = A20 on; bl: 0xcf9 = SYS_RST|FULL_RST
    assert result.regs.rax & 0xFFFF_FFFF == 0xFFFF_FFFF  # in eax,0xcf8: no PCI, floats high


@pytest.mark.parametrize("code", [FAST_RESET, CF9_RESET], ids=["port92", "cf9"])
def test_cli_exits_with_the_reset_status(kvm_required, tmp_path, code):
    img = tmp_path / "reset.bin"
    img.write_bytes(code)
    env = lab.CHILD_ENV
    r = subprocess.run([sys.executable, "-m", "kvmpy", "run", str(img), "--format", "raw", "--mode", "real",
                        "--mem", "1M", "--timeout", "20"], capture_output=True, timeout=60, env=env, cwd="/")
    assert r.returncode == EXIT_RESET == 120, r.stderr


# mov dx,0xcf9; mov al,0x0a; out dx,al; mov al,0; out 0x92,al; jmp $ (latch values, then wait)
LATCH_AND_WAIT = bytes.fromhex("baf90c b00a ee b000 e692 ebfe")
# in al,0x92; mov bl,al; mov dx,0xcf9; in al,dx; mov bh,al; out 0xf4,al
REPORT = bytes.fromhex("e492 88c3 baf90c ec 88c7 e6f4")


@pytest.mark.parametrize("old", [False, True], ids=["current", "older-snapshot"])
def test_latched_bits_survive_a_snapshot_and_older_snapshots_restore(kvm_required, tmp_path, old):
    snap = tmp_path / "snap"
    with kvmpy.Machine(mem_size=1 << 20) as m:
        m.load(LATCH_AND_WAIT, format="raw", mode="real")
        assert m.run(timeout=0.5).reason == "timeout"
        m.memory.write(0x7C00 + len(LATCH_AND_WAIT) - 2, REPORT)     # replace the jmp $ with REPORT
        m.snapshot(str(snap))
    if old:                                 # a snapshot written before the reset lines existed
        rewrite_manifest(snap, lambda b: [b["devices"].pop(k) for k in ("port92", "reset_control")])
    with kvmpy.Machine.restore(str(snap)) as m:
        result = m.run(timeout=10)
    assert result.reason == "exit"
    assert result.regs.rbx & 0xFFFF == (0x00_02 if old else 0x0A_00)     # bh: 0xcf9, bl: 0x92 (power-on: A20)
