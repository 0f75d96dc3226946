"""The migration stream's wire written again from docs/snapshots.md ("The stream"), not
from kvmpy's code: fake sources and targets speak it, so the tests also pin the format.

    frame     kind (4 bytes), length (u32 LE), payload, MAC (32 bytes; none on MIGR)
    MIGR      "kvmpy-migration\\0", version (u32 LE), 32-byte nonce; the source's goes first
    session   HMAC-SHA256(key, magic | version | source nonce | target nonce)
    MAC       HMAC-SHA256(session, "S" or "T" | counter (u64 LE) | kind | length | payload)
"""
import hashlib
import hmac
import os
import socket
import struct

MAGIC = b"kvmpy-migration\0"
VERSION = 3
HEAD = struct.Struct("<4sI")


def greeting(nonce: bytes, version: int = VERSION) -> bytes:
    payload = MAGIC + struct.pack("<I", version) + nonce
    return HEAD.pack(b"MIGR", len(payload)) + payload


class Wire:
    """One end of a connection ``sock``: "S" (source) or "T" (target), with ``key``."""

    def __init__(self, sock: socket.socket, me: bytes = b"S", key: bytes = b""):
        self.sock, self.me, self.key = sock, me, key
        self.peer = b"T" if me == b"S" else b"S"
        self.session = None
        self.out = self.into = 0

    def recv_exactly(self, n: int) -> bytes:
        data = self.sock.recv(n, socket.MSG_WAITALL) if n else b""
        if len(data) != n:
            raise EOFError(f"{len(data)} of {n} bytes")
        return data

    def greet(self, nonce: bytes | None = None) -> bytes:
        """The greeting (source: ours first; target: theirs first); returns our greeting's bytes."""
        nonce = nonce or os.urandom(32)
        ours = greeting(nonce)
        if self.me == b"S":
            self.sock.sendall(ours)
        kind, n = HEAD.unpack(self.recv_exactly(8))
        payload = self.recv_exactly(n)
        assert kind == b"MIGR", (kind, payload)
        theirs = payload[20:]
        if self.me == b"T":
            self.sock.sendall(ours)
        s, t = (nonce, theirs) if self.me == b"S" else (theirs, nonce)
        self.session = hmac.new(self.key, MAGIC + struct.pack("<I", VERSION) + s + t, hashlib.sha256).digest()
        return ours

    def mac(self, who: bytes, counter: int, frame: bytes) -> bytes:
        return hmac.new(self.session, who + struct.pack("<Q", counter) + frame, hashlib.sha256).digest()

    def frame(self, kind: bytes, payload: bytes = b"") -> bytes:
        """The bytes of our next frame (counted as sent)."""
        body = HEAD.pack(kind, len(payload)) + payload
        out = body + self.mac(self.me, self.out, body)
        self.out += 1
        return out

    def send(self, kind: bytes, payload: bytes = b"") -> bytes:
        data = self.frame(kind, payload)
        self.sock.sendall(data)
        return data

    def recv(self) -> tuple[bytes, bytes]:
        """The peer's next frame, its MAC checked (AssertionError if it fails)."""
        head = self.recv_exactly(8)
        kind, n = HEAD.unpack(head)
        payload = self.recv_exactly(n)
        if self.session is not None:
            assert hmac.compare_digest(self.recv_exactly(32), self.mac(self.peer, self.into, head + payload))
            self.into += 1
        return kind, payload
