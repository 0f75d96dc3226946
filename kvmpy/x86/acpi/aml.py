"""AML, the byte code of an ACPI DSDT: the part of it that names devices and their resources.

An operating system learns about the devices it cannot probe from the DSDT's *definition
block*: a tree of named objects in AML (ACPI 6.5, chapter 20, "ACPI Machine Language
Specification"). kvmpy's devices need only declarations, no code: a ``Scope``, a
``Device`` per device, and ``Name`` objects holding integers, strings and buffers, the
buffers being *resource templates* (chapter 6.4, "Resource Data Types for ACPI"). Each
function here returns the bytes of one such term; they nest by concatenation:

    device("COM1",
           name("_HID", eisa_id("PNP0501")),
           name("_CRS", resource_template(io(0x3F8, 8), irq_no_flags(4))))

encodes what ASL writes as::

    Device (COM1) {
        Name (_HID, EisaId ("PNP0501"))
        Name (_CRS, ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08) IRQNoFlags () {4} })
    }

The encodings are the ones ACPICA's ``iasl`` compiler chooses (integers in the shortest
form, ``Zero``/``One``/``Ones`` for 0/1/all ones), so disassembling kvmpy's DSDT with
``iasl -d`` and compiling the result again gives back the same bytes (tests/unit/test_acpi_iasl.py).
No methods, no operation regions, no control flow: a Device whose answer never changes
is described by ``Name`` objects alone, as QEMU and Firecracker do for theirs.
"""
from __future__ import annotations

import re
import struct

# --- opcodes (ACPI 6.5, 20.3 "AML Byte Stream Byte Values") --------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
NAME_OP = 0x08
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82                   # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C                   # '\'
PARENT_PREFIX_CHAR = 0x5E          # '^'
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
NULL_NAME = 0x00

#: The largest value a PkgLength can hold: 4 bytes, 4 + 8 + 8 + 8 bits (20.2.4).
PKG_LENGTH_MAX = (1 << 28) - 1
_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


# --- package lengths -----------------------------------------------------------------------
def pkg_length(content: int) -> bytes:
    """The PkgLength of a term whose ``content`` bytes follow it. The value it encodes counts
    its own bytes too (20.2.4): one byte holds up to 63 in bits 0-5; longer values take
    1 to 3 more bytes, the lead byte holding their count in bits 6-7 and the low nibble."""
    if content < 0:
        raise ValueError(f"negative length {content}")
    for extra in range(4):
        total = content + 1 + extra
        if extra == 0 and total <= 0x3F:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            return bytes([extra << 6 | total & 0x0F]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"{content} bytes do not fit in a PkgLength (at most {PKG_LENGTH_MAX} with itself)")


def decode_pkg_length(data: bytes, offset: int = 0) -> tuple[int, int]:
    """``(value, bytes used)`` of the PkgLength at ``offset``: the inverse of :func:`pkg_length`."""
    lead = data[offset]
    extra = lead >> 6
    if extra == 0:
        return lead & 0x3F, 1
    if lead & 0x30:
        raise ValueError(f"PkgLength lead byte {lead:#04x} has bits 4-5 set")
    rest = int.from_bytes(data[offset + 1:offset + 1 + extra], "little")
    return lead & 0x0F | rest << 4, 1 + extra


def _with_length(prefix: bytes, content: bytes) -> bytes:
    return prefix + pkg_length(len(content)) + content


# --- names -------------------------------------------------------------------------------------
def name_seg(seg: str) -> bytes:
    """A NameSeg: 1-4 characters, a capital or '_' first, then capitals, digits or '_';
    padded to 4 with '_' (20.2.2)."""
    if not _NAME_SEG.fullmatch(seg):
        raise ValueError(f"bad ACPI name segment {seg!r}: 1-4 of A-Z, 0-9, _ (not a digit first)")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: ``\\`` (the root) or some ``^`` (parents) and then segments joined by '.',
    e.g. ``\\_SB.VR00``, ``^COM1``, ``_HID``; ``\\`` alone is the root itself."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    else:
        while path.startswith("^"):
            prefix, path = prefix + bytes([PARENT_PREFIX_CHAR]), path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise ValueError(f"{len(segs)} name segments: at most 255")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# --- data objects --------------------------------------------------------------------------------
def integer(value: int) -> bytes:
    """An integer constant in its shortest form: Zero, One, Ones (all 64 bits set), or a
    Byte/Word/DWord/QWord with its prefix. DSDT revision 2 and later has 64-bit integers."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"AML integers are 64-bit unsigned, got {value}")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == (1 << 64) - 1:
        return bytes([ONES_OP])
    for prefix, fmt in ((BYTE_PREFIX, "<B"), (WORD_PREFIX, "<H"), (DWORD_PREFIX, "<I")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    """A String constant: ASCII 0x01-0x7F, NUL-terminated."""
    raw = text.encode("ascii")
    if b"\0" in raw:
        raise ValueError("an AML string cannot contain NUL")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id(pnp_id: str) -> bytes:
    """``EisaId ("PNP0501")``: three capitals and four hex digits compressed into a 32-bit
    integer (5 bits a letter, 'A' = 1), stored big-endian as the EISA spec has it."""
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", pnp_id):
        raise ValueError(f"bad EISA id {pnp_id!r}: three capitals and four hex digits")
    a, b, c = (ord(ch) - 0x40 for ch in pnp_id[:3])
    value = a << 26 | b << 21 | c << 16 | int(pnp_id[3:], 16)
    return integer(int.from_bytes(value.to_bytes(4, "big"), "little"))


def buffer(data: bytes) -> bytes:
    """``Buffer () {...}``: its size as an integer term, then the bytes."""
    return _with_length(bytes([BUFFER_OP]), integer(len(data)) + data)


def package(*elements: bytes) -> bytes:
    """``Package () {...}`` of encoded data objects (integers, strings, buffers, packages)."""
    if len(elements) > 255:
        raise ValueError(f"{len(elements)} package elements: a Package holds at most 255")
    return _with_length(bytes([PACKAGE_OP]), bytes([len(elements)]) + b"".join(elements))


def _data(value) -> bytes:
    if isinstance(value, bool):
        raise TypeError("use 0 or 1, not a bool")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    return bytes(value)              # an encoded term: eisa_id(), buffer(), package()


# --- named objects and scopes -------------------------------------------------------------------
def name(path: str, value) -> bytes:
    """``Name (path, value)``; ``value`` is an int, a str, or an encoded data object."""
    return bytes([NAME_OP]) + name_string(path) + _data(value)


def scope(path: str, *terms: bytes) -> bytes:
    """``Scope (path) {terms}``."""
    return _with_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """``Device (path) {terms}``."""
    return _with_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


# --- resource descriptors (ACPI 6.5, 6.4) ----------------------------------------------------------
SMALL_IRQ = 0x04            # small item names, shifted into bits 3-6 of the tag byte
SMALL_IO = 0x08
SMALL_END_TAG = 0x0F
LARGE_MEMORY32_FIXED = 0x86
LARGE_EXTENDED_IRQ = 0x89
LARGE_DWORD_ADDRESS = 0x87
LARGE_WORD_ADDRESS = 0x88
LARGE_QWORD_ADDRESS = 0x8A
# Address space descriptors (6.4.3.5): resource types, and the general flags of a bridge's
# window: ResourceProducer (bit 0 clear), PosDecode, MinFixed (bit 2), MaxFixed (bit 3).
RESOURCE_MEMORY, RESOURCE_IO, RESOURCE_BUS = 0, 1, 2
WINDOW_FLAGS = 0x0C
IO_ENTIRE_RANGE = 0x03              # _RNG: ISA and non-ISA ports
MEMORY_READ_WRITE = 0x01            # _RW, non-cacheable


def _small(item: int, body: bytes) -> bytes:
    return bytes([item << 3 | len(body)]) + body


def _large(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + struct.pack("<H", len(body)) + body


def io(port: int, length: int, *, alignment: int = 1) -> bytes:
    """``IO (Decode16, port, port, alignment, length)``: a fixed range of 16-bit-decoded ports."""
    if not (0 <= port <= 0xFFFF and 0 < length <= 0xFF and port + length <= 0x10000 and 0 <= alignment <= 0xFF):
        raise ValueError(f"bad I/O range {port:#x}+{length}")
    return _small(SMALL_IO, struct.pack("<BHHBB", 1, port, port, alignment, length))


def irq_no_flags(*irqs: int) -> bytes:
    """``IRQNoFlags () {irqs}``: ISA interrupts 0-15, edge-triggered, active high, not shared."""
    if not irqs or any(not 0 <= i < 16 for i in irqs):
        raise ValueError(f"IRQNoFlags takes ISA IRQs 0-15, got {irqs}")
    mask = 0
    for i in irqs:
        mask |= 1 << i
    return _small(SMALL_IRQ, struct.pack("<H", mask))


def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """``Memory32Fixed (ReadWrite, base, length)``."""
    if not (0 <= base < 1 << 32 and 0 < length and base + length <= 1 << 32):
        raise ValueError(f"bad 32-bit memory range {base:#x}+{length:#x}")
    return _large(LARGE_MEMORY32_FIXED, struct.pack("<BII", 1 if writable else 0, base, length))


def interrupt(*gsis: int, level: bool, active_low: bool = False, shared: bool = False) -> bytes:
    """``Interrupt (ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow, Exclusive|Shared) {gsis}``:
    the Extended Interrupt descriptor, which names global system interrupts (on x86, IOAPIC
    inputs) and says how the line signals."""
    if not 1 <= len(gsis) <= 255 or any(not 0 <= g < 1 << 32 for g in gsis):
        raise ValueError(f"Interrupt takes 1-255 32-bit interrupt numbers, got {gsis}")
    flags = 1 | (0 if level else 2) | (4 if active_low else 0) | (8 if shared else 0)   # bit 0: consumer
    return _large(LARGE_EXTENDED_IRQ, struct.pack(f"<BB{len(gsis)}I", flags, len(gsis), *gsis))


def _address_space(kind: int, type_flags: int, lo: int, hi: int, width: int) -> bytes:
    """A Word/DWord/QWord address space descriptor for the fixed window ``[lo, hi]`` that a
    bridge produces (granularity 0, no translation), as iasl encodes it."""
    if not 0 <= lo <= hi < 1 << (8 * width):
        raise ValueError(f"bad {8 * width}-bit window {lo:#x}-{hi:#x}")
    tag, fmt = {2: (LARGE_WORD_ADDRESS, "<5H"), 4: (LARGE_DWORD_ADDRESS, "<5I"), 8: (LARGE_QWORD_ADDRESS, "<5Q")}[width]
    return _large(tag, struct.pack("<BBB", kind, WINDOW_FLAGS, type_flags) + struct.pack(fmt, 0, lo, hi, 0, hi - lo + 1))


def word_bus_number(first: int, last: int) -> bytes:
    """``WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, first, last, 0, n)``."""
    return _address_space(RESOURCE_BUS, 0, first, last, 2)


def word_io(first: int, last: int) -> bytes:
    """``WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, first, last, 0, n)``."""
    return _address_space(RESOURCE_IO, IO_ENTIRE_RANGE, first, last, 2)


def dword_memory(first: int, last: int) -> bytes:
    """``DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
    0, first, last, 0, n)``: a 32-bit MMIO window a bridge forwards."""
    return _address_space(RESOURCE_MEMORY, MEMORY_READ_WRITE, first, last, 4)


def resource_template(*descriptors: bytes) -> bytes:
    """``ResourceTemplate () {descriptors}``: a Buffer of descriptors closed by an End Tag whose
    checksum byte is 0 ("treat as correct"), as iasl writes it."""
    return buffer(b"".join(descriptors) + _small(SMALL_END_TAG, b"\0"))
