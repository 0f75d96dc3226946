"""What a virtio-net backend is: the host side of the guest's network cable.

A backend moves whole Ethernet frames (no virtio-net header) between the device and
something on the host: a frame stream to passt (passt.py), a TAP interface (tap.py).
Every call is non-blocking, because ``send`` runs on a vCPU thread inside a
QueueNotify and ``receive``/``flush`` on the Machine's network thread (vmm/netpump.py),
which waits on ``fileno()`` with poll:

- ``send(frame) -> bool``: hand one frame to the host; False if it was dropped (the
  host side is full or gone). A backend never raises here: a frame that cannot go is a
  frame lost on the wire, counted in ``tx_dropped``, and a broken connection is
  recorded in ``error`` for the network thread to report.
- ``receive() -> list[bytes]``: the frames that have arrived (maybe none); raises
  :class:`NetBackendError` when the host side is gone or broke its protocol.
- ``wants_write()``/``flush()``: a stream backend may hold the tail of a frame the
  socket did not take; the network thread flushes it when the socket can take more.
- ``close()``: idempotent; releases the fd (and a child process).
"""
from __future__ import annotations

import os
import socket

from ..errors import KvmpyError
from .stream import MAX_FRAME, MIN_FRAME, FrameReader, StreamError, encode

#: Bytes of frames a stream backend holds when its socket is full, before it drops frames:
#: about 64 full-size frames (the guest's TX queue is at most 256 chains).
OUT_LIMIT = 4 << 20
#: Bytes read from a socket per ``receive`` at most, so one busy peer cannot keep the
#: network thread (and the device's lock) from everything else.
READ_BUDGET = 1 << 20


class NetBackendError(KvmpyError):
    """A network backend could not be set up, or its host side failed or went away."""


class StreamBackend:
    """Frames over a connected stream socket, length-prefixed (stream.py); ``what`` names
    the peer in errors ("passt", "the socket /run/x.sock"). Plain read(2)/write(2) on the
    socket's fd, the calls the CLI's seccomp filter allows a running VM (vmm/confine.py)."""

    kind = "stream"

    def __init__(self, sock: socket.socket, what: str):
        sock.setblocking(False)
        self.sock, self.what = sock, what
        self.reader = FrameReader()
        self.out = bytearray()
        self.error: str | None = None
        self.tx_dropped = 0
        self.rx_dropped = 0             # frames too short to be Ethernet

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes) -> bool:
        if self.error is not None or self.sock.fileno() < 0 or len(self.out) + 4 + len(frame) > OUT_LIMIT:
            self.tx_dropped += 1
            return False
        self.out += encode(frame)
        self.flush()
        return True

    def send_records(self, records) -> bool:
        """Hand over whole frames already in the stream's format (each with its length before
        it, as csrc/virtio_net.c gathers them) in one piece: True if all were taken; False if
        none was, and the caller sends them one by one (to count each drop)."""
        if self.error is not None or self.sock.fileno() < 0 or len(self.out) + len(records) > OUT_LIMIT:
            return False
        self.out += records
        self.flush()
        return True

    def wants_write(self) -> bool:
        return bool(self.out) and self.error is None

    def flush(self) -> None:
        """Write what the socket takes now; the rest waits (a frame is never cut short)."""
        while self.out and self.error is None:
            try:
                n = os.write(self.sock.fileno(), self.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.error = f"{self.what}: send failed: {e.strerror or e}"
                return
            del self.out[:n]

    def receive(self) -> list[bytes]:
        frames: list[bytes] = []
        got = 0
        while got < READ_BUDGET:
            try:
                data = os.read(self.sock.fileno(), 1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                raise NetBackendError(f"{self.what}: receive failed: {e.strerror or e}") from None
            if not data:
                try:
                    self.reader.eof()
                except StreamError as e:
                    raise NetBackendError(f"{self.what}: {e}") from None
                raise NetBackendError(f"{self.what} closed the connection")
            got += len(data)
            try:
                frames += self.reader.feed(data)
            except StreamError as e:
                raise NetBackendError(f"{self.what}: {e}") from None
            if self.reader.broken is not None:     # deliver what came before, then stop
                self.error = f"{self.what}: {self.reader.broken}"
                break
        if not frames and self.reader.broken is not None:
            raise NetBackendError(f"{self.what}: {self.reader.broken}")
        short = [f for f in frames if len(f) < MIN_FRAME]
        self.rx_dropped += len(short)
        return [f for f in frames if len(f) >= MIN_FRAME] if short else frames

    def close(self) -> None:
        self.sock.close()               # idempotent


__all__ = ["NetBackendError", "StreamBackend", "OUT_LIMIT", "READ_BUDGET", "MAX_FRAME", "MIN_FRAME"]
