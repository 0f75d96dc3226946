"""virtio-blk (virtio 1.2, section 5.2) backed by a host file or block device.

One request queue (no VIRTIO_BLK_F_MQ) of up to ``QUEUE_NUM_MAX`` entries. A request
is a descriptor chain ``struct virtio_blk_req { le32 type; le32 reserved; le64
sector; u8 data[]; u8 status; }``: the 16-byte header is the first 16 bytes of the
device-readable buffers, ``status`` is the very last byte of the device-writable
buffers, and ``data`` is what lies between (the readable bytes after the header for
OUT, the writable bytes before the status byte for IN and GET_ID). Buffers may be
split or merged across descriptors in any way.

Features offered: VIRTIO_F_VERSION_1, VIRTIO_BLK_F_SEG_MAX (seg_max =
QUEUE_NUM_MAX - 2: one descriptor each for the header and the status byte),
VIRTIO_BLK_F_FLUSH, and VIRTIO_BLK_F_RO for a read-only disk. Request types:
IN (0), OUT (1), FLUSH (4), GET_ID (8); anything else completes with UNSUPP.

The disk is ``capacity = file size // 512`` sectors. A trailing partial sector is
never read or written, and nothing outside ``[0, capacity * 512)`` is ever touched:
the file is opened without O_CREAT/O_TRUNC and never grown or shrunk. Data moves
with ``os.preadv``/``os.pwritev`` straight between the file and guest RAM views,
looping on short transfers. Before any byte moves, the range is checked against the
file's size at that moment (``lseek(fd, 0, SEEK_END)``): someone may have shrunk it
under us, and a write past its end would grow it back. Such a request, hitting end of
file anyway, or an OSError completes the request with IOERR.

Request checks, in order (docs/virtio.md has the table):
1. no device-writable byte -> no status byte can be written: VirtqueueError
   (the transport sets DEVICE_NEEDS_RESET, no used entry);
2. fewer than 16 readable bytes -> IOERR;
3. by type: IN/GET_ID need exactly the 16 header bytes readable; OUT needs
   exactly the status byte writable, and a writable disk; IN/OUT data length a
   multiple of 512 and ``sector + len/512 <= capacity`` -> else IOERR.
   FLUSH ignores ``sector`` and any data. GET_ID writes min(len, 20) bytes of the
   NUL-padded ID. Unknown type -> UNSUPP.
``used.len`` is 1 (the status byte) plus the data bytes written: the data length
for a successful IN, min(len, 20) for GET_ID, 0 otherwise.

Rate limits (``limits=``, kvmpy/devices/ratelimit.py): every request costs one
operation, IN and OUT their data length in bytes, FLUSH one flush. A request whose
tokens are not there yet is put back in the ring (as if never popped) and the notify
ends; ``limiter.throttled_until`` says when it may go, and whoever calls ``notify``
again then (the Machine's disk timer, or the guest's next QueueNotify) serves it.
"""
from __future__ import annotations

import errno
import os
import stat
import struct
import time
from typing import Callable

from ...errors import DeviceError
from ...kvm.memory import GuestMemory
from ..ratelimit import Limits, RateLimiter
from .queue import DescriptorChain, VirtQueue, VirtqueueError
from .core import VIRTIO_F_VERSION_1

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512
QUEUE_NUM_MAX = 256

# Feature bits (5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

# Request types (5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

# Status byte values
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
REQ_HEADER = struct.Struct("<IIQ")      # type, reserved, sector

# struct virtio_blk_config up to and including num_queues (5.2.4); fields of
# features we do not offer read as 0. Offsets:
#   0 capacity u64, 8 size_max u32, 12 seg_max u32, 16 geometry (u16 cylinders,
#   u8 heads, u8 sectors), 20 blk_size u32, 24 topology (u8, u8, u16, u32),
#   32 writeback u8, 33 unused0 u8, 34 num_queues u16.
CONFIG = struct.Struct("<QII4xI8xBBH")
CONFIG_SIZE = CONFIG.size                # 36
SEG_MAX = QUEUE_NUM_MAX - 2


class VirtioBlk:
    """A virtio block device over the file at ``path`` (see module docstring)."""

    device_id = VIRTIO_ID_BLOCK
    num_queues = 1
    queue_num_max = QUEUE_NUM_MAX
    config_size = CONFIG_SIZE

    def __init__(self, path: str | os.PathLike, readonly: bool = False,
                 serial_id: str | bytes | None = None, limits: Limits | None = None,
                 clock: Callable[[], int] = time.monotonic_ns):
        ident = serial_id.encode("ascii") if isinstance(serial_id, str) else bytes(serial_id or b"")
        if len(ident) > VIRTIO_BLK_ID_BYTES:
            raise DeviceError(f"virtio-blk: serial_id {serial_id!r} is longer than "
                              f"{VIRTIO_BLK_ID_BYTES} bytes")
        self.path = os.fspath(path)
        self.readonly = bool(readonly)
        self.serial_id = ident.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.limiter = RateLimiter(limits, clock) if limits else None
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            hint = ("; pass readonly=True for a read-only image"
                    if not readonly and e.errno in (errno.EACCES, errno.EROFS) else "")
            raise DeviceError(f"virtio-blk: cannot open {self.path!r}: {e.strerror}{hint}") from e
        try:
            mode = os.fstat(self.fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise DeviceError(f"virtio-blk: {self.path!r} is not a regular file or block device")
            self.file_size = os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self.fd)
            raise
        self.capacity = self.file_size // SECTOR_SIZE
        self.written = None                # a reset overlay's bitmap of written 4 KiB blocks
        self.engine = None                 # set later: serves notify() instead (vmm/native_blk.py)
        self._file_fd = None               # the file's fd while I/O goes to an overlay
        self.device_features = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_SEG_MAX)
                                | (1 << VIRTIO_BLK_F_FLUSH)
                                | ((1 << VIRTIO_BLK_F_RO) if self.readonly else 0))
        self._config = CONFIG.pack(self.capacity, 0, SEG_MAX, 0, 0, 0, 0)

    # --- VirtioDevice ------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Every field we expose is read-only (no VIRTIO_BLK_F_CONFIG_WCE): ignored."""

    def reset(self) -> None:
        """Requests complete synchronously, so there is nothing in flight to drop; a
        throttled request's ring is gone (the buckets keep their tokens)."""
        if self.limiter is not None:
            self.limiter.clear()

    def notify(self, queue_index: int, queue: VirtQueue) -> None:
        """Serve the available requests of ``queue`` in ring order, at most ``queue.size``.

        The bound keeps one QueueNotify from running forever: a device-writable buffer
        may overlap the available ring, so serving a request can publish another (a
        self-feeding ring). A driver that follows the spec never has more than
        ``queue.size`` chains available, so one notify still serves all of its work
        (docs/virtio.md, "Notification and interrupts"). An ``engine`` (the C twin, for a
        disk without rate limits) does the same work when there is one.
        """
        if self.engine is not None:
            self.engine.notify(queue_index, queue)
            return
        for chain in queue.one_notify(self.limiter):
            _check_status_byte(chain)
            header = _header(queue.mem, chain)
            if self.limiter is not None and not self.limiter.admit(*_cost(chain, header)):
                queue.last_avail_idx = (queue.last_avail_idx - 1) & 0xFFFF   # back, untouched
                return
            written = self.handle(queue.mem, chain, header)
            queue.push_used(chain.head, written)

    # --- requests --------------------------------------------------------------------

    def handle(self, mem: GuestMemory, chain: DescriptorChain, header: bytes | None = None) -> int:
        """Execute one request; write its status byte; return used.len. ``header`` is
        the request header already copied out of guest RAM (read once), if it was."""
        _check_status_byte(chain)
        wlen = chain.writable_len
        status_addr = chain.writable[-1][0] + chain.writable[-1][1] - 1
        if header is None:
            header = _header(mem, chain)
        status, data_written = self._execute(mem, chain, wlen, header)
        mem.write(status_addr, bytes([status]))
        return data_written + 1

    def _execute(self, mem: GuestMemory, chain: DescriptorChain, wlen: int,
                 header: bytes | None) -> tuple[int, int]:
        """(status, data bytes written to the guest) for a chain with a status byte."""
        rlen = chain.readable_len
        if header is None:
            return VIRTIO_BLK_S_IOERR, 0
        rtype, _reserved, sector = REQ_HEADER.unpack(header)
        if rtype == VIRTIO_BLK_T_IN:
            n = wlen - 1
            if rlen != REQ_HEADER.size or not self._in_range(sector, n):
                return VIRTIO_BLK_S_IOERR, 0
            ok = self._transfer(mem, _slice(chain.writable, 0, n), sector, write=False)
            return (VIRTIO_BLK_S_OK, n) if ok else (VIRTIO_BLK_S_IOERR, 0)
        if rtype == VIRTIO_BLK_T_OUT:
            n = rlen - REQ_HEADER.size
            if wlen != 1 or self.readonly or not self._in_range(sector, n):
                return VIRTIO_BLK_S_IOERR, 0
            ok = self._transfer(mem, _slice(chain.readable, REQ_HEADER.size, n), sector, write=True)
            return (VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR), 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            return (VIRTIO_BLK_S_OK if self._flush() else VIRTIO_BLK_S_IOERR), 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            if rlen != REQ_HEADER.size:
                return VIRTIO_BLK_S_IOERR, 0
            n = min(wlen - 1, VIRTIO_BLK_ID_BYTES)
            _scatter(mem, chain.writable, self.serial_id[:n])
            return VIRTIO_BLK_S_OK, n
        return VIRTIO_BLK_S_UNSUPP, 0

    def _in_range(self, sector: int, nbytes: int) -> bool:
        """``nbytes`` is whole sectors and ``[sector, sector + nbytes/512)`` is on the disk."""
        if nbytes % SECTOR_SIZE:
            return False
        return sector <= self.capacity and nbytes // SECTOR_SIZE <= self.capacity - sector

    def _transfer(self, mem: GuestMemory, segments: list[tuple[int, int]], sector: int,
                  write: bool) -> bool:
        """Move the segments' bytes to/from the disk at ``sector``; False on any failure."""
        if self.fd < 0 or not self._inside_file(sector * SECTOR_SIZE + sum(n for _, n in segments)):
            return False
        # a disk write only reads guest RAM: read-only views, nothing marked dirty
        views = [mem.view(addr, n, writable=not write) for addr, n in segments]
        made = list(views)                 # every view we create, released below
        try:
            pos = sector * SECTOR_SIZE
            pending = views
            while pending:
                n = (os.pwritev if write else os.preadv)(self.fd, pending, pos)
                if n <= 0:
                    return False           # end of file: the file shrank under us
                pos += n
                pending = _advance(pending, n)
                if pending and all(pending[0] is not v for v in made):
                    made.append(pending[0])    # a partial view _advance cut
            return True
        except OSError:
            return False
        finally:
            for v in reversed(made):       # sub-views before the views they slice
                v.release()
            if not write:                  # dirty again now the data is in (view() marked before)
                for addr, n in segments:
                    mem.mark_dirty(addr, n)
            elif self.written is not None:  # every block the write may have touched
                mark_blocks(self.written, sector * SECTOR_SIZE, sum(n for _, n in segments))

    def _inside_file(self, end: int) -> bool:
        """The transfer ends inside the file as it is now. Someone may have shrunk it under
        us: a read past its end has nothing to read, and a write past it would grow the
        disk back, which we never do. Both get IOERR with nothing moved."""
        try:
            return end <= os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            return False

    def _flush(self) -> bool:
        if self.fd < 0:
            return False
        if self.readonly:
            return True                    # we never write, so there is nothing to flush
        try:
            os.fdatasync(self.fd)
        except OSError:
            return False
        return True

    # --- lifetime -------------------------------------------------------------------

    def state(self) -> dict:
        """Static facts about the disk, for snapshots and debugging."""
        return {"path": self.path, "readonly": self.readonly, "capacity": self.capacity,
                "file_size": self.file_size, "device_features": self.device_features,
                "serial_id": self.serial_id, "closed": self.fd < 0}

    def use_overlay(self, fd: int | None, written=None) -> None:
        """Send all I/O to ``fd`` instead of the file (a reset overlay: lifecycle/reset.py) and
        mark each 4 KiB block a write touches in ``written``, a writable buffer (block b is bit
        b % 8 of byte b // 8); ``None``: back to the file. The overlay's fd stays its owner's."""
        if fd is None:
            if self._file_fd is not None:
                self.fd, self._file_fd = self._file_fd, None
            self.written = None
            return
        if self.fd < 0 and self._file_fd is None:
            raise DeviceError(f"virtio-blk: {self.path!r} is closed")
        if self._file_fd is None:
            self._file_fd = self.fd
        self.fd, self.written = fd, written

    def close(self) -> None:
        """Close the backing file; idempotent. Later requests complete with IOERR."""
        if self._file_fd is not None:      # an overlay's fd is not ours to close
            self.fd, self._file_fd, self.written = self._file_fd, None, None
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "VirtioBlk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        ro = ", readonly" if self.readonly else ""
        return f"VirtioBlk({self.path!r}, {self.capacity} sectors{ro})"


# --- one request's header and what it costs ----------------------------------------------

def mark_blocks(bitmap, pos: int, length: int, block: int = 4096) -> None:
    """Set the bits of the ``block``-byte blocks holding bytes ``[pos, pos+length)`` in
    ``bitmap`` (block b is bit b % 8 of byte b // 8: the u64-word layout of csrc/dirty.c)."""
    if length <= 0:
        return
    for b in range(pos // block, (pos + length - 1) // block + 1):
        bitmap[b >> 3] |= 1 << (b & 7)


def _check_status_byte(chain: DescriptorChain) -> None:
    if chain.writable_len == 0:
        raise VirtqueueError(f"virtio-blk request at descriptor {chain.head} has no "
                             "device-writable status byte")


def _header(mem: GuestMemory, chain: DescriptorChain) -> bytes | None:
    """The 16-byte request header, copied once; None if fewer bytes are readable."""
    if chain.readable_len < REQ_HEADER.size:
        return None
    return _gather(mem, chain.readable, REQ_HEADER.size)


def _cost(chain: DescriptorChain, header: bytes | None) -> tuple[int, int, int]:
    """(operations, bytes, flushes) a request takes from the rate limiter (csrc admit)."""
    rtype = REQ_HEADER.unpack(header)[0] if header is not None else None
    if rtype == VIRTIO_BLK_T_IN:
        return 1, chain.writable_len - 1, 0
    if rtype == VIRTIO_BLK_T_OUT:
        return 1, chain.readable_len - REQ_HEADER.size, 0
    return 1, 0, 1 if rtype == VIRTIO_BLK_T_FLUSH else 0


# --- scatter/gather over (gpa, len) segment lists ---------------------------------------

def _slice(segments: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """The sub-list of segments covering bytes ``[start, start + length)`` of their concatenation."""
    out, pos, end = [], 0, start + length
    for addr, n in segments:
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append((addr + lo - pos, hi - lo))
        pos += n
        if pos >= end:
            break
    return out


def _gather(mem: GuestMemory, segments: list[tuple[int, int]], length: int) -> bytes:
    """The first ``length`` bytes of the segments' concatenation."""
    return b"".join(mem.read(addr, n) for addr, n in _slice(segments, 0, length))


def _scatter(mem: GuestMemory, segments: list[tuple[int, int]], data: bytes) -> None:
    """Write ``data`` over the start of the segments' concatenation."""
    pos = 0
    for addr, n in _slice(segments, 0, len(data)):
        mem.write(addr, data[pos:pos + n])
        pos += n


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The views left after the first ``n`` bytes were transferred."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest
