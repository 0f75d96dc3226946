"""QEMU's pc-testdev (kvmpy/devices/testdev.py); the host side of its page flush is in test_flush_page.py.

The hypothesis tests hold the model to a reference written the way QEMU is: the memory
core cuts an access into naturally aligned pieces no wider than the region allows
(``memory_access_size`` in QEMU's physmem.c), drops pieces the region does not accept
(``memory_region_access_valid``), splits what is left to the handler's own width
(``access_with_adjusted_size``) and calls the handlers of hw/misc/pc-testdev.c, written
out here with their masks and shifts. The model under test works byte by byte instead.
"""
import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.testdev import (FLUSH_PAGE, IOMEM_SIZE, IOPORT, IOPORT_BYTE, IRQ_LINES, PORT_COUNT,
                                   PcTestdev)
from kvmpy.errors import DeviceError

RAM_END = 0x100000


class Flushes:
    """A stand-in for GuestMemory.flush_page: records every call; RAM is [0, RAM_END)."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def __call__(self, gpa: int) -> bool:
        self.calls.append(gpa)
        if self.fail:
            raise PermissionError(13, "mprotect: Permission denied")
        return 0 <= gpa < RAM_END


def make(fail: bool = False):
    lines = [RecordingTrigger() for _ in range(IRQ_LINES)]
    flushes = Flushes(fail)
    return PcTestdev(flushes, lines), lines, flushes


# --- the reference: QEMU's memory core and handlers ----------------------------------------

class Region:
    def __init__(self, base, size, valid_min=1, valid_max=4, impl_max=4, read=None, write=None):
        self.base, self.size = base, size
        self.valid_min, self.valid_max, self.impl_max = valid_min, valid_max, impl_max
        self.read, self.write = read, write


class Qemu:
    """pc-testdev as QEMU builds it: five regions in two address spaces."""

    def __init__(self):
        self.ioport_data = 0
        self.iomem_buf = bytearray(0x10000)
        self.flushes, self.irqs = [], []
        self.io = [Region(0xE0, 4, read=self.ioport_read, write=self.ioport_write),
                   Region(0xE4, 4, valid_min=4, valid_max=4, read=lambda a, n: 0, write=self.flush_write),
                   Region(0xE8, 4, valid_max=4, impl_max=1, read=self.ioport_read, write=self.ioport_write),
                   Region(0x2000, 24, valid_max=1, read=lambda a, n: 0, write=self.irq_write)]
        self.mem = [Region(0xFF000000, 0x10000, read=self.iomem_read, write=self.iomem_write)]

    # hw/misc/pc-testdev.c
    def ioport_write(self, addr, data, n):
        start = (addr & 3) * 8
        mask = ((0xFFFFFFFF >> (32 - n * 8)) << start) & 0xFFFFFFFF
        self.ioport_data = (self.ioport_data & ~mask | data << start) & 0xFFFFFFFF

    def ioport_read(self, addr, n):
        start = (addr & 3) * 8
        mask = ((0xFFFFFFFF >> (32 - n * 8)) << start) & 0xFFFFFFFF
        return (self.ioport_data & mask) >> start

    def flush_write(self, addr, data, n):
        self.flushes.append(data & ~0xFFF)

    def irq_write(self, addr, data, n):
        self.irqs.append((addr, bool(data)))

    def iomem_read(self, addr, n):
        return int.from_bytes(self.iomem_buf[addr:addr + n], "little")

    def iomem_write(self, addr, data, n):
        self.iomem_buf[addr:addr + n] = data.to_bytes(n, "little")

    # the memory core
    def access(self, space, addr, n, value=None, unassigned=0):
        out, done = 0, 0
        while done < n:
            a = addr + done
            r = next((r for r in space if r.base <= a < r.base + r.size), None)
            if r is None:                           # one byte of nothing
                out |= unassigned << (8 * done)
                done += 1
                continue
            rel, left = a - r.base, min(n - done, r.base + r.size - a)
            step = min(r.valid_max, rel & -rel) if rel else r.valid_max
            step = 1 << (min(left, step).bit_length() - 1)      # pow2floor
            valid = r.valid_min <= step <= r.valid_max
            piece = 0
            if value is not None:
                data = value >> (8 * done) & ((1 << (8 * step)) - 1)
                for k in range(0, step, r.impl_max) if valid else ():
                    m = min(r.impl_max, step)
                    r.write(rel + k, data >> (8 * k) & ((1 << (8 * m)) - 1), m)
            elif valid:
                for k in range(0, step, r.impl_max):
                    m = min(r.impl_max, step)
                    piece |= r.read(rel + k, m) << (8 * k)
            out |= piece << (8 * done)
            done += step
        return out


PORT_BASE, IRQ_BASE, IOMEM_BASE = 0xE0, 0x2000, 0xFF000000

op = st.one_of(
    st.tuples(st.just("port"), st.integers(0, PORT_COUNT - 1), st.sampled_from([1, 2, 4]),
              st.none() | st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("irq"), st.integers(0, IRQ_LINES - 1), st.sampled_from([1, 2, 4]),
              st.none() | st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("mem"), st.integers(0, IOMEM_SIZE - 1) | st.integers(IOMEM_SIZE - 9, IOMEM_SIZE - 1),
              st.sampled_from([1, 2, 4, 8]), st.none() | st.integers(0, (1 << 64) - 1)),
)


@settings(max_examples=400)
@given(st.lists(op, max_size=40))
def test_the_model_answers_every_access_as_qemu_does(ops):
    dev, lines, flushes = make()
    ref = Qemu()
    for kind, off, size, value in ops:
        window, space, base, unassigned = {
            "port": (dev.ports, ref.io, PORT_BASE, 0xFF), "irq": (dev.irq, ref.io, IRQ_BASE, 0xFF),
            "mem": (dev.window, ref.mem, IOMEM_BASE, 0)}[kind]
        if value is None:
            assert window.read(off, size) == ref.access(space, base + off, size, unassigned=unassigned), \
                (kind, hex(off), size)
        else:
            window.write(off, size, value)
            ref.access(space, base + off, size, value)
    assert dev.latch == ref.ioport_data
    assert dev.iomem == ref.iomem_buf
    assert flushes.calls == ref.flushes
    recorded = sorted((n, lv) for n, t in enumerate(lines) for lv in t.levels)
    assert recorded == sorted(ref.irqs)


# --- what kvm-unit-tests relies on, spelled out --------------------------------------------

def test_latch_byte_lanes_by_port():
    dev, _, _ = make()
    dev.ports.write(IOPORT, 4, 0x12345678)
    assert dev.ports.read(1, 1) == 0x56
    assert dev.ports.read(2, 2) == 0x1234
    dev.ports.write(1, 1, 0xAB)
    assert dev.ports.read(IOPORT, 4) == 0x1234AB78
    dev.ports.write(2, 2, 0xCDEF)
    assert dev.latch == 0xCDEFAB78


def test_0xe8_is_the_same_latch_byte_by_byte():
    dev, _, _ = make()
    dev.ports.write(IOPORT, 4, 0x11223344)
    assert dev.ports.read(IOPORT_BYTE, 4) == 0x11223344
    assert dev.ports.read(IOPORT_BYTE + 3, 1) == 0x11
    dev.ports.write(IOPORT_BYTE + 1, 1, 0x99)
    assert dev.ports.read(IOPORT, 4) == 0x11229944
    dev.ports.write(IOPORT_BYTE + 2, 2, 0xBEEF)
    assert dev.ports.read(IOPORT, 4) == 0xBEEF9944


def test_string_io_is_one_access_per_item():
    """`rep outsb` to 0xe0 leaves the last byte in lane 0; `rep insb` from 0xe1 reads lane 1 each time."""
    dev, _, _ = make()
    for b in b"\x01\x02\x03\x04":                     # what the vCPU loop does with count = 4
        dev.ports.write(IOPORT, 1, b)
    dev.ports.write(IOPORT + 1, 1, 0x5A)
    assert dev.latch & 0xFFFF == 0x5A04
    assert [dev.ports.read(IOPORT + 1, 1) for _ in range(8)] == [0x5A] * 8


def test_flush_page_takes_only_an_aligned_dword_and_counts_what_is_not_ram():
    dev, _, flushes = make()
    dev.ports.write(FLUSH_PAGE, 4, 0x12345)
    dev.ports.write(FLUSH_PAGE, 4, 0xFEE00000)        # not RAM: ignored, counted
    dev.ports.write(FLUSH_PAGE, 2, 0x3000)            # too narrow: dropped (QEMU: valid size 4 only)
    dev.ports.write(FLUSH_PAGE + 1, 1, 0x30)
    dev.ports.write(IOPORT + 2, 4, 0x5000_0000)       # straddles 0xe2-0xe5: the 0xe4 half is dropped
    assert flushes.calls == [0x12000, 0xFEE00000]
    assert (dev.flushed, dev.flush_ignored, dev.flush_failed) == (1, 1, 0)
    assert dev.ports.read(FLUSH_PAGE, 4) == 0 and dev.ports.read(IOPORT + 2, 4) == 0


def test_a_refused_flush_is_counted_not_raised():
    dev, _, flushes = make(fail=True)
    dev.ports.write(FLUSH_PAGE, 4, 0x1000)
    assert flushes.calls == [0x1000] and dev.flush_failed == 1 and dev.flushed == 0


def test_irq_ports_drive_each_line_on_every_write():
    dev, lines, _ = make()
    dev.irq.write(14, 1, 1)
    dev.irq.write(14, 1, 7)                           # again high: QEMU calls qemu_set_irq again
    dev.irq.write(14, 1, 0)
    dev.irq.write(22, 2, 0x0100)                      # bytes are lines: 22 low, 23 high
    assert lines[14].levels == [True, True, False]
    assert lines[22].levels == [False] and lines[23].levels == [True]
    assert dev.irq.read(0, 1) == 0
    dev.irq.write(23, 4, 0xFFFFFFFF)                  # 0x2018-0x201a are nobody's
    assert lines[23].levels == [True, True] and dev.irq.read(23, 2) == 0xFF00


def test_window_reads_back_little_endian_and_stops_at_its_end():
    dev, _, _ = make()
    dev.window.write(0, 8, 0x0807060504030201)
    assert dev.window.read(1, 2) == 0x0302 and dev.window.read(0, 1) == 1
    dev.window.write(IOMEM_SIZE - 2, 4, 0xDDCCBBAA)
    assert dev.window.read(IOMEM_SIZE - 2, 4) == 0xBBAA             # past the end reads 0
    assert dev.window.read(IOMEM_SIZE - 1, 1) == 0xBB


@given(st.integers(-(1 << 70), 1 << 70), st.integers(-16, 64), st.integers(-(1 << 80), 1 << 80))
def test_hostile_offsets_sizes_and_values_never_raise_or_grow_state(offset, size, value):
    dev, _, _ = make()
    for w in (dev.ports, dev.irq, dev.window):
        w.write(offset, size, value)
        got = w.read(offset, size)
        assert 0 <= got < 1 << (8 * max(size, 0))
    assert len(dev.iomem) == IOMEM_SIZE and 0 <= dev.latch <= 0xFFFFFFFF


# --- state ------------------------------------------------------------------------------------

@given(st.integers(0, 0xFFFFFFFF), st.dictionaries(st.integers(0, IOMEM_SIZE - 1), st.integers(0, 255), max_size=20))
def test_state_round_trips(latch, bytes_at):
    dev, _, _ = make()
    dev.ports.write(IOPORT, 4, latch)
    for off, b in bytes_at.items():
        dev.window.write(off, 1, b)
    state = dev.save_state()
    assert len(state["iomem"]) < 2000                 # deflated: a mostly empty window is small
    other, _, _ = make()
    other.load_state(state)
    assert other.latch == latch and other.iomem == dev.iomem


def _packed(data: bytes) -> str:
    import base64
    import zlib
    return base64.b64encode(zlib.compress(data)).decode()


GOOD = {"latch": 5, "iomem": _packed(bytes(IOMEM_SIZE))}


@pytest.mark.parametrize("bad", [
    {}, {"latch": 1}, {"iomem": GOOD["iomem"]}, None, [], "x",
    {**GOOD, "latch": -1}, {**GOOD, "latch": 1 << 32}, {**GOOD, "latch": "5"}, {**GOOD, "latch": True},
    {**GOOD, "iomem": 7}, {**GOOD, "iomem": "not base64!"}, {**GOOD, "iomem": "AAAA"},
    {**GOOD, "iomem": _packed(bytes(IOMEM_SIZE - 1))}, {**GOOD, "iomem": _packed(bytes(IOMEM_SIZE + 1))},
    {**GOOD, "iomem": _packed(bytes(64 << 20))},                       # a bomb: inflated no further than 64 KiB + 1
    {**GOOD, "iomem": GOOD["iomem"][:-8]},                             # truncated stream
])
def test_a_bad_state_is_refused_and_changes_nothing(bad):
    dev, _, _ = make()
    dev.ports.write(IOPORT, 4, 0xCAFE)
    dev.window.write(0, 1, 9)
    with pytest.raises(DeviceError):
        dev.load_state(bad)
    assert dev.latch == 0xCAFE and dev.iomem[0] == 9


def test_trailing_garbage_after_the_window_is_refused():
    import base64
    import zlib
    packed = base64.b64encode(zlib.compress(bytes(IOMEM_SIZE)) + b"junk").decode()
    dev, _, _ = make()
    with pytest.raises(DeviceError):
        dev.load_state({"latch": 0, "iomem": packed})


def test_it_needs_24_lines():
    with pytest.raises(ValueError):
        PcTestdev(Flushes(), [RecordingTrigger()] * 16)
