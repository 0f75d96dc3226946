"""Linux bzImage: the x86 boot protocol's setup header, and loading the protected-mode kernel.

A bzImage (Documentation/arch/x86/boot.rst) is a small real-mode program ("setup",
``setup_sects`` 512-byte sectors after the boot sector) followed by the
protected-mode kernel: a decompressor carrying the compressed vmlinux as its
payload. The *setup header* lives at offset 0x1f1 of the file and is the contract
between the kernel and its boot loader: magic "HdrS" at 0x202, protocol version at
0x206, load flags, where the initrd may go (``initrd_addr_max``), how long the
command line may be (``cmdline_size``), whether the kernel is relocatable and to
what alignment, where it prefers to run (``pref_address``) and how much memory it
needs there before it can read the memory map (``init_size``).

kvmpy skips the real-mode setup and uses the 32-bit or 64-bit boot protocol
(boot.rst, "32-bit boot protocol" / "64-bit boot protocol"): copy the
protected-mode kernel to its load address, build the zero page
(:mod:`kvmpy.x86.bootparams`), and enter at the load address (32-bit, paging off,
ESI = zero page) or at load address + 0x200 (64-bit, identity-mapped paging,
RSI = zero page). Both need protocol 2.06 or newer here (``cmdline_size``); the
64-bit entry needs 2.12 (``xloadflags`` bit XLF_KERNEL_64).

The file is hostile: every field is range-checked before use, and a header that
does not add up raises :class:`~kvmpy.errors.LoaderError` naming the field.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import LoaderError

SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55                  # at 0x1fe, the boot sector signature
HDRS_MAGIC = b"HdrS"                # at 0x202
MIN_VERSION = 0x0206                # first protocol with cmdline_size
VERSION_PREF_ADDRESS = 0x020A       # pref_address and init_size
VERSION_XLOADFLAGS = 0x020C
DEFAULT_SETUP_SECTS = 4             # "if setup_sects is 0, the real value is 4"
SECTOR = 512
ENTRY64_OFFSET = 0x200              # the 64-bit entry point, relative to the load address

LOADED_HIGH = 1 << 0                # loadflags: protected-mode code loaded at 0x100000 (bzImage)
XLF_KERNEL_64 = 1 << 0              # xloadflags: has the 64-bit entry at +0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
LEGACY_LOAD_ADDRESS = 0x10_0000     # where a non-relocatable (pre-2.10) bzImage is loaded

# The last header field each protocol version adds (offset, size), so that a header
# claiming a version is long enough to hold what that version defines.
_VERSION_HEADER_END = ((0x020F, 0x26C), (0x020B, 0x268), (0x020A, 0x264), (0x0209, 0x258),
                       (0x0208, 0x250), (0x0207, 0x248), (0x0206, 0x23C))

# Compressed-payload magics (the formats arch/x86/boot/compressed can be built with).
PAYLOAD_MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x89LZO", "lzo"),
    (b"\x02\x21\x4c\x18", "lz4"),     # LZ4 legacy frame (lz4 -l)
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage setup header that a 32/64-bit loader uses."""

    version: int
    setup_sects: int                # real-mode setup sectors (0 already turned into 4)
    syssize: int                    # protected-mode code size in 16-byte paragraphs
    loadflags: int
    code32_start: int
    initrd_addr_max: int            # highest address the initrd may occupy (inclusive)
    kernel_alignment: int
    relocatable_kernel: bool
    xloadflags: int
    cmdline_size: int               # longest command line, without its NUL
    payload_offset: int             # from the start of the protected-mode code (2.08+), else 0
    payload_length: int
    pref_address: int
    init_size: int                  # bytes the kernel needs from its runtime start (2.10+), else 0
    header: bytes                   # the raw header, 0x1f1 up to its end, to copy into the zero page

    @property
    def kernel_offset(self) -> int:
        """File offset of the protected-mode kernel."""
        return (self.setup_sects + 1) * SECTOR

    @property
    def kernel_size(self) -> int:
        return self.syssize * 16

    @property
    def has_entry64(self) -> bool:
        return bool(self.xloadflags & XLF_KERNEL_64)


def _u(buf, fmt: str, off: int) -> int:
    return struct.unpack_from(fmt, buf, off)[0]


def parse_setup_header(data) -> SetupHeader:
    """Validate and decode the setup header of bzImage ``data``; see the module docstring."""
    buf = memoryview(data).cast("B")
    size = len(buf)
    if size < 0x206:
        raise LoaderError(f"file too short for a Linux setup header (size {size:#x}, need at least 0x206)")
    if bytes(buf[0x202:0x206]) != HDRS_MAGIC:
        raise LoaderError(f"no Linux boot header: magic at 0x202 is {bytes(buf[0x202:0x206])!r}, "
                          f"expected {HDRS_MAGIC!r} (not a bzImage)")
    if size < 0x208:
        raise LoaderError(f"file too short for the boot protocol version (size {size:#x})")
    version = _u(buf, "<H", 0x206)
    if version < MIN_VERSION:
        raise LoaderError(f"boot protocol {version >> 8}.{version & 0xFF:02d} is too old: kvmpy needs "
                          f"{MIN_VERSION >> 8}.{MIN_VERSION & 0xFF:02d} or newer (Linux 2.6.22+)")
    boot_flag = _u(buf, "<H", 0x1FE)
    if boot_flag != BOOT_FLAG:
        raise LoaderError(f"bad boot_flag {boot_flag:#06x} at 0x1fe, expected {BOOT_FLAG:#06x}")
    header_end = 0x202 + buf[0x201]
    need = next(end for v, end in _VERSION_HEADER_END if version >= v)
    if not need <= header_end <= 0x290:
        raise LoaderError(f"setup header ends at {header_end:#x} (0x202 + byte at 0x201), but protocol "
                          f"{version >> 8}.{version & 0xFF:02d} needs it to reach {need:#x} and it must not "
                          "pass 0x290")
    if size < header_end:
        raise LoaderError(f"file too short for its setup header (size {size:#x}, header ends at {header_end:#x})")
    loadflags = buf[0x211]
    if not loadflags & LOADED_HIGH:
        raise LoaderError("loadflags bit LOADED_HIGH is clear: a zImage (loaded at 0x10000) is not supported")
    setup_sects = buf[0x1F1] or DEFAULT_SETUP_SECTS
    syssize = _u(buf, "<I", 0x1F4)
    has = version >= VERSION_PREF_ADDRESS
    hdr = SetupHeader(
        version=version, setup_sects=setup_sects, syssize=syssize, loadflags=loadflags,
        code32_start=_u(buf, "<I", 0x214), initrd_addr_max=_u(buf, "<I", 0x22C),
        kernel_alignment=_u(buf, "<I", 0x230), relocatable_kernel=bool(buf[0x234]),
        xloadflags=_u(buf, "<H", 0x236) if version >= VERSION_XLOADFLAGS else 0,
        cmdline_size=_u(buf, "<I", 0x238),
        payload_offset=_u(buf, "<I", 0x248) if version >= 0x0208 else 0,
        payload_length=_u(buf, "<I", 0x24C) if version >= 0x0208 else 0,
        pref_address=_u(buf, "<Q", 0x258) if has else LEGACY_LOAD_ADDRESS,
        init_size=_u(buf, "<I", 0x260) if has else 0,
        header=bytes(buf[SETUP_HEADER_OFFSET:header_end]))
    _check(hdr, size)
    return hdr


def _check(h: SetupHeader, size: int) -> None:
    """Cross-field checks: the kernel is in the file, alignment is sane, addresses fit."""
    if h.kernel_offset >= size:
        raise LoaderError(f"truncated bzImage: setup_sects={h.setup_sects} puts the protected-mode kernel at "
                          f"{h.kernel_offset:#x}, past the end of the file (size {size:#x})")
    if h.syssize == 0:
        raise LoaderError("syssize is 0: the image has no protected-mode kernel")
    if h.kernel_offset + h.kernel_size > size:
        raise LoaderError(f"truncated bzImage: syssize={h.syssize:#x} paragraphs ({h.kernel_size:#x} bytes) from "
                          f"{h.kernel_offset:#x} runs past the end of the file (size {size:#x})")
    if h.relocatable_kernel and (h.kernel_alignment == 0 or h.kernel_alignment & (h.kernel_alignment - 1)):
        raise LoaderError(f"kernel_alignment={h.kernel_alignment:#x} is not a power of two")
    if h.kernel_alignment > 1 << 30:
        raise LoaderError(f"kernel_alignment={h.kernel_alignment:#x} is larger than 1 GiB")
    if h.pref_address % 4096 or h.pref_address >= 1 << 32:
        raise LoaderError(f"pref_address={h.pref_address:#x} is not a page-aligned address below 4 GiB")
    if h.cmdline_size == 0:
        raise LoaderError("cmdline_size is 0: the kernel takes no command line")
    if h.payload_length and h.payload_offset + h.payload_length > h.kernel_size:
        raise LoaderError(f"payload (offset {h.payload_offset:#x}, length {h.payload_length:#x}) runs past the "
                          f"protected-mode kernel ({h.kernel_size:#x} bytes)")


def runtime_start(h: SetupHeader, load_addr: int) -> int:
    """Where the kernel runs after loading at ``load_addr`` (boot.rst, "init_size")."""
    if not h.relocatable_kernel:
        return h.pref_address
    start = max(load_addr, h.pref_address)
    return (start + h.kernel_alignment - 1) & ~(h.kernel_alignment - 1)


def load_address(h: SetupHeader) -> int:
    """Where kvmpy loads the protected-mode kernel: its preferred address, aligned.

    A relocatable kernel loaded lower still runs at ``pref_address`` or above
    (see :func:`runtime_start`), so loading lower would save nothing.
    """
    return runtime_start(h, h.pref_address)


def kernel_extent(h: SetupHeader, load_addr: int) -> tuple[int, int]:
    """``(start, end)`` of guest memory the kernel uses before it reads the e820 map."""
    end = max(load_addr + h.kernel_size, runtime_start(h, load_addr) + h.init_size)
    return load_addr, end


def kernel_code(data, h: SetupHeader) -> memoryview:
    """The protected-mode kernel: the bytes a 32/64-bit loader copies to the load address."""
    return memoryview(data).cast("B")[h.kernel_offset:h.kernel_offset + h.kernel_size]


def payload(data, h: SetupHeader | None = None) -> tuple[str, memoryview]:
    """The compressed vmlinux inside a bzImage: (format name, bytes).

    The format is named by the payload's magic: one of "gzip", "bzip2", "lzma",
    "xz", "lzo", "lz4", "zstd". Needs protocol 2.08 (payload_offset/length).
    """
    h = parse_setup_header(data) if h is None else h
    if h.version < 0x0208 or h.payload_length == 0:
        raise LoaderError("no payload information (boot protocol 2.08+ with payload_length > 0 needed)")
    blob = kernel_code(data, h)[h.payload_offset:h.payload_offset + h.payload_length]
    for magic, name in PAYLOAD_MAGICS:
        if bytes(blob[:len(magic)]) == magic:
            return name, blob
    raise LoaderError(f"unknown payload compression: magic {bytes(blob[:6]).hex()}")
