"""The counter guest: deterministic output, memory and disk writes (the snapshot/migration workload).

guests/counter.c documents the contract; kvmpy.images.guests.counter_output models what it prints.
The disk checks derive the expected sectors from the checksums the guest printed.
"""
import os
import re
import struct

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.devices.virtio.blk import VirtioBlk

GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
EXIT_OK = 0x43
LINE = re.compile(rb"count (\d+) 0x([0-9a-f]+)")


def run_counter(disk=None, cmdline="", native=True, user=False, timeout=60):
    g = guests.get("counter")
    with kvmpy.Machine(disks=[disk] if disk else [], native=native) as m:
        m.load(g.path, g.format, mode=g.mode, user=user, cmdline=cmdline)
        result = m.run(timeout=timeout)
        return result, m.serial_output


def sector(i: int, c: int) -> bytes:
    """The documented sector pattern of iteration i with checksum c."""
    words = [i, c] + [(c + j * GOLDEN) & MASK for j in range(2, 64)]
    return struct.pack("<64Q", *words)


def checksums(out: bytes, n: int) -> list[int]:
    """The count lines' checksums, checking the lines run 1..n and are well formed."""
    lines = out.splitlines()
    assert lines[-1].startswith(b"counter: done 0x")
    counts = lines[2:-1]
    matches = [LINE.fullmatch(line) for line in counts]
    assert all(matches), counts
    assert [int(m.group(1)) for m in matches] == list(range(1, n + 1))
    return [int(m.group(2), 16) for m in matches]


def expected_disk(initial: bytes, sums: list[int]) -> bytes:
    """Disk contents after the run: sector i % min(64, capacity) holds iteration i's pattern."""
    disk = bytearray(initial)
    span = min(64, len(initial) // 512)
    for i, c in enumerate(sums, 1):
        s = i % span
        disk[s * 512:(s + 1) * 512] = sector(i, c)
    return bytes(disk)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_default_run_prints_the_model_and_writes_the_pattern(tmp_path, native, monkeypatch):
    """Defaults (n=200, pages=256): every line as modelled, exit 0x43, sectors 0..63 hold the pattern."""
    flushes = []
    real_flush = VirtioBlk._flush
    monkeypatch.setattr(VirtioBlk, "_flush", lambda self: flushes.append(1) or real_flush(self))
    initial = os.urandom(2048 * 512 + 100)           # the partial tail is no sector and stays
    path = tmp_path / "disk.img"
    path.write_bytes(initial)
    result, out = run_counter(str(path), native=native)
    assert (result.reason, result.status) == ("exit", (EXIT_OK << 1) | 1), out[-300:]
    assert result.regs.rax & 0xFF == EXIT_OK
    assert out.startswith(b"counter: n=200 pages=256\ncounter: disk 2048 sectors\n")
    sums = checksums(out, 200)
    assert out == guests.counter_output(200, 256, capacity=2048)
    body = path.read_bytes()
    assert body == expected_disk(initial, sums)
    assert body[64 * 512:] == initial[64 * 512:]    # only sectors 0..63 are written
    if not native:                                  # the Python device served them: one flush per 8
        assert len(flushes) == 25


def test_two_runs_are_identical_and_small_disks_wrap(tmp_path):
    """Same parameters, same output and disk; a 40-sector disk is used as sectors i % 40."""
    initial = os.urandom(40 * 512)
    runs = []
    for k in range(2):
        path = tmp_path / f"disk{k}.img"
        path.write_bytes(initial)
        result, out = run_counter(str(path), cmdline="n=77 pages=40")
        assert result.status == (EXIT_OK << 1) | 1, out[-300:]
        runs.append((out, path.read_bytes()))
    assert runs[0] == runs[1]
    out, body = runs[0]
    assert out == guests.counter_output(77, 40, capacity=40)
    assert body == expected_disk(initial, checksums(out, 77))


def test_without_a_disk_only_the_second_line_differs():
    """No disk: 'counter: no disk' instead of the disk line, the rest unchanged, same exit."""
    result, out = run_counter(cmdline=" n=20\tpages=3 ")
    assert result.status == (EXIT_OK << 1) | 1
    assert out.splitlines()[1] == b"counter: no disk"
    assert out == guests.counter_output(20, 3)
    assert checksums(out, 20) == guests.counter_checksums(20, 3)[0]


def test_a_last_partial_group_of_eight_is_flushed_too(tmp_path, monkeypatch):
    """n=13: a flush after iteration 8 and one at the end (n % 8 != 0), on the Python device."""
    flushes = []
    real_flush = VirtioBlk._flush
    monkeypatch.setattr(VirtioBlk, "_flush", lambda self: flushes.append(1) or real_flush(self))
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 512))
    result, out = run_counter(str(path), cmdline="n=13 pages=2", native=False)
    assert result.status == (EXIT_OK << 1) | 1
    assert len(flushes) == 2
    assert path.read_bytes() == expected_disk(bytes(64 * 512), checksums(out, 13))


def test_ring3_and_python_loop_give_the_same_output(tmp_path):
    """Started at CPL 3, or served by the Python run loop, the guest prints the same bytes."""
    outs = set()
    for native, user in [(True, False), (True, True), (False, True)]:
        path = tmp_path / f"disk-{native}-{user}.img"
        path.write_bytes(bytes(64 * 512))
        result, out = run_counter(str(path), cmdline="n=30 pages=64", native=native, user=user)
        assert result.status == (EXIT_OK << 1) | 1
        outs.add((out, path.read_bytes()))
    assert len(outs) == 1


@pytest.mark.parametrize("cmdline, message", [
    ("n=x", b"counter: bad cmdline: n=x\n"),
    ("n=5 size=3", b"counter: bad cmdline: size=3\n"),
    ("n=1000000001", b"counter: bad cmdline: n=1000000001\n"),
    ("pages=0", b"counter: pages must be 1..15872\n"),      # 64 MiB of RAM, array at 2 MiB
    ("pages=15873", b"counter: pages must be 1..15872\n"),
])
def test_bad_command_lines_exit_0x42(cmdline, message):
    """A bad parameter is named on the console and ends the run with 0x42 before any work."""
    result, out = run_counter(cmdline=cmdline)
    assert (out, result.status) == (message, (0x42 << 1) | 1)


def test_read_only_disk_is_an_io_error(tmp_path):
    """A write refused by a read-only disk ends the run with 0x4D; the file is untouched."""
    initial = os.urandom(64 * 512)
    path = tmp_path / "disk.img"
    path.write_bytes(initial)
    result, out = run_counter(f"{path},ro", cmdline="n=3 pages=1")
    assert out.endswith(b"count 1 0x4846ca61452ed0b6\ncounter: write error at sector 1: I/O error\n")
    assert result.status == (0x4D << 1) | 1
    assert path.read_bytes() == initial
