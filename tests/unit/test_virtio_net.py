"""virtio-net behind the virtio-mmio transport, driven the way a guest driver drives it,
and hostile descriptor chains thrown at both of its queues."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio import net as N
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmpy.kvm.memory import GuestMemory

RAM = 0x100000
QSIZE = 16
RINGS = {0: (0x1000, 0x2000, 0x3000), 1: (0x4000, 0x5000, 0x6000)}
RXBUF, TXBUF = 0x10000, 0x80000
MAC = bytes.fromhex("02aabbccddee")
FEATURES = N.VirtioNet.device_features


def frame(n, seed=0):
    """An Ethernet frame of ``n`` bytes: broadcast, from MAC, type 0x88b5, a pattern."""
    head = b"\xff" * 6 + MAC + b"\x88\xb5"
    return (head + bytes((seed + i) & 0xFF for i in range(max(0, n - 14))))[:n]


class Sink:
    def __init__(self, accept=True):
        self.sent, self.accept = [], accept

    def send(self, f):
        self.sent.append(f)
        return self.accept


class Driver:
    """A minimal virtio-net driver: negotiate, set up both queues, offer chains."""

    def __init__(self, dev, mem):
        self.dev, self.mem = dev, mem
        self.avail = {0: 0, 1: 0}
        self.seen = {0: 0, 1: 0}

    def wr(self, off, value):
        self.dev.write(off, 4, value)

    def rd(self, off):
        return self.dev.read(off, 4)

    def up(self, features=FEATURES):
        self.wr(R.Status, 0)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER)
        for sel in (0, 1):
            self.wr(R.DriverFeaturesSel, sel)
            self.wr(R.DriverFeatures, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK)
        assert self.rd(R.Status) & R.FEATURES_OK
        for q, (desc, drv, dev) in RINGS.items():
            self.wr(R.QueueSel, q)
            self.wr(R.QueueNum, QSIZE)
            for off, addr in ((R.QueueDescLow, desc), (R.QueueDriverLow, drv), (R.QueueDeviceLow, dev)):
                self.wr(off, addr)
                self.wr(off + 4, 0)
            self.wr(R.QueueReady, 1)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)
        return self

    def desc(self, q, i, addr, length, flags, nxt=0):
        self.mem.write(RINGS[q][0] + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, q, head, notify=True):
        drv = RINGS[q][1]
        self.mem.write(drv + 4 + 2 * (self.avail[q] % QSIZE), struct.pack("<H", head))
        self.avail[q] = (self.avail[q] + 1) & 0xFFFF
        self.mem.write(drv + 2, struct.pack("<H", self.avail[q]))
        if notify:
            self.wr(R.QueueNotify, q)

    def used(self, q):
        """The used elements the device added since the last call."""
        dev = RINGS[q][2]
        idx = struct.unpack("<H", self.mem.read(dev + 2, 2))[0]
        out = []
        while self.seen[q] != idx:
            slot = dev + 4 + 8 * (self.seen[q] % QSIZE)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.seen[q] = (self.seen[q] + 1) & 0xFFFF
        return out

    def send(self, data, head=0):
        """Transmit header + data in one descriptor."""
        self.mem.write(TXBUF, bytes(N.NET_HDR_SIZE) + data)
        self.desc(1, head, TXBUF, N.NET_HDR_SIZE + len(data), 0)
        self.offer(1, head)

    def post_rx(self, head, size=1526, addr=None):
        self.desc(0, head, addr if addr is not None else RXBUF + 0x1000 * head, size, VIRTQ_DESC_F_WRITE)
        self.offer(0, head)


def machine(backend=None):
    mem = GuestMemory.anonymous(RAM, 0)
    net = N.VirtioNet(backend, mac=MAC)
    trig = RecordingTrigger()
    dev = R.VirtioMmioTransport(net, mem, trig)
    return net, dev, mem, trig


def test_identity_features_and_config():
    net, dev, mem, _ = machine()
    assert dev.read(R.DeviceID, 4) == 1
    assert dev.read(R.DeviceFeatures, 4) == 1 << N.VIRTIO_NET_F_MAC | 1 << N.VIRTIO_NET_F_STATUS | 1 << N.VIRTIO_NET_F_MTU
    dev.write(R.DeviceFeaturesSel, 4, 1)
    assert dev.read(R.DeviceFeatures, 4) == 1                   # VIRTIO_F_VERSION_1
    assert bytes(dev.read(R.Config + i, 1) for i in range(6)) == MAC
    assert dev.read(R.Config + 6, 2) == N.VIRTIO_NET_S_LINK_UP
    assert dev.read(R.Config + 10, 2) == 1500
    assert dev.read(R.Config + 12, 1) == 0                     # past the configuration space
    dev.write(R.Config, 1, 0xFF)                                # read-only MAC
    assert dev.read(R.Config, 1) == MAC[0]
    assert not FEATURES & (1 << N.VIRTIO_NET_F_MRG_RXBUF)


def test_transmit_sends_the_frame_after_the_header_and_interrupts():
    sink = Sink()
    net, dev, mem, trig = machine(sink)
    d = Driver(dev, mem).up()
    f = frame(60)
    d.send(f)
    assert sink.sent == [f]
    assert d.used(1) == [(0, 0)]
    assert dev.interrupt_status & R.VIRTIO_MMIO_INT_VRING and trig.level
    assert net.counters["tx_frames"] == 1 and net.counters["tx_bytes"] == 60


def test_a_frame_the_backend_refuses_is_counted_and_the_chain_returned():
    net, dev, mem, _ = machine(Sink(accept=False))
    d = Driver(dev, mem).up()
    d.send(frame(100))
    assert d.used(1) == [(0, 0)] and net.counters["tx_dropped"] == 1


def test_transmit_across_several_descriptors():
    sink = Sink()
    net, dev, mem, _ = machine(sink)
    d = Driver(dev, mem).up()
    f = frame(200, seed=3)
    data = bytes(N.NET_HDR_SIZE) + f
    for i, (lo, hi) in enumerate(((0, 5), (5, 40), (40, len(data)))):
        mem.write(TXBUF + 0x100 * i, data[lo:hi])
        d.desc(1, 3 + i, TXBUF + 0x100 * i, hi - lo, VIRTQ_DESC_F_NEXT if i < 2 else 0, 4 + i)
    d.offer(1, 3)
    assert sink.sent == [f] and d.used(1) == [(3, 0)]


def test_receive_fills_one_chain_per_frame_with_the_header():
    net, dev, mem, trig = machine()
    d = Driver(dev, mem).up()
    d.post_rx(0)
    d.post_rx(1)
    assert d.used(0) == [] and not trig.level                   # no frames yet: the chains wait
    f1, f2 = frame(64, 1), frame(1514, 2)
    assert net.receive(f1) and net.receive(f2)
    d.wr(R.QueueNotify, 0)                                      # what the network thread does
    assert d.used(0) == [(0, 12 + 64), (1, 12 + 1514)]
    assert mem.read(RXBUF, 12) == N.RX_HDR and mem.read(RXBUF + 12, 64) == f1
    assert mem.read(RXBUF + 0x1000 + 12, 1514) == f2
    assert struct.unpack("<H", N.RX_HDR[10:])[0] == 1           # num_buffers
    assert trig.level and net.counters["rx_frames"] == 2


def test_frames_wait_for_buffers_and_a_too_big_one_is_dropped_not_the_chain():
    net, dev, mem, _ = machine()
    d = Driver(dev, mem).up()
    net.receive(frame(2000))
    net.receive(frame(100, 7))
    d.post_rx(0, size=1526)                                     # the guest notifies queue 0
    assert d.used(0) == [(0, 112)] and mem.read(RXBUF + 12, 100) == frame(100, 7)
    assert net.counters["rx_too_big"] == 1


def test_the_backlog_is_bounded_and_reset_drops_it():
    net, dev, mem, _ = machine()
    for i in range(N.RX_BACKLOG + 10):
        net.receive(frame(60, i))
    assert len(net.backlog) == N.RX_BACKLOG and net.counters["rx_dropped"] == 10
    assert not net.receive(frame(N.MAX_FRAME + 1)) and not net.receive(frame(13))
    dev.write(R.Status, 4, 0)
    assert not net.backlog and net.counters["rx_dropped"] == 10 + N.RX_BACKLOG + 1


def test_bad_chain_shapes_are_returned_empty_and_counted():
    sink = Sink()
    net, dev, mem, _ = machine(sink)
    d = Driver(dev, mem).up()
    d.desc(1, 0, TXBUF, 100, VIRTQ_DESC_F_WRITE)                 # a writable transmit buffer
    d.offer(1, 0)
    d.desc(1, 1, TXBUF, 12 + 13, 0)                              # shorter than an Ethernet header
    d.offer(1, 1)
    d.desc(1, 2, TXBUF, 12 + N.MAX_FRAME + 1, 0)                 # longer than any frame
    d.offer(1, 2)
    assert sink.sent == [] and d.used(1) == [(0, 0), (1, 0), (2, 0)]
    assert net.counters["tx_bad_chain"] == 1 and net.counters["tx_bad_length"] == 2
    net.receive(frame(60))
    d.desc(0, 0, RXBUF, 100, 0)                                  # device-readable receive buffer
    d.offer(0, 0)
    d.post_rx(1, size=8)                                         # too small for the header
    d.post_rx(2)
    assert d.used(0) == [(0, 0), (1, 0), (2, 72)] and net.counters["rx_bad_chain"] == 2
    assert not dev.status & R.DEVICE_NEEDS_RESET


def test_a_ring_error_sets_needs_reset_not_an_exception():
    net, dev, mem, _ = machine(Sink())
    d = Driver(dev, mem).up()
    d.desc(1, 0, RAM - 4, 64, 0)                                 # outside guest RAM
    d.offer(1, 0)
    assert dev.status & R.DEVICE_NEEDS_RESET and "outside guest RAM" in dev.last_error


def test_snapshot_state_round_trips_and_is_checked():
    net, dev, mem, _ = machine(Sink())
    d = Driver(dev, mem).up()
    d.send(frame(60))
    state = dev.save_state()
    net2, dev2, _, _ = (lambda n: (n, R.VirtioMmioTransport(n, mem), None, None))(N.VirtioNet(Sink(), mac=MAC))
    dev2.load_state(state)
    assert dev2.save_state() == state and len(state["queues"]) == 2


def test_bad_macs_and_mtus_are_refused():
    with pytest.raises(ValueError):
        N.VirtioNet(mac=b"\x01" * 6)                             # multicast
    with pytest.raises(ValueError):
        N.VirtioNet(mac=b"\x02" * 5)
    with pytest.raises(ValueError):
        N.VirtioNet(mtu=67)


# --- hostile chains: whatever the guest writes, the host neither raises nor hangs ------

DESCS = st.tuples(st.integers(0, RAM + 0x1000), st.integers(0, 0x11000),
                  st.integers(0, 0xFFFF), st.integers(0, 2 * QSIZE))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(DESCS, min_size=1, max_size=QSIZE), heads=st.lists(st.integers(0, 0xFFFF), max_size=8),
       idx=st.integers(0, 0xFFFF), frames=st.lists(st.integers(0, 70000), max_size=6),
       queue=st.sampled_from([0, 1]))
def test_hostile_rings_never_raise_and_never_write_outside_offered_buffers(descs, heads, idx, frames, queue):
    sink = Sink()
    net, dev, mem, _ = machine(sink)
    d = Driver(dev, mem).up()
    for i, (addr, length, flags, nxt) in enumerate(descs):
        d.desc(queue, i, addr, length, flags, nxt)
    drv = RINGS[queue][1]
    for i, h in enumerate(heads):
        mem.write(drv + 4 + 2 * i, struct.pack("<H", h))
    mem.write(drv + 2, struct.pack("<H", idx))
    for n in frames:
        net.receive(b"\x02" * min(n, 14) + bytes(max(0, n - 14)))
    rings = [RINGS[q] for q in RINGS]
    before = mem.read(0, RAM)
    d.wr(R.QueueNotify, queue)
    d.wr(R.QueueNotify, queue)
    after = mem.read(0, RAM)
    # Only the used ring and device-writable buffers the guest named may change.
    allowed = [(r[2], 6 + 8 * QSIZE) for r in rings]
    allowed += [(a, n) for a, n, f, _ in descs if f & VIRTQ_DESC_F_WRITE]
    changed = [i for i in range(0, RAM, 64) if before[i:i + 64] != after[i:i + 64]]
    for i in changed:
        assert any(a - 64 < i < a + n for a, n in allowed), hex(i)
    assert all(N.MIN_FRAME <= len(f) <= N.MAX_FRAME for f in sink.sent)
    assert len(net.backlog) <= N.RX_BACKLOG
    used = struct.unpack("<H", mem.read(RINGS[queue][2] + 2, 2))[0]
    assert used <= QSIZE * 2                                     # two notifies, each at most QueueNum chains


def test_receive_some_takes_what_receive_would_one_by_one():
    from collections import deque
    frames = [b"a" * 60, b"short", b"b" * (N.MAX_FRAME + 1), b"c" * 1514] * 3
    bulk, single = N.VirtioNet(), N.VirtioNet()
    bulk.backlog.extend([b"x" * 60] * (N.RX_BACKLOG - 8))
    single.backlog.extend([b"x" * 60] * (N.RX_BACKLOG - 8))
    left = deque(frames)
    assert bulk.receive_some(left, 5) == (5, sum(map(len, frames[:5])))
    assert bulk.receive_some(left, 100) == (5, sum(map(len, frames[5:10])))    # 5 places left: 3 taken
    assert bulk.receive_some(left, 100) == (2, sum(map(len, frames[10:])))
    assert bulk.receive_some(deque([b"d" * 60] * 3), 100) == (2, 120) and not left    # full after two
    for f in frames + [b"d" * 60] * 2:
        single.receive(f)
    assert list(bulk.backlog) == list(single.backlog) and bulk.counters == single.counters
    good = N.VirtioNet()
    assert good.receive_some(deque([b"g" * 100] * 3), 64) == (3, 300) and len(good.backlog) == 3
