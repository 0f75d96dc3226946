"""The wire format between kvmpy.linuxbox and its guest agent (guests/linux/kvmpy-agent.c).

One request, one reply per vsock connection; every integer little-endian, every string
or blob a ``u32`` length and its bytes (strings: no NUL byte).

Request, host to agent::

    "KVMQ" u8 version u8 kind u16 0  u32 max_output  u32 max_fetch  u32 body_length
    body (kind RUN):  u32 argc, argc strings      the program and its arguments
                      u32 envc, envc strings      "NAME=value", the program's environment
                      string cwd
                      blob stdin
                      u32 nfiles, nfiles x (string path, u32 mode, blob data)   written first
                      u32 nfetch, nfetch x string path                          read last
    kind READY has an empty body: the agent answers with a reply whose stdout says who it
    is, waits for one byte from the host, then stops the machine (isa-debug-exit): the
    point where the sandbox takes its checkpoint.

Reply, agent to host::

    "KVMR" u8 version u8 kind u16 flags  i32 wait_status
    kind OK:    blob stdout, blob stderr (each at most max_output bytes; flags bits 0 and 1:
                the program wrote more, which was read and dropped)
                u32 nfetch (as asked), nfetch x (i32 errno, u32 truncated, blob data)
    kind ERROR: blob message (the agent could not do what was asked: a file it could not
                write, a request it could not parse)

The guest is hostile: :func:`read_reply` checks every length against what the request
allowed before it reads the bytes, and any surprise is a :class:`ProtocolError`.
"""
from __future__ import annotations

import errno as errno_names
import os
import struct
from dataclasses import dataclass, field

from ..errors import KvmpyError

VERSION = 1
REQUEST_MAGIC = b"KVMQ"
REPLY_MAGIC = b"KVMR"
KIND_RUN, KIND_READY = 1, 2
REPLY_OK, REPLY_ERROR = 0, 1
REQUEST_HEADER = struct.Struct("<4sBBHIII")
REPLY_HEADER = struct.Struct("<4sBBHi")
FILE_HEADER = struct.Struct("<iI")
STDOUT_TRUNCATED, STDERR_TRUNCATED = 1, 2
#: What the agent takes (it reads a request whole, and keeps both outputs in guest RAM).
MAX_REQUEST = 64 << 20
MAX_OUTPUT = 64 << 20
MAX_FETCH = 64 << 20
MAX_MESSAGE = 4096
MAX_ITEMS = 4096                # argv, env, files, fetch: each at most this many entries


class ProtocolError(KvmpyError):
    """The guest's reply broke the format, or a request cannot be sent; the message says where."""


@dataclass(frozen=True)
class Request:
    """What one call asks the agent to do (see the module docstring)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/root"
    stdin: bytes = b""
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    fetch: list[str] = field(default_factory=list)
    max_output: int = 16 << 20
    max_fetch: int = 16 << 20


@dataclass(frozen=True)
class Reply:
    """A parsed OK reply: raw wait status, both outputs, and each fetched path's
    (errno, truncated, data) in the request's order."""

    wait_status: int
    stdout: bytes
    stderr: bytes
    flags: int
    fetched: list[tuple[int, bool, bytes]]

    @property
    def status(self) -> int:
        """The exit status, or minus the signal that ended the program (as subprocess has it)."""
        return decode_status(self.wait_status)


def decode_status(ws: int) -> int:
    """A wait4() status as subprocess's returncode: the exit code, or -signal."""
    sig = ws & 0x7F
    if sig == 0 and ws >= 0 and ws >> 16 == 0:
        return (ws >> 8) & 0xFF
    if 0 < sig < 0x7F and ws >> 16 == 0 and ws >= 0:
        return -sig
    raise ProtocolError(f"wait status {ws:#x} is neither an exit nor a signal")


def _string(text: str, what: str) -> bytes:
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if b"\0" in raw:
        raise ProtocolError(f"{what} {text!r} contains a NUL byte")
    return struct.pack("<I", len(raw)) + raw


def _blob(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + bytes(data)


def _count(items, what: str) -> bytes:
    if len(items) > MAX_ITEMS:
        raise ProtocolError(f"{len(items)} {what}: at most {MAX_ITEMS}")
    return struct.pack("<I", len(items))


def encode_request(req: Request) -> bytes:
    """The bytes of a RUN request; ProtocolError if it breaks a limit."""
    if not req.argv:
        raise ProtocolError("a command needs at least a program name")
    if not 0 <= req.max_output <= MAX_OUTPUT or not 0 <= req.max_fetch <= MAX_FETCH:
        raise ProtocolError(f"max_output and max_fetch are limited to {MAX_OUTPUT} and {MAX_FETCH} bytes")
    parts = [_count(req.argv, "arguments"), *(_string(a, "argument") for a in req.argv)]
    parts += [_count(req.env, "environment variables")]
    for name, value in req.env.items():
        if not name or "=" in name:
            raise ProtocolError(f"environment variable name {name!r} is empty or has '='")
        parts.append(_string(f"{name}={value}", "environment variable"))
    parts += [_string(req.cwd, "working directory"), _blob(req.stdin), _count(req.files, "files")]
    for path, (data, mode) in req.files.items():
        if not 0 <= mode <= 0o7777:
            raise ProtocolError(f"file {path!r}: mode {mode:#o} is not a permission mode")
        parts += [_string(path, "file path"), struct.pack("<I", mode), _blob(data)]
    parts += [_count(req.fetch, "paths to fetch"), *(_string(p, "path to fetch") for p in req.fetch)]
    body = b"".join(parts)
    if len(body) > MAX_REQUEST:
        raise ProtocolError(f"the request is {len(body)} bytes (stdin and files): at most {MAX_REQUEST}")
    return REQUEST_HEADER.pack(REQUEST_MAGIC, VERSION, KIND_RUN, 0, req.max_output, req.max_fetch, len(body)) + body


def encode_ready() -> bytes:
    """The READY request (no body)."""
    return REQUEST_HEADER.pack(REQUEST_MAGIC, VERSION, KIND_READY, 0, MAX_MESSAGE, 0, 0)


def _read_blob(read, limit: int, what: str) -> bytes:
    (n,) = struct.unpack("<I", read(4))
    if n > limit:
        raise ProtocolError(f"{what}: the guest says {n} bytes, at most {limit} were allowed")
    return read(n)


def read_reply(read, max_output: int, max_fetch: int, nfetch: int) -> Reply:
    """Parse one reply from ``read(n)`` (exactly n bytes, or raise) for a request that allowed
    ``max_output`` bytes per output and ``max_fetch`` per file and fetched ``nfetch`` paths.
    An ERROR reply raises AgentError; anything malformed ProtocolError."""
    magic, version, kind, flags, ws = REPLY_HEADER.unpack(read(REPLY_HEADER.size))
    if magic != REPLY_MAGIC or version != VERSION:
        raise ProtocolError(f"not a version-{VERSION} reply (magic {magic!r}, version {version})")
    if kind == REPLY_ERROR:
        raise AgentError(_read_blob(read, MAX_MESSAGE, "error message").decode("utf-8", "replace"))
    if kind != REPLY_OK or flags & ~(STDOUT_TRUNCATED | STDERR_TRUNCATED):
        raise ProtocolError(f"unknown reply kind {kind} or flags {flags:#x}")
    decode_status(ws)
    stdout = _read_blob(read, max_output, "stdout")
    stderr = _read_blob(read, max_output, "stderr")
    (count,) = struct.unpack("<I", read(4))
    if count != nfetch:
        raise ProtocolError(f"the guest answers for {count} fetched files, {nfetch} were asked for")
    fetched = []
    for i in range(count):
        err, truncated = FILE_HEADER.unpack(read(FILE_HEADER.size))
        if err < 0 or err > 4095 or truncated > 1:
            raise ProtocolError(f"fetched file {i}: errno {err}, truncated {truncated}")
        data = _read_blob(read, 0 if err else max_fetch, f"fetched file {i}")
        fetched.append((err, bool(truncated), data))
    return Reply(ws, stdout, stderr, flags, fetched)


class AgentError(KvmpyError):
    """The agent could not do what a call asked (a file it could not write, say)."""


def errno_text(err: int) -> str:
    """'ENOENT (No such file or directory)' for errno 2."""
    return f"{errno_names.errorcode.get(err, f'errno {err}')} ({os.strerror(err)})"


def bytes_reader(data: bytes):
    """A ``read(n)`` over bytes, for tests and for replies already in memory."""
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ProtocolError(f"the reply ends after {len(data)} bytes, {pos + n} were needed")
        pos += n
        return data[pos - n:pos]
    return read


def encode_reply(wait_status: int, stdout: bytes = b"", stderr: bytes = b"", flags: int = 0,
                 fetched=(), error: str | None = None) -> bytes:
    """A reply as the agent writes it (the agent is C; this is its format's model, for tests)."""
    if error is not None:
        return REPLY_HEADER.pack(REPLY_MAGIC, VERSION, REPLY_ERROR, 0, 0) + _blob(error.encode())
    parts = [REPLY_HEADER.pack(REPLY_MAGIC, VERSION, REPLY_OK, flags, wait_status), _blob(stdout), _blob(stderr),
             struct.pack("<I", len(fetched))]
    for err, truncated, data in fetched:
        parts += [FILE_HEADER.pack(err, int(truncated)), _blob(data)]
    return b"".join(parts)
