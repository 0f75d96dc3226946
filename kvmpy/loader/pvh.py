"""PVH: entering an uncompressed Linux vmlinux (an ELF file) directly in 32-bit protected mode.

Xen's PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h, docs/misc/pvh.pandoc),
used by QEMU, Firecracker and cloud-hypervisor for ``vmlinux`` images: a kernel that
supports it carries an ELF note of owner "Xen" and type ``XEN_ELFNOTE_PHYS32_ENTRY``
(18) whose value is the physical address of its 32-bit entry point. The loader copies
the PT_LOAD segments to their physical addresses, writes a ``struct hvm_start_info``
(magic 0x336ec578; version 1 adds a memory map) with the command line and the initrd
as module 0, and enters at that address with paging off, flat 32-bit segments and
EBX = the start info's physical address. No decompression, no real-mode setup: the
fastest way to start Linux.

Everything in the ELF file is hostile: note sizes and offsets are checked against
the segment and the file before use.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import LoaderError
from ..x86.bootparams import E820Entry
from .elf import ELFMAG, program_headers, read_header

PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
NOTE_OWNER_XEN = b"Xen"
NOTE_HEADER = struct.Struct("<III")         # namesz, descsz, type (Elf32_Nhdr == Elf64_Nhdr)

HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1                      # version 1: memmap_paddr and memmap_entries present
START_INFO = struct.Struct("<IIIIQQQQII")  # struct hvm_start_info: 56 bytes
MODLIST_ENTRY = struct.Struct("<QQQQ")     # struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")      # struct hvm_memmap_table_entry: addr, size, type, reserved


@dataclass(frozen=True)
class PvhKernel:
    """What a PVH loader needs to know about a vmlinux before it writes anything."""

    entry: int                                  # XEN_ELFNOTE_PHYS32_ENTRY
    segments: tuple[tuple[int, int], ...]       # (p_paddr, p_memsz) of each non-empty PT_LOAD

    @property
    def extent(self) -> tuple[int, int]:
        return (min(a for a, _ in self.segments), max(a + n for a, n in self.segments))


def iter_notes(desc: memoryview, align: int = 4):
    """Yield ``(name, type, desc)`` for each ELF note in ``desc`` (one PT_NOTE's bytes).

    A truncated note raises LoaderError; ``align`` is the padding of name and desc
    (4, as Linux and most tools write them, or 8).
    """
    off, size = 0, len(desc)
    while off < size:
        if size - off < NOTE_HEADER.size:
            raise LoaderError(f"truncated ELF note header at offset {off:#x} of a PT_NOTE of {size:#x} bytes")
        namesz, descsz, ntype = NOTE_HEADER.unpack_from(desc, off)
        name_at = off + NOTE_HEADER.size
        desc_at = name_at + ((namesz + align - 1) & ~(align - 1))
        end = desc_at + ((descsz + align - 1) & ~(align - 1))
        if desc_at + descsz > size:
            raise LoaderError(f"ELF note at offset {off:#x} (namesz={namesz:#x}, descsz={descsz:#x}) runs past "
                              f"its PT_NOTE ({size:#x} bytes)")
        name = bytes(desc[name_at:name_at + namesz]).rstrip(b"\0")
        yield name, ntype, desc[desc_at:desc_at + descsz]
        off = end


def find_pvh_entry(data) -> int | None:
    """The PVH entry point of ELF ``data``, or None if it has no PHYS32_ENTRY note.

    Raises LoaderError for a malformed ELF header, program header table or note.
    """
    buf = memoryview(data).cast("B")
    cls, eh = read_header(buf)
    entry = None
    for i, ph in enumerate(program_headers(buf, cls, eh)):
        if ph.p_type != PT_NOTE:
            continue
        if ph.p_offset + ph.p_filesz > len(buf):
            raise LoaderError(f"PT_NOTE {i} (p_offset={ph.p_offset:#x}, p_filesz={ph.p_filesz:#x}) runs past "
                              f"end of file (size {len(buf):#x})")
        align = 8 if ph.p_align == 8 else 4
        for name, ntype, desc in iter_notes(buf[ph.p_offset:ph.p_offset + ph.p_filesz], align):
            if name != NOTE_OWNER_XEN or ntype != XEN_ELFNOTE_PHYS32_ENTRY:
                continue
            if len(desc) == 4:
                value = struct.unpack_from("<I", desc)[0]
            elif len(desc) == 8:
                value = struct.unpack_from("<Q", desc)[0]
            else:
                raise LoaderError(f"XEN_ELFNOTE_PHYS32_ENTRY has a {len(desc)}-byte value; expected 4 or 8")
            if value >= 1 << 32:
                raise LoaderError(f"PVH entry point {value:#x} is not a 32-bit physical address")
            entry = value
    return entry


def parse_pvh(data) -> PvhKernel:
    """Validate a PVH-capable vmlinux: its note, its PT_LOAD segments, the entry inside one."""
    buf = memoryview(data).cast("B")
    if bytes(buf[:4]) != ELFMAG:
        raise LoaderError(f"not an ELF file (magic {bytes(buf[:4]).hex()}); PVH boots an uncompressed vmlinux")
    entry = find_pvh_entry(buf)
    if entry is None:
        raise LoaderError("ELF file has no XEN_ELFNOTE_PHYS32_ENTRY note (owner 'Xen', type 18): not a "
                          "PVH-bootable kernel (Linux needs CONFIG_PVH=y)")
    cls, eh = read_header(buf)
    segments = []
    for i, ph in enumerate(program_headers(buf, cls, eh)):
        if ph.p_type != 1 or ph.p_memsz == 0:       # PT_LOAD
            continue
        if ph.p_filesz > ph.p_memsz or ph.p_offset + ph.p_filesz > len(buf) or ph.p_paddr + ph.p_memsz > 1 << 32:
            raise LoaderError(f"segment {i} (p_offset={ph.p_offset:#x}, p_filesz={ph.p_filesz:#x}, "
                              f"p_paddr={ph.p_paddr:#x}, p_memsz={ph.p_memsz:#x}) is malformed or above 4 GiB")
        segments.append((ph.p_paddr, ph.p_memsz))
    if not segments:
        raise LoaderError("no loadable segment (no PT_LOAD program header with p_memsz > 0)")
    if not any(a <= entry < a + n for a, n in segments):
        raise LoaderError(f"PVH entry point {entry:#x} is not inside any loaded segment")
    return PvhKernel(entry=entry, segments=tuple(segments))


def start_info(*, cmdline_paddr: int, memmap_paddr: int, memmap_entries: int,
               modlist_paddr: int = 0, nr_modules: int = 0, rsdp_paddr: int = 0) -> bytes:
    """``struct hvm_start_info``, version 1 (56 bytes)."""
    return START_INFO.pack(HVM_START_MAGIC, HVM_START_VERSION, 0, nr_modules, modlist_paddr,
                           cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, 0)


def modlist_entry(paddr: int, size: int, cmdline_paddr: int = 0) -> bytes:
    """One ``struct hvm_modlist_entry``; Linux takes module 0 as its initrd."""
    return MODLIST_ENTRY.pack(paddr, size, cmdline_paddr, 0)


def memmap_table(e820: list[E820Entry]) -> bytes:
    """The PVH memory map: ``struct hvm_memmap_table_entry`` per e820 range (same types)."""
    return b"".join(MEMMAP_ENTRY.pack(e.addr, e.size, e.type, 0) for e in e820)
