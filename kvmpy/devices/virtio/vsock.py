"""virtio-vsock, the socket device (virtio 1.2, section 5.10): stream connections between
the guest (its CID, default 3) and the host (CID 2).

Device ID 19, three queues (0 rx: device to driver, 1 tx: driver to device, 2 event),
configuration space ``le64 guest_cid``, no feature bits but VIRTIO_F_VERSION_1 (no
SEQPACKET). Every packet starts with the 44-byte ``struct virtio_vsock_hdr``
(:class:`Header`): src/dst CID and port, ``len`` of the payload, ``type`` (STREAM 1),
``op``, ``flags``, and the sender's credit: ``buf_alloc`` (its receive buffer) and
``fwd_cnt`` (bytes it has consumed). A sender may have at most ``buf_alloc - (sent -
fwd_cnt)`` bytes unconsumed at the receiver (5.10.6.3).

The model is pure: a host connection is a *peer*, any object with non-blocking
``send(bytes) -> int``, ``recv(n) -> bytes`` (b"" at end of stream; BlockingIOError when
there is nothing) and ``close()``, which a socket is. ``host_connect(port)`` (given at
construction) returns a peer for a guest connecting to host port ``port``, or None
(refused). The host side (kvmpy/vmm/vsock.py) adds connections the host opens with
:meth:`VirtioVsock.connect_from_host`, marks peers readable, and calls ``wake`` work in.

Decisions (docs/vsock.md has the table):

- **Hostile headers.** A tx packet whose chain has fewer than 44 readable bytes, whose
  ``len`` is more than the readable bytes after the header or MAX_PAYLOAD, or which is
  not from the guest's CID to CID 2, is dropped and counted (``dropped``). A packet of
  another ``type`` or an ``op`` that is not valid for the connection's state gets a RST.
  Device-writable buffers on the tx queue are ignored.
- **Bounded host memory.** At most MAX_CONNECTIONS connections (a REQUEST beyond that is
  answered RST); guest data waiting for a slow host reader is at most HOST_BUF_ALLOC
  bytes per connection, the ``buf_alloc`` we advertise: a guest that sends past its
  credit has its connection reset. RSTs for unknown connections wait in a queue of at
  most MAX_PENDING_RST; beyond that they are dropped. Host data is read from the peer
  straight into an rx buffer, only as much as the guest's credit allows: nothing is
  buffered on the way in.
- **Rx buffers.** Each rx chain carries one packet; a chain with fewer than 44 writable
  bytes is a driver error (DEVICE_NEEDS_RESET). When nothing is ready, no chain is taken.
- **Shutdown.** A guest SHUTDOWN with both flags (or a RST) ends the connection: the
  host peer is closed after the guest's pending data is written, and a SHUTDOWN gets its
  RST. A host peer that reaches end of stream sends the guest SHUTDOWN(RCV|SEND); the
  connection ends with the guest's RST.
- **Snapshots.** Connections are not saved (their host sockets do not survive a
  restore); a restored device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event
  queue (:meth:`transport_reset`), after which the guest drops its connections (5.10.6.6).
"""
from __future__ import annotations

import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import Callable

from ...kvm.memory import GuestMemory
from .mmio import VIRTIO_F_VERSION_1
from .queue import DescriptorChain, VirtQueue, VirtqueueError

VIRTIO_ID_VSOCK = 19
QUEUE_NUM_MAX = 256
RXQ, TXQ, EVENTQ = 0, 1, 2
VMADDR_CID_HOST = 2
DEFAULT_GUEST_CID = 3
VIRTIO_VSOCK_TYPE_STREAM = 1
# op
OP_INVALID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(8)
OP_NAMES = ("INVALID", "REQUEST", "RESPONSE", "RST", "SHUTDOWN", "RW", "CREDIT_UPDATE", "CREDIT_REQUEST")
# flags of OP_SHUTDOWN
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND
# struct virtio_vsock_event.id
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

HDR_SIZE = 44
MAX_PAYLOAD = 64 << 10              # a tx packet's payload at most (Linux sends at most 64 KiB)
HOST_BUF_ALLOC = 256 << 10          # our receive buffer per connection (guest -> host)
MAX_CONNECTIONS = 64                # 64 x 256 KiB = 16 MiB of host buffers at most
MAX_PENDING_RST = 64
FIRST_HOST_PORT = 1 << 30           # local ports of host-initiated connections count from here
_U32 = 0xFFFF_FFFF
MAX_CID = (1 << 32) - 1             # CIDs are u32 in Linux; 0-2 are reserved, and -1 is VMADDR_CID_ANY


class VsockError(ValueError):
    """A malformed header, or a configuration value out of range."""


@dataclass
class Header:
    """``struct virtio_vsock_hdr`` (all fields little-endian)."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int = 0
    type: int = VIRTIO_VSOCK_TYPE_STREAM
    op: int = OP_INVALID
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    FORMAT = struct.Struct("<QQIIIHHIII")

    @classmethod
    def parse(cls, raw: bytes) -> "Header":
        if len(raw) != HDR_SIZE:
            raise VsockError(f"a vsock header is {HDR_SIZE} bytes, got {len(raw)}")
        return cls(*cls.FORMAT.unpack(raw))

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                                self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    def __str__(self) -> str:
        op = OP_NAMES[self.op] if self.op < len(OP_NAMES) else str(self.op)
        return (f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} len {self.len} "
                f"flags {self.flags:#x} buf_alloc {self.buf_alloc} fwd_cnt {self.fwd_cnt}")


def check_cid(cid) -> int:
    """A guest CID: an integer in 3..2**32-2 (0, 1 and 2 are reserved, -1 means any)."""
    if type(cid) is not int or not 3 <= cid < MAX_CID:
        raise VsockError(f"guest CID must be an integer in 3..{MAX_CID - 1}, got {cid!r}")
    return cid


def read_chain(mem: GuestMemory, chain: DescriptorChain, limit: int) -> bytes:
    """Up to ``limit`` bytes of the chain's device-readable buffers, in order."""
    out = bytearray()
    for addr, length in chain.readable:
        take = min(length, limit - len(out))
        if take <= 0:
            break
        out += mem.read(addr, take)
    return bytes(out)


def write_chain(mem: GuestMemory, chain: DescriptorChain, data: bytes) -> int:
    """Write ``data`` across the chain's device-writable buffers; returns bytes written."""
    done = 0
    for addr, length in chain.writable:
        if done >= len(data):
            break
        piece = data[done:done + length]
        mem.write(addr, piece)
        done += len(piece)
    return done


class Connection:
    """One stream between guest port ``guest_port`` and host port ``host_port``.

    ``state``: "connecting" (the host asked, REQUEST sent or queued, waiting for RESPONSE),
    "established", "closing" (we sent SHUTDOWN or RST, waiting for the guest's RST).
    """

    def __init__(self, guest_port: int, host_port: int, peer, state: str):
        self.guest_port, self.host_port, self.peer, self.state = guest_port, host_port, peer, state
        self.ops: list[int] = []        # control packets to send, in order (each op at most once)
        self.to_host = bytearray()      # guest data the host peer has not taken yet (<= HOST_BUF_ALLOC)
        self.fwd_cnt = 0                # bytes of guest data the host peer took (our fwd_cnt, u32)
        self.fwd_cnt_sent = 0           # fwd_cnt as of our last packet to the guest
        self.tx_cnt = 0                 # bytes sent to the guest (u32)
        self.peer_buf_alloc = 0         # the guest's credit, from its last header
        self.peer_fwd_cnt = 0
        self.readable = False           # the host side saw the peer readable
        self.host_eof = False           # the peer ended its stream
        self.guest_shutdown = 0         # SHUTDOWN flags the guest sent
        self.close_after_flush = False  # close the peer once to_host is written
        self.reply_line = b""           # "OK <port>\n" for a host-initiated connection
        self.reply_pending = b""        # what of it the peer has not taken yet
        self.peer_shut = False          # we shut the peer's write direction (guest SHUTDOWN SEND)

    @property
    def key(self) -> tuple[int, int]:
        return self.guest_port, self.host_port

    def queue_op(self, op: int) -> None:
        if op not in self.ops:
            self.ops.append(op)

    def credit(self) -> int:
        """Bytes we may still send the guest (0 if its header claims the impossible)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & _U32
        return max(0, self.peer_buf_alloc - in_flight) if in_flight <= self.peer_buf_alloc else 0

    def wants_read(self) -> bool:
        """Should the host side watch the peer for data to send the guest?"""
        return (self.state == "established" and not self.host_eof and not self.guest_shutdown & SHUTDOWN_RCV
                and self.credit() > 0)

    def wants_write(self) -> bool:
        return bool(self.to_host or self.reply_pending)

    def op_ready(self) -> bool:
        """A control packet can go now (a closing RST waits until the guest's data is written)."""
        return bool(self.ops) and not (self.ops[0] == OP_RST and self.to_host)


class VirtioVsock:
    """A virtio socket device (see the module docstring)."""

    device_id = VIRTIO_ID_VSOCK
    device_features = 1 << VIRTIO_F_VERSION_1
    num_queues = 3
    queue_num_max = QUEUE_NUM_MAX
    config_size = 8

    def __init__(self, guest_cid: int = DEFAULT_GUEST_CID, host_connect: Callable[[int], object] | None = None,
                 wake: Callable[[], None] | None = None, max_connections: int = MAX_CONNECTIONS):
        self.guest_cid = check_cid(guest_cid)
        self.host_connect = host_connect or (lambda port: None)
        self.wake = wake or (lambda: None)
        self.max_connections = max_connections
        self.conns: dict[tuple[int, int], Connection] = {}
        self.rsts: deque[Header] = deque()
        self.next_host_port = FIRST_HOST_PORT
        self.reset_event = False        # a TRANSPORT_RESET waits for an event buffer
        self.dropped = 0                # malformed tx packets
        self.packets_in = self.packets_out = 0

    # --- VirtioDevice ---------------------------------------------------------------------
    def read_config(self, offset: int, size: int) -> int:
        return (self.guest_cid >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """guest_cid is read-only: ignored."""

    def reset(self) -> None:
        """The driver reset the device: every connection it knew of is gone (their peers are
        closed). A host connection whose REQUEST it has not seen yet waits for the new driver."""
        for conn in list(self.conns.values()):
            if conn.ops != [OP_REQUEST]:
                self._close(conn)
        self.rsts.clear()

    def notify(self, queue_index: int, queue: VirtQueue) -> None:
        if queue_index == TXQ:
            for chain in queue.one_notify():
                self.handle_tx(queue.mem, chain)
                queue.push_used(chain.head, 0)
            self.wake()                 # replies, and credit the host side may use
        elif queue_index == RXQ:
            self.fill_rx(queue)
        elif queue_index == EVENTQ:
            self.fill_event(queue)

    # --- tx: packets from the guest ---------------------------------------------------------
    def handle_tx(self, mem: GuestMemory, chain: DescriptorChain) -> None:
        raw = read_chain(mem, chain, HDR_SIZE)
        if len(raw) < HDR_SIZE:
            self.dropped += 1
            return
        hdr = Header.parse(raw)
        if hdr.len > MAX_PAYLOAD or hdr.len > chain.readable_len - HDR_SIZE \
                or hdr.src_cid != self.guest_cid or hdr.dst_cid != VMADDR_CID_HOST:
            self.dropped += 1
            return
        payload = read_chain(mem, chain, HDR_SIZE + hdr.len)[HDR_SIZE:] if hdr.len else b""
        self.packets_in += 1
        self.receive(hdr, payload)

    def receive(self, hdr: Header, payload: bytes = b"") -> None:
        """One well-addressed packet from the guest (the state machine)."""
        conn = self.conns.get((hdr.src_port, hdr.dst_port))
        if hdr.op == OP_RST:
            if conn is not None:
                self._close(conn)
            return
        if hdr.type != VIRTIO_VSOCK_TYPE_STREAM:
            self._reset(hdr, conn)
            return
        if conn is None:
            if hdr.op == OP_REQUEST:
                self._accept(hdr)
            else:
                self._reset(hdr, None)
            return
        if OP_RST in conn.ops:
            return                              # being reset: the guest's packets are moot
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        handler = _HANDLERS.get((conn.state, hdr.op))
        if handler is None:
            self._reset(hdr, conn)
        else:
            handler(self, conn, hdr, payload)

    def _accept(self, hdr: Header) -> None:
        """A guest REQUEST to host port dst_port: reach the host's listener, or RST."""
        if len(self.conns) >= self.max_connections:
            self._reset(hdr, None)
            return
        peer = self.host_connect(hdr.dst_port)
        if peer is None:
            self._reset(hdr, None)
            return
        conn = Connection(hdr.src_port, hdr.dst_port, peer, "established")
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        conn.queue_op(OP_RESPONSE)
        self.conns[conn.key] = conn

    def _on_response(self, conn: Connection, hdr: Header, payload: bytes) -> None:
        conn.state = "established"
        conn.reply_pending = conn.reply_line    # "OK <port>\n" before any data (not counted in fwd_cnt)
        self.flush(conn)

    def _on_rw(self, conn: Connection, hdr: Header, payload: bytes) -> None:
        if conn.guest_shutdown & SHUTDOWN_SEND or len(conn.to_host) + len(payload) > HOST_BUF_ALLOC:
            self._reset(hdr, conn)              # past the credit we gave, or after "no more"
            return
        conn.to_host += payload
        self.flush(conn)

    def _on_shutdown(self, conn: Connection, hdr: Header, payload: bytes) -> None:
        conn.guest_shutdown |= hdr.flags & SHUTDOWN_BOTH
        if conn.guest_shutdown == SHUTDOWN_BOTH:
            conn.state = "closing"
            conn.ops = [OP_RST]
            conn.close_after_flush = True
        self.flush(conn)

    def _on_credit_update(self, conn: Connection, hdr: Header, payload: bytes) -> None:
        """The credit fields are taken from every header (in receive)."""

    def _on_credit_request(self, conn: Connection, hdr: Header, payload: bytes) -> None:
        conn.queue_op(OP_CREDIT_UPDATE)

    def _reset(self, hdr: Header, conn: Connection | None) -> None:
        """Answer ``hdr`` with a RST and forget the connection (if any)."""
        if conn is not None:
            conn.state = "closing"
            conn.ops = [OP_RST]
            conn.to_host.clear()
            conn.close_after_flush = True
            self.flush(conn)
            return
        if len(self.rsts) < MAX_PENDING_RST:
            self.rsts.append(Header(VMADDR_CID_HOST, self.guest_cid, hdr.dst_port, hdr.src_port, op=OP_RST))

    # --- the host side ---------------------------------------------------------------
    def connect_from_host(self, guest_port: int, peer) -> Connection | None:
        """A host program asks for guest port ``guest_port``: queue a REQUEST. None (and the
        caller closes the peer) when the device has MAX_CONNECTIONS."""
        if len(self.conns) >= self.max_connections or not 0 <= guest_port <= _U32:
            return None
        used = {c.host_port for c in self.conns.values()}
        port = self.next_host_port
        while port in used:
            port = FIRST_HOST_PORT + (port + 1 - FIRST_HOST_PORT) % (1 << 30)
        self.next_host_port = FIRST_HOST_PORT + (port + 1 - FIRST_HOST_PORT) % (1 << 30)
        conn = Connection(guest_port, port, peer, "connecting")
        conn.reply_line = f"OK {conn.host_port}\n".encode()
        conn.queue_op(OP_REQUEST)
        self.conns[conn.key] = conn
        return conn

    def flush(self, conn: Connection) -> None:
        """Give the host peer what it will take of the guest's data; close it when done."""
        while conn.reply_pending:
            try:
                n = conn.peer.send(conn.reply_pending)
            except BlockingIOError:
                return
            except OSError:
                conn.reply_pending = b""
                self.host_gone(conn)
                return
            conn.reply_pending = conn.reply_pending[n:]
        while conn.to_host:
            try:
                n = conn.peer.send(bytes(conn.to_host[:MAX_PAYLOAD]))
            except BlockingIOError:
                break
            except OSError:
                conn.to_host.clear()            # the host reader went away
                self.host_gone(conn)
                return
            del conn.to_host[:n]
            conn.fwd_cnt = (conn.fwd_cnt + n) & _U32
        if conn.fwd_cnt != conn.fwd_cnt_sent and conn.state == "established" \
                and ((conn.fwd_cnt - conn.fwd_cnt_sent) & _U32) >= HOST_BUF_ALLOC // 4:
            conn.queue_op(OP_CREDIT_UPDATE)     # the guest may be waiting for room
        if conn.guest_shutdown & SHUTDOWN_SEND and not conn.to_host and not conn.peer_shut:
            conn.peer_shut = True               # the guest sends no more: the host reader sees EOF
            try:
                conn.peer.shutdown(socket.SHUT_WR)
            except (OSError, AttributeError):
                pass
        if conn.close_after_flush and not conn.to_host and not conn.ops:
            self._close(conn)

    def host_gone(self, conn: Connection) -> None:
        """The peer reached end of stream or failed: tell the guest, finish with its RST."""
        conn.host_eof = True
        if conn.state == "connecting":
            self._close(conn)                   # the guest never heard of it... but may have a REQUEST
            return
        if conn.state == "established":
            conn.state = "closing"
            conn.queue_op(OP_SHUTDOWN)

    def flush_all(self) -> None:
        for conn in list(self.conns.values()):
            if conn.to_host or conn.reply_pending or conn.close_after_flush:
                self.flush(conn)

    def has_rx_work(self) -> bool:
        return bool(self.rsts) or any(c.op_ready() or (c.readable and c.wants_read()) for c in self.conns.values())

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self.rsts.clear()

    def _close(self, conn: Connection) -> None:
        self.conns.pop(conn.key, None)
        conn.state = "closed"
        try:
            conn.peer.close()
        except OSError:
            pass

    # --- rx: packets to the guest -----------------------------------------------------------
    def fill_rx(self, queue: VirtQueue) -> None:
        """Put ready packets into the guest's rx buffers, one per chain, at most ``size`` of them."""
        for _ in range(queue.size):
            if not self.has_rx_work():
                return
            chain = queue.pop()
            if chain is None:
                return
            if chain.writable_len < HDR_SIZE:
                raise VirtqueueError(f"vsock rx chain at descriptor {chain.head} has "
                                     f"{chain.writable_len} writable bytes, a header needs {HDR_SIZE}")
            packet = self._next_packet(chain.writable_len - HDR_SIZE)
            if packet is None:                  # the peer had nothing after all: give it back
                queue.last_avail_idx = (queue.last_avail_idx - 1) & 0xFFFF
                return
            queue.push_used(chain.head, write_chain(queue.mem, chain, packet))
            self.packets_out += 1
        self.wake()                             # a full round: the host side comes back for the rest

    def _next_packet(self, room: int) -> bytes | None:
        if self.rsts:
            return self.rsts.popleft().pack()
        for conn in list(self.conns.values()):
            if conn.op_ready():
                return self._control(conn, conn.ops.pop(0))
        for conn in list(self.conns.values()):
            if conn.readable and conn.wants_read():
                data = self._read_peer(conn, min(room, conn.credit(), MAX_PAYLOAD))
                if data:
                    return self._header(conn, OP_RW, len(data)).pack() + data
                if conn.ops:                    # end of stream: SHUTDOWN
                    return self._control(conn, conn.ops.pop(0))
        return None

    def _read_peer(self, conn: Connection, n: int) -> bytes:
        if n <= 0:
            return b""
        try:
            data = conn.peer.recv(n)
        except BlockingIOError:
            conn.readable = False
            return b""
        except OSError:
            data = b""
        if not data:
            conn.readable = False
            self.host_gone(conn)
            return b""
        conn.tx_cnt = (conn.tx_cnt + len(data)) & _U32
        return data

    def _control(self, conn: Connection, op: int) -> bytes:
        flags = SHUTDOWN_BOTH if op == OP_SHUTDOWN else 0
        packet = self._header(conn, op, 0, flags).pack()
        if op == OP_RST:
            self._close(conn)
        return packet

    def _header(self, conn: Connection, op: int, length: int, flags: int = 0) -> Header:
        conn.fwd_cnt_sent = conn.fwd_cnt
        return Header(VMADDR_CID_HOST, self.guest_cid, conn.host_port, conn.guest_port, length,
                      VIRTIO_VSOCK_TYPE_STREAM, op, flags, HOST_BUF_ALLOC, conn.fwd_cnt)

    # --- event queue and snapshots --------------------------------------------------------
    def transport_reset(self) -> None:
        """Every connection is gone (a restore): tell the guest on the event queue."""
        self.close_all()
        self.reset_event = True

    def fill_event(self, queue: VirtQueue) -> None:
        if not self.reset_event:
            return
        chain = queue.pop()
        if chain is None:
            return
        if chain.writable_len < 4:
            raise VirtqueueError(f"vsock event chain at descriptor {chain.head} has "
                                 f"{chain.writable_len} writable bytes, an event needs 4")
        queue.push_used(chain.head, write_chain(queue.mem, chain, struct.pack("<I", VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)))
        self.reset_event = False

    def state(self) -> dict:
        """Counters, for debugging."""
        return {"guest_cid": self.guest_cid, "connections": len(self.conns), "packets_in": self.packets_in,
                "packets_out": self.packets_out, "dropped": self.dropped}

    def __repr__(self) -> str:
        return f"VirtioVsock(cid {self.guest_cid}, {len(self.conns)} connections)"


_HANDLERS = {
    ("connecting", OP_RESPONSE): VirtioVsock._on_response,
    ("established", OP_RW): VirtioVsock._on_rw,
    ("established", OP_SHUTDOWN): VirtioVsock._on_shutdown,
    ("established", OP_CREDIT_UPDATE): VirtioVsock._on_credit_update,
    ("established", OP_CREDIT_REQUEST): VirtioVsock._on_credit_request,
    ("closing", OP_SHUTDOWN): VirtioVsock._on_shutdown,
    ("closing", OP_CREDIT_UPDATE): VirtioVsock._on_credit_update,
    ("closing", OP_CREDIT_REQUEST): VirtioVsock._on_credit_request,
    ("closing", OP_RW): VirtioVsock._on_rw,
}
