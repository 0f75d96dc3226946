"""virtio-rng behind the virtio-mmio transport, driven the way a guest driver drives it."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.ratelimit import Limits
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VirtQueue
from kvmpy.devices.virtio.rng import DEFAULT_LIMITS, MAX_REQUEST_BYTES, QUEUE_NUM_MAX, VirtioRng
from kvmpy.kvm.memory import GuestMemory

RAM = 0x80000
QSIZE = 16
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
BUF = 0x10000
VERSION_1 = 1 << R.VIRTIO_F_VERSION_1
FILL = 0xEE


class Counting:
    """A deterministic entropy source: byte k of everything it ever returns is k & 0xFF;
    ``chunk`` caps each call (getrandom interrupted by a signal returns less)."""

    def __init__(self, chunk=None):
        self.pos, self.chunk, self.calls = 0, chunk, []

    def __call__(self, n):
        self.calls.append(n)
        n = min(n, self.chunk) if self.chunk is not None else n
        out = bytes((self.pos + i) & 0xFF for i in range(n))
        self.pos += n
        return out


class Clock:
    def __init__(self):
        self.now = 1_000_000_000

    def __call__(self):
        return self.now


def pattern(start, n):
    return bytes((start + i) & 0xFF for i in range(n))


class Driver:
    """A minimal virtio-mmio driver for queue 0: negotiate, set up, offer chains."""

    def __init__(self, dev, mem, qsize=QSIZE):
        self.dev, self.mem, self.qsize = dev, mem, qsize
        self.avail_idx = self.used_seen = 0

    def rd(self, off):
        return self.dev.read(off, 4)

    def wr(self, off, value):
        self.dev.write(off, 4, value)

    def init(self, accept=VERSION_1):
        self.wr(R.Status, 0)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER)
        for sel in (0, 1):
            self.wr(R.DriverFeaturesSel, sel)
            self.wr(R.DriverFeatures, (accept >> (32 * sel)) & 0xFFFF_FFFF)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK)
        if not self.rd(R.Status) & R.FEATURES_OK:
            return False
        for off, v in ((R.QueueSel, 0), (R.QueueNum, self.qsize), (R.QueueDescLow, DESC),
                       (R.QueueDriverLow, AVAIL), (R.QueueDeviceLow, USED), (R.QueueReady, 1)):
            self.wr(off, v)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)
        return True

    def offer(self, bufs, first=0, notify=True):
        """Chain (addr, len, writable) buffers from descriptor ``first`` and make it available."""
        for i, (addr, n, writable) in enumerate(bufs):
            last = i == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.mem.write(DESC + 16 * (first + i), struct.pack("<QIHH", addr, n, flags, 0 if last else first + i + 1))
        self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % self.qsize), struct.pack("<H", first))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))
        if notify:
            self.wr(R.QueueNotify, 0)

    def used(self):
        idx = struct.unpack("<H", self.mem.read(USED + 2, 2))[0]
        out = []
        while self.used_seen != idx:
            out.append(struct.unpack("<II", self.mem.read(USED + 4 + 8 * (self.used_seen % self.qsize), 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


def rig(limits=None, source=None, clock=None):
    mem = GuestMemory.anonymous(RAM)
    mem.fill(BUF, RAM - BUF, FILL)
    rng = VirtioRng(limits, source=source or Counting(), **({"clock": clock} if clock else {}))
    irq = RecordingTrigger()
    dev = R.VirtioMmioTransport(rng, mem, irq)
    drv = Driver(dev, mem)
    assert drv.init()
    return drv, rng, irq


# --- identity and negotiation -------------------------------------------------------------

def test_probe_registers_identify_an_entropy_device_with_version_1_only():
    drv, _, _ = rig()
    assert drv.rd(R.MagicValue) == R.VIRTIO_MMIO_MAGIC and drv.rd(R.Version) == 2
    assert drv.rd(R.DeviceID) == 4
    drv.wr(R.DeviceFeaturesSel, 0)
    assert drv.rd(R.DeviceFeatures) == 0
    drv.wr(R.DeviceFeaturesSel, 1)
    assert drv.rd(R.DeviceFeatures) == 1              # bit 32: VIRTIO_F_VERSION_1
    drv.wr(R.QueueSel, 0)
    assert drv.rd(R.QueueNumMax) == QUEUE_NUM_MAX
    drv.wr(R.QueueSel, 1)
    assert drv.rd(R.QueueNumMax) == 0                 # one queue: requestq
    for off, size in ((0, 1), (0, 4), (0, 8), (3, 2)):
        assert drv.dev.read(R.Config + off, size) == 0   # no configuration space


@pytest.mark.parametrize("accept", [0, 1, VERSION_1 | 1, VERSION_1 | (1 << 28)])
def test_features_other_than_version_1_are_refused(accept):
    mem = GuestMemory.anonymous(RAM)
    drv = Driver(R.VirtioMmioTransport(VirtioRng(), mem), mem)
    assert not drv.init(accept)


# --- filling buffers ----------------------------------------------------------------------

def test_a_buffer_is_filled_from_the_source_and_returned_with_its_length():
    drv, rng, irq = rig()
    drv.offer([(BUF, 64, True)])
    assert drv.used() == [(0, 64)]
    assert drv.mem.read(BUF, 64) == pattern(0, 64)
    assert drv.mem.read(BUF + 64, 16) == bytes([FILL]) * 16
    assert irq.levels == [True] and drv.rd(R.InterruptStatus) == R.VIRTIO_MMIO_INT_VRING
    assert (rng.requests, rng.bytes_served) == (1, 64)


def test_several_writable_descriptors_are_filled_in_chain_order():
    drv, _, _ = rig()
    drv.offer([(BUF + 0x3000, 10, True), (BUF, 5, True), (BUF + 0x1000, 0, True), (BUF + 0x2000, 7, True)])
    assert drv.used() == [(0, 22)]
    assert drv.mem.read(BUF + 0x3000, 10) == pattern(0, 10)
    assert drv.mem.read(BUF, 5) == pattern(10, 5)
    assert drv.mem.read(BUF + 0x2000, 7) == pattern(15, 7)
    assert drv.mem.read(BUF + 0x1000, 1) == bytes([FILL])      # the zero-length one: untouched


def test_at_most_64_kib_are_written_per_chain():
    drv, rng, _ = rig()
    drv.offer([(BUF, 40 << 10, True), (BUF + (40 << 10), 40 << 10, True)])
    assert drv.used() == [(0, MAX_REQUEST_BYTES)]
    assert drv.mem.read(BUF, MAX_REQUEST_BYTES) == pattern(0, MAX_REQUEST_BYTES)
    assert drv.mem.read(BUF + MAX_REQUEST_BYTES, 16 << 10) == bytes([FILL]) * (16 << 10)
    assert rng.bytes_served == MAX_REQUEST_BYTES


def test_a_chain_without_writable_bytes_is_returned_empty():
    drv, rng, _ = rig()
    drv.offer([(BUF, 0, True), (0xFFFF_FFFF_FFFF_0000, 0, True)])   # zero-length: never checked
    assert drv.used() == [(0, 0)]
    assert drv.rd(R.Status) & R.DEVICE_NEEDS_RESET == 0 and rng.source.calls == []


@pytest.mark.parametrize("bufs", [
    [(BUF, 16, False)],                                  # only readable
    [(BUF, 16, False), (BUF + 0x100, 16, True)],         # readable, then writable
])
def test_a_device_readable_buffer_is_a_device_error(bufs):
    drv, rng, irq = rig()
    drv.offer(bufs)
    assert drv.used() == []
    assert drv.rd(R.Status) & R.DEVICE_NEEDS_RESET
    assert drv.rd(R.InterruptStatus) == R.VIRTIO_MMIO_INT_CONFIG and irq.level
    assert drv.mem.read(BUF, 0x200) == bytes([FILL]) * 0x200 and rng.source.calls == []
    assert "device-readable" in drv.dev.last_error
    drv.offer([(BUF, 8, True)])                          # nothing is served until a reset
    assert drv.used() == []
    assert drv.init()                                    # a reset recovers
    drv.avail_idx = drv.used_seen = 0
    drv.offer([(BUF, 8, True)])
    assert drv.used() == [(0, 8)]


def test_short_reads_from_the_source_are_continued():
    src = Counting(chunk=7)
    drv, _, _ = rig(source=src)
    drv.offer([(BUF, 30, True)])
    assert drv.used() == [(0, 30)]
    assert drv.mem.read(BUF, 30) == pattern(0, 30)
    assert src.calls == [30, 23, 16, 9, 2]


def test_a_source_that_runs_dry_returns_what_it_gave():
    given = [b"abc", b""]
    drv, rng, _ = rig(source=lambda n: given.pop(0) if given else b"")
    drv.offer([(BUF, 10, True), (BUF + 0x100, 10, True)])
    assert drv.used() == [(0, 3)]
    assert drv.mem.read(BUF, 4) == b"abc" + bytes([FILL])
    assert drv.mem.read(BUF + 0x100, 1) == bytes([FILL])


def test_a_batch_is_served_in_ring_order_with_one_interrupt():
    drv, _, irq = rig()
    for k in range(3):
        drv.offer([(BUF + 0x100 * k, 4 + k, True)], first=2 * k, notify=False)
    drv.wr(R.QueueNotify, 0)
    assert drv.used() == [(0, 4), (2, 5), (4, 6)]
    assert irq.levels == [True]
    drv.wr(R.InterruptACK, R.VIRTIO_MMIO_INT_VRING)
    assert irq.levels == [True, False]


def test_one_notify_of_a_self_feeding_ring_serves_at_most_queue_num_chains():
    """A chain whose buffer is avail.idx, filled by a source that always says "one more",
    republishes itself forever; each QueueNotify still ends after QueueNum chains."""
    served = []

    def one_more(n):
        assert n == 2
        served.append(1)
        return struct.pack("<H", len(served) + 1)

    drv, rng, _ = rig(source=one_more)
    drv.offer([(AVAIL + 2, 2, True)], notify=False)
    drv.wr(R.QueueNotify, 0)
    assert len(served) == QSIZE
    drv.wr(R.QueueNotify, 0)
    assert len(served) == 2 * QSIZE and rng.requests == 2 * QSIZE
    assert drv.rd(R.Status) & R.DEVICE_NEEDS_RESET == 0


def test_the_default_source_is_the_hosts_getrandom():
    mem = GuestMemory.anonymous(RAM)
    drv = Driver(R.VirtioMmioTransport(VirtioRng(), mem), mem)
    assert drv.init()
    drv.offer([(BUF, 4096, True)])
    drv.offer([(BUF + 4096, 4096, True)], first=1)
    assert drv.used() == [(0, 4096), (1, 4096)]
    a, b = mem.read(BUF, 4096), mem.read(BUF + 4096, 4096)
    assert a != b and a != bytes(4096) and b != bytes(4096)


def test_writes_mark_the_pages_dirty():
    drv, _, _ = rig()
    region = drv.mem.regions[0]
    region.take_dirty()
    drv.offer([(BUF + 0x5000, 8, True)])
    assert (BUF + 0x5000) >> 12 in region.dirty_pages()


# --- rate limits --------------------------------------------------------------------------

def test_a_throttled_chain_waits_in_the_ring_until_its_tokens_arrive():
    clock = Clock()
    drv, rng, irq = rig(limits=Limits(bps=1000), clock=clock)
    drv.offer([(BUF, 600, True)])
    assert drv.used() == [(0, 600)]
    drv.offer([(BUF + 0x1000, 600, True)], first=1)
    assert drv.used() == []                              # 400 tokens left: waits, untouched
    assert drv.mem.read(BUF + 0x1000, 600) == bytes([FILL]) * 600
    until = rng.limiter.throttled_until
    assert until == clock.now + 200_000_000              # 200 more tokens at 1000/s
    q = drv.dev.queues[0].live
    assert q.last_avail_idx == q.used_idx == 1           # put back as if never popped
    clock.now = until
    drv.wr(R.QueueNotify, 0)                             # the timer's (or the guest's) notify
    assert drv.used() == [(1, 600)] and rng.limiter.throttled_until == 0
    assert irq.levels == [True]


def test_requests_are_limited_by_count_too():
    clock = Clock()
    drv, rng, _ = rig(limits=Limits(iops=2), clock=clock)
    for k in range(3):
        drv.offer([(BUF + 0x100 * k, 1, True)], first=k, notify=False)
    drv.wr(R.QueueNotify, 0)
    assert [u[0] for u in drv.used()] == [0, 1]
    assert rng.limiter.throttled_until == clock.now + 500_000_000


def test_a_reset_forgets_the_throttled_chain():
    clock = Clock()
    drv, rng, _ = rig(limits=Limits(iops=1), clock=clock)
    drv.offer([(BUF, 1, True)])
    drv.offer([(BUF, 1, True)], first=1)
    assert rng.limiter.throttled_until
    drv.wr(R.Status, 0)
    assert rng.limiter.throttled_until == 0


def test_the_default_limits_bound_bytes_and_requests():
    assert DEFAULT_LIMITS.bps == 1 << 20 and DEFAULT_LIMITS.iops == 4096
    assert DEFAULT_LIMITS.bps >= MAX_REQUEST_BYTES        # a full chain never outgrows the bucket


# --- saved state ----------------------------------------------------------------------------

def test_the_transport_state_round_trips():
    drv, _, _ = rig()
    drv.offer([(BUF, 8, True)])
    assert drv.used() == [(0, 8)]
    saved = drv.dev.save_state()
    dev2 = R.VirtioMmioTransport(VirtioRng(), drv.mem)
    dev2.load_state(saved)
    assert dev2.save_state() == saved and dev2.live
    drv.dev = dev2
    drv.offer([(BUF + 0x100, 8, True)], first=1)
    assert drv.used() == [(1, 8)]


def test_a_saved_state_with_blk_features_is_refused():
    drv, _, _ = rig()
    saved = drv.dev.save_state()
    saved["driver_features"] |= 1 << 9                   # VIRTIO_BLK_F_FLUSH: not offered here
    with pytest.raises(ValueError, match="FEATURES_OK"):
        R.VirtioMmioTransport(VirtioRng(), drv.mem).load_state(saved)


# --- hypothesis: hostile descriptor chains --------------------------------------------------

HRAM = 0x40000
HQ = 8
HDESC, HAVAIL, HUSED = 0x1000, 0x1100, 0x1200

h_addrs = st.one_of(st.integers(0, HRAM + 32), st.integers(0, (1 << 64) - 1),
                    st.sampled_from([0x1000, 0x1100, 0x1200, 0x2000, HRAM - 1, HRAM - 16, (1 << 64) - 16]))
h_lens = st.one_of(st.integers(0, 4096), st.sampled_from([0, 1, 2, 8, 0x10000, 0x10001, 0x20000, 0xFFFF_FFFF]))
h_flags = st.one_of(st.sampled_from([2, 3, 0, 1, 4, 6]), st.integers(0, 0xFFFF))
h_next = st.one_of(st.integers(0, HQ), st.integers(0, 0xFFFF))
hostile_desc = st.tuples(h_addrs, h_lens, h_flags, h_next)
# a driver's ordinary chains (writable, in RAM, linked inside the table), so that many examples
# serve requests between the hostile ones; some overlap the rings
plausible_desc = st.tuples(st.integers(0x1000, HRAM - 0x1000), st.integers(0, 0x800),
                           st.sampled_from([2, 2, 2, 3, 3, 1]), st.integers(0, HQ - 1))


def mostly(good, bad, odds=5):
    """``bad`` one time in ``odds``, else ``good``."""
    return st.integers(0, odds - 1).flatmap(lambda k: bad if k == 0 else good)


h_ring = mostly(st.integers(0, HQ - 1), st.integers(0, 0xFFFF))
h_avail = mostly(st.integers(1, HQ), st.one_of(st.integers(0, HQ + 1), st.integers(0, 0xFFFF)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=st.lists(mostly(plausible_desc, hostile_desc, 4), min_size=HQ, max_size=HQ),
       ring=st.lists(h_ring, min_size=HQ, max_size=HQ), avail_idx=h_avail,
       notifies=st.integers(1, 3), limited=st.booleans())
def test_hostile_chains_never_escape_their_buffers(table, ring, avail_idx, notifies, limited):
    """Garbage rings (loops, readable buffers, addresses outside RAM or wrapping 2^64, huge
    lengths, INDIRECT, bogus indices) never raise out of the device; guest RAM changes only in
    the first 64 KiB of popped chains' writable buffers and the used ring; a notify pops at
    most QueueNum chains; used.len never exceeds 64 KiB or the chain; the line matches
    InterruptStatus."""
    mem = GuestMemory.anonymous(HRAM)
    mem.fill(0x1000, HRAM - 0x1000, 0x5A)
    for i, d in enumerate(table):
        mem.write(HDESC + 16 * i, struct.pack("<QIHH", *d))
    mem.write(HAVAIL, struct.pack("<HH", 1, avail_idx) + struct.pack(f"<{HQ}H", *ring))
    mem.write(HUSED, bytes(6 + 8 * HQ))
    clock = Clock()
    rng = VirtioRng(Limits(bps=0x18000, iops=5) if limited else None, source=Counting(), clock=clock)
    irq = RecordingTrigger()
    dev = R.VirtioMmioTransport(rng, mem, irq)
    drv = Driver(dev, mem, qsize=HQ)
    for off, val in ((R.Status, R.ACKNOWLEDGE | R.DRIVER), (R.DriverFeaturesSel, 1), (R.DriverFeatures, 1),
                     (R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK), (R.QueueNum, HQ),
                     (R.QueueDescLow, HDESC), (R.QueueDriverLow, HAVAIL), (R.QueueDeviceLow, HUSED),
                     (R.QueueReady, 1), (R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)):
        drv.wr(off, val)
    assert dev.live

    popped, popped_at, per_notify, pushed = [], [], [], []
    real_pop, real_push = VirtQueue.pop, VirtQueue.push_used

    def recording_pop(self):
        at = self.last_avail_idx
        chain = real_pop(self)
        if chain is not None:
            if popped_at and popped_at[-1] == at:   # the limiter put the last chain back: taken again
                popped.pop()
                popped_at.pop()
            popped.append(chain)
            popped_at.append(at)
            per_notify[-1] += 1
        return chain

    def recording_push(self, head, written):
        pushed.append((head, written))
        return real_push(self, head, written)

    before = mem.read(0, HRAM)
    VirtQueue.pop, VirtQueue.push_used = recording_pop, recording_push
    try:
        for _ in range(notifies):
            per_notify.append(0)
            drv.wr(R.QueueNotify, 0)
            clock.now += 300_000_000
    finally:
        VirtQueue.pop, VirtQueue.push_used = real_pop, real_push
    after = mem.read(0, HRAM)

    allowed = bytearray(HRAM)
    allowed[HUSED:HUSED + 6 + 8 * HQ] = b"\xff" * (6 + 8 * HQ)
    for c in popped:
        left = MAX_REQUEST_BYTES
        for a, n in c.writable:
            k = min(n, left)
            allowed[a:a + k] = b"\xff" * k
            left -= k
    changed = int.from_bytes(before, "little") ^ int.from_bytes(after, "little")
    outside = changed & ~int.from_bytes(allowed, "little")
    assert not outside, f"byte {(outside & -outside).bit_length() // 8 - 1:#x} changed outside every writable buffer"
    assert all(n <= HQ for n in per_notify)
    assert len(pushed) <= len(popped)
    for (head, length), c in zip(pushed, popped):
        assert head == c.head and length == min(c.writable_len, MAX_REQUEST_BYTES)
    assert rng.bytes_served == sum(n for _, n in pushed)
    if any(c.readable for c in popped):
        assert dev.status & R.DEVICE_NEEDS_RESET
    state = dev.state()
    assert state["irq_level"] == (state["interrupt_status"] != 0) == irq.level
