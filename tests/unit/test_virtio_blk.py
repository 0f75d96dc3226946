"""virtio-blk behind the virtio-mmio transport, driven the way a guest driver drives it."""
import fcntl
import os
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio.blk import (
    CONFIG_SIZE, QUEUE_NUM_MAX, SEG_MAX, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlk,
)
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VirtQueue
from kvmpy.errors import DeviceError
from kvmpy.kvm.memory import GuestMemory

RAM = 0x40000
QSIZE = 16
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
BUF = 0x8000                   # request buffers are laid out from here up
VERSION_1 = 1 << R.VIRTIO_F_VERSION_1


class Driver:
    """A minimal virtio-mmio guest driver for one queue: negotiate, set up, submit."""

    def __init__(self, dev, mem, qsize=QSIZE):
        self.dev, self.mem, self.qsize = dev, mem, qsize
        self.avail_idx = 0
        self.used_seen = 0

    def rd(self, off):
        return self.dev.read(off, 4)

    def wr(self, off, value):
        self.dev.write(off, 4, value)

    def features(self):
        self.wr(R.DeviceFeaturesSel, 0)
        lo = self.rd(R.DeviceFeatures)
        self.wr(R.DeviceFeaturesSel, 1)
        return lo | self.rd(R.DeviceFeatures) << 32

    def negotiate(self, accept=None):
        """Reset, ACK, DRIVER, write features, FEATURES_OK; returns whether it stuck."""
        self.wr(R.Status, 0)
        self.wr(R.Status, R.ACKNOWLEDGE)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER)
        feats = self.features() if accept is None else accept
        for sel in (0, 1):
            self.wr(R.DriverFeaturesSel, sel)
            self.wr(R.DriverFeatures, (feats >> (32 * sel)) & 0xFFFF_FFFF)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK)
        return bool(self.rd(R.Status) & R.FEATURES_OK)

    def setup_queue(self, desc=DESC, avail=AVAIL, used=USED):
        self.mem.fill(desc, 16 * self.qsize)
        self.mem.fill(avail, 6 + 2 * self.qsize)
        self.mem.fill(used, 6 + 8 * self.qsize)
        self.avail_idx = self.used_seen = 0
        self.wr(R.QueueSel, 0)
        assert self.rd(R.QueueReady) == 0
        self.wr(R.QueueNum, self.qsize)
        for low, addr in ((R.QueueDescLow, desc), (R.QueueDriverLow, avail),
                          (R.QueueDeviceLow, used)):
            self.wr(low, addr & 0xFFFF_FFFF)
            self.wr(low + 4, addr >> 32)
        self.wr(R.QueueReady, 1)

    def init(self, accept=None):
        assert self.negotiate(accept)
        self.setup_queue()
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)
        return self

    def submit(self, bufs, notify=True):
        """Chain (addr, len, writable) buffers from descriptor 0, offer and notify; returns the head."""
        for i, (addr, n, writable) in enumerate(bufs):
            last = i == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.mem.write(DESC + 16 * i, struct.pack("<QIHH", addr, n, flags, 0 if last else i + 1))
        self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % self.qsize), struct.pack("<H", 0))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))
        if notify:
            self.wr(R.QueueNotify, 0)
        return 0

    def used(self):
        """New used elements since the last call, as (id, len)."""
        idx = struct.unpack("<H", self.mem.read(USED + 2, 2))[0]
        out = []
        while self.used_seen != idx:
            slot = USED + 4 + 8 * (self.used_seen % self.qsize)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def request(self, rtype, sector=0, out=b"", in_len=0, splits=1, header_split=0):
        """One virtio_blk_req; returns (status byte, data read, used.len)."""
        hdr = struct.pack("<IIQ", rtype, 0, sector)
        bufs, addr = [], BUF
        if header_split:
            bufs += [(addr, header_split, False), (addr + 0x100, 16 - header_split, False)]
            self.mem.write(addr, hdr[:header_split])
            self.mem.write(addr + 0x100, hdr[header_split:])
        else:
            bufs.append((addr, 16, False))
            self.mem.write(addr, hdr)
        addr += 0x1000
        for piece in _split(out, splits):
            self.mem.write(addr, piece)
            bufs.append((addr, len(piece), False))
            addr += len(piece) + 0x100
        in_bufs = []
        for n in _split_len(in_len, splits):
            self.mem.fill(addr, n, 0xEE)
            bufs.append((addr, n, True))
            in_bufs.append((addr, n))
            addr += n + 0x100
        self.mem.write(addr, b"\xFF")
        bufs.append((addr, 1, True))
        self.submit(bufs)
        (used,) = self.used()
        data = b"".join(self.mem.read(a, n) for a, n in in_bufs)
        return self.mem.read(addr, 1)[0], data, used[1]


def _split_len(n, parts):
    cuts = [n * k // parts for k in range(parts + 1)]
    return [b - a for a, b in zip(cuts, cuts[1:]) if b > a]


def _split(data, parts):
    out, pos = [], 0
    for n in _split_len(len(data), parts):
        out.append(data[pos:pos + n])
        pos += n
    return out


def disk_file(tmp, content):
    path = os.path.join(tmp, "disk.img")
    with open(path, "wb") as f:
        f.write(content)
    return path


@pytest.fixture
def disk(tmp_path):
    """An 8-sector disk whose sector k is filled with byte k."""
    return disk_file(str(tmp_path), b"".join(bytes([k]) * 512 for k in range(8)))


def rig(path, **kw):
    mem = GuestMemory.anonymous(RAM)
    blk = VirtioBlk(path, **kw)
    irq = RecordingTrigger()
    dev = R.VirtioMmioTransport(blk, mem, irq)
    return Driver(dev, mem), blk, irq


# --- probing and negotiation -------------------------------------------------------------

def test_probe_registers_identify_a_virtio_mmio_v2_block_device(disk):
    """MagicValue 'virt', Version 2, DeviceID 2, QueueNumMax 256, and the offered features."""
    drv, blk, _ = rig(disk)
    assert drv.rd(R.MagicValue) == 0x74726976 == int.from_bytes(b"virt", "little")
    assert drv.rd(R.Version) == 2
    assert drv.rd(R.DeviceID) == 2
    assert drv.rd(R.VendorID) == R.VIRTIO_MMIO_VENDOR
    assert drv.rd(R.QueueNumMax) == QUEUE_NUM_MAX == 256
    assert drv.features() == VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX
    assert drv.rd(R.Status) == 0 and drv.rd(R.ConfigGeneration) == 0
    blk.close()


def test_config_space_holds_capacity_and_seg_max(disk):
    """capacity (le64 at 0) is the sector count, seg_max (le32 at 12) is QueueNumMax - 2."""
    drv, _, _ = rig(disk)
    assert drv.dev.read(R.Config, 8) == 8
    assert drv.dev.read(R.Config, 4) == 8 and drv.dev.read(R.Config + 4, 4) == 0
    assert drv.dev.read(R.Config + 12, 4) == SEG_MAX == 254
    assert drv.dev.read(R.Config, 1) == 8 and drv.dev.read(R.Config + 1, 2) == 0
    assert drv.dev.read(R.Config + CONFIG_SIZE - 1, 1) == 0
    assert drv.dev.read(R.Config + CONFIG_SIZE, 1) == 0          # past the end
    assert drv.dev.read(R.Config + CONFIG_SIZE - 4, 8) == 0      # straddles the end


def test_features_ok_sticks_for_an_offered_subset(disk):
    """Accepting VERSION_1 and a subset of offered bits keeps FEATURES_OK."""
    drv, _, _ = rig(disk)
    assert drv.negotiate(VERSION_1)
    assert drv.dev.state()["driver_features"] == VERSION_1
    assert drv.negotiate(VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH)


@pytest.mark.parametrize("accept", [
    VERSION_1 | 1 << R.VIRTIO_F_INDIRECT_DESC,      # not offered
    VERSION_1 | 1 << R.VIRTIO_F_EVENT_IDX,          # not offered
    VERSION_1 | 1 << VIRTIO_BLK_F_RO,               # only offered for read-only disks
    1 << VIRTIO_BLK_F_FLUSH,                        # a legacy driver: no VERSION_1
    0,
])
def test_features_ok_is_refused_for_unoffered_features_or_missing_version_1(disk, accept):
    """The device leaves FEATURES_OK clear, so the driver knows negotiation failed."""
    drv, _, _ = rig(disk)
    assert not drv.negotiate(accept)
    assert drv.rd(R.Status) == R.ACKNOWLEDGE | R.DRIVER


def test_a_refused_device_does_not_process_requests(disk):
    """Without FEATURES_OK the device is not live: QueueNotify is ignored."""
    drv, _, _ = rig(disk)
    assert not drv.negotiate(0)
    drv.setup_queue()
    drv.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.DRIVER_OK)
    drv.mem.write(BUF, struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0))
    drv.submit([(BUF, 16, False), (BUF + 16, 1, True)])
    assert drv.used() == []


def test_read_only_disk_offers_virtio_blk_f_ro(disk):
    """A read-only disk adds VIRTIO_BLK_F_RO to the offered features."""
    drv, _, _ = rig(disk, readonly=True)
    assert drv.features() & (1 << VIRTIO_BLK_F_RO)


# --- requests ----------------------------------------------------------------------------------

def test_read_returns_the_sectors_from_the_file(disk):
    """IN of sectors 2-4 returns their bytes, status OK, used.len = data + status byte."""
    drv, _, _ = rig(disk)
    drv.init()
    status, data, used_len = drv.request(VIRTIO_BLK_T_IN, sector=2, in_len=3 * 512, splits=3)
    assert status == VIRTIO_BLK_S_OK
    assert data == bytes([2]) * 512 + bytes([3]) * 512 + bytes([4]) * 512
    assert used_len == 3 * 512 + 1


def test_write_then_read_round_trips_through_the_file(disk):
    """OUT stores the data at the sector in the file; IN reads it back; used.len = 1 for OUT."""
    drv, _, _ = rig(disk)
    drv.init()
    payload = bytes(range(256)) * 4
    assert drv.request(VIRTIO_BLK_T_OUT, sector=6, out=payload, splits=2) == (VIRTIO_BLK_S_OK, b"", 1)
    with open(disk, "rb") as f:
        content = f.read()
    assert content[6 * 512:7 * 512] == payload[:512] and content[7 * 512:] == payload[512:]
    assert content[:6 * 512] == b"".join(bytes([k]) * 512 for k in range(6))
    assert drv.request(VIRTIO_BLK_T_IN, sector=6, in_len=1024)[1] == payload


def test_header_may_be_split_and_data_merged_with_the_status_byte(disk):
    """Framing is free: a 5+11-byte header and a 513-byte data+status buffer work."""
    drv, _, _ = rig(disk)
    drv.init()
    assert drv.request(VIRTIO_BLK_T_IN, sector=1, in_len=512, header_split=5)[:2] == (
        VIRTIO_BLK_S_OK, bytes([1]) * 512)
    hdr = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 5)
    drv.mem.write(BUF, hdr)
    drv.mem.fill(BUF + 0x1000, 513, 0xEE)
    drv.submit([(BUF, 16, False), (BUF + 0x1000, 513, True)])
    assert drv.used() == [(0, 513)]
    assert drv.mem.read(BUF + 0x1000, 513) == bytes([5]) * 512 + bytes([VIRTIO_BLK_S_OK])


def test_flush_succeeds(disk):
    """FLUSH completes with OK and used.len 1."""
    drv, _, _ = rig(disk)
    drv.init()
    assert drv.request(VIRTIO_BLK_T_FLUSH) == (VIRTIO_BLK_S_OK, b"", 1)


@pytest.mark.parametrize("serial,expect", [
    ("kvmpy-disk-0", b"kvmpy-disk-0" + b"\0" * 8),
    ("A" * 20, b"A" * 20),
    (None, b"\0" * 20),
])
def test_get_id_returns_the_nul_padded_serial(disk, serial, expect):
    """GET_ID fills 20 bytes with the serial, NUL-padded (no NUL if it is 20 bytes long)."""
    drv, _, _ = rig(disk, serial_id=serial)
    drv.init()
    assert drv.request(VIRTIO_BLK_T_GET_ID, in_len=20) == (VIRTIO_BLK_S_OK, expect, 21)


def test_get_id_into_a_shorter_or_longer_buffer_writes_at_most_20_bytes(disk):
    """GET_ID writes min(len, 20) bytes; used.len says how many."""
    drv, _, _ = rig(disk, serial_id="0123456789abcdefghij")
    drv.init()
    assert drv.request(VIRTIO_BLK_T_GET_ID, in_len=8) == (VIRTIO_BLK_S_OK, b"01234567", 9)
    status, data, used_len = drv.request(VIRTIO_BLK_T_GET_ID, in_len=32)
    assert (status, data[:20], data[20:], used_len) == (
        VIRTIO_BLK_S_OK, b"0123456789abcdefghij", b"\xEE" * 12, 21)


def test_read_only_disk_refuses_writes_and_leaves_the_file_alone(disk, monkeypatch):
    """OUT on a read-only disk is IOERR without any write attempt; IN and FLUSH still work."""
    with open(disk, "rb") as f:
        before = f.read()
    drv, _, _ = rig(disk, readonly=True)
    drv.init()
    monkeypatch.setattr(os, "pwritev", lambda *a: pytest.fail("pwritev on a read-only disk"))
    monkeypatch.setattr(os, "fdatasync", lambda *a: pytest.fail("fdatasync on a read-only disk"))
    assert drv.request(VIRTIO_BLK_T_OUT, sector=0, out=b"\x55" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_IN, sector=7, in_len=512)[:2] == (VIRTIO_BLK_S_OK, b"\x07" * 512)
    assert drv.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    with open(disk, "rb") as f:
        assert f.read() == before


@pytest.mark.parametrize("rtype,sector,nbytes", [
    (VIRTIO_BLK_T_OUT, 8, 512),          # starts at capacity
    (VIRTIO_BLK_T_OUT, 7, 1024),         # runs past the end
    (VIRTIO_BLK_T_OUT, (1 << 64) - 1, 512),
    (VIRTIO_BLK_T_OUT, (1 << 64) - 1, 0),
    (VIRTIO_BLK_T_OUT, 0, 100),          # not whole sectors
    (VIRTIO_BLK_T_IN, 8, 512),
    (VIRTIO_BLK_T_IN, 1 << 63, 512),
    (VIRTIO_BLK_T_IN, 0, 511),
])
def test_out_of_range_or_partial_sector_requests_are_ioerr(disk, rtype, sector, nbytes):
    """Requests past capacity (or wrapping u64) or of partial sectors fail; the file is unchanged."""
    with open(disk, "rb") as f:
        before = f.read()
    drv, _, _ = rig(disk)
    drv.init()
    kw = {"out": b"\x77" * nbytes} if rtype == VIRTIO_BLK_T_OUT else {"in_len": nbytes}
    status, data, used_len = drv.request(rtype, sector=sector, **kw)
    assert status == VIRTIO_BLK_S_IOERR and used_len == 1
    assert data == b"\xEE" * len(data)
    with open(disk, "rb") as f:
        assert f.read() == before


def test_zero_length_transfers_at_capacity_are_ok(disk):
    """A 0-byte IN/OUT at sector == capacity is inside the disk (sector + 0 <= capacity)."""
    drv, _, _ = rig(disk)
    drv.init()
    assert drv.request(VIRTIO_BLK_T_IN, sector=8) == (VIRTIO_BLK_S_OK, b"", 1)
    assert drv.request(VIRTIO_BLK_T_OUT, sector=8) == (VIRTIO_BLK_S_OK, b"", 1)


def test_trailing_partial_sector_is_invisible_and_untouched(tmp_path):
    """capacity = size // 512; the last 100 bytes are never read or written."""
    path = disk_file(str(tmp_path), b"\x11" * 4 * 512 + b"\x99" * 100)
    drv, blk, _ = rig(path)
    assert blk.capacity == 4 and drv.dev.read(R.Config, 8) == 4
    drv.init()
    assert drv.request(VIRTIO_BLK_T_OUT, sector=3, out=b"\x22" * 512)[0] == VIRTIO_BLK_S_OK
    assert drv.request(VIRTIO_BLK_T_OUT, sector=4, out=b"\x33" * 512)[0] == VIRTIO_BLK_S_IOERR
    with open(path, "rb") as f:
        assert f.read() == b"\x11" * 3 * 512 + b"\x22" * 512 + b"\x99" * 100


@pytest.mark.parametrize("rtype", [2, 3, 5, 10, 11, 13, 14, 15, 0x80000000, 0xFFFFFFFF])
def test_unknown_request_types_are_unsupp(disk, rtype):
    """Types other than IN/OUT/FLUSH/GET_ID complete with UNSUPP and touch nothing."""
    with open(disk, "rb") as f:
        before = f.read()
    drv, _, _ = rig(disk)
    drv.init()
    assert drv.request(rtype, out=b"\x01" * 512) == (VIRTIO_BLK_S_UNSUPP, b"", 1)
    with open(disk, "rb") as f:
        assert f.read() == before


def test_short_header_is_ioerr(disk):
    """Fewer than 16 device-readable bytes: IOERR in the status byte."""
    drv, _, _ = rig(disk)
    drv.init()
    drv.mem.write(BUF, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    drv.submit([(BUF, 15, False), (BUF + 0x100, 512, True), (BUF + 0x400, 1, True)])
    assert drv.used() == [(0, 1)] and drv.mem.read(BUF + 0x400, 1)[0] == VIRTIO_BLK_S_IOERR


def test_wrong_direction_data_is_ioerr(disk):
    """IN with device-readable data, OUT with device-writable data, GET_ID with readable data: IOERR."""
    drv, _, _ = rig(disk)
    drv.init()
    for rtype, bufs in (
            (VIRTIO_BLK_T_IN, [(BUF, 16 + 512, False), (BUF + 0x400, 1, True)]),
            (VIRTIO_BLK_T_OUT, [(BUF, 16, False), (BUF + 0x1000, 512, True), (BUF + 0x400, 1, True)]),
            (VIRTIO_BLK_T_GET_ID, [(BUF, 17, False), (BUF + 0x1000, 20, True), (BUF + 0x400, 1, True)])):
        drv.mem.write(BUF, struct.pack("<IIQ", rtype, 0, 0))
        drv.mem.fill(BUF + 0x1000, 512, 0xEE)
        drv.submit(bufs)
        assert drv.used() == [(0, 1)] and drv.mem.read(BUF + 0x400, 1)[0] == VIRTIO_BLK_S_IOERR
        assert drv.mem.read(BUF + 0x1000, 512) == b"\xEE" * 512


def test_flush_ignores_sector_and_stray_data(disk):
    """FLUSH with a non-zero sector and data buffers in both directions still completes OK."""
    drv, _, _ = rig(disk)
    drv.init()
    drv.mem.write(BUF, struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 12345) + b"x" * 16)
    drv.submit([(BUF, 32, False), (BUF + 0x1000, 64, True)])
    assert drv.used() == [(0, 1)] and drv.mem.read(BUF + 0x1000 + 63, 1)[0] == VIRTIO_BLK_S_OK


def test_request_without_a_writable_byte_needs_reset(disk):
    """No status byte can be written: DEVICE_NEEDS_RESET, a config interrupt, no used entry."""
    drv, _, irq = rig(disk)
    drv.init()
    drv.mem.write(BUF, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 0))
    drv.submit([(BUF, 16 + 512, False)])
    assert drv.used() == []
    assert drv.rd(R.Status) & R.DEVICE_NEEDS_RESET
    assert drv.rd(R.InterruptStatus) == R.VIRTIO_MMIO_INT_CONFIG and irq.levels == [True]
    assert "no device-writable" in drv.dev.state()["last_error"]
    drv.mem.write(BUF, struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0))
    drv.submit([(BUF, 16, False), (BUF + 16, 1, True)])     # ignored until reset
    assert drv.used() == []
    drv.init()                                                 # reset and start over
    assert drv.rd(R.Status) & R.DEVICE_NEEDS_RESET == 0 and irq.levels == [True, False]
    assert drv.request(VIRTIO_BLK_T_FLUSH) == (VIRTIO_BLK_S_OK, b"", 1)


def test_closed_disk_completes_io_with_ioerr(disk):
    """After close() every I/O request fails with IOERR; close is idempotent."""
    drv, blk, _ = rig(disk)
    drv.init()
    blk.close()
    blk.close()
    assert drv.request(VIRTIO_BLK_T_IN, in_len=512)[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_OUT, out=b"a" * 512)[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_IOERR
    assert drv.request(VIRTIO_BLK_T_GET_ID, in_len=20)[0] == VIRTIO_BLK_S_OK


def _short(real, limit):
    """Wrap preadv/pwritev so each call moves at most ``limit`` bytes."""
    def call(fd, views, pos):
        cut, left = [], limit
        for v in views:
            if left == 0:
                break
            cut.append(v[:left])
            left -= len(cut[-1])
        try:
            return real(fd, cut, pos)
        finally:
            for v in cut:
                v.release()
    return call


@pytest.mark.parametrize("limit", [1, 100, 511, 513, 700])
def test_short_reads_and_writes_are_continued(disk, monkeypatch, limit):
    """preadv/pwritev moving fewer bytes than asked are called again from where they stopped."""
    drv, _, _ = rig(disk)
    drv.init()
    monkeypatch.setattr(os, "preadv", _short(os.preadv, limit))
    monkeypatch.setattr(os, "pwritev", _short(os.pwritev, limit))
    payload = os.urandom(1536)
    assert drv.request(VIRTIO_BLK_T_OUT, sector=2, out=payload, splits=3)[0] == VIRTIO_BLK_S_OK
    assert drv.request(VIRTIO_BLK_T_IN, sector=2, in_len=1536, splits=3)[1] == payload
    with open(disk, "rb") as f:
        assert f.read()[1024:2560] == payload


@pytest.mark.parametrize("name,effect", [
    ("preadv", lambda *a: 0),                                   # EOF: the file shrank
    ("preadv", lambda *a: (_ for _ in ()).throw(OSError(5, "EIO"))),
    ("pwritev", lambda *a: 0),
    ("pwritev", lambda *a: (_ for _ in ()).throw(OSError(28, "ENOSPC"))),
    ("fdatasync", lambda *a: (_ for _ in ()).throw(OSError(5, "EIO"))),
])
def test_host_io_failures_complete_with_ioerr(disk, monkeypatch, name, effect):
    """End of file or an OSError from the host completes the request with IOERR, used.len 1."""
    drv, _, _ = rig(disk)
    drv.init()
    monkeypatch.setattr(os, name, effect)
    rtype = {"preadv": VIRTIO_BLK_T_IN, "pwritev": VIRTIO_BLK_T_OUT, "fdatasync": VIRTIO_BLK_T_FLUSH}[name]
    kw = {"preadv": {"in_len": 512}, "pwritev": {"out": b"z" * 512}, "fdatasync": {}}[name]
    assert drv.request(rtype, **kw)[0::2] == (VIRTIO_BLK_S_IOERR, 1)
    assert drv.rd(R.Status) & R.DEVICE_NEEDS_RESET == 0


def test_batched_requests_complete_in_ring_order(disk):
    """Several chains offered before one notify are all served, in available-ring order."""
    drv, _, _ = rig(disk)
    drv.init()
    for i in range(3):
        base = BUF + 0x1000 * i
        drv.mem.write(base, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, i))
        drv.mem.write(DESC + 16 * (2 * i), struct.pack("<QIHH", base, 16, VIRTQ_DESC_F_NEXT, 2 * i + 1))
        drv.mem.write(DESC + 16 * (2 * i + 1), struct.pack("<QIHH", base + 16, 513, VIRTQ_DESC_F_WRITE, 0))
        drv.mem.write(AVAIL + 4 + 2 * i, struct.pack("<H", 2 * i))
    drv.mem.write(AVAIL + 2, struct.pack("<H", 3))
    drv.wr(R.QueueNotify, 0)
    assert drv.used() == [(0, 513), (2, 513), (4, 513)]
    for i in range(3):
        assert drv.mem.read(BUF + 0x1000 * i + 16, 513) == bytes([i]) * 512 + b"\0"


# --- interrupts and reset -----------------------------------------------------------------------

def test_completion_raises_the_line_until_acknowledged(disk):
    """A used buffer sets InterruptStatus bit 0 and raises the line; InterruptACK lowers it."""
    drv, _, irq = rig(disk)
    drv.init()
    assert irq.levels == []
    drv.request(VIRTIO_BLK_T_FLUSH)
    assert drv.rd(R.InterruptStatus) == R.VIRTIO_MMIO_INT_VRING and irq.levels == [True]
    drv.request(VIRTIO_BLK_T_FLUSH)
    assert irq.levels == [True]                       # already high: no new edge
    drv.wr(R.InterruptACK, R.VIRTIO_MMIO_INT_VRING)
    assert drv.rd(R.InterruptStatus) == 0 and irq.levels == [True, False]


def test_no_interrupt_flag_suppresses_the_used_buffer_interrupt(disk):
    """With VIRTQ_AVAIL_F_NO_INTERRUPT the request completes but no interrupt is raised."""
    drv, _, irq = rig(disk)
    drv.init()
    drv.mem.write(AVAIL, struct.pack("<H", 1))
    assert drv.request(VIRTIO_BLK_T_IN, in_len=512)[0] == VIRTIO_BLK_S_OK
    assert drv.rd(R.InterruptStatus) == 0 and irq.levels == []
    drv.mem.write(AVAIL, struct.pack("<H", 0))
    drv.request(VIRTIO_BLK_T_FLUSH)
    assert irq.levels == [True]


def test_status_zero_resets_everything(disk):
    """Writing 0 to Status clears status, features, queues and interrupts, and lowers the line."""
    drv, _, irq = rig(disk)
    drv.init()
    drv.request(VIRTIO_BLK_T_FLUSH)
    drv.wr(R.Status, 0)
    st_ = drv.dev.state()
    assert st_["status"] == 0 and st_["driver_features"] == 0 and st_["interrupt_status"] == 0
    assert st_["queues"][0] == {"num": QUEUE_NUM_MAX, "ready": False, "desc": 0, "driver": 0,
                                "device": 0, "last_avail_idx": 0, "used_idx": 0}
    assert drv.rd(R.QueueReady) == 0 and irq.levels == [True, False]
    drv.init()                                          # rings start again from index 0
    assert drv.request(VIRTIO_BLK_T_IN, sector=3, in_len=512)[1] == b"\x03" * 512


def test_bad_queue_setup_needs_reset_without_an_interrupt_before_driver_ok(disk):
    """A misaligned ring at QueueReady sets DEVICE_NEEDS_RESET; no DRIVER_OK, so no interrupt."""
    drv, _, irq = rig(disk)
    assert drv.negotiate()
    drv.setup_queue(desc=DESC + 8)
    assert drv.rd(R.QueueReady) == 0
    assert drv.rd(R.Status) & R.DEVICE_NEEDS_RESET
    assert drv.rd(R.InterruptStatus) == 0 and irq.levels == []


# --- construction ---------------------------------------------------------------------------------

def test_backing_file_is_opened_cloexec_and_never_truncated(disk):
    """The fd has FD_CLOEXEC, the file keeps its size, and read-only opens O_RDONLY."""
    size = os.path.getsize(disk)
    with VirtioBlk(disk) as blk:
        assert fcntl.fcntl(blk.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(blk.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    with VirtioBlk(disk, readonly=True) as blk:
        assert fcntl.fcntl(blk.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    assert blk.fd == -1 and os.path.getsize(disk) == size


def test_constructor_errors_are_device_errors(tmp_path, disk):
    """A missing file, a directory, or a serial longer than 20 bytes is a DeviceError."""
    with pytest.raises(DeviceError, match="cannot open"):
        VirtioBlk(tmp_path / "missing.img")
    assert not (tmp_path / "missing.img").exists()
    with pytest.raises(DeviceError, match="not a regular file"):
        VirtioBlk(tmp_path, readonly=True)
    with pytest.raises(DeviceError, match="longer than 20"):
        VirtioBlk(disk, serial_id="x" * 21)


# --- hypothesis: hostile descriptor chains against a real disk ---------------------------------------

HRAM = 0x10000
HQ = 8
HDESC, HAVAIL, HUSED = 0x1000, 0x1100, 0x1200
DISK = bytes(range(256)) * 2 * 8 + b"\xAB" * 77          # 8 sectors + a 77-byte tail

h_addrs = st.one_of(st.integers(0x2000, HRAM + 32), st.integers(0, (1 << 64) - 1),
                    st.sampled_from([0x2000, 0x4000, HRAM - 1, HRAM - 16, (1 << 64) - 16]))
h_lens = st.one_of(st.integers(0, 2048), st.sampled_from([0, 1, 16, 17, 512, 513, 0xFFFF_FFFF]))
h_flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
h_next = st.one_of(st.integers(0, HQ), st.integers(0, 0xFFFF))
h_header = st.tuples(st.sampled_from([0, 1, 4, 8, 2, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF),
                     st.one_of(st.integers(0, 10), st.integers(0, (1 << 64) - 1)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=st.lists(st.tuples(h_addrs, h_lens, h_flags, h_next), min_size=HQ, max_size=HQ),
       ring=st.lists(st.one_of(st.integers(0, HQ - 1), st.integers(0, 0xFFFF)), min_size=HQ,
                     max_size=HQ),
       avail_idx=st.one_of(st.integers(0, HQ + 1), st.integers(0, 0xFFFF)),
       headers=st.lists(h_header, min_size=4, max_size=4),
       readonly=st.booleans(), noise=st.binary(min_size=64, max_size=64))
def test_hostile_chains_never_escape_their_buffers(table, ring, avail_idx, headers, readonly, noise):
    """Garbage rings never raise; RAM changes only in popped writable buffers + used ring, file tail kept."""
    with tempfile.TemporaryDirectory() as tmp:
        path = disk_file(tmp, DISK)
        mem = GuestMemory.anonymous(HRAM)
        for k in range(0x2000, HRAM, 64):
            mem.write(k, noise)
        for i, (type_, res, sector) in enumerate(headers):   # plausible headers to hit
            mem.write(0x2000 + 0x2000 * i, struct.pack("<IIQ", type_, res, sector))
        for i, d in enumerate(table):
            mem.write(HDESC + 16 * i, struct.pack("<QIHH", *d))
        mem.write(HAVAIL + 2, struct.pack("<H", avail_idx) + struct.pack(f"<{HQ}H", *ring))
        blk = VirtioBlk(path, readonly=readonly)
        irq = RecordingTrigger()
        dev = R.VirtioMmioTransport(blk, mem, irq)
        drv = Driver(dev, mem, qsize=HQ)
        assert drv.negotiate()
        for off, val in ((R.QueueNum, HQ), (R.QueueDescLow, HDESC), (R.QueueDriverLow, HAVAIL),
                         (R.QueueDeviceLow, HUSED), (R.QueueReady, 1)):
            drv.wr(off, val)
        drv.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)

        popped = []
        real_pop = VirtQueue.pop

        def recording_pop(self):
            chain = real_pop(self)
            if chain is not None:
                popped.append(chain)
            return chain

        before = bytearray(mem.read(0, HRAM))
        VirtQueue.pop = recording_pop
        try:
            drv.wr(R.QueueNotify, 0)
            drv.wr(R.QueueNotify, 0)
        finally:
            VirtQueue.pop = real_pop
        after = mem.read(0, HRAM)
        blk.close()

        allowed = bytearray(HRAM)
        for a, n in [(HUSED, 6 + 8 * HQ)] + [seg for c in popped for seg in c.writable]:
            allowed[a:a + n] = b"\1" * n
        for k in range(HRAM):
            if before[k] != after[k]:
                assert allowed[k], f"byte {k:#x} changed outside every writable buffer"
        with open(path, "rb") as f:
            content = f.read()
        assert len(content) == len(DISK) and content[8 * 512:] == DISK[8 * 512:]
        if readonly:
            assert content == DISK
        state = dev.state()
        assert state["irq_level"] == (state["interrupt_status"] != 0) == irq.level
        assert len(popped) <= HQ


# --- model-based: random valid requests against a bytearray ---------------------------------------

SECTORS = 16
request_st = st.one_of(
    st.tuples(st.just("in"), st.integers(0, SECTORS), st.integers(0, 4), st.integers(1, 4)),
    st.tuples(st.just("out"), st.integers(0, SECTORS), st.integers(0, 4), st.integers(1, 4),
              st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("flush")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request_st, min_size=1, max_size=20))
def test_random_reads_and_writes_match_a_bytearray_model(requests):
    """Any sequence of in-range IN/OUT/FLUSH requests behaves exactly like a bytearray disk."""
    model = bytearray(os.urandom(SECTORS * 512))
    with tempfile.TemporaryDirectory() as tmp:
        path = disk_file(tmp, bytes(model))
        drv, blk, _ = rig(path)
        drv.init()
        for req in requests:
            if req[0] == "flush":
                assert drv.request(VIRTIO_BLK_T_FLUSH) == (VIRTIO_BLK_S_OK, b"", 1)
                continue
            sector, count, splits = req[1], req[2], req[3]
            fits = sector + count <= SECTORS
            if req[0] == "in":
                status, data, used_len = drv.request(VIRTIO_BLK_T_IN, sector, in_len=512 * count,
                                                     splits=splits)
                if fits:
                    assert (status, used_len) == (VIRTIO_BLK_S_OK, 512 * count + 1)
                    assert data == model[512 * sector:512 * (sector + count)]
                else:
                    assert (status, used_len) == (VIRTIO_BLK_S_IOERR, 1)
            else:
                payload = (req[4] * (512 * count // len(req[4]) + 1))[:512 * count]
                status, _, used_len = drv.request(VIRTIO_BLK_T_OUT, sector, out=payload,
                                                  splits=splits)
                assert used_len == 1
                assert status == (VIRTIO_BLK_S_OK if fits else VIRTIO_BLK_S_IOERR)
                if fits:
                    model[512 * sector:512 * (sector + count)] = payload
        blk.close()
        with open(path, "rb") as f:
            assert f.read() == model
