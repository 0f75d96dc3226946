"""The call ABI between kvmpy.Sandbox and a guest built with guests/runtime/sandbox.h.

A call page (``struct sbx_page``, the guest's symbol ``sandbox_page``) holds little-endian
u64 words; a value is three of them, ``(type, value, len)``: type is the signature letter
(``i`` int64, ``b`` bytes, ``s`` UTF-8 str; 0 for none), value the integer or the guest
address of the bytes, len their length. The guest publishes its export table there at
its ready point; the host writes a call (function index, arguments) and reads the result;
the guest writes a host call's request and the host its answer. docs/sandboxes.md has
the whole protocol.

Everything the guest wrote is hostile: :func:`parse_exports`, :func:`parse_reply` and
:func:`parse_host_request` bound every count, length and address before the host reads
guest memory with it, and raise :class:`SandboxProtocolError` (a clear message, the
sandbox stays usable) otherwise. Pure: bytes in, values out.
"""
from __future__ import annotations

import struct
from typing import Callable, NamedTuple

from ..errors import KvmpyError

MAGIC = 0x31584253                  # "SBX1", the guest's word at the ready point
MAX_ARGS = 8
EXIT_READY, EXIT_DONE, EXIT_HOST = 0x52, 0x44, 0x48     # isa-debug-exit values ('R', 'D', 'H')
STATUS_OK, STATUS_ERROR = 0, 1
INT, BYTES, STR = ord("i"), ord("b"), ord("s")
TYPES = {"i": INT, "b": BYTES, "s": STR}
NAMES = {v: k for k, v in TYPES.items()}

MAX_EXPORTS = 1024
MAX_NAME = 64                       # bytes of a function's name
MAX_SIG = 2 * MAX_ARGS + 2          # "iiiiiiii:i"
MAX_MESSAGE = 4096                  # bytes of an error message the host reads
EXPORT = struct.Struct("<QQQ")      # struct sbx_export: name, sig, fn
VAL = struct.Struct("<QQQ")
U64 = (1 << 64) - 1

_FIELDS = (("magic", 1), ("exports", 1), ("nexports", 1), ("func", 1), ("argc", 1), ("args", 3 * MAX_ARGS),
           ("status", 1), ("ret", 3), ("host_name", 1), ("host_name_len", 1), ("host_argc", 1),
           ("host_args", 3 * MAX_ARGS), ("host_buf", 1), ("host_buf_cap", 1), ("host_status", 1),
           ("host_ret", 3))
OFFSET: dict[str, int] = {}
_at = 0
for _name, _words in _FIELDS:
    OFFSET[_name] = _at
    _at += 8 * _words
PAGE_SIZE = _at                     # sizeof(struct sbx_page): the symbol's size must match
PAGE = struct.Struct(f"<{PAGE_SIZE // 8}Q")


class SandboxError(KvmpyError):
    """A sandbox call failed, or a sandbox cannot be set up."""


class SandboxProtocolError(SandboxError):
    """The guest broke the call ABI: a length, an address, a type or an exit value the host
    refuses. The call fails; the sandbox is reset and stays usable."""


class SandboxCrash(SandboxError):
    """The guest crashed during a call: ``kind`` is the exception's SDM mnemonic ("#PF"),
    "triple-fault", or how the run ended ("halt", "reset"...); ``vector``, ``rip`` and
    ``address`` (CR2, for a #PF) when an exception was caught. The sandbox stays usable."""

    def __init__(self, message: str, kind: str, vector: int | None = None, rip: int | None = None,
                 address: int | None = None):
        super().__init__(message)
        self.kind, self.vector, self.rip, self.address = kind, vector, rip, address

    def __reduce__(self):           # pickled whole (Ray sends it from the actor that owns the sandbox)
        return type(self), (str(self), self.kind, self.vector, self.rip, self.address)


class SandboxTimeout(SandboxError):
    """A call used up its time budget (host calls included). The sandbox stays usable."""


class GuestFunctionError(SandboxError):
    """The guest function returned an error (``sbx_error()``); ``message`` is its text."""

    def __init__(self, function: str, message: str):
        super().__init__(f"{function}: {message}")
        self.function, self.message = function, message

    def __reduce__(self):
        return type(self), (self.function, self.message)


class Signature(NamedTuple):
    args: str           # one letter per argument: "ii"
    ret: str            # "i", "b", "s" or "" (None)

    def __str__(self) -> str:
        return f"{self.args}:{self.ret}"


class Export(NamedTuple):
    index: int
    name: str
    signature: Signature


class Val(NamedTuple):
    type: int
    value: int
    len: int


class Reply(NamedTuple):
    """A finished call: ``error`` (then ``value``/``len`` are the message), the result's type,
    value (an int, or the address of the bytes) and length."""
    error: bool
    type: int
    value: int
    len: int


class HostRequest(NamedTuple):
    name_addr: int
    name_len: int
    args: tuple             # of Val
    buf: int                # where the host may write its answer's bytes
    cap: int


def parse_signature(text: str) -> Signature:
    """``"ii:i"`` -> Signature("ii", "i"); ValueError for anything else."""
    args, colon, ret = text.partition(":")
    if not colon or len(args) > MAX_ARGS or len(ret) > 1 or not set(args + ret) <= set(TYPES):
        raise ValueError(f"bad signature {text!r}: want ARGS:RET, at most {MAX_ARGS} of i/b/s, "
                         f"RET one of i/b/s or empty (e.g. 'ii:i', 'b:b', ':')")
    return Signature(args, ret)


def _in_ram(addr: int, length: int, ram_size: int, what: str) -> None:
    if not (0 <= addr and 0 <= length and addr + length <= ram_size):
        raise SandboxProtocolError(f"{what} ({length:#x} bytes at {addr:#x}) is not inside the guest's "
                                   f"{ram_size:#x} bytes of RAM")


def _cstring(read: Callable[[int, int], bytes], addr: int, limit: int, ram_size: int, what: str) -> str:
    _in_ram(addr, 1, ram_size, what)
    raw = read(addr, min(limit + 1, ram_size - addr))
    end = raw.find(b"\0")
    if end < 0:
        raise SandboxProtocolError(f"{what} at {addr:#x} is longer than {limit} bytes")
    try:
        return raw[:end].decode("ascii")
    except UnicodeDecodeError:
        raise SandboxProtocolError(f"{what} at {addr:#x} is not ASCII") from None


def parse_exports(page: bytes, read: Callable[[int, int], bytes], ram_size: int) -> dict[str, Export]:
    """The export table the guest published at its ready point, by name. ``read(addr, n)``
    reads guest memory."""
    w = PAGE.unpack_from(page)
    if w[0] != MAGIC:
        raise SandboxError(f"the call page holds {w[0]:#x}, not the sandbox magic {MAGIC:#x}: "
                           "the guest did not call sandbox_serve() (guests/runtime/sandbox.h)")
    table, n = w[1], w[2]
    if n > MAX_EXPORTS:
        raise SandboxProtocolError(f"the guest exports {n} functions (at most {MAX_EXPORTS})")
    _in_ram(table, n * EXPORT.size, ram_size, "the export table")
    raw = read(table, n * EXPORT.size) if n else b""
    out: dict[str, Export] = {}
    for i in range(n):
        name_at, sig_at, _ = EXPORT.unpack_from(raw, i * EXPORT.size)
        name = _cstring(read, name_at, MAX_NAME, ram_size, f"export {i}'s name")
        sig = _cstring(read, sig_at, MAX_SIG, ram_size, f"export {name!r}'s signature")
        try:
            out.setdefault(name, Export(i, name, parse_signature(sig)))
        except ValueError as e:
            raise SandboxProtocolError(f"export {name!r}: {e}") from None
    return out


def to_u64(v: int) -> int:
    if not -(1 << 63) <= v <= U64:
        raise OverflowError(f"{v} does not fit in 64 bits")
    return v & U64


def to_i64(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def check_value(letter: str, v, what: str) -> bytes | int:
    """A Python value for a signature letter: an int, or the bytes to place; TypeError if it is not one."""
    if letter == "i":
        if not isinstance(v, int):
            raise TypeError(f"{what} must be an int, not {type(v).__name__}")
        return to_u64(v)
    if letter == "s":
        if not isinstance(v, str):
            raise TypeError(f"{what} must be a str, not {type(v).__name__}")
        return v.encode("utf-8")
    if not isinstance(v, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(v).__name__}")
    return bytes(v)


def encode_args(sig: Signature, args: tuple, base: int, size: int, name: str = "call") -> tuple[list[Val], bytes]:
    """The call's values and the bytes to write at ``base`` (each bytes/str argument 8-aligned,
    NUL after it); TypeError/ValueError when ``args`` do not fit ``sig`` or ``size`` bytes."""
    if len(args) != len(sig.args):
        raise TypeError(f"{name}() takes {len(sig.args)} arguments ({sig}), {len(args)} given")
    vals, blob = [], bytearray()
    for i, (letter, v) in enumerate(zip(sig.args, args)):
        x = check_value(letter, v, f"{name}() argument {i + 1}")
        if isinstance(x, int):
            vals.append(Val(INT, x, 0))
            continue
        vals.append(Val(TYPES[letter], base + len(blob), len(x)))
        blob += x + bytes(8 - len(x) % 8)        # at least one NUL
    if len(blob) > size:
        raise ValueError(f"{name}() arguments need {len(blob)} bytes; the guest's argument area has {size}")
    return vals, bytes(blob)


def pack_call(index: int, vals: list[Val]) -> bytes:
    """The words from ``func`` to the end of ``args``: one write."""
    words = [index, len(vals)]
    for v in vals:
        words += v
    words += [0] * (3 * (MAX_ARGS - len(vals)))
    return struct.pack(f"<{len(words)}Q", *words)


def parse_reply(page: bytes, ret: str, ram_size: int, max_result: int) -> Reply:
    """The result of a finished call, checked: a known status, the declared type, a length
    within ``max_result`` (MAX_MESSAGE for an error message) and bytes inside RAM."""
    w = PAGE.unpack_from(page)
    o = OFFSET["status"] // 8
    status, (t, value, n) = w[o], w[o + 1:o + 4]
    if status == STATUS_ERROR:
        if t not in (STR, BYTES):
            raise SandboxProtocolError(f"the guest failed the call with an error of type {t:#x}, not a str")
        n = min(n, MAX_MESSAGE)
        _in_ram(value, n, ram_size, "the error message")
        return Reply(True, t, value, n)
    if status != STATUS_OK:
        raise SandboxProtocolError(f"the guest left call status {status:#x} (0 ok, 1 error)")
    want = TYPES[ret] if ret else 0
    if ret and t != want:
        raise SandboxProtocolError(f"the guest returned a value of type {NAMES.get(t, hex(t))!r} for a "
                                   f"function declared to return {ret!r}")
    if want in (BYTES, STR):
        if n > max_result:
            raise SandboxProtocolError(f"the guest returned {n:#x} bytes; the limit is {max_result:#x}")
        _in_ram(value, n, ram_size, "the result")
    return Reply(False, want, value, n if want in (BYTES, STR) else 0)


def parse_host_request(page: bytes, ram_size: int, max_arg: int) -> HostRequest:
    """A host call's request, checked: the name and every bytes/str argument inside RAM and
    bounded, at most MAX_ARGS arguments of known types, the answer buffer inside RAM."""
    w = PAGE.unpack_from(page)
    at = {k: v // 8 for k, v in OFFSET.items()}
    name_addr, name_len, argc = w[at["host_name"]], w[at["host_name_len"]], w[at["host_argc"]]
    if name_len > MAX_NAME:
        raise SandboxProtocolError(f"a host call's name of {name_len:#x} bytes (at most {MAX_NAME})")
    _in_ram(name_addr, name_len, ram_size, "a host call's name")
    if argc > MAX_ARGS:
        raise SandboxProtocolError(f"a host call with {argc} arguments (at most {MAX_ARGS})")
    args = []
    for i in range(argc):
        v = Val(*w[at["host_args"] + 3 * i:at["host_args"] + 3 * i + 3])
        if v.type not in NAMES:
            raise SandboxProtocolError(f"a host call's argument {i + 1} has type {v.type:#x}")
        if v.type != INT:
            if v.len > max_arg:
                raise SandboxProtocolError(f"a host call's argument {i + 1} is {v.len:#x} bytes (at most {max_arg:#x})")
            _in_ram(v.value, v.len, ram_size, f"a host call's argument {i + 1}")
        args.append(v)
    buf, cap = w[at["host_buf"]], w[at["host_buf_cap"]]
    _in_ram(buf, cap, ram_size, "a host call's answer buffer")
    return HostRequest(name_addr, name_len, tuple(args), buf, cap)


def pack_answer(status: int, val: Val) -> bytes:
    """The words from ``host_status`` to the end of ``host_ret``."""
    return struct.pack("<4Q", status, *val)
