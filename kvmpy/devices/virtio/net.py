"""virtio-net, the network device (virtio 1.2, section 5.1), over a host backend.

Device ID 1, two queues: ``receiveq1`` (0, device-writable buffers the device fills
with frames from the host) and ``transmitq1`` (1, device-readable frames the guest
sends). Every frame in either queue is preceded by the 12-byte ``struct
virtio_net_hdr`` (VIRTIO_F_VERSION_1: flags, gso_type, hdr_len, gso_size, csum_start,
csum_offset, num_buffers). No control queue, no multiqueue.

Features offered: VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC (the guest's MAC in the
configuration space), VIRTIO_NET_F_STATUS (the link is always up), VIRTIO_NET_F_MTU
(1500). Not VIRTIO_NET_F_MRG_RXBUF: without it each received frame goes into one
chain, so the device never holds a chain across frames or needs to know what the driver
negotiated (the transport does not tell a model), and the driver sizes its buffers for
the MTU the device announces (Linux posts 1526-byte buffers; frames are at most 1514
bytes with an MTU of 1500). No checksum or segmentation offloads: every frame is whole
and checksummed by the guest, so the header is all zeros both ways (num_buffers 1
on receive, as the spec asks of a device without MRG_RXBUF); what a driver puts in a
transmitted header is ignored.

The host side is a backend (kvmpy/net/: passt, TAP) with ``send(frame) -> bool``; the
network thread (vmm/netpump.py) calls :meth:`VirtioNet.receive` for each frame that
arrives and then a host-side QueueNotify of queue 0, under the device's lock, so the
frames go into the ring and the interrupt is raised the same way as when the guest
adds receive buffers.

Hostile-guest rules (each counted in ``counters``, never an exception to the host):

- transmit: a chain with a device-writable buffer (``tx_bad_chain``: the spec makes
  transmit buffers device-readable), fewer than 12 + 14 readable bytes or more than
  12 + MAX_FRAME (``tx_bad_length``) is returned with ``used.len`` 0 and nothing sent;
  its bytes are not read when the length is wrong. A frame the backend cannot take is
  ``tx_dropped``.
- receive: a chain with a device-readable buffer or under 12 writable bytes
  (``rx_bad_chain``) is returned with ``used.len`` 0; a frame that does not fit the
  next chain is dropped (``rx_too_big``) and the chain kept for the next frame. Frames
  wait in a backlog of RX_BACKLOG frames while the driver offers no buffers; more
  are dropped (``rx_dropped``), as a NIC with a full ring does. The network thread
  does not get there: it asks :meth:`VirtioNet.has_room` first and, while the backlog
  is full, leaves frames in the backend (the socket), so a TCP sender in front of
  passt is slowed by flow control instead of losing segments; ``on_room``, set by
  that thread while it waits, is called once the guest's buffers made room.
- each notify serves at most QueueNum chains (a self-feeding ring cannot keep it
  going), and everything the queue checks (queue.py) is checked.

Nothing to save beyond the transport's registers: chains never stay in the device
between notifies; frames in the backlog at a snapshot are lost, as on a wire. The
backend itself is host-side and re-made on restore.
"""
from __future__ import annotations

import struct
from collections import deque

from ...kvm.memory import GuestMemory
from .mmio import VIRTIO_F_VERSION_1
from .queue import DescriptorChain, VirtQueue

VIRTIO_ID_NET = 1
QUEUE_NUM_MAX = 256
RECEIVEQ, TRANSMITQ = 0, 1

# Feature bits (5.1.3)
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

#: struct virtio_net_hdr (5.1.6): flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset, num_buffers.
NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size          # 12
RX_HDR = NET_HDR.pack(0, 0, 0, 0, 0, 0, 1)   # no offloads; one buffer holds the frame
#: The biggest Ethernet frame carried either way: a 64 KiB IP datagram, a 14-byte Ethernet
#: header and a 4-byte VLAN tag (5.1.6.3.1 asks for 65562-byte buffers: this plus the header).
MAX_FRAME = 65550
MIN_FRAME = 14                       # an Ethernet header: destination, source, type
MTU = 1500
RX_BACKLOG = 256                     # frames held for a driver that offers no buffers yet

# struct virtio_net_config (5.1.4): mac[6], status, max_virtqueue_pairs, mtu.
CONFIG = struct.Struct("<6sHHH")
CONFIG_SIZE = CONFIG.size            # 12

COUNTERS = ("rx_frames", "rx_bytes", "rx_dropped", "rx_too_big", "rx_bad_chain",
            "tx_frames", "tx_bytes", "tx_dropped", "tx_bad_chain", "tx_bad_length")


class VirtioNet:
    """A virtio network device (see the module docstring); ``backend.send(frame)`` takes
    the guest's frames (None: they are dropped), ``mac`` is 6 bytes."""

    device_id = VIRTIO_ID_NET
    device_features = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
                       | (1 << VIRTIO_NET_F_MTU))
    num_queues = 2
    queue_num_max = QUEUE_NUM_MAX
    config_size = CONFIG_SIZE

    def __init__(self, backend=None, mac: bytes = b"\x02\x6b\x76\x6d\x70\x01", mtu: int = MTU):
        """``engine``, set after construction, runs the two queue methods instead of this
        object (``vmm/native_net.py``: the same work in C); None: Python."""
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError(f"MAC {mac.hex(':')} is not six bytes of a unicast address")
        if not 68 <= mtu <= MAX_FRAME - 18:
            raise ValueError(f"MTU {mtu} is not in 68..{MAX_FRAME - 18}")
        self.backend, self.mac, self.mtu = backend, bytes(mac), mtu
        self._config = CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1, mtu)
        self.backlog: deque[bytes] = deque()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.engine = None
        self.on_room = None             # called (once, then cleared) when the backlog has room

    # --- VirtioDevice ----------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Every field is read-only (no VIRTIO_NET_F_CTRL_MAC_ADDR): ignored."""

    def restored(self) -> None:
        """The transport loaded a saved state (a restore, or Machine.reset()): frames still in
        the backlog belong to the time before it and are dropped, as on a wire."""
        self.counters["rx_dropped"] += len(self.backlog)
        self.backlog.clear()

    def reset(self) -> None:
        """Frames waiting for this driver's buffers are dropped with its rings."""
        self.counters["rx_dropped"] += len(self.backlog)
        self.backlog.clear()

    def notify(self, queue_index: int, queue: VirtQueue) -> None:
        work = self.engine if self.engine is not None else self
        if queue_index == RECEIVEQ:
            work.fill_rx(queue)
            if self.on_room is not None and self.has_room():
                wake, self.on_room = self.on_room, None
                wake()
        elif queue_index == TRANSMITQ:
            work.transmit(queue)

    # --- host side ----------------------------------------------------------------------

    def has_room(self) -> bool:
        """Would :meth:`receive` queue one more frame rather than drop it for a full backlog?"""
        return len(self.backlog) < RX_BACKLOG

    def receive(self, frame: bytes) -> bool:
        """Queue a frame from the host for the guest; False if it was dropped (too short,
        too long, or the backlog is full). The caller then notifies queue 0."""
        if not MIN_FRAME <= len(frame) <= MAX_FRAME:
            self.counters["rx_too_big" if len(frame) > MAX_FRAME else "rx_dropped"] += 1
            return False
        if len(self.backlog) >= RX_BACKLOG:
            self.counters["rx_dropped"] += 1
            return False
        self.backlog.append(frame)
        return True

    def receive_some(self, frames: deque, limit: int) -> tuple[int, int]:
        """:meth:`receive` for frames taken from the left of ``frames`` while the backlog has
        room, at most ``limit``; returns how many were taken (dropped ones included) and
        their bytes."""
        n = max(0, min(limit, len(frames), RX_BACKLOG - len(self.backlog)))
        taken = [frames.popleft() for _ in range(n)]
        sizes = list(map(len, taken))
        if n and MIN_FRAME <= min(sizes) and max(sizes) <= MAX_FRAME:
            self.backlog.extend(taken)          # the common case: every frame is good
        else:
            for frame in taken:
                self.receive(frame)
        return n, sum(sizes)

    # --- the queues ---------------------------------------------------------------------

    def fill_rx(self, queue: VirtQueue) -> None:
        """Move backlog frames into the receive chains the driver offers, one frame per
        chain, at most ``queue.size`` chains."""
        c = self.counters
        for _ in range(queue.size):
            if not self.backlog:
                return
            chain = queue.pop()
            if chain is None:
                return
            if chain.readable or chain.writable_len < NET_HDR_SIZE:
                c["rx_bad_chain"] += 1
                queue.push_used(chain.head, 0)
                continue
            frame = self.backlog.popleft()
            if NET_HDR_SIZE + len(frame) > chain.writable_len:
                c["rx_too_big"] += 1
                queue.last_avail_idx = (queue.last_avail_idx - 1) & 0xFFFF   # the chain waits, untouched
                continue
            _scatter(queue.mem, chain.writable, RX_HDR + frame)
            queue.push_used(chain.head, NET_HDR_SIZE + len(frame))
            c["rx_frames"] += 1
            c["rx_bytes"] += len(frame)

    def transmit(self, queue: VirtQueue) -> None:
        """Send the frames of the available transmit chains, at most ``queue.size``."""
        for chain in queue.one_notify():
            frame = self.tx_frame(queue.mem, chain)
            queue.push_used(chain.head, 0)
            if frame is None:
                continue
            if self.backend is not None and self.backend.send(frame):
                self.counters["tx_frames"] += 1
                self.counters["tx_bytes"] += len(frame)
            else:
                self.counters["tx_dropped"] += 1

    def tx_frame(self, mem: GuestMemory, chain: DescriptorChain) -> bytes | None:
        """The frame a transmit chain carries (its bytes after the header), read once; None
        (counted) if the chain has the wrong shape or length."""
        if chain.writable:
            self.counters["tx_bad_chain"] += 1
            return None
        n = chain.readable_len
        if not NET_HDR_SIZE + MIN_FRAME <= n <= NET_HDR_SIZE + MAX_FRAME:
            self.counters["tx_bad_length"] += 1
            return None
        data = b"".join(mem.read(addr, length) for addr, length in chain.readable)
        return data[NET_HDR_SIZE:]

    # --- lifetime -------------------------------------------------------------------------

    def state(self) -> dict:
        """The MAC, the counters and the backlog's length, for debugging (not saved)."""
        return {"mac": self.mac.hex(":"), "mtu": self.mtu, "backlog": len(self.backlog), **self.counters}

    def __repr__(self) -> str:
        c = self.counters
        return f"VirtioNet({self.mac.hex(':')}, rx {c['rx_frames']}, tx {c['tx_frames']})"


def _scatter(mem: GuestMemory, segments: list[tuple[int, int]], data: bytes) -> None:
    """Write ``data`` over the start of the segments' concatenation."""
    pos = 0
    for addr, n in segments:
        if pos >= len(data):
            return
        piece = data[pos:pos + n]
        mem.write(addr, piece)
        pos += len(piece)
