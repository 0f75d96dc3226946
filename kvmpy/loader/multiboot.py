"""Multiboot (version 1) kernels, loaded the way QEMU's ``-kernel`` loads them.

Spec: The Multiboot Specification, version 0.6.96
(https://www.gnu.org/software/grub/manual/multiboot/multiboot.html). Reference
implementation matched here: QEMU's ``hw/i386/multiboot.c`` plus the option ROM
``pc-bios/optionrom/multiboot.S`` that fills in the memory fields at boot.

**The header.** A multiboot kernel carries a 32-bit aligned header inside its first
8192 bytes: ``magic`` 0x1BADB002, ``flags``, ``checksum`` with magic + flags +
checksum == 0 mod 2^32. A candidate with the magic but a bad checksum is not a header
(the search goes on, as in QEMU). Flags bits 0-15 are requests the loader must honour:
bit 0 (page-align modules) and bit 1 (memory information) are always honoured; bit 2
(a video mode) is ignored and no video information is passed, as QEMU does ("multiboot
knows VBE. we don't."); so are the undefined bits 3-15 (QEMU ignores them too). Bit 16
says the header also holds the *a.out kludge* address fields (``header_addr``,
``load_addr``, ``load_end_addr``, ``bss_end_addr``, ``entry_addr``): then the file
from offset ``offset - (header_addr - load_addr)`` is copied to ``load_addr``, up to
``load_end_addr`` (0: the end of the file), zeroes follow up to ``bss_end_addr`` (0: no
bss) and the kernel starts at ``entry_addr``. Without bit 16 the file must be an ELF32
image (loaded by :mod:`.elf`); like QEMU, an ``e_entry`` that is a virtual address
inside an executable segment whose ``p_vaddr != p_paddr`` is translated to physical.

**Entry.** 32-bit protected mode, flat segments, paging off, interrupts off,
``EAX = 0x2BADB002``, ``EBX`` = guest-physical address of the information structure
(returned as ``LoadedImage.registers``); ESP is undefined, the kernel sets its own.
The spec asks only CR0.PE set and CR0.PG clear; QEMU's option ROM enters with
``mov $1, %eax; mov %eax, %cr0`` (CR0 = PE|ET = 0x11, ET being hardwired) and CR4 = 0,
so that is what a multiboot kernel gets here too (``LoadedImage.control_registers``):
caching on (CD and NW clear), no MP, NE or SSE bits it did not ask for.

**Where things go.** QEMU copies the kernel to its load address, puts the module list
and the strings right after it, then the modules, each page-aligned; it builds the
memory map at 0x9000 and the structure at 0x9500, in low memory. Its map does not say
any of that is in use: a kernel that frees memory by the map, before it has copied what
it needs, can overwrite its own boot information. kvmpy keeps QEMU's places and makes
the map honest:

* the kernel at its load address, bss zeroed, ending at ``kernel_end``; anywhere in RAM
  below 4 GiB clear of ``reserved`` (``kvmpy.loader.load`` reserves the PC's legacy hole
  0x9FC00-0xFFFFF, so a kernel linked at 0x8000 loads, as under QEMU);
* the VMM's boot GDT and TSS at their homes, or moved clear of the kernel
  (``x86.boottables.place``);
* the modules, each at the next free page after the kernel (and the module before it);
* the information block, at the first free page of low memory (0x500-0x9FC00; past
  1 MiB only if none is left): the 88-byte structure, the module list (16 bytes per
  module), the memory map (24 bytes per entry, room for as many as it can have), then
  the strings: each module's, the kernel's command line, the boot loader name "kvmpy".

Nothing the loader places overlaps the kernel, another placed range, ``reserved``, or
the legacy hole (by pages), and all of it is below 4 GiB (the structure holds 32-bit
addresses). The memory map marks the pages of the GDT, the TSS, the information block
and every module reserved (type 2).

**The information.** ``flags`` = MEMORY | BOOTDEV | CMDLINE | MODS | MEM_MAP |
BOOT_LOADER_NAME (0x24F, what QEMU sets). ``cmdline`` is ``f"{image_name} {cmdline}"``
(QEMU passes the kernel file name, a space, then ``-append``). ``boot_device`` is
0x8000FFFF (first BIOS disk, no partition; QEMU's value). The memory map is built
from the RAM regions with the low-memory holes SeaBIOS reports under QEMU:
0x9FC00-0xA0000 (EBDA) and 0xF0000-0x100000 (BIOS) reserved, 0xA0000-0xF0000 (VGA
and option ROMs) absent, and then what kvmpy wrote reserved (above). ``mem_lower`` /
``mem_upper`` are derived from the map of RAM alone (before kvmpy's ranges are marked)
the way QEMU's option ROM and a BIOS's INT 12h do: KiB of available RAM from 0 (capped
at 640 KiB: 639 with the EBDA hole), and KiB of available RAM contiguous from 1 MiB
below 4 GiB. They describe the machine, not what is free in it; the map says that.

API::

    find_header(data) -> MultibootHeader | None
    is_multiboot(data) -> bool
    load_multiboot(mem, data, *, cmdline="", modules=(), reserved=(), image_name="kernel")
        -> LoadedImage(entry, "protected", "multiboot", segments,
                       registers=(("rax", 0x2BADB002), ("rbx", info_gpa)),
                       control_registers=(("cr0", 0x11), ("cr4", 0)))
    memory_map(mem, reserved=()) -> [(base, length, type)]

``modules`` is a sequence of ``(bytes, string)``; the string is written verbatim (QEMU
writes the ``-initrd`` entry, i.e. ``"FILE ARGS"``, or just ``"FILE"``:
:func:`module_string` builds that form). ``segments`` lists the kernel's ranges, then
the information block, then each non-empty module. Every failure is a
:class:`~kvmpy.errors.LoaderError` naming the problem, raised before guest memory
is written.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from itertools import accumulate
from dataclasses import dataclass

from ..errors import LoaderError
from ..x86 import boottables, layout
from ..x86.layout import PAGE
from . import elf
from .image import LoadedImage, check_placement

MULTIBOOT_HEADER_MAGIC = 0x1BADB002       # in the kernel's header
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002   # in EAX at entry
MULTIBOOT_SEARCH = 8192                   # the header lies entirely in the first 8 KiB ...
MULTIBOOT_HEADER_ALIGN = 4                # ... at a 32-bit aligned offset

# Header flags (names from the spec's multiboot.h).
MULTIBOOT_PAGE_ALIGN = 1 << 0
MULTIBOOT_MEMORY_INFO = 1 << 1
MULTIBOOT_VIDEO_MODE = 1 << 2
MULTIBOOT_AOUT_KLUDGE = 1 << 16

# Information structure flags.
MULTIBOOT_INFO_MEMORY = 1 << 0
MULTIBOOT_INFO_BOOTDEV = 1 << 1
MULTIBOOT_INFO_CMDLINE = 1 << 2
MULTIBOOT_INFO_MODS = 1 << 3
MULTIBOOT_INFO_AOUT_SYMS = 1 << 4
MULTIBOOT_INFO_ELF_SHDR = 1 << 5
MULTIBOOT_INFO_MEM_MAP = 1 << 6
MULTIBOOT_INFO_DRIVE_INFO = 1 << 7
MULTIBOOT_INFO_CONFIG_TABLE = 1 << 8
MULTIBOOT_INFO_BOOT_LOADER_NAME = 1 << 9
MULTIBOOT_INFO_APM_TABLE = 1 << 10
MULTIBOOT_INFO_VBE_INFO = 1 << 11
#: What load_multiboot provides: the same set as QEMU.
INFO_FLAGS = (MULTIBOOT_INFO_MEMORY | MULTIBOOT_INFO_BOOTDEV | MULTIBOOT_INFO_CMDLINE
              | MULTIBOOT_INFO_MODS | MULTIBOOT_INFO_MEM_MAP | MULTIBOOT_INFO_BOOT_LOADER_NAME)

# Memory map entry types.
MULTIBOOT_MEMORY_AVAILABLE = 1
MULTIBOOT_MEMORY_RESERVED = 2

#: CR0 and CR4 at entry: what QEMU's multiboot option ROM leaves (see the module docstring):
#: CR0.PE (bit 0) and CR0.ET (bit 4, hardwired to 1), nothing else.
ENTRY_CONTROL_REGISTERS = (("cr0", 1 << 0 | 1 << 4), ("cr4", 0))

BOOT_DEVICE = 0x8000FFFF        # BIOS drive 0x80, no partition: what QEMU reports
BOOT_LOADER_NAME = "kvmpy"
_4GiB = 1 << 32

# Header: magic, flags, checksum; then the address fields; then the video fields.
_HDR = struct.Struct("<3I")
_ADDR = struct.Struct("<5I")          # header_addr load_addr load_end_addr bss_end_addr entry_addr
_VIDEO = struct.Struct("<4I")         # mode_type width height depth
_ADDR_END = _HDR.size + _ADDR.size    # 32: bytes the header needs with flags bit 16
_VIDEO_END = _ADDR_END + _VIDEO.size  # 48

#: The information structure of spec 0.6.96 (88 bytes), field by field.
INFO_FIELDS = ("flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count",
               "mods_addr", "syms", "mmap_length", "mmap_addr", "drives_length", "drives_addr",
               "config_table", "boot_loader_name", "apm_table", "vbe_control_info",
               "vbe_mode_info", "vbe_mode", "vbe_interface_seg", "vbe_interface_off",
               "vbe_interface_len")
INFO = struct.Struct("<7I16s9I4H")
MODULE = struct.Struct("<4I")         # mod_start, mod_end (exclusive), string, reserved
MMAP_ENTRY = struct.Struct("<IQQI")   # size (20: the bytes after it), base_addr, length, type

#: Low-memory holes of a PC under QEMU + SeaBIOS: (start, end, type or None = not listed).
LOW_MEMORY_HOLES = ((0x9FC00, 0xA0000, MULTIBOOT_MEMORY_RESERVED),    # EBDA
                    (0xA0000, 0xF0000, None),                         # VGA window, option ROMs
                    (0xF0000, 0x100000, MULTIBOOT_MEMORY_RESERVED))   # system BIOS
_MODULE_WINDOW = ((layout.IVT_BDA[1], _4GiB),)   # modules: anywhere in RAM below 4 GiB
_LOWER_LIMIT = 0xA0000                # mem_lower is at most 640 KiB
_UPPER_START = 0x100000               # mem_upper counts from 1 MiB

_E_ENTRY32 = 24                       # offset of e_entry in an ELF32 header
_PF_X = 1


@dataclass(frozen=True)
class MultibootHeader:
    """A multiboot header found at file ``offset``; address/video fields None if absent."""

    offset: int
    flags: int
    checksum: int
    header_addr: int | None = None
    load_addr: int | None = None
    load_end_addr: int | None = None
    bss_end_addr: int | None = None
    entry_addr: int | None = None
    mode_type: int | None = None
    width: int | None = None
    height: int | None = None
    depth: int | None = None

    @property
    def aout_kludge(self) -> bool:
        """Flags bit 16: the address fields say where to load the file."""
        return bool(self.flags & MULTIBOOT_AOUT_KLUDGE)


def _align(n: int, a: int = PAGE) -> int:
    return (n + a - 1) & -a


def _scan(buf: memoryview):
    """(first valid header or None, [(offset, flags, checksum) of bad-checksum candidates])."""
    window = bytes(buf[:MULTIBOOT_SEARCH])
    magic = _HDR.pack(MULTIBOOT_HEADER_MAGIC, 0, 0)[:4]
    bad = []
    pos = window.find(magic)
    while pos >= 0 and pos + _HDR.size <= len(window):
        if pos % MULTIBOOT_HEADER_ALIGN == 0:
            _, flags, checksum = _HDR.unpack_from(window, pos)
            if (MULTIBOOT_HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF == 0:
                return _parse(window, pos, flags, checksum), bad
            bad.append((pos, flags, checksum))
        pos = window.find(magic, pos + 1)
    return None, bad


def _parse(window: bytes, off: int, flags: int, checksum: int) -> MultibootHeader:
    fields = {}
    if flags & MULTIBOOT_AOUT_KLUDGE:
        if off + _ADDR_END > len(window):
            where = "the first 8 KiB" if len(window) == MULTIBOOT_SEARCH else "the file"
            raise LoaderError(f"multiboot header at file offset {off:#x} sets flags bit 16 (address "
                              f"fields) but {where} ends {len(window) - off} bytes after it; the "
                              f"header with address fields is {_ADDR_END} bytes (truncated header)")
        fields.update(zip(("header_addr", "load_addr", "load_end_addr", "bss_end_addr", "entry_addr"),
                          _ADDR.unpack_from(window, off + _HDR.size)))
    if flags & MULTIBOOT_VIDEO_MODE and off + _VIDEO_END <= len(window):
        fields.update(zip(("mode_type", "width", "height", "depth"),
                          _VIDEO.unpack_from(window, off + _ADDR_END)))
    return MultibootHeader(off, flags, checksum, **fields)


def find_header(data) -> MultibootHeader | None:
    """The first valid multiboot header in the first 8 KiB of ``data``, or None.

    Raises LoaderError if that header sets flags bit 16 but its address fields are
    cut off by the end of the file or of the 8 KiB window.
    """
    return _scan(memoryview(data).cast("B"))[0]


def is_multiboot(data) -> bool:
    """True if ``data`` has a multiboot header (valid checksum) in its first 8 KiB."""
    try:
        return find_header(data) is not None
    except LoaderError:
        return True             # a header, just a broken one: loading it says why


def _no_header(buf: memoryview, bad) -> LoaderError:
    if bad:
        off, flags, checksum = bad[0]
        total = (MULTIBOOT_HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF
        more = f" (and {len(bad) - 1} more such candidates)" if len(bad) > 1 else ""
        return LoaderError(f"no valid multiboot header: the magic {MULTIBOOT_HEADER_MAGIC:#x} at file "
                           f"offset {off:#x} has a bad checksum {checksum:#x} (magic + flags {flags:#x} "
                           f"+ checksum = {total:#x} mod 2^32, must be 0){more}")
    if len(buf) < _HDR.size:
        return LoaderError(f"file too short for a multiboot header (size {len(buf):#x}, need {_HDR.size:#x})")
    return LoaderError(f"no multiboot header (magic {MULTIBOOT_HEADER_MAGIC:#x} at a 4-byte aligned "
                       f"offset) in the first 8 KiB of the file (size {len(buf):#x})")


# --- the kernel --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Kernel:
    entry: int
    end: int                                   # one past the kernel's last byte, bss included
    segments: tuple[tuple[int, int], ...]
    write: Callable[[object], None]            # write(mem): put the kernel in RAM


def _plan_aout(buf: memoryview, h: MultibootHeader, mem, reserved) -> _Kernel:
    """The a.out kludge, with QEMU's consistency checks (and a few more)."""
    if h.header_addr < h.load_addr:
        raise LoaderError(f"invalid load_addr {h.load_addr:#x}: above header_addr {h.header_addr:#x} "
                          "(the header must lie at or after the load start)")
    if h.header_addr - h.load_addr > h.offset:
        raise LoaderError(f"invalid header_addr {h.header_addr:#x}: {h.header_addr - h.load_addr:#x} bytes "
                          f"after load_addr {h.load_addr:#x}, but the header is only {h.offset:#x} bytes "
                          "into the file (the load would start before the file)")
    text_offset = h.offset - (h.header_addr - h.load_addr)
    if h.load_end_addr:
        if h.load_end_addr < h.load_addr:
            raise LoaderError(f"invalid load_end_addr {h.load_end_addr:#x}: below load_addr {h.load_addr:#x}")
        load_size = h.load_end_addr - h.load_addr
        if text_offset + load_size > len(buf):
            raise LoaderError(f"load_addr..load_end_addr ({h.load_addr:#x}..{h.load_end_addr:#x}) asks for "
                              f"{load_size:#x} bytes from file offset {text_offset:#x}, past the end of "
                              f"the file (size {len(buf):#x}; truncated file?)")
    else:
        load_size = len(buf) - text_offset          # 0 means: the rest of the file
    if h.load_addr + load_size > _4GiB:
        raise LoaderError(f"kernel at load_addr {h.load_addr:#x} with {load_size:#x} bytes does not fit "
                          "in the 32-bit address space")
    if h.bss_end_addr:
        if h.bss_end_addr < h.load_addr + load_size:
            raise LoaderError(f"invalid bss_end_addr {h.bss_end_addr:#x}: before the end of the loaded "
                              f"image {h.load_addr + load_size:#x}")
        kernel_size = h.bss_end_addr - h.load_addr
    else:
        kernel_size = load_size
    if not h.load_addr <= h.entry_addr < h.load_addr + load_size:
        raise LoaderError(f"entry_addr {h.entry_addr:#x} is outside the loaded image "
                          f"{h.load_addr:#x}..{h.load_addr + load_size:#x}")
    check_placement(mem, h.load_addr, kernel_size, reserved, "multiboot kernel")
    load_addr, data = h.load_addr, buf[text_offset:text_offset + load_size]

    def write(m):
        m.write(load_addr, data)
        if kernel_size > load_size:
            m.fill(load_addr + load_size, kernel_size - load_size)
    return _Kernel(h.entry_addr, load_addr + kernel_size, ((load_addr, kernel_size),), write)


def _plan_elf(buf: memoryview, mem, reserved) -> _Kernel:
    """An ELF32 kernel: validate with the ELF loader's checks, then let load_elf place it."""
    if bytes(buf[:4]) != elf.ELFMAG:
        raise LoaderError("the multiboot header has no address fields (flags bit 16 clear), so the "
                          f"kernel must be an ELF file, but it starts with {bytes(buf[:4]).hex()}, "
                          f"not {elf.ELFMAG.hex()} (set bit 16 and the a.out kludge fields for a flat binary)")
    cls, eh = elf.read_header(buf)
    if cls.bits != 32:
        raise LoaderError(f"{cls.name} multiboot kernel: multiboot v1 enters in 32-bit protected mode and "
                          "needs an ELF32 (EM_386) image (QEMU refuses 64-bit ones too)")
    loads = [(i, ph) for i, ph in enumerate(elf.program_headers(buf, cls, eh)) if ph.p_type == elf.PT_LOAD]
    for i, ph in loads:
        elf.check_segment(i, ph, cls, len(buf))
        if ph.p_memsz:
            check_placement(mem, ph.p_paddr, ph.p_memsz, reserved, f"segment {i}")
    placed = [ph for _, ph in loads if ph.p_memsz]
    if not placed:
        raise LoaderError("no loadable segment (no PT_LOAD program header with p_memsz > 0)")
    entry = eh.e_entry
    for _, ph in loads:     # QEMU (elf_ops.h): a virtual e_entry in an X segment -> its physical address
        if (ph.p_flags & _PF_X and ph.p_vaddr != ph.p_paddr
                and ph.p_vaddr <= eh.e_entry < ph.p_vaddr + ph.p_filesz):
            entry = eh.e_entry - ph.p_vaddr + ph.p_paddr
    data = buf
    if entry != eh.e_entry:     # hand load_elf the physical entry it checks against p_paddr
        patched = bytearray(buf)
        struct.pack_into("<I", patched, _E_ENTRY32, entry)
        data = patched

    def write(m):
        elf.load_elf(m, data, mode="protected", reserved=reserved)
    return _Kernel(entry, max(ph.p_paddr + ph.p_memsz for ph in placed),
                   tuple((ph.p_paddr, ph.p_memsz) for ph in placed), write)


# --- the information structure -------------------------------------------------------------
def memory_map(mem, reserved=()) -> list[tuple[int, int, int]]:
    """``(base, length, type)`` for each RAM region, minus the PC's low-memory holes, with each
    ``(start, end)`` of ``reserved`` that lies in available RAM marked reserved (type 2)."""
    out: list[tuple[int, int, int]] = []

    def add(base, end, kind):
        if base >= end:
            return
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == base:
            out[-1] = (out[-1][0], end - out[-1][0], kind)
        else:
            out.append((base, end - base, kind))

    for r in mem.regions:
        ram = MULTIBOOT_MEMORY_RESERVED if r.readonly else MULTIBOOT_MEMORY_AVAILABLE
        pos = r.gpa
        for start, end, kind in _holes(reserved):
            if end <= pos:
                continue
            if start >= r.end:
                break
            add(pos, start, ram)
            if kind is not None:
                add(max(start, pos), min(end, r.end), kind if ram == MULTIBOOT_MEMORY_AVAILABLE else ram)
            pos = min(end, r.end)
        add(pos, r.end, ram)
    return out


def _holes(reserved) -> list[tuple[int, int, int | None]]:
    """The PC's low-memory holes and the ``reserved`` ranges outside them, sorted, none overlapping."""
    holes = list(LOW_MEMORY_HOLES)
    for start, end in sorted(reserved):
        for h_start, h_end, _ in LOW_MEMORY_HOLES:      # a hole stays what it is
            if start < h_end and h_start < end:
                if start < h_start:
                    holes.append((start, h_start, MULTIBOOT_MEMORY_RESERVED))
                start = max(start, h_end)
        if start < end:
            holes.append((start, end, MULTIBOOT_MEMORY_RESERVED))
    holes.sort()
    merged: list[tuple[int, int, int | None]] = []
    for start, end, kind in holes:                   # reserved ranges may touch or overlap each other
        if merged and merged[-1][2] == kind and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]), kind)
        else:
            merged.append((start, end, kind))
    return merged


def _mem_lower_upper(mmap) -> tuple[int, int]:
    """KiB available from 0 (at most 640) and contiguous from 1 MiB below 4 GiB, as QEMU's ROM."""
    def reach(start: int, limit: int) -> int:
        end, grew = start, True
        while grew:
            grew = False
            for base, length, kind in mmap:
                if kind == MULTIBOOT_MEMORY_AVAILABLE and base <= end < min(base + length, limit):
                    end, grew = min(base + length, limit), True
        return end
    return min(reach(0, _4GiB), _LOWER_LIMIT) >> 10, (reach(_UPPER_START, _4GiB) - _UPPER_START) >> 10


def _cstring(s: str, what: str) -> bytes:
    try:
        b = s.encode()
    except UnicodeEncodeError as e:
        raise LoaderError(f"{what} cannot be encoded as UTF-8: {e}") from None
    if b"\0" in b:
        raise LoaderError(f"{what} contains a NUL byte; multiboot strings are NUL-terminated")
    return b + b"\0"


def module_string(path: str, args: str = "") -> str:
    """A module's string in QEMU's form: ``"FILE ARGS"``, or ``"FILE"`` without arguments."""
    return f"{path} {args}" if args else path


def load_multiboot(mem, data, *, cmdline: str = "", modules=(), reserved=(),
                   image_name: str = "kernel") -> LoadedImage:
    """Load multiboot kernel ``data`` and its ``modules`` into ``mem``; see the module docstring."""
    buf = memoryview(data).cast("B")
    reserved = tuple(reserved)
    header, bad = _scan(buf)
    if header is None:
        raise _no_header(buf, bad)
    modules = [(memoryview(m).cast("B"), s) for m, s in modules]
    mod_strings = [_cstring(s, f"module {k} string") for k, (_, s) in enumerate(modules)]
    kernel_cmdline = _cstring(f"{image_name} {cmdline}", "command line")
    loader_name = _cstring(BOOT_LOADER_NAME, "boot loader name")

    kernel = (_plan_aout(buf, header, mem, reserved) if header.aout_kludge
              else _plan_elf(buf, mem, reserved))

    # The VMM's GDT and TSS, clear of the kernel; then what this loader writes, clear of
    # both, of the reserved ranges and of the holes the memory map leaves out (all by pages).
    ram = [(r.gpa, r.end) for r in mem.regions]
    kernel_ranges = [(gpa, gpa + size) for gpa, size in kernel.segments]
    try:
        tables = boottables.place("protected", mem.end, ram, kernel_ranges)
    except ValueError as e:
        raise LoaderError(str(e)) from None
    taken = boottables.pages([*kernel_ranges, *reserved, *tables.ranges("protected", mem.end),
                              layout.LEGACY_HOLE])
    placed = _place_modules(modules, ram, taken, kernel.end)
    taken += boottables.pages((gpa, gpa + len(mod)) for gpa, mod in placed)

    # The information block, in low memory: structure, module list, memory map, strings. The map
    # marks the tables, the block and the modules reserved; each splits an entry at most in three.
    slots = len(memory_map(mem)) + 2 * (2 + 1 + len(placed))
    strings = b"".join(mod_strings) + kernel_cmdline + loader_name
    info_size = INFO.size + MODULE.size * len(modules) + MMAP_ENTRY.size * slots + len(strings)
    info = boottables.first_fit(info_size, ram, taken)
    if info is None:
        raise LoaderError(f"the multiboot information ({info_size:#x} bytes) does not fit in guest RAM "
                          "below 4 GiB clear of the kernel, its modules and the boot tables")
    mmap = memory_map(mem, boottables.pages([*tables.ranges("protected", mem.end), (info, info + info_size),
                                             *((gpa, gpa + len(mod)) for gpa, mod in placed)]))
    blob = _information(mem, info, slots, mmap, placed, mod_strings, kernel_cmdline, loader_name)
    assert len(blob) == info_size

    # Everything validated: only now touch guest memory.
    kernel.write(mem)
    mem.write(info, blob)
    for gpa, mod in placed:
        mem.write(gpa, mod)
    segments = kernel.segments + ((info, info_size),) + tuple((gpa, len(mod)) for gpa, mod in placed if len(mod))
    return LoadedImage(entry=kernel.entry, mode="protected", format="multiboot", segments=segments,
                       registers=(("rax", MULTIBOOT_BOOTLOADER_MAGIC), ("rbx", info)),
                       control_registers=ENTRY_CONTROL_REGISTERS, tables=tables)


def _information(mem, info: int, slots: int, mmap, placed, mod_strings, kernel_cmdline: bytes,
                 loader_name: bytes) -> bytes:
    """The information block at ``info``: the structure, the module list, the memory map in
    ``slots`` entries' room, then the strings (each module's, the command line, the loader's)."""
    mods_addr = info + INFO.size
    mmap_addr = mods_addr + MODULE.size * len(placed)
    string_at = list(accumulate(map(len, mod_strings), initial=mmap_addr + MMAP_ENTRY.size * slots))
    mem_lower, mem_upper = _mem_lower_upper(memory_map(mem))       # the machine's RAM, not what is free
    values = dict.fromkeys(INFO_FIELDS, 0)
    values.update(flags=INFO_FLAGS, mem_lower=mem_lower, mem_upper=mem_upper, boot_device=BOOT_DEVICE,
                  cmdline=string_at[-1], mods_count=len(placed), mods_addr=mods_addr, syms=bytes(16),
                  mmap_length=MMAP_ENTRY.size * len(mmap), mmap_addr=mmap_addr,
                  boot_loader_name=string_at[-1] + len(kernel_cmdline))
    assert len(mmap) <= slots
    return b"".join([INFO.pack(*(values[f] for f in INFO_FIELDS)),
                     *(MODULE.pack(gpa, gpa + len(mod), string_at[k], 0) for k, (gpa, mod) in enumerate(placed)),
                     *(MMAP_ENTRY.pack(MMAP_ENTRY.size - 4, base, length, kind) for base, length, kind in mmap),
                     bytes(MMAP_ENTRY.size * (slots - len(mmap))),
                     *mod_strings, kernel_cmdline, loader_name])


def _place_modules(modules, ram, taken, kernel_end: int) -> list[tuple[int, memoryview]]:
    """Each module at the next free page after the kernel (and the module before it), below 4 GiB."""
    placed, pos = [], kernel_end
    for k, (mod, _) in enumerate(modules):
        gpa = boottables.first_fit(len(mod), ram, taken, windows=_MODULE_WINDOW, start=pos)
        if gpa is None:
            raise LoaderError(f"module {k} ({len(mod):#x} bytes) does not fit in guest RAM after "
                              f"{pos:#x}, below 4 GiB (the multiboot information holds 32-bit addresses)")
        placed.append((gpa, mod))
        taken = [*taken, *boottables.pages([(gpa, gpa + len(mod))])]
        pos = gpa + len(mod)
    return placed
