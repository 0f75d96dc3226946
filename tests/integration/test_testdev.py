"""QEMU's pc-testdev on a real VM: what a kernel written for `-device pc-testdev` sees.

The testdev guest (guests/testdev.c) checks every feature from the inside and prints one
line per feature; these tests also look from the host: the device's counters and state,
KVM's own statistics for the page flush, snapshots, and the command line.
"""
import fcntl
import json
import os
import re
import struct
import subprocess
import sys

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.devices import testdev
from kvmpy.vmm.state import SnapshotError
from kvmpy.vmm.vcpu_loop import VcpuLoop

from .lab import rewrite_manifest
from . import lab

NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
GUEST = guests.get("testdev")
EXIT_OK, EXIT_ABSENT = 0x54, 0x55
FEATURE_LINES = [b"testdev: latch lanes ok", b"testdev: string io ok", b"testdev: flush keeps pages",
                 b"testdev: pic line 5 ok", b"testdev: ioapic line 17 (edge) ok"]


def run_guest(**machine_kw):
    with kvmpy.Machine(mem_size=16 << 20, **machine_kw) as m:
        m.load(GUEST.path, GUEST.format, mode=GUEST.mode)
        result = m.run(timeout=30)
        dev = m.platform.slot("pc-testdev").model if m.test_devices else None
        return result, m.serial_output, m.stats, dev


@NATIVE
def test_the_guest_sees_every_feature(native):
    result, out, stats, dev = run_guest(native=native, test_devices=True)
    assert result.reason == "exit", out
    lines = out.splitlines()
    for line in FEATURE_LINES:
        assert line in lines, out
    # level-triggered: it arrives and stops once the handler lowered the line (kvm_pvm hands
    # such an interrupt to CPL 0 twice; docs/host-notes.md)
    assert re.search(rb"^testdev: ioapic line 18 \(level\) ok, [12] interrupts?$", out, re.M), out
    assert lines[-2:] == [b"testdev: window ok", b"testdev: done"], out
    assert result.status == (EXIT_OK << 1) | 1 and result.regs.rax & 0xFF == EXIT_OK
    # the host's view: four pages flushed (data page twice, code, stack), one address not RAM
    assert (dev.flushed, dev.flush_ignored, dev.flush_failed) == (4, 1, 0)
    assert dev.latch == 0x22225A04                      # the string I/O check left it so
    assert dev.iomem[0:8] == bytes.fromhex("efbe3412 88776699") and dev.iomem[0xFFFC:] == bytes.fromhex("0df0feca")
    assert dev.iomem[4064:4128] == b"\x04" * 64 and dev.iomem[4128] == 0       # rep insb into the window
    assert stats.devices["pc-testdev-irq"] >= 8 and stats.devices["pc-testdev-iomem"] >= 10


@NATIVE
def test_without_test_devices_every_testdev_address_is_unclaimed(native):
    result, out, stats, _ = run_guest(native=native)
    assert out == b"testdev: absent\n"
    assert result.status == (EXIT_ABSENT << 1) | 1
    assert stats.devices["unclaimed-pio"] >= 5 and stats.devices["unclaimed-mmio"] >= 2
    with kvmpy.Machine(mem_size=1 << 20) as m:
        assert not m.test_devices and "test_devices" not in m.shape()
        for port in (*range(0xE0, 0xEC), 0x2000, 0x2017):
            assert m.pio.lookup(port) is None, hex(port)
        assert m.mmio.lookup(testdev.IOMEM_BASE) is None and m.mmio.lookup(testdev.IOMEM_BASE + 0xFFFF) is None


def test_the_ranges_it_claims():
    with kvmpy.Machine(mem_size=1 << 20, test_devices=True) as m:
        assert m.shape()["test_devices"] is True
        names = {p: m.pio.lookup(p)[2] for p in (0xE0, 0xE4, 0xEB, 0x2000, 0x2017)}
        assert set(names.values()) == {"pc-testdev", "pc-testdev-irq"}
        assert m.pio.lookup(0xEC) is None and m.pio.lookup(0xDF) is None and m.pio.lookup(0x2018) is None
        assert m.mmio.lookup(0xFF00FFFF)[2] == "pc-testdev-iomem" and m.mmio.lookup(0xFF010000) is None


def test_string_io_with_many_items_per_exit():
    """The vCPU loop hands a `rep outs`/`rep ins` exit's count items to the device one by one
    (this host splits string I/O into one exit per item, so drive the loop as KVM may)."""
    with kvmpy.Machine(mem_size=1 << 20, test_devices=True, native=False) as m:
        loop = VcpuLoop(m.vcpus[0], m.pio, m.mmio, m.stats, m.gate, m.memory)
        loop.pio_out(0xE0, 1, 4, b"\x01\x02\x03\x04")             # rep outsb: lane 0 keeps the last
        loop.pio_out(0xE2, 2, 2, b"\x11\x11\x22\x22")             # rep outsw: lanes 2-3 keep the last
        assert loop.pio_in(0xE0, 4, 1) == bytes.fromhex("04002222")
        assert loop.pio_in(0xEB, 1, 5) == b"\x22" * 5               # rep insb from the byte twin
        assert loop.pio_in(0xE4, 4, 3) == bytes(12)                 # the flush port reads 0
        assert m.stats.devices["pc-testdev"] == 4 + 2 + 1 + 5 + 3


# --- the page flush, as KVM sees it --------------------------------------------------------------

KVM_GET_STATS_FD = 0xAE << 8 | 0xCE


def vm_stat(vm_fd: int, name: str) -> int | None:
    """One VM statistic from KVM's binary stats (KVM_GET_STATS_FD), None if there is none."""
    try:
        fd = fcntl.ioctl(vm_fd, KVM_GET_STATS_FD)
    except OSError:
        return None
    try:
        _, name_size, count, _, desc_at, data_at = struct.unpack("<6I", os.pread(fd, 24, 0))
        size = 16 + name_size
        descs = os.pread(fd, count * size, desc_at)
        for i in range(count):
            d = descs[i * size:(i + 1) * size]
            if d[16:].split(b"\0")[0].decode() == name:
                offset = struct.unpack_from("<I", d, 8)[0]
                return struct.unpack("<Q", os.pread(fd, 8, data_at + offset))[0]
        return None
    finally:
        os.close(fd)


# long mode, ring 3 (runs natively, so KVM maps its pages): mov edi,0x200000; mov ecx,0x10000;
# xor eax,eax; rep stosb; then forever: mov al,[0x200000]
TOUCH_PAGES = bytes.fromhex("bf00002000 b900000100 31c0 f3aa 8a042500002000 ebf7")


def mapped_kib(vm_fd: int) -> int | None:
    """KiB of guest memory KVM maps now, from its pages_4k and pages_2m statistics (RAM of 2 MiB
    or more is 2 MiB-aligned and advised huge pages, so the page may sit in a 2 MiB mapping)."""
    small, huge = vm_stat(vm_fd, "pages_4k"), vm_stat(vm_fd, "pages_2m") or 0
    return None if small is None else 4 * small + 2048 * huge


def test_a_flush_makes_kvm_drop_the_page_and_the_guest_fault_it_back():
    with kvmpy.Machine(mem_size=4 << 20, test_devices=True) as m:
        m.load(TOUCH_PAGES, format="raw", mode="long", user=True)
        assert m.run(timeout=0.3).reason == "timeout"
        mapped = mapped_kib(m.vm.fd)
        if not mapped:
            pytest.skip("KVM here does not count the 4 KiB pages it maps (no pages_4k statistic)")
        m.memory.write(0x200000, b"kept")
        flush, offset, _ = m.pio.lookup(0xE4)
        flush.write(offset, 4, 0x200123)                            # what `out 0xe4, eax` does
        assert m.platform.slot("pc-testdev").model.flushed == 1
        dropped = mapped_kib(m.vm.fd)
        assert dropped < mapped                                     # KVM let go of the page
        assert m.memory.read(0x200000, 4) == b"kept"
        assert m.run(timeout=0.3).reason == "timeout"               # the guest touches it again
        assert mapped_kib(m.vm.fd) > dropped
        assert m.memory.read(0x200000, 4) == b"kept"


# --- snapshots ------------------------------------------------------------------------------------

# 32-bit: mov eax,0x11223344; out 0xe0,eax; mov dword [0xff000010],0xcafebabe; jmp $
LATCH_AND_WAIT = bytes.fromhex("b844332211 e7e0 c70510 0000ff bebafeca ebfe")
# in eax,0xe0; mov ebx,[0xff000010]; out 0xf4,al
REPORT = bytes.fromhex("e5e0 8b1d100000ff e6f4")


@pytest.mark.parametrize("old", [False, True], ids=["current", "without-its-state"])
def test_latch_and_window_survive_a_snapshot(tmp_path, old):
    snap = tmp_path / "snap"
    with kvmpy.Machine(mem_size=4 << 20, test_devices=True) as m:
        img = m.load(LATCH_AND_WAIT, format="raw", mode="protected")
        assert m.run(timeout=0.5).reason == "timeout"
        m.memory.write(img.entry + len(LATCH_AND_WAIT) - 2, REPORT)      # replace the jmp $ with REPORT
        m.snapshot(str(snap))
    body = json.loads((snap / "manifest.json").read_text())
    assert body["machine"]["test_devices"] is True and body["devices"]["pc_testdev"]["latch"] == 0x11223344
    if old:                             # a state without the device's key: power-on latch and window
        rewrite_manifest(snap, lambda b: b["devices"].pop("pc_testdev"))
    with kvmpy.Machine.restore(str(snap)) as m:
        assert m.test_devices
        result = m.run(timeout=10)
    assert result.reason == "exit"
    assert result.regs.rax & 0xFFFFFFFF == (0 if old else 0x11223344)
    assert result.regs.rbx & 0xFFFFFFFF == (0 if old else 0xCAFEBABE)


def test_a_snapshot_with_a_bad_test_devices_flag_or_state_is_refused(tmp_path):
    snap = tmp_path / "snap"
    with kvmpy.Machine(mem_size=1 << 20, test_devices=True) as m:
        m.load(bytes.fromhex("ebfe"), format="raw", mode="real")
        m.run(timeout=0.2)
        m.snapshot(str(snap))

    def flag(b):
        b["machine"]["test_devices"] = "yes"
    rewrite_manifest(snap, flag)
    with pytest.raises(SnapshotError, match="test_devices"):
        kvmpy.Machine.restore(str(snap))

    def state(b):
        b["machine"]["test_devices"] = True
        b["devices"]["pc_testdev"]["iomem"] = "AAAA"
    rewrite_manifest(snap, state)
    with pytest.raises(SnapshotError, match="pc-testdev"):
        kvmpy.Machine.restore(str(snap))


def test_restore_takes_no_test_devices_option(tmp_path):
    with kvmpy.Machine(mem_size=1 << 20) as m:
        m.load(bytes.fromhex("ebfe"), format="raw", mode="real")
        m.run(timeout=0.2)
        m.snapshot(str(tmp_path / "snap"))
    with pytest.raises(TypeError, match="test_devices"):          # the shape is the snapshot's
        kvmpy.Machine.restore(str(tmp_path / "snap"), test_devices=True)


# --- the command line ---------------------------------------------------------------------------

ENV = lab.CHILD_ENV


def kvmpy_run(*args):
    return subprocess.run([sys.executable, "-m", "kvmpy", "run", str(GUEST.path), "--mode", "protected",
                           "--mem", "16M", "--timeout", "30", *args], capture_output=True, timeout=120,
                          env=ENV, cwd="/")


def test_cli_test_devices_flag():
    r = kvmpy_run("--test-devices")
    assert r.returncode == (EXIT_OK << 1) | 1, r.stdout + r.stderr
    assert b"testdev: done" in r.stdout
    r = kvmpy_run()
    assert r.returncode == (EXIT_ABSENT << 1) | 1 and r.stdout == b"testdev: absent\n", r.stderr
