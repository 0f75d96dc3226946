"""The migration stream's wire: a greeting that exchanges nonces, then frames that each
carry an HMAC-SHA256 and must arrive whole by a deadline.

docs/snapshots.md ("The stream") is the specification; in short:

    frame     kind (4 ASCII bytes), length (u32 LE), payload, MAC (32 bytes)
    greeting  a MIGR frame each way, without a MAC: MAGIC (16 bytes), VERSION (u32 LE),
              nonce (32 random bytes); the source speaks first
    session   HMAC-SHA256(key, MAGIC | VERSION | source nonce | target nonce)
    MAC       HMAC-SHA256(session, sender ("S" or "T") | counter (u64 LE) | kind | length | payload)

The counter counts each direction's frames from 0, so a frame cannot be dropped,
repeated or moved; the sender byte stops a frame being reflected back to its sender;
both nonces make every connection's session key new, so a frame recorded on one
connection fails on any other. Without a key the MACs use the empty key: they still
catch a damaged or spliced stream, but anyone can make them, which is why a target
without a key listens on loopback only (migration.receive).

A frame must arrive whole within ``frame_timeout`` seconds of its first read, and every
frame by the migration's overall deadline: a peer that sends a byte now and then cannot
hold a receiver (or a paused source) for longer than that.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import stat
import struct
import time

from ..errors import KvmpyError

VERSION = 3                     # 2: kvmpy before authentication (HELO first, no MACs)
MAGIC = b"kvmpy-migration\0"
HEADER = struct.Struct("<4sI")
GREETING = struct.Struct("<16sI32s")
COUNTER = struct.Struct("<Q")
MAC_SIZE = 32
SOURCE, TARGET = b"S", b"T"     # who sent a frame (part of its MAC)
MIN_KEY = 16                    # bytes: e.g. `openssl rand -hex 32 > KEYFILE` gives 64
MAX_REASON = 4096               # a FAIL frame's text
KEY_ENV = "KVMPY_MIGRATION_KEY"


class MigrationError(KvmpyError):
    """The migration did not complete; the source machine is still running."""


class WrongVersion(MigrationError):
    """The peer speaks another version of the stream (safe to tell the peer: names nothing local)."""


class Channel:
    """One end of a migration connection (``role`` SOURCE or TARGET) over ``sock``.

    ``key`` (bytes or None) is the pre-shared key. ``frame_timeout`` bounds each frame,
    ``deadline`` (seconds from now) the whole connection; either may be None (no bound).
    Until ``greet()`` (source) or ``answer_greeting()`` (target) has run, frames go
    without a MAC; only FAIL is sent then."""

    def __init__(self, sock: socket.socket, role: bytes, key: bytes | None,
                 frame_timeout: float | None, deadline: float | None):
        self.sock, self.role = sock, role
        self.peer_role = TARGET if role == SOURCE else SOURCE
        self._key = bytes(key or b"")
        self.frame_timeout, self.total = frame_timeout, deadline
        self._end = None if deadline is None else time.monotonic() + deadline
        self._session = None            # an hmac object keyed with the session key
        self._out = self._in = 0        # frames sent / received since the greeting
        self._until = None              # the frame being read must be whole by then
        self._frame = None              # [kind, bytes of payload left, its hmac]
        self.sent = 0

    # --- the greeting -------------------------------------------------------------
    def greet(self) -> None:
        """Source: send our nonce, read the target's, key the session."""
        mine = secrets.token_bytes(32)
        self.send(b"MIGR", GREETING.pack(MAGIC, VERSION, mine))
        kind, payload = self.recv(MAX_REASON)
        if kind == b"FAIL":
            raise MigrationError(f"the other side gave up at the greeting: {printable(payload)} (this kvmpy "
                                 f"speaks migration stream version {VERSION}; is the target older?)")
        theirs = self._check_greeting(kind, payload, "the target")
        self._key_session(mine, theirs)

    def answer_greeting(self, where: str) -> None:
        """Target: read the source's nonce, send ours, key the session."""
        kind, payload = self.recv(MAX_REASON)
        if kind == b"HELO":
            raise WrongVersion(f"{where}: the source speaks migration stream version 2 (an older kvmpy, "
                               f"without authentication); this kvmpy speaks {VERSION}: upgrade the source")
        theirs = self._check_greeting(kind, payload, where)
        mine = secrets.token_bytes(32)
        self.send(b"MIGR", GREETING.pack(MAGIC, VERSION, mine))
        self._key_session(theirs, mine)

    @staticmethod
    def _check_greeting(kind: bytes, payload: bytes, where: str) -> bytes:
        if kind != b"MIGR" or len(payload) < 20 or payload[:16] != MAGIC:
            raise MigrationError(f"{where}: not a kvmpy migration stream (first frame {kind!r})")
        version = int.from_bytes(payload[16:20], "little")
        if version != VERSION:
            raise WrongVersion(f"{where}: migration stream version {version}, this kvmpy speaks {VERSION}")
        if len(payload) != GREETING.size:
            raise MigrationError(f"{where}: malformed greeting ({len(payload)} bytes)")
        return GREETING.unpack(payload)[2]

    def _key_session(self, source_nonce: bytes, target_nonce: bytes) -> None:
        session = hmac.new(self._key, MAGIC + struct.pack("<I", VERSION) + source_nonce + target_nonce,
                           hashlib.sha256).digest()
        self._session = hmac.new(session, digestmod=hashlib.sha256)

    def _mac(self, sender: bytes, counter: int):
        h = self._session.copy()
        h.update(sender + COUNTER.pack(counter))
        return h

    # --- sending ------------------------------------------------------------------
    def send(self, kind: bytes, head: bytes = b"", data=b"") -> None:
        """One frame: ``head`` then ``data`` (e.g. a view of guest RAM, copied once here, so
        what is MACed is what is sent even while the guest writes it), then its MAC."""
        n = len(head) + len(data)
        tail = MAC_SIZE if self._session is not None else 0
        frame = bytearray(HEADER.size + n + tail)
        HEADER.pack_into(frame, 0, kind, n)
        frame[HEADER.size:HEADER.size + len(head)] = head
        frame[HEADER.size + len(head):HEADER.size + n] = data
        if tail:
            h = self._mac(self.role, self._out)
            h.update(memoryview(frame)[:HEADER.size + n])
            frame[HEADER.size + n:] = h.digest()
            self._out += 1
        self._arm(self._frame_end())
        try:
            self.sock.sendall(frame)
        except socket.timeout:
            raise MigrationError(f"the other side did not take a {kind!r} frame in time "
                                 f"({self._bound_text()})") from None
        self.sent += len(frame)

    def send_json(self, kind: bytes, obj) -> None:
        self.send(kind, json.dumps(obj).encode())

    def fail(self, reason: bytes) -> None:
        """Best effort: tell the peer we give up (a few seconds at most, errors ignored)."""
        try:
            self._end = min(self._end or float("inf"), time.monotonic() + 5)
            self.send(b"FAIL", reason[:MAX_REASON])
        except (OSError, MigrationError):
            pass

    # --- receiving ----------------------------------------------------------------
    def recv(self, limit: int) -> tuple[bytes, bytes]:
        """One whole frame, its MAC checked: (kind, payload). Longer than ``limit``: refused."""
        kind, n = self.begin()
        if n > limit:
            raise MigrationError(f"a {kind!r} frame of {n} bytes is larger than allowed ({limit})")
        payload = bytes(self.read(n))
        self.end()
        return kind, payload

    def begin(self) -> tuple[bytes, int]:
        """Read a frame's header: (kind, length). Then ``read`` its payload and ``end`` it."""
        self._until = self._frame_end()
        header = bytes(self._exactly(HEADER.size))
        kind, n = HEADER.unpack(header)
        h = None
        if self._session is not None:
            h = self._mac(self.peer_role, self._in)
            h.update(header)
        self._frame = [bytes(kind), n, h]
        return bytes(kind), n

    def read(self, n: int, into=None):
        """``n`` more bytes of the frame's payload (into the writable buffer ``into``)."""
        if n > self._frame[1]:
            raise MigrationError(f"a {self._frame[0]!r} frame is shorter than its contents")
        data = self._exactly(n, into)
        self._frame[1] -= n
        if self._frame[2] is not None:
            self._frame[2].update(data)
        return data

    def end(self) -> None:
        """The frame's MAC: checked in constant time. A frame that fails it is refused."""
        kind, left, h = self._frame
        if left:
            raise MigrationError(f"a {kind!r} frame is longer than its contents")
        if h is not None:
            got = bytes(self._exactly(MAC_SIZE))
            if not hmac.compare_digest(h.digest(), got):
                raise MigrationError(self._bad_mac_text(kind))
            self._in += 1
        self._frame = self._until = None

    def _bad_mac_text(self, kind: bytes) -> str:
        if self._in == 0:
            return (f"the other side's first frame ({kind!r}) fails its MAC: the two ends have different "
                    "migration keys (or only one has a key), or the frame was recorded on another connection")
        return f"frame {self._in} ({kind!r}) fails its MAC: it was damaged, forged, replayed or reordered"

    # --- deadlines ----------------------------------------------------------------
    def _frame_end(self) -> float | None:
        ends = [t for t in (self._end, None if self.frame_timeout is None
                            else time.monotonic() + self.frame_timeout) if t is not None]
        return min(ends) if ends else None

    def _arm(self, until: float | None) -> None:
        if until is None:
            self.sock.settimeout(None)
            return
        left = until - time.monotonic()
        if left <= 0:
            raise MigrationError(f"not in time: {self._bound_text()}")
        self.sock.settimeout(left)

    def _bound_text(self) -> str:
        if self._end is not None and time.monotonic() >= self._end:
            return f"the migration must be done within {self.total} s"
        return f"each frame must arrive within {self.frame_timeout} s"

    def _exactly(self, n: int, into=None):
        buf = into if into is not None else memoryview(bytearray(n))
        got = 0
        while got < n:
            self._arm(self._until)      # the frame's deadline, not a fresh one per recv
            try:
                k = self.sock.recv_into(buf[got:], n - got)
            except socket.timeout:
                raise MigrationError(f"no whole frame in time: {self._bound_text()}") from None
            if k == 0:
                raise MigrationError(f"the stream ended early ({got} of {n} bytes of a frame)")
            got += k
        return buf


def printable(data: bytes, limit: int = 300) -> str:
    """A peer's text, safe to print: no control characters, at most ``limit`` of them."""
    text = data.decode(errors="replace")[:limit]
    return "".join(c if c.isprintable() else "?" for c in text)


def is_loopback(address: str) -> bool:
    """Is ``address`` (an IP address as getsockname gives it) on this host only?"""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def load_key(path: str) -> bytes:
    """The key in file ``path``: its bytes less one trailing newline, at least MIN_KEY of
    them. The file must be a regular file that only its owner may read or write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise MigrationError(f"key file {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MigrationError(f"key file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise MigrationError(f"key file {path}: others may read it (mode {st.st_mode & 0o777:o}): "
                                 f"chmod 600 {path}")
        key = f.read(4097)
    return check_key(key.removesuffix(b"\n").removesuffix(b"\r"), f"key file {path}")


def check_key(key: bytes, what: str = "the migration key") -> bytes:
    if not MIN_KEY <= len(key) <= 4096:
        raise MigrationError(f"{what}: a key has {MIN_KEY} to 4096 bytes, this one {len(key)} "
                             "(make one with: openssl rand -hex 32 > KEYFILE; chmod 600 KEYFILE)")
    return key


def key_from(path: str | None) -> bytes | None:
    """The command line's key: from ``path`` if given, else from $KVMPY_MIGRATION_KEY, else None."""
    if path is not None:
        return load_key(path)
    text = os.environ.get(KEY_ENV)
    return None if not text else check_key(text.encode(), f"${KEY_ENV}")
