"""Linux's x86 "zero page" (``struct boot_params``) and the e820 memory map, as bytes.

A boot loader that enters Linux through the 32-bit or 64-bit boot protocol hands it
one 4 KiB page, ``struct boot_params`` (arch/x86/include/uapi/asm/bootparam.h; the
fields are described in Documentation/arch/x86/zero-page.rst and boot.rst). It holds
a copy of the kernel image's setup header at offset 0x1f1, edited by the loader
(where the command line and the initrd are), and the machine's memory map: up to 128
e820 entries (``struct boot_e820_entry``: u64 addr, u64 size, u32 type), the table a
PC BIOS returns for INT 15h, AX=E820h (ACPI 6.5, section 15.1).

Everything here is pure: numbers in, bytes out. ``kvmpy.loader.bzimage`` validates
the header before it gets here; these functions only check their own arguments.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from . import layout

BOOT_PARAMS_SIZE = 0x1000

# e820 types (ACPI 6.5 table 15.4; Linux's enum e820_type)
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5
E820_MAX_ENTRIES_ZEROPAGE = 128      # room in boot_params.e820_table
E820_ENTRY = struct.Struct("<QQI")   # struct boot_e820_entry, packed: 20 bytes

# Memory that is not RAM on a PC even when the VMM backs it: 0x9FC00-0x9FFFF is where a
# BIOS keeps its extended data area (and kvmpy may put an MP table there), 0xA0000-0xFFFFF
# is the VGA window and the BIOS ROM. Left out of the map, as real firmware and
# Firecracker do, so Linux never allocates from it.
LEGACY_HOLE = layout.LEGACY_HOLE

# --- offsets in struct boot_params (bootparam.h; zero-page.rst) -------------------------
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
BP_HDR = 0x1F1                      # struct setup_header starts here
BP_HDR_MAX_END = 0x290              # edd_mbr_sig_buffer follows the header area
BP_E820_TABLE = 0x2D0

# --- offsets of setup-header fields, counted from the start of the image/boot_params ----
HDR_VID_MODE = 0x1FA
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_CMD_LINE_PTR = 0x228
HDR_HARDWARE_SUBARCH = 0x23C
HDR_SETUP_DATA = 0x250

LOADER_TYPE_UNDEFINED = 0xFF        # boot.rst, type_of_loader: "0xFF: no ID assigned"
VID_MODE_NORMAL = 0xFFFF            # boot.rst, vid_mode: 0xFFFF = "normal"


@dataclass(frozen=True)
class E820Entry:
    """One memory-map range: ``[addr, addr + size)`` of ``type`` (E820_RAM, ...)."""

    addr: int
    size: int
    type: int = E820_RAM

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        return E820_ENTRY.pack(self.addr, self.size, self.type)


def _subtract(ranges: list[tuple[int, int]], hole: tuple[int, int]) -> list[tuple[int, int]]:
    lo, hi = hole
    out = []
    for start, end in ranges:
        if end <= lo or hi <= start:
            out.append((start, end))
            continue
        if start < lo:
            out.append((start, lo))
        if hi < end:
            out.append((hi, end))
    return out


def e820_map(ram, holes=(LEGACY_HOLE,), extra=()) -> list[E820Entry]:
    """The e820 map of a machine whose RAM is the ``(gpa, size)`` ranges in ``ram``.

    RAM becomes E820_RAM entries, sorted and with adjacent ranges merged; the
    ``holes`` (by default the PC's legacy 0x9FC00-0xFFFFF) are cut out. ``extra``
    entries (E820Entry: the ACPI tables' E820_ACPI range, say) are cut out of the RAM
    too and listed in address order. Raises ValueError for empty or overlapping ranges
    or a map too big for the zero page.
    """
    ranges = sorted((int(gpa), int(gpa) + int(size)) for gpa, size in ram)
    for (start, end) in ranges:
        if start < 0 or end <= start or end > 1 << 64:
            raise ValueError(f"bad RAM range {start:#x}..{end:#x}")
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and start < merged[-1][1]:
            raise ValueError(f"RAM ranges overlap at {start:#x}")
        if merged and start == merged[-1][1]:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    extra = sorted(extra, key=lambda e: e.addr)
    for a, b in zip(extra, extra[1:]):
        if b.addr < a.end:
            raise ValueError(f"e820 entries overlap at {b.addr:#x}")
    for hole in (*holes, *((e.addr, e.end) for e in extra)):
        merged = _subtract(merged, hole)
    entries = sorted([E820Entry(start, end - start, E820_RAM) for start, end in merged] + extra,
                     key=lambda e: e.addr)
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(entries)} e820 entries do not fit in the zero page "
                         f"(at most {E820_MAX_ENTRIES_ZEROPAGE})")
    return entries


def boot_params(setup_header: bytes, *, cmd_line_ptr: int, e820: list[E820Entry],
                ramdisk_image: int = 0, ramdisk_size: int = 0, code32_start: int | None = None,
                type_of_loader: int = LOADER_TYPE_UNDEFINED, acpi_rsdp_addr: int = 0) -> bytes:
    """A 4 KiB zero page for the 32-bit/64-bit boot protocols.

    ``setup_header`` is the image's bytes from offset 0x1f1 to the end of its
    header (0x202 + the byte at 0x201); it is copied in place and then edited:
    loader type, the command line pointer, the initrd, ``code32_start`` (where
    the protected-mode kernel was loaded), and the e820 table. Values above
    32 bits go to the ``ext_*`` fields (boot protocol 2.12+). ``acpi_rsdp_addr`` is
    where the ACPI RSDP is (``boot_params.acpi_rsdp_addr``, which Linux 5.0 and later read
    whatever the header's protocol version; 0, or an older kernel: Linux scans the BIOS
    area for it). Everything
    else stays zero: no setup_data chain, hardware_subarch 0 (a normal PC), and sentinel 0
    so Linux trusts the page.
    """
    end = BP_HDR + len(setup_header)
    if not BP_HDR < end <= BP_HDR_MAX_END:
        raise ValueError(f"setup header of {len(setup_header):#x} bytes does not fit at "
                         f"{BP_HDR:#x}..{BP_HDR_MAX_END:#x}")
    if end < HDR_CMD_LINE_PTR + 4:
        raise ValueError("setup header too short to hold cmd_line_ptr (boot protocol < 2.02)")
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(f"{len(e820)} e820 entries do not fit (at most {E820_MAX_ENTRIES_ZEROPAGE})")
    for name, value in (("cmd_line_ptr", cmd_line_ptr), ("ramdisk_image", ramdisk_image),
                        ("ramdisk_size", ramdisk_size), ("acpi_rsdp_addr", acpi_rsdp_addr)):
        if not 0 <= value < 1 << 64:
            raise ValueError(f"{name}={value:#x} is not a 64-bit value")
    bp = bytearray(BOOT_PARAMS_SIZE)
    bp[BP_HDR:end] = setup_header
    bp[HDR_TYPE_OF_LOADER] = type_of_loader
    struct.pack_into("<H", bp, HDR_VID_MODE, VID_MODE_NORMAL)
    if code32_start is not None:
        struct.pack_into("<I", bp, HDR_CODE32_START, code32_start)
    struct.pack_into("<I", bp, HDR_CMD_LINE_PTR, cmd_line_ptr & 0xFFFF_FFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, cmd_line_ptr >> 32)
    struct.pack_into("<I", bp, HDR_RAMDISK_IMAGE, ramdisk_image & 0xFFFF_FFFF)
    struct.pack_into("<I", bp, BP_EXT_RAMDISK_IMAGE, ramdisk_image >> 32)
    struct.pack_into("<I", bp, HDR_RAMDISK_SIZE, ramdisk_size & 0xFFFF_FFFF)
    struct.pack_into("<I", bp, BP_EXT_RAMDISK_SIZE, ramdisk_size >> 32)
    if end >= HDR_HARDWARE_SUBARCH + 4:
        struct.pack_into("<I", bp, HDR_HARDWARE_SUBARCH, 0)
    if end >= HDR_SETUP_DATA + 8:
        struct.pack_into("<Q", bp, HDR_SETUP_DATA, 0)
    struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, acpi_rsdp_addr)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        bp[BP_E820_TABLE + i * E820_ENTRY.size:BP_E820_TABLE + (i + 1) * E820_ENTRY.size] = entry.pack()
    return bytes(bp)
