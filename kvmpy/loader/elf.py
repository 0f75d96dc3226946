"""ELF executables: 32-bit x86 images enter in protected mode, 64-bit in long mode.

An ELF file (System V ABI, generic part, chapters 4 "Object Files" and 5
"Program Loading"; https://refspecs.linuxfoundation.org/elf/gabi4+/contents.html)
opens with an ELF header: ``e_ident`` (magic ``\\x7fELF``, class 32/64-bit,
data encoding, version), then the machine, the entry point ``e_entry`` and
where the program header table is (``e_phoff``, ``e_phnum`` entries of
``e_phentsize`` bytes). Loading needs only the program headers of type
``PT_LOAD``: copy ``p_filesz`` bytes from file offset ``p_offset`` to the
segment's address and zero the rest up to ``p_memsz`` (that tail is ``.bss``).
Sections are for linkers and debuggers; a loader ignores them.

Decisions:

* Segments go to their *physical* address ``p_paddr``. kvmpy enters the guest
  with paging off (protected mode) or with RAM identity-mapped (long mode), so
  at the first instruction virtual == physical, and ``p_paddr`` is where the
  linker says the bytes must physically sit (``AT()`` in a linker script). For
  ordinary guests it equals ``p_vaddr``. ``e_entry`` is likewise taken as a
  physical address and must fall inside a loaded segment.
* ``ET_EXEC`` and ``ET_DYN`` are accepted; ``ET_DYN`` (PIE) is placed at its
  linked addresses with no load bias and no relocations applied.
* Only little-endian ``EM_386`` (ELF32) and ``EM_X86_64`` (ELF64), the x86
  psABI machines.

The file is hostile input. Every offset, size and address is checked before it
is used, sizes are checked against the file and guest RAM before anything is
allocated, and nothing is written until the whole file has validated: a load
that fails leaves guest memory untouched.
"""
from __future__ import annotations

import struct
from collections import namedtuple
from dataclasses import dataclass

from ..errors import LoaderError
from .image import LoadedImage, check_mode, check_placement

ELFMAG = b"\x7fELF"
EI_CLASS, EI_DATA, EI_VERSION, EI_NIDENT = 4, 5, 6, 16
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
EV_CURRENT = 1
ET_EXEC, ET_DYN = 2, 3
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1
PN_XNUM = 0xFFFF            # e_phnum escape: real count lives in section header 0

Ehdr = namedtuple("Ehdr", "e_type e_machine e_version e_entry e_phoff e_shoff e_flags "
                          "e_ehsize e_phentsize e_phnum e_shentsize e_shnum e_shstrndx")
Phdr = namedtuple("Phdr", "p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz p_align")


@dataclass(frozen=True)
class _ElfClass:
    name: str
    bits: int
    machine: int
    machine_name: str
    mode: str
    ehdr: struct.Struct         # the ELF header after e_ident
    phdr: struct.Struct
    phdr_fields: tuple[str, ...]  # phdr field order in the file (differs by class)


_CLASSES = {
    ELFCLASS32: _ElfClass("ELF32", 32, EM_386, "EM_386", "protected",
                          struct.Struct("<HHIIIIIHHHHHH"), struct.Struct("<8I"),
                          ("p_type", "p_offset", "p_vaddr", "p_paddr",
                           "p_filesz", "p_memsz", "p_flags", "p_align")),
    ELFCLASS64: _ElfClass("ELF64", 64, EM_X86_64, "EM_X86_64", "long",
                          struct.Struct("<HHIQQQIHHHHHH"), struct.Struct("<IIQQQQQQ"),
                          ("p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr",
                           "p_filesz", "p_memsz", "p_align")),
}

_ZERO_CHUNK = 1 << 20       # zero .bss in bounded pieces, never one huge buffer


def read_header(buf: memoryview) -> tuple[_ElfClass, Ehdr]:
    """Validate e_ident and the ELF header; return the class and the header."""
    size = len(buf)
    if size < EI_NIDENT:
        raise LoaderError(f"file too short for an ELF identification (size {size:#x}, need {EI_NIDENT:#x})")
    if buf[:4] != ELFMAG:
        raise LoaderError(f"bad ELF magic {bytes(buf[:4]).hex()}, expected {ELFMAG.hex()}")
    cls = _CLASSES.get(buf[EI_CLASS])
    if cls is None:
        raise LoaderError(f"unsupported ELF class EI_CLASS={buf[EI_CLASS]}; expected 1 (ELF32) or 2 (ELF64)")
    if buf[EI_DATA] == ELFDATA2MSB:
        raise LoaderError("big-endian ELF (EI_DATA=2) is not supported; x86 images are little-endian")
    if buf[EI_DATA] != ELFDATA2LSB:
        raise LoaderError(f"bad ELF data encoding EI_DATA={buf[EI_DATA]}; expected 1 (little-endian)")
    if buf[EI_VERSION] != EV_CURRENT:
        raise LoaderError(f"bad ELF identification version EI_VERSION={buf[EI_VERSION]}; expected 1")
    need = EI_NIDENT + cls.ehdr.size
    if size < need:
        raise LoaderError(f"file too short for an {cls.name} header (size {size:#x}, need {need:#x})")
    eh = Ehdr(*cls.ehdr.unpack_from(buf, EI_NIDENT))
    if eh.e_type not in (ET_EXEC, ET_DYN):
        raise LoaderError(f"ELF type e_type={eh.e_type} is not loadable; expected 2 (ET_EXEC) or 3 (ET_DYN)")
    if eh.e_machine != cls.machine:
        raise LoaderError(f"{cls.name} file has e_machine={eh.e_machine}; expected {cls.machine} ({cls.machine_name})")
    if eh.e_version != EV_CURRENT:
        raise LoaderError(f"bad ELF version e_version={eh.e_version}; expected 1")
    return cls, eh


def program_headers(buf: memoryview, cls: _ElfClass, eh: Ehdr) -> list[Phdr]:
    """Validate the program header table's bounds and unpack every entry."""
    if eh.e_phnum == 0:
        raise LoaderError("no program headers (e_phnum=0); nothing to load")
    if eh.e_phnum == PN_XNUM:
        raise LoaderError(f"extended program header numbering (e_phnum={PN_XNUM:#x}) is not supported")
    if eh.e_phentsize < cls.phdr.size:
        raise LoaderError(f"e_phentsize={eh.e_phentsize:#x} is smaller than an {cls.name} "
                          f"program header ({cls.phdr.size:#x})")
    table_end = eh.e_phoff + eh.e_phnum * eh.e_phentsize
    if table_end > len(buf):
        raise LoaderError(f"program header table (e_phoff={eh.e_phoff:#x}, e_phnum={eh.e_phnum}, "
                          f"e_phentsize={eh.e_phentsize:#x}) runs past end of file (size {len(buf):#x})")
    return [Phdr(**dict(zip(cls.phdr_fields, cls.phdr.unpack_from(buf, eh.e_phoff + i * eh.e_phentsize))))
            for i in range(eh.e_phnum)]


def check_segment(i: int, ph: Phdr, cls: _ElfClass, file_size: int) -> None:
    """Checks on one PT_LOAD that need only the file, not guest RAM."""
    if ph.p_filesz > ph.p_memsz:
        raise LoaderError(f"segment {i} has p_filesz={ph.p_filesz:#x} larger than p_memsz={ph.p_memsz:#x}")
    if ph.p_offset + ph.p_filesz > file_size:
        raise LoaderError(f"segment {i} (p_offset={ph.p_offset:#x}, p_filesz={ph.p_filesz:#x}) "
                          f"runs past end of file (size {file_size:#x})")
    if ph.p_paddr + ph.p_memsz > 1 << cls.bits:
        raise LoaderError(f"segment {i} (p_paddr={ph.p_paddr:#x}, p_memsz={ph.p_memsz:#x}) wraps past "
                          f"the end of the {cls.bits}-bit address space")


def load_elf(mem, data, *, mode: str | None = None, reserved=()) -> LoadedImage:
    """Load the PT_LOAD segments of ELF ``data`` into ``mem``; see the module docstring.

    ``mode``, if given, is the mode the caller expects ("protected" for ELF32,
    "long" for ELF64); a file of the other class is rejected before loading.
    """
    buf = memoryview(data).cast("B")
    reserved = tuple(reserved)
    cls, eh = read_header(buf)
    if mode is not None and check_mode(mode) != cls.mode:
        raise LoaderError(f"{cls.name} image enters in {cls.mode} mode, but mode={mode!r} was requested")
    placed: list[tuple[int, Phdr]] = []
    for i, ph in enumerate(program_headers(buf, cls, eh)):
        if ph.p_type != PT_LOAD:
            continue
        check_segment(i, ph, cls, len(buf))
        if ph.p_memsz == 0:
            continue                    # places nothing
        check_placement(mem, ph.p_paddr, ph.p_memsz, reserved, f"segment {i}")
        for j, other in placed:
            if ph.p_paddr < other.p_paddr + other.p_memsz and other.p_paddr < ph.p_paddr + ph.p_memsz:
                raise LoaderError(f"segment {i} at {ph.p_paddr:#x}..{ph.p_paddr + ph.p_memsz:#x} overlaps "
                                  f"segment {j} at {other.p_paddr:#x}..{other.p_paddr + other.p_memsz:#x}")
        placed.append((i, ph))
    if not placed:
        raise LoaderError("no loadable segment (no PT_LOAD program header with p_memsz > 0)")
    if not any(ph.p_paddr <= eh.e_entry < ph.p_paddr + ph.p_memsz for _, ph in placed):
        spans = ", ".join(f"{ph.p_paddr:#x}..{ph.p_paddr + ph.p_memsz:#x}" for _, ph in placed)
        raise LoaderError(f"entry point e_entry={eh.e_entry:#x} is not inside any loaded segment ({spans})")

    # Everything validated: only now touch guest memory.
    for _, ph in placed:
        mem.write(ph.p_paddr, buf[ph.p_offset:ph.p_offset + ph.p_filesz])
        gpa, left = ph.p_paddr + ph.p_filesz, ph.p_memsz - ph.p_filesz
        while left:
            n = min(left, _ZERO_CHUNK)
            mem.fill(gpa, n)
            gpa, left = gpa + n, left - n
    return LoadedImage(entry=eh.e_entry, mode=cls.mode, format="elf",
                       segments=tuple((ph.p_paddr, ph.p_memsz) for _, ph in placed))
