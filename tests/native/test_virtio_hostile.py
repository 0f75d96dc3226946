"""Hostile guests against both virtio-blk twins (issue 11, items 1 and 7).

* A self-feeding ring: the request's header sector field *is* ``avail.idx``, inside
  the request's own IN buffer, and the disk holds ``s + 1`` where that field lands, so
  serving the request for sector s publishes the request for sector s + 1. One
  QueueNotify must serve at most QueueNum chains and return.
* A disk file shrunk under the device: writes past its current end get IOERR and
  never grow it back; reads there get IOERR too.

The disks here are small, so a regression does bounded work and fails instead of
hanging; tests/integration/test_hostile_blk.py runs the endless version in a guest.
"""
import os
import struct
import time

import pytest

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio.blk import VirtioBlk
from kvmpy.kvm.memory import GuestMemory

RAM = 0x40000
DESC, AVAIL, USED, BUF = 0x1000, 0x2000, 0x3000, 0x8000
SECTORS = 64
# The self-feeding chain: a 16-byte header whose sector field (bytes 8..16) lies over
# avail.idx and ring[0..2] (all 0: every slot names head 0), and a 512-byte IN buffer
# whose byte FEED_AT lands on avail.idx. Status byte apart.
HEADER = AVAIL + 2 - 8
FEED_AT = 0x102
IN_BUF = AVAIL + 2 - FEED_AT
STATUS = BUF
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT = 0, 1
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR = 0, 1


class Rig:
    """One twin (C or Python) with its own RAM, and a minimal driver for it."""

    def __init__(self, path, native: bool, qsize: int, ram: int = RAM):
        self.mem = GuestMemory.anonymous(ram)
        self.qsize = qsize
        if native:
            from kvmpy.vmm.native import NativeVirtioBlk
            self.dev = NativeVirtioBlk(path, self.mem)
            self.close_dev = self.dev.close
        else:
            blk = VirtioBlk(path)
            self.dev = R.VirtioMmioTransport(blk, self.mem, RecordingTrigger())
            self.close_dev = blk.close
        self.setup()

    def setup(self):
        """Negotiate VERSION_1, set up queue 0 at DESC/AVAIL/USED, DRIVER_OK."""
        w = lambda off, v: self.dev.write(off, 4, v)     # noqa: E731
        qsize = self.qsize
        for v in (0, R.ACKNOWLEDGE, R.ACKNOWLEDGE | R.DRIVER):
            w(R.Status, v)
        w(R.DriverFeaturesSel, 1)
        w(R.DriverFeatures, 1)                           # VIRTIO_F_VERSION_1
        w(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK)
        w(R.QueueNum, qsize)
        for reg, addr in ((R.QueueDescLow, DESC), (R.QueueDriverLow, AVAIL), (R.QueueDeviceLow, USED)):
            w(reg, addr)
        w(R.QueueReady, 1)
        w(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)
        self.avail_idx = 0

    def chain(self, bufs):
        for i, (addr, n, writable) in enumerate(bufs):
            last = i == len(bufs) - 1
            self.mem.write(DESC + 16 * i, struct.pack("<QIHH", addr, n, (2 if writable else 0) | (0 if last else 1),
                                                      0 if last else i + 1))

    def publish(self, count=1):
        """Offer head 0 ``count`` more times (avail.idx += count)."""
        for _ in range(count):
            self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % self.qsize), b"\0\0")
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def notify(self):
        self.dev.write(R.QueueNotify, 4, 0)

    def used_idx(self):
        return struct.unpack("<H", self.mem.read(USED + 2, 2))[0]

    def request(self, rtype, sector, data=b"", in_len=0):
        """One request from descriptor 0; returns (status byte, data read)."""
        self.mem.write(BUF + 0x10, struct.pack("<IIQ", rtype, 0, sector))
        bufs = [(BUF + 0x10, 16, False)]
        if data:
            self.mem.write(BUF + 0x100, data)
            bufs.append((BUF + 0x100, len(data), False))
        if in_len:
            self.mem.fill(BUF + 0x100, in_len, 0xEE)
            bufs.append((BUF + 0x100, in_len, True))
        self.mem.write(STATUS, b"\xff")
        bufs.append((STATUS, 1, True))
        self.chain(bufs)
        before = self.used_idx()
        self.publish()
        self.notify()
        assert self.used_idx() == (before + 1) & 0xFFFF
        return self.mem.read(STATUS, 1)[0], self.mem.read(BUF + 0x100, in_len)

    def close(self):
        self.close_dev()
        self.mem.close()


TWINS = pytest.mark.parametrize("native", [False, True], ids=["python", "c"])


def self_feeding_disk(path, sectors=SECTORS, feed=range(SECTORS)):
    """Sector s holds s + 1 (le16) at FEED_AT for s in ``feed``, zeros elsewhere."""
    body = bytearray(sectors * 512)
    for s in feed:
        struct.pack_into("<H", body, s * 512 + FEED_AT, (s + 1) & 0xFFFF)
    path.write_bytes(bytes(body))


def self_feeding_rig(path, native, qsize):
    rig = Rig(path, native, qsize)
    rig.chain([(HEADER, 16, False), (IN_BUF, 512, True), (STATUS, 1, True)])
    rig.publish()                     # avail.idx = 1: the header says sector 1
    return rig


@TWINS
@pytest.mark.parametrize("qsize", [4, 8, 16])
def test_one_notify_of_a_self_feeding_ring_serves_at_most_queue_num_chains(tmp_path, native, qsize):
    """Each chain served publishes the next one, yet a notify returns after QueueNum of them;
    further notifies go on from there, QueueNum at a time (without the bound the first
    notify would serve the disk's whole chain of 64, and on a 32 MiB disk never return)."""
    self_feeding_disk(tmp_path / "d.img")
    rig = self_feeding_rig(tmp_path / "d.img", native, qsize)
    try:
        for k in range(1, 4):
            rig.notify()
            assert rig.used_idx() == k * qsize
            # the device's own reads moved avail.idx on: work is published, the device stopped
            assert struct.unpack("<H", rig.mem.read(AVAIL + 2, 2))[0] == k * qsize + 1
            assert rig.mem.read(STATUS, 1) == b"\0"
            assert rig.dev.read(R.Status, 4) & R.DEVICE_NEEDS_RESET == 0
    finally:
        rig.close()


@TWINS
def test_a_full_ring_published_before_one_notify_is_served_by_it(tmp_path, native):
    """A driver that follows the spec (at most QueueNum chains available) loses nothing to the bound."""
    path = tmp_path / "d.img"
    path.write_bytes(bytes(range(256)) * 2 * SECTORS)
    rig = Rig(path, native, qsize=16)
    try:
        rig.mem.write(BUF + 0x10, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 3))
        rig.chain([(BUF + 0x10, 16, False), (BUF + 0x100, 512, True), (STATUS, 1, True)])
        rig.publish(16)
        rig.notify()
        assert rig.used_idx() == 16
        assert rig.mem.read(STATUS, 1) == b"\0"
    finally:
        rig.close()


@TWINS
def test_a_disk_shrunk_under_the_device_is_never_grown_back(tmp_path, native):
    """After the file shrinks to 16 sectors, writes ending past its end get IOERR and leave
    its size alone; reads there get IOERR; requests inside it still work."""
    path = tmp_path / "d.img"
    path.write_bytes(bytes(SECTORS * 512))
    rig = Rig(path, native, qsize=4)
    try:
        os.truncate(path, 16 * 512)
        sector = b"\xab" * 512
        assert rig.request(VIRTIO_BLK_T_OUT, 40, data=sector)[0] == VIRTIO_BLK_S_IOERR
        assert rig.request(VIRTIO_BLK_T_OUT, 15, data=sector * 2)[0] == VIRTIO_BLK_S_IOERR
        assert rig.request(VIRTIO_BLK_T_OUT, 16, data=sector)[0] == VIRTIO_BLK_S_IOERR
        assert os.path.getsize(path) == 16 * 512
        status, data = rig.request(VIRTIO_BLK_T_IN, 20, in_len=512)
        assert status == VIRTIO_BLK_S_IOERR and data == b"\xee" * 512      # nothing read
        assert rig.request(VIRTIO_BLK_T_OUT, 15, data=sector)[0] == VIRTIO_BLK_S_OK
        assert rig.request(VIRTIO_BLK_T_IN, 15, in_len=512) == (VIRTIO_BLK_S_OK, sector)
        assert os.path.getsize(path) == 16 * 512
    finally:
        rig.close()
    assert path.read_bytes() == bytes(15 * 512) + sector


def test_c_requests_racing_resets_and_register_reads_leave_a_consistent_device(tmp_path):
    """The C device drops its register lock during file I/O. Another thread resetting the
    device, re-creating the queue and reading registers while 8 MiB reads are in flight must
    never see a completion pushed into the queue that replaced its own (used_idx ahead of
    last_avail_idx), must leave a state that restores, and close() must wait for the notify
    in progress rather than close the fd under it."""
    import threading
    from kvmpy.vmm.native import NativeVirtioBlk
    big = 8 << 20
    path = tmp_path / "d.img"
    path.write_bytes(b"\x5a" * big)
    rig = Rig(path, True, 16, ram=2 * big)
    stop = threading.Event()

    def feed():
        while not stop.is_set():
            rig.mem.write(BUF + 0x10, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
            rig.chain([(BUF + 0x10, 16, False), (big, big, True), (STATUS, 1, True)])
            q = rig.dev.raw_state().q
            rig.mem.write(AVAIL + 2, struct.pack("<H", (q.last_avail_idx + 1) & 0xFFFF))
            rig.notify()

    t = threading.Thread(target=feed)
    t.start()
    try:
        for i in range(300):
            q = rig.dev.raw_state().q
            assert not q.ready or (q.last_avail_idx - q.used_idx) & 0xFFFF in (0, 1), i
            time.sleep(0.0005)
            if i % 2:
                rig.dev.write(R.QueueReady, 4, 0)
                rig.dev.write(R.QueueReady, 4, 1)
            else:
                rig.dev.write(R.Status, 4, 0)
                rig.setup()
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    state = rig.dev.save_state()
    fresh = NativeVirtioBlk(path, rig.mem)
    fresh.load_state(state)                 # refused if a chain were lost or returned twice
    fresh.close()
    notifier = threading.Thread(target=rig.notify)
    notifier.start()
    rig.close_dev()                         # waits for that notify, if it is still running
    notifier.join(10)
    rig.mem.close()
