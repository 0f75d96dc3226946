"""The frame stream that QEMU's ``-netdev stream`` and passt speak: Ethernet frames over
a byte stream (a UNIX stream socket), each preceded by its length as a 32-bit big-endian
unsigned integer, no padding, no other framing (passt(1), "qrap"/"stream" mode).

Both directions are here, as pure byte functions a test drives without sockets:

- :class:`FrameReader` takes the bytes the peer sent, in pieces of any size, and gives
  back whole frames. The peer is hostile: a length of 0 is dropped (counted in
  ``zero_length``; nothing to deliver, and the stream stays in step); a length above
  ``max_frame`` (default MAX_FRAME, the biggest frame the virtio-net device carries) is
  a :class:`StreamError` (after the frames before it are handed out), since nothing after it can be trusted to be in step and
  buffering it would let a peer make us hold 4 GiB. So the reader never holds more than
  4 + ``max_frame`` bytes of a partial frame, whatever the peer sends. A stream that
  ends inside a frame (``eof()`` with bytes pending) is a StreamError too.
- :func:`encode` prefixes one frame with its length (the caller bounds the frame).
"""
from __future__ import annotations

import struct

from ..devices.virtio.net import MAX_FRAME, MIN_FRAME    # the device's limits, one home
from ..errors import KvmpyError

_LEN = struct.Struct(">I")


class StreamError(KvmpyError):
    """The peer of a frame stream broke its framing (a length too big, a frame cut off)."""


def encode(frame: bytes) -> bytes:
    """``frame`` as it goes on the stream: its 32-bit big-endian length, then its bytes."""
    return _LEN.pack(len(frame)) + frame


class FrameReader:
    """Reassembles frames from the stream's bytes (see the module docstring)."""

    def __init__(self, max_frame: int = MAX_FRAME):
        if not 1 <= max_frame <= 0xFFFF_FFFF:
            raise ValueError(f"max_frame {max_frame} is not in 1..2**32-1")
        self.max_frame = max_frame
        self.buf = bytearray()
        self.zero_length = 0            # frames of length 0 the peer sent (dropped)
        self.frames = 0                 # frames handed out
        self.broken: str | None = None  # why the stream can no longer be read

    def feed(self, data: bytes) -> list[bytes]:
        """The frames ``data`` completes, in order. A length over ``max_frame`` ends the
        stream: the frames before it are returned, and this call or the next raises
        StreamError (``broken`` says why); nothing after it is buffered."""
        if self.broken is not None:
            raise StreamError(self.broken)
        if self.buf:
            self.buf += data
            src = self.buf
        else:
            src = data                  # the common case: parse the read itself, no copy first
        out, pos, end = [], 0, len(src)
        with memoryview(src) as view:
            while end - pos >= _LEN.size:
                (n,) = _LEN.unpack_from(view, pos)
                if n > self.max_frame:
                    self.broken = (f"the peer sent a frame length of {n} bytes; at most "
                                   f"{self.max_frame} are allowed (a broken or hostile peer)")
                    pos = end               # nothing after it is kept
                    break
                if end - pos - _LEN.size < n:
                    break
                if n:
                    out.append(bytes(view[pos + _LEN.size:pos + _LEN.size + n]))
                else:
                    self.zero_length += 1
                pos += _LEN.size + n
            rest = bytes(view[pos:]) if src is data else None
        if src is data:
            self.buf += rest
        else:
            del self.buf[:pos]
        self.frames += len(out)
        if self.broken is not None and not out:
            raise StreamError(self.broken)
        return out

    @property
    def pending(self) -> int:
        """Bytes of a frame (or length) received but not yet complete."""
        return len(self.buf)

    def eof(self) -> None:
        """The peer closed the stream: StreamError if it did so in the middle of a frame."""
        if self.buf:
            raise StreamError(f"the peer closed the stream in the middle of a frame "
                              f"({len(self.buf)} bytes of it received)")
