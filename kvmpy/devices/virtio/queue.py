"""The device side of a split virtqueue (virtio 1.2, section 2.7), over hostile guest RAM.

A split virtqueue is three guest-RAM areas the driver allocates and the transport
tells us about: the Descriptor Table (``struct virtq_desc[size]``, 16 bytes each),
the Driver Area holding the available ring (``struct virtq_avail``: flags, idx,
ring[size]) and the Device Area holding the used ring (``struct virtq_used``:
flags, idx, ring[size] of ``{le32 id; le32 len}``). All fields are little-endian.

:meth:`VirtQueue.pop` takes the next head from the available ring and walks its
descriptor chain into a :class:`DescriptorChain` (device-readable then
device-writable ``(addr, len)`` buffers); :meth:`VirtQueue.push_used` returns a
chain to the driver. Everything the guest wrote is checked before use; a driver
error becomes :class:`VirtqueueError`, which the transport turns into
DEVICE_NEEDS_RESET. The rules, in the order they are applied (the C twin applies
them in the same order, so both fail on the same request):

- construction: ``size`` a power of two in 1..32768; the three areas aligned
  (desc 16, avail 2, used 4) and each inside one RAM region with the sizes of the
  spec's table (16*size, 6+2*size, 6+8*size).
- ``pop``: read avail ``idx``; equal to ``last_avail_idx`` -> no work (None);
  ``(idx - last_avail_idx) mod 2**16 > size`` -> error. Read the head from
  ``ring[last_avail_idx % size]``, then per descriptor, starting at the head:
  index >= size -> error; more than ``size`` descriptors -> error (this is the loop
  check: a chain can never be longer than the table); VIRTQ_DESC_F_INDIRECT set ->
  error (VIRTIO_F_INDIRECT_DESC is never offered); ``len == 0`` -> the descriptor
  is skipped (address and WRITE flag ignored; it still counts towards the length
  limit); ``addr + len > 2**64`` -> error; buffer not inside one RAM region ->
  error; a device-readable buffer after a device-writable one -> error; running
  byte total > 2**32 -> error. Unknown flag bits are ignored. ``last_avail_idx``
  advances only when the whole chain is valid.

Not implemented, on purpose: VIRTIO_F_EVENT_IDX (so ``used_event``/``avail_event``
are never read or written), VIRTIO_F_INDIRECT_DESC, VIRTIO_F_IN_ORDER, packed
rings. The device never writes ``used.flags`` (the driver initialises it to 0, so
VIRTQ_USED_F_NO_NOTIFY is never set: every notification is welcome).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...errors import KvmpyError
from ...kvm.memory import GuestMemory

# struct virtq_desc.flags
VIRTQ_DESC_F_NEXT = 1        # the buffer continues via the next field
VIRTQ_DESC_F_WRITE = 2       # device write-only (otherwise device read-only)
VIRTQ_DESC_F_INDIRECT = 4    # the buffer holds a table of descriptors
# struct virtq_avail.flags / struct virtq_used.flags
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

VIRTQ_MAX_SIZE = 32768       # the highest power of two that fits in 16 bits
VIRTQ_DESC_SIZE = 16         # le64 addr, le32 len, le16 flags, le16 next
VIRTQ_USED_ELEM_SIZE = 8     # le32 id, le32 len
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4
MAX_CHAIN_BYTES = 1 << 32    # "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes"

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class VirtqueueError(KvmpyError):
    """The driver broke a virtqueue rule; the device must enter DEVICE_NEEDS_RESET."""


def desc_table_size(size: int) -> int:
    """Bytes of the Descriptor Table for a queue of ``size`` entries."""
    return VIRTQ_DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Bytes of the available ring: flags, idx, ring[size], used_event."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """Bytes of the used ring: flags, idx, ring[size] of 8-byte elements, avail_event."""
    return 6 + VIRTQ_USED_ELEM_SIZE * size


@dataclass
class DescriptorChain:
    """One request as the driver laid it out: readable buffers, then writable ones.

    ``readable`` and ``writable`` are ``(gpa, length)`` pairs, every one of them
    checked to lie inside one RAM region, with ``length > 0``.
    """

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        """Total bytes the device may read."""
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        """Total bytes the device may write."""
        return sum(n for _, n in self.writable)


class VirtQueue:
    """A live split virtqueue of ``size`` entries at the three given guest addresses."""

    def __init__(self, mem: GuestMemory, size: int, desc_addr: int = 0,
                 driver_addr: int = 0, device_addr: int = 0):
        if not 1 <= size <= VIRTQ_MAX_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two in 1..{VIRTQ_MAX_SIZE}")
        for name, addr, align, length in (
                ("descriptor table", desc_addr, DESC_ALIGN, desc_table_size(size)),
                ("available ring", driver_addr, AVAIL_ALIGN, avail_ring_size(size)),
                ("used ring", device_addr, USED_ALIGN, used_ring_size(size))):
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not mem.contains(addr, length):
                raise VirtqueueError(f"{name} {addr:#x}+{length:#x} is outside guest RAM")
        self.mem = mem
        self.size = size
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self.last_avail_idx = 0   # free-running u16: next available ring slot to take
        self.used_idx = 0         # free-running u16: the value of used.idx we last wrote
        self.used_count = 0       # push_used calls since this queue went live (not wrapped)

    # --- available ring --------------------------------------------------

    def avail_idx(self) -> int:
        """The driver's available ``idx`` as it is in guest RAM now."""
        return _U16.unpack(self.mem.read(self.driver_addr + 2, 2))[0]

    def avail_flags(self) -> int:
        """The driver's available ``flags`` as it is in guest RAM now."""
        return _U16.unpack(self.mem.read(self.driver_addr, 2))[0]

    def interrupts_suppressed(self) -> bool:
        """True if the driver set VIRTQ_AVAIL_F_NO_INTERRUPT (only bit 0 is looked at)."""
        return bool(self.avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated, or None if the driver has offered none."""
        idx = self.avail_idx()
        pending = (idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(
                f"available idx {idx} is {pending} entries ahead of {self.last_avail_idx}; "
                f"at most {self.size} can be outstanding")
        slot = self.driver_addr + 4 + 2 * (self.last_avail_idx % self.size)
        head = _U16.unpack(self.mem.read(slot, 2))[0]
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def one_notify(self, limiter=None):
        """The chains one QueueNotify serves: those available, in ring order, at most
        ``size`` of them. The bound keeps a notify finite when a device-writable buffer
        overlaps the available ring and serving a chain publishes the next (a self-feeding
        ring); a driver that follows the spec never has more than ``size`` outstanding.
        An empty ring clears ``limiter``'s mark of a chain waiting for tokens."""
        for _ in range(self.size):
            chain = self.pop()
            if chain is None:
                if limiter is not None:
                    limiter.clear()             # the ring is empty: nothing waits
                return
            yield chain

    def _walk(self, head: int) -> DescriptorChain:
        """Follow ``next`` links from ``head`` applying every check in the module docstring."""
        chain = DescriptorChain(head)
        index, count, total = head, 0, 0
        while True:
            if index >= self.size:
                raise VirtqueueError(f"descriptor index {index} >= queue size {self.size}")
            count += 1
            if count > self.size:
                raise VirtqueueError(f"descriptor chain from {head} is longer than the queue "
                                     f"size {self.size} (a loop?)")
            addr, length, flags, nxt = _DESC.unpack(
                self.mem.read(self.desc_addr + VIRTQ_DESC_SIZE * index, VIRTQ_DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise VirtqueueError(f"descriptor {index} is indirect; "
                                     "VIRTIO_F_INDIRECT_DESC was not offered")
            if length:
                self._check_buffer(index, addr, length)
                if flags & VIRTQ_DESC_F_WRITE:
                    chain.writable.append((addr, length))
                elif chain.writable:
                    raise VirtqueueError(f"descriptor {index} is device-readable but follows "
                                         "a device-writable one")
                else:
                    chain.readable.append((addr, length))
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise VirtqueueError(f"descriptor chain from {head} is longer than 2**32 bytes")
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            index = nxt

    def _check_buffer(self, index: int, addr: int, length: int) -> None:
        if addr + length > 1 << 64:
            raise VirtqueueError(f"descriptor {index}: {addr:#x}+{length:#x} overflows 64 bits")
        if not self.mem.contains(addr, length):
            raise VirtqueueError(f"descriptor {index}: buffer {addr:#x}+{length:#x} "
                                 "is outside guest RAM")

    # --- used ring -------------------------------------------------------

    def push_used(self, head: int, written_len: int) -> None:
        """Return chain ``head`` to the driver: used element first, then ``used.idx``."""
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} is not a descriptor index of this queue")
        if not 0 <= written_len <= 0xFFFF_FFFF:
            raise ValueError(f"written length {written_len} does not fit in le32")
        slot = self.device_addr + 4 + VIRTQ_USED_ELEM_SIZE * (self.used_idx % self.size)
        self.mem.write(slot, _USED_ELEM.pack(head, written_len))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.mem.write(self.device_addr + 2, _U16.pack(self.used_idx))
        self.used_count += 1

    def state(self) -> dict:
        """The device-side ring state, for snapshots and debugging."""
        return {"size": self.size, "desc": self.desc_addr, "driver": self.driver_addr,
                "device": self.device_addr, "last_avail_idx": self.last_avail_idx,
                "used_idx": self.used_idx, "used_count": self.used_count}
