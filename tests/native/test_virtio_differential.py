"""The C virtio-blk (transport, virtqueue, requests) behaves exactly like the Python reference.

Hypothesis drives both with the same register accesses, guest-memory writes (hostile
descriptor tables and rings included) and notifications, then demands identical
observables after every step: register values, device state, interrupt level, guest
RAM, and the backing file's bytes and size. Two C twins face the Python model: the whole
device in C (``c``: what virtio-mmio uses) and the request queue alone in C behind the
Python transport (``engine``: what virtio-pci uses, vmm/native_blk.py).
"""
import os
import struct

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio.blk import VirtioBlk
from kvmpy.kvm.memory import GuestMemory

RAM = 0x40000
DISK = 64 * 1024
QSIZE = 16
DESC, AVAIL, USED, BUF = 0x1000, 0x2000, 0x3000, 0x8000
REGS = [R.MagicValue, R.Version, R.DeviceID, R.VendorID, R.DeviceFeatures, R.DeviceFeaturesSel,
        R.DriverFeatures, R.DriverFeaturesSel, R.QueueSel, R.QueueNumMax, R.QueueNum, R.QueueReady,
        R.QueueNotify, R.InterruptStatus, R.InterruptACK, R.Status, R.QueueDescLow, R.QueueDescHigh,
        R.QueueDriverLow, R.QueueDriverHigh, R.QueueDeviceLow, R.QueueDeviceHigh, R.SHMLenLow,
        R.ConfigGeneration, R.Config, R.Config + 4, R.Config + 12, R.Config + 34, R.Config + 36, 0x7F]
VALUES = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 0xB, 0xF, 0x4F, 0x80, QSIZE, 3, 0x100,
                                    DESC, AVAIL, USED, 0xFFFFFFFF, 1 << 0 | 1 << 9]),
                   st.integers(0, 0xFFFFFFFF))
ADDRS = st.one_of(st.integers(BUF, RAM - 0x1000), st.sampled_from([0, RAM - 1, RAM, 2**64 - 8, 2**63]),
                  st.integers(0, 2**64 - 1))
LENS = st.one_of(st.sampled_from([0, 1, 15, 16, 17, 512, 513, 1024, 4096, 2**32 - 1]), st.integers(0, 0x3000))

FEATURE_WORDS = st.one_of(st.sampled_from([0, 1 << 9, 1 << 9 | 1 << 2, 1 << 5, 1 << 28, 0xFFFFFFFF]),
                         st.integers(0, 0xFFFFFFFF))
REQUESTS = st.tuples(
    st.just("req"),
    st.sampled_from([0, 0, 1, 1, 4, 8, 2, 99]),                      # IN, OUT, FLUSH, GET_ID, others
    st.one_of(st.integers(0, DISK // 512 + 1), st.sampled_from([2**64 - 1, 2**63])),
    st.sampled_from([0, 512, 1024, 2048, 513, 20, 19, 21, 4096]),  # data bytes
    st.booleans(),                                                  # data device-writable?
    st.sampled_from([1, 1, 1, 2, 0]),                               # status descriptor length
    st.integers(1, 3),                                              # data split into descriptors
    st.sampled_from([16, 16, 16, 8, 20]),                           # header descriptor length
)

OPS = st.lists(st.one_of(
    st.tuples(st.just("init"), st.booleans()),
    st.tuples(st.just("features"), FEATURE_WORDS, FEATURE_WORDS),
    REQUESTS, REQUESTS, REQUESTS,
    st.tuples(st.just("w"), st.sampled_from(REGS), st.sampled_from([4, 4, 4, 1, 2, 8]), VALUES),
    st.tuples(st.just("r"), st.sampled_from(REGS), st.sampled_from([4, 4, 1, 2, 8])),
    st.tuples(st.just("desc"), st.integers(0, QSIZE + 1), ADDRS, LENS, st.integers(0, 7), st.integers(0, QSIZE + 2)),
    st.tuples(st.just("hdr"), st.integers(BUF, RAM - 16), st.sampled_from([0, 1, 4, 8, 7]),
              st.one_of(st.integers(0, DISK // 512 + 2), st.integers(0, 2**64 - 1))),
    st.tuples(st.just("avail"), st.integers(0, QSIZE - 1), st.integers(0, QSIZE + 1),
              st.sampled_from([0, 1, 2, QSIZE, QSIZE + 1, 0xFFFF])),
    st.tuples(st.just("notify"), st.integers(0, 1)),
    st.tuples(st.just("mem"), st.integers(0, RAM - 8), st.binary(min_size=1, max_size=8)),
), min_size=1, max_size=40).map(lambda ops: [("init", True)] + ops)


class Side:
    """One implementation with its own RAM and disk file."""

    def __init__(self, path, native, readonly=False):
        """native: False (the Python model), "c" or True (the C device) or "engine" (the Python
        transport with the C request queue)."""
        self.mem = GuestMemory.anonymous(RAM)
        if native is True or native == "c":
            from kvmpy.vmm.native import NativeVirtioBlk
            self.dev = NativeVirtioBlk(path, self.mem, readonly=readonly)
            self.level = lambda: self.dev.irq_level
        else:
            self.blk = VirtioBlk(path, readonly=readonly)
            if native == "engine":
                from kvmpy.vmm.native_blk import NativeBlkQueue
                self.blk.engine = NativeBlkQueue(self.blk, self.mem)
            self.trig = RecordingTrigger()
            self.dev = R.VirtioMmioTransport(self.blk, self.mem, self.trig)
            self.level = lambda: self.trig.level
        self.avail_idx = 0

    def request(self, rtype, sector, nbytes, data_writable, status_len, split, hdr_len):
        """Lay out one (possibly malformed) request from descriptor 0, offer it and notify."""
        self.mem.write(BUF, struct.pack("<IIQ", rtype, 0, sector))
        bufs = [(BUF, hdr_len, False)]
        cuts = [nbytes * k // split for k in range(split + 1)]
        addr = BUF + 0x100
        for a, b in zip(cuts, cuts[1:]):
            if b > a:
                self.mem.write(addr, bytes((addr + i) & 0xFF for i in range(b - a)))
                bufs.append((addr, b - a, data_writable))
                addr += b - a + 0x40
        if status_len:
            self.mem.write(addr, b"\xEE" * status_len)
            bufs.append((addr, status_len, True))
        for i, (a, n, w) in enumerate(bufs):
            last = i == len(bufs) - 1
            self.mem.write(DESC + 16 * i, struct.pack("<QIHH", a, n, (2 if w else 0) | (0 if last else 1), i + 1))
        self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % QSIZE), struct.pack("<H", 0))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))
        self.dev.write(R.QueueNotify, 4, 0)
        return self.mem.read(addr, max(status_len, 1))

    def close(self):
        (self.dev if hasattr(self.dev, "close") and not hasattr(self, "blk") else self.blk).close()
        self.mem.close()

    def apply(self, op):
        kind = op[0]
        if kind == "init":
            for v in (0, R.ACKNOWLEDGE, R.ACKNOWLEDGE | R.DRIVER):
                self.dev.write(R.Status, 4, v)
            for sel, word in ((0, 1 << 9), (1, 1)):
                self.dev.write(R.DriverFeaturesSel, 4, sel)
                self.dev.write(R.DriverFeatures, 4, word)
            self.dev.write(R.Status, 4, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK)
            self.dev.write(R.QueueSel, 4, 0)
            self.dev.write(R.QueueNum, 4, QSIZE)
            for reg, addr in ((R.QueueDescLow, DESC), (R.QueueDriverLow, AVAIL), (R.QueueDeviceLow, USED)):
                self.dev.write(reg, 4, addr)
                self.dev.write(reg + 4, 4, 0)
            self.dev.write(R.QueueReady, 4, 1)
            if op[1]:
                self.dev.write(R.Status, 4, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)
            self.avail_idx = 0
            return None
        if kind == "features":
            self.dev.write(R.Status, 4, 0)
            self.dev.write(R.Status, 4, R.ACKNOWLEDGE | R.DRIVER)
            for sel, word in ((0, op[1]), (1, op[2])):
                self.dev.write(R.DriverFeaturesSel, 4, sel)
                self.dev.write(R.DriverFeatures, 4, word)
            self.dev.write(R.Status, 4, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK)
            return self.dev.read(R.Status, 4)
        if kind == "req":
            return self.request(*op[1:])
        if kind == "w":
            self.dev.write(op[1], op[2], op[3] & ((1 << (8 * op[2])) - 1))
            return None
        if kind == "r":
            return self.dev.read(op[1], op[2])
        if kind == "desc":
            _, i, addr, n, flags, nxt = op
            gpa = DESC + 16 * i
            if gpa + 16 <= RAM:
                self.mem.write(gpa, struct.pack("<QIHH", addr, n & 0xFFFFFFFF, flags, nxt))
            return None
        if kind == "hdr":
            _, gpa, rtype, sector = op
            self.mem.write(gpa, struct.pack("<IIQ", rtype, 0, sector))
            return None
        if kind == "avail":
            _, slot, head, advance = op
            self.mem.write(AVAIL + 4 + 2 * slot, struct.pack("<H", head))
            self.avail_idx = (self.avail_idx + advance) & 0xFFFF
            self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))
            return None
        if kind == "notify":
            self.dev.write(R.QueueNotify, 4, op[1])
            return None
        self.mem.write(op[1], op[2])
        return None


def comparable(state):
    s = dict(state)
    s["last_error"] = s["last_error"] is not None     # messages differ; whether there was one must not
    return s


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, content=st.binary(min_size=16, max_size=64).map(lambda b: (b * (DISK // len(b) + 1))[:DISK]),
       tail=st.integers(0, 511))
@pytest.mark.parametrize("twin", ["c", "engine"])
def test_native_virtio_blk_matches_the_python_reference(tmp_path_factory, twin, ops, content, tail):
    """Same accesses, same results: registers, state, IRQ level, guest RAM and the disk file."""
    d = tmp_path_factory.mktemp("d")
    paths = [d / "py.img", d / "c.img"]
    for p in paths:
        p.write_bytes(content + b"\x5a" * tail)        # a partial last sector must never be touched
    py, c = Side(paths[0], native=False), Side(paths[1], native=twin)
    try:
        for op in ops:
            assert c.apply(op) == py.apply(op), op
            assert comparable(c.dev.state()) == comparable(py.dev.state()), op
            assert c.level() == py.level(), op
            assert c.mem.read(0, RAM) == py.mem.read(0, RAM), op
    finally:
        py.close()
        c.close()
    assert paths[1].read_bytes() == paths[0].read_bytes()
    assert os.path.getsize(paths[1]) == DISK + tail


@pytest.mark.parametrize("twin", ["c", "engine"])
def test_native_read_write_round_trip(tmp_path, twin):
    """A guest-style write then read through the C device lands in the file and comes back."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK))
    side = Side(path, native=twin)
    side.apply(("init", True))
    data = bytes(range(256)) * 2
    side.mem.write(BUF, struct.pack("<IIQ", 1, 0, 3))           # OUT sector 3
    side.mem.write(BUF + 0x100, data)
    for i, (addr, n, fl) in enumerate([(BUF, 16, 1), (BUF + 0x100, 512, 1), (BUF + 0x400, 1, 2)]):
        side.mem.write(DESC + 16 * i, struct.pack("<QIHH", addr, n, fl, i + 1))
    side.apply(("avail", 0, 0, 1))
    side.apply(("notify", 0))
    assert side.mem.read(BUF + 0x400, 1) == b"\x00"               # VIRTIO_BLK_S_OK
    assert side.dev.state()["interrupt_status"] & 1
    side.close()
    assert path.read_bytes()[3 * 512:4 * 512] == data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(REQUESTS, min_size=1, max_size=25), readonly=st.booleans(),
       content=st.binary(min_size=16, max_size=64).map(lambda b: (b * (DISK // len(b) + 1))[:DISK]))
@pytest.mark.parametrize("twin", ["c", "engine"])
def test_native_requests_match_the_python_reference(tmp_path_factory, twin, reqs, readonly, content):
    """Streams of well- and ill-formed requests on a live queue give identical status bytes, used
    entries, guest RAM and file contents in C and in Python."""
    d = tmp_path_factory.mktemp("r")
    paths = [d / "py.img", d / "c.img"]
    for p in paths:
        p.write_bytes(content)
    py, c = Side(paths[0], native=False, readonly=readonly), Side(paths[1], native=twin, readonly=readonly)
    try:
        for op in [("init", True)] + reqs:
            assert c.apply(op) == py.apply(op), op
            assert comparable(c.dev.state()) == comparable(py.dev.state()), op
            assert c.mem.read(0, RAM) == py.mem.read(0, RAM), op
    finally:
        py.close()
        c.close()
    assert paths[1].read_bytes() == paths[0].read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(feed_at=st.integers(0, 510), chain_len=st.integers(0, DISK // 512), notifies=st.integers(1, 4),
       header_type=st.sampled_from([0, 0, 0, 1, 8]), extra=st.binary(max_size=8))
@pytest.mark.parametrize("twin", ["c", "engine"])
def test_self_feeding_rings_are_bounded_alike(tmp_path_factory, twin, feed_at, chain_len, notifies, header_type,
                                              extra):
    """A request whose header sector field is avail.idx inside its own IN buffer, on a disk
    where sector s holds s + 1 at that offset for s < chain_len: each served chain publishes
    the next. Both twins serve at most QueueNum (QSIZE) chains per notify, with identical
    RAM, used ring, state and file after every notify."""
    body = bytearray(DISK)
    for s in range(chain_len):
        struct.pack_into("<H", body, s * 512 + feed_at, s + 1)
        tail = extra[:510 - feed_at]                    # what fits in the sector after the u16
        body[s * 512 + feed_at + 2:s * 512 + feed_at + 2 + len(tail)] = tail
    d = tmp_path_factory.mktemp("f")
    paths = [d / "py.img", d / "c.img"]
    for p in paths:
        p.write_bytes(bytes(body))
    sides = [Side(paths[0], native=False), Side(paths[1], native=twin)]
    try:
        for side in sides:
            side.apply(("init", True))
            header = AVAIL + 2 - 8                      # sector field = avail.idx, ring[0..2]
            side.mem.write(header, struct.pack("<I", header_type))
            for i, (addr, n, fl) in enumerate([(header, 16, 1), (AVAIL + 2 - feed_at, 512, 3), (BUF, 1, 2)]):
                side.mem.write(DESC + 16 * i, struct.pack("<QIHH", addr, n, fl, i + 1))
            side.apply(("avail", 0, 0, 1))
        py, c = sides
        for _ in range(notifies):
            used_before = struct.unpack("<H", py.mem.read(USED + 2, 2))[0]
            for side in sides:
                side.apply(("notify", 0))
            assert comparable(c.dev.state()) == comparable(py.dev.state())
            assert c.mem.read(0, RAM) == py.mem.read(0, RAM)
            assert (struct.unpack("<H", py.mem.read(USED + 2, 2))[0] - used_before) & 0xFFFF <= QSIZE
    finally:
        for side in sides:
            side.close()
    assert paths[1].read_bytes() == paths[0].read_bytes()


@pytest.mark.parametrize("field, value", [("desc_addr", RAM - 8), ("driver_addr", 2**64 - 4),
                                          ("device_addr", RAM), ("size", 3)])
def test_the_c_request_queue_refuses_a_queue_it_cannot_check(tmp_path, field, value):
    """The C request queue trusts nothing the Python side hands it: a queue that would put a
    ring outside guest RAM (or an odd size) is refused with a driver error, no access made."""
    from kvmpy.devices.virtio.queue import VirtqueueError
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK))
    side = Side(path, native="engine")
    side.apply(("init", True))
    queue = side.dev.core.queues[0].live
    setattr(queue, field, value)
    before = side.mem.read(0, RAM)
    try:
        with pytest.raises(VirtqueueError):
            side.blk.engine.notify(0, queue)
        assert side.mem.read(0, RAM) == before
    finally:
        side.close()
