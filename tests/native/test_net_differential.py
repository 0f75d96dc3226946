"""The C queue work of virtio-net (csrc/virtio_net.c via vmm/native_net.py) behaves exactly
like the Python model (devices/virtio/net.py): hypothesis drives both, each with its own
RAM behind its own transport, with the same hostile descriptor tables, rings, frames from
the host and notifications, and demands after every step the same guest RAM, transport
state (ring indices, status, DEVICE_NEEDS_RESET), counters, backlog and frames sent."""
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio import net as N
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmpy.kvm.memory import GuestMemory
from kvmpy.vmm.native_net import NativeNetQueues

RAM = 0x60000
QSIZE = 8
RINGS = {0: (0x1000, 0x2000, 0x3000), 1: (0x4000, 0x5000, 0x6000)}
BUF = 0x10000


class Sink:
    def __init__(self):
        self.sent, self.refuse = [], False

    def send(self, f):
        self.sent.append(bytes(f))
        return not self.refuse


class RecordSink(Sink):
    """A stream backend's way in as well: whole records (be32 length + frame) in one piece."""

    def __init__(self):
        super().__init__()
        self.pieces = 0

    def send_records(self, records):
        if self.refuse:
            return False
        data, pos = bytes(records), 0
        while pos < len(data):
            n = int.from_bytes(data[pos:pos + 4], "big")
            self.sent.append(data[pos + 4:pos + 4 + n])
            pos += 4 + n
        self.pieces += 1
        return True


class Side:
    def __init__(self, native, sink=Sink):
        self.mem = GuestMemory.anonymous(RAM)
        self.sink = sink()
        self.net = N.VirtioNet(self.sink)
        if native:
            self.net.engine = NativeNetQueues(self.net, self.mem)
        self.trig = RecordingTrigger()
        self.dev = R.VirtioMmioTransport(self.net, self.mem, self.trig)
        self.avail = {0: 0, 1: 0}

    def wr(self, off, v):
        self.dev.write(off, 4, v)

    def up(self):
        self.wr(R.Status, 0)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER)
        for sel in (0, 1):
            self.wr(R.DriverFeaturesSel, sel)
            self.wr(R.DriverFeatures, (N.VirtioNet.device_features >> (32 * sel)) & 0xFFFFFFFF)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK)
        for q, (d, a, u) in RINGS.items():
            self.wr(R.QueueSel, q)
            self.wr(R.QueueNum, QSIZE)
            for off, addr in ((R.QueueDescLow, d), (R.QueueDriverLow, a), (R.QueueDeviceLow, u)):
                self.wr(off, addr)
                self.wr(off + 4, 0)
            self.wr(R.QueueReady, 1)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)

    def apply(self, op):
        kind = op[0]
        if kind == "up":
            self.up()
        elif kind == "desc":
            _, q, i, addr, length, flags, nxt = op
            self.mem.write(RINGS[q][0] + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
        elif kind == "avail":
            _, q, slot, head, idx = op
            self.mem.write(RINGS[q][1] + 4 + 2 * slot, struct.pack("<H", head))
            self.mem.write(RINGS[q][1] + 2, struct.pack("<H", idx))
        elif kind == "notify":
            self.wr(R.QueueNotify, op[1])
        elif kind == "frame":
            self.net.receive(op[1])
        elif kind == "mem":
            self.mem.write(op[1], op[2])
        elif kind == "refuse":
            self.sink.refuse = op[1]
        elif kind == "tx":                  # a well-formed transmit chain: header + frame, 1 or 2 descriptors
            _, head, n, split = op
            data = bytes(12) + bytes((head + i) & 0xFF for i in range(n))
            addr = BUF + 0x1000 * head
            self.mem.write(addr, data)
            if split and n > 4:
                nxt = (head + 1) % QSIZE
                self.apply(("desc", 1, head, addr, 16, VIRTQ_DESC_F_NEXT, nxt))
                self.apply(("desc", 1, nxt, addr + 16, len(data) - 16, 0, 0))
            else:
                self.apply(("desc", 1, head, addr, len(data), 0, 0))
            self.apply(("offer", 1, head))
        elif kind == "rx":                  # a receive buffer of n bytes
            _, head, n = op
            self.apply(("desc", 0, head, BUF + 0x8000 + 0x1000 * head, n, VIRTQ_DESC_F_WRITE, 0))
            self.apply(("offer", 0, head))
        elif kind == "offer":
            _, q, head = op
            self.mem.write(RINGS[q][1] + 4 + 2 * (self.avail[q] % QSIZE), struct.pack("<H", head))
            self.avail[q] = (self.avail[q] + 1) & 0xFFFF
            self.mem.write(RINGS[q][1] + 2, struct.pack("<H", self.avail[q]))

    def observe(self):
        return (self.mem.read(0, RAM), self.dev.save_state(), bool(self.dev.last_error), dict(self.net.counters),
                len(self.net.backlog), list(self.sink.sent), self.trig.level)


ADDRS = st.one_of(st.integers(BUF, RAM - 0x800), st.sampled_from([0, RAM - 1, RAM, 2**64 - 8]),
                  st.integers(0, 2**64 - 1))
LENS = st.one_of(st.sampled_from([0, 1, 11, 12, 25, 26, 27, 60, 1526, 65562, 65563, 2**32 - 1]),
                 st.integers(0, 0x2000))
FLAGS = st.sampled_from([0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 4, 7])
FRAMES = st.one_of(st.binary(min_size=14, max_size=200), st.sampled_from([b"", b"x" * 13, b"y" * 1514, b"z" * 3000]))
OPS = st.lists(st.one_of(
    st.tuples(st.just("desc"), st.integers(0, 1), st.integers(0, QSIZE - 1), ADDRS, LENS, FLAGS,
              st.integers(0, QSIZE + 1)),
    st.tuples(st.just("avail"), st.integers(0, 1), st.integers(0, QSIZE - 1), st.integers(0, QSIZE + 1),
              st.one_of(st.integers(0, 2 * QSIZE), st.sampled_from([0xFFFF, 0x8000]))),
    st.tuples(st.just("notify"), st.integers(0, 2)),
    st.tuples(st.just("notify"), st.integers(0, 1)),
    st.tuples(st.just("frame"), FRAMES),
    st.tuples(st.just("mem"), st.integers(0, RAM - 8), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("refuse"), st.booleans()),
    st.tuples(st.just("up")),
    st.tuples(st.just("tx"), st.integers(0, QSIZE - 1), st.sampled_from([0, 13, 14, 60, 1514, 4000]), st.booleans()),
    st.tuples(st.just("tx"), st.integers(0, QSIZE - 1), st.integers(14, 300), st.booleans()),
    st.tuples(st.just("rx"), st.integers(0, QSIZE - 1), st.sampled_from([8, 12, 26, 74, 1526, 3012])),
    st.tuples(st.just("rx"), st.integers(0, QSIZE - 1), st.integers(0, 400)),
    st.tuples(st.just("frame"), FRAMES),
), min_size=1, max_size=60).map(lambda ops: [("up",)] + ops)


GOOD = [
    st.tuples(st.just("tx"), st.integers(0, QSIZE - 1), st.integers(14, 300), st.booleans()),
    st.tuples(st.just("rx"), st.integers(0, QSIZE - 1), st.sampled_from([26, 74, 1526, 3012])),
    st.tuples(st.just("frame"), st.binary(min_size=14, max_size=200)),
    st.tuples(st.just("notify"), st.integers(0, 1)),
]
#: Mostly a driver that follows the rules, now and then one that does not: the paths that
#: move frames get exercised as much as the ones that refuse them.
MOSTLY_GOOD = st.lists(st.one_of(*GOOD, *GOOD, *GOOD, OPS.map(lambda ops: ops[-1])),
                       min_size=1, max_size=60).map(lambda ops: [("up",)] + ops)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=st.one_of(OPS, MOSTLY_GOOD))
def test_c_queue_work_matches_the_python_model(ops):
    py, c = Side(False), Side(True)
    for op in ops:
        py.apply(op)
        c.apply(op)
        assert c.observe() == py.observe(), op


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=st.one_of(OPS, MOSTLY_GOOD))
def test_c_queue_work_handing_records_in_one_piece_matches_the_python_model(ops):
    """A backend with send_records (the stream backend) gets the same frames, counted the same."""
    py, c = Side(False), Side(True, RecordSink)
    for op in ops:
        py.apply(op)
        c.apply(op)
        assert c.observe() == py.observe(), op


def valid_tx(side, heads):
    """Well-formed transmit chains: a header descriptor and a frame split in two."""
    for k, h in enumerate(heads):
        frame = bytes([k]) * 14 + bytes(range(k, k + 46))
        side.mem.write(BUF + 0x1000 * k, bytes(12) + frame)
        side.apply(("desc", 1, h, BUF + 0x1000 * k, 20, VIRTQ_DESC_F_NEXT, (h + 1) % QSIZE))
    return frame


def test_a_full_ring_of_good_chains_and_frames_is_the_same_both_ways():
    py, c = Side(False), Side(True)
    for s in (py, c):
        s.up()
        for i in range(QSIZE):
            s.mem.write(BUF + 0x800 * i, bytes(12) + bytes([i]) * 100)
            s.apply(("desc", 1, i, BUF + 0x800 * i, 112, 0, 0))
            s.mem.write(RINGS[1][1] + 4 + 2 * i, struct.pack("<H", i))
        s.mem.write(RINGS[1][1] + 2, struct.pack("<H", QSIZE))
        s.apply(("notify", 1))
        for i in range(QSIZE):
            s.apply(("desc", 0, i, BUF + 0x8000 + 0x800 * i, 1526 if i % 3 else 200, VIRTQ_DESC_F_WRITE, 0))
            s.mem.write(RINGS[0][1] + 4 + 2 * i, struct.pack("<H", i))
        s.mem.write(RINGS[0][1] + 2, struct.pack("<H", QSIZE))
        for i in range(QSIZE + 2):
            s.net.receive(bytes([0x40 + i]) * (60 if i % 2 else 1000))
        s.apply(("notify", 0))
    assert c.observe() == py.observe()
    assert len(py.sink.sent) == QSIZE and py.net.counters["rx_frames"] > 0 and py.net.counters["rx_too_big"] > 0


def test_a_ring_of_frames_goes_to_a_stream_backend_in_one_piece():
    py, c = Side(False), Side(True, RecordSink)
    for s in (py, c):
        s.up()
        for i in range(QSIZE):
            s.apply(("tx", i, 60 + i, i % 2 == 0))
        s.apply(("notify", 1))
    assert c.observe() == py.observe()
    assert len(c.sink.sent) == QSIZE and c.sink.pieces == 1 and c.net.counters["tx_bytes"] == sum(map(len, c.sink.sent))
