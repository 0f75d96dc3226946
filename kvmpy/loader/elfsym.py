"""An ELF file's symbol table: where a named object of a guest image sits, and its size.

Loading needs only program headers (:mod:`.elf`); a harness that writes a case's input into
``fuzz_input`` or reads a coverage map from ``__fuzz_cov_map`` needs the section header
table and the ``SHT_SYMTAB`` section in it (System V gABI, chapter 4, "Sections" and
"Symbol Table"): each ``Elf64_Sym``/``Elf32_Sym`` names a string in the section its
``sh_link`` points to and gives ``st_value`` (for an executable, the address) and
``st_size``.

The file is hostile input: every offset, count and size is checked against the file
before it is read, and a malformed table raises ``LoaderError``.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import LoaderError
from .elf import ELFCLASS64, EI_CLASS, read_header

SHT_SYMTAB = 2
SHN_UNDEF = 0
STT_NOTYPE, STT_OBJECT, STT_FUNC = 0, 1, 2     # others (sections, files) are skipped

# (section header, symbol) layouts after the ELF class
_SHDR = {ELFCLASS64: struct.Struct("<IIQQQQIIQQ"), 1: struct.Struct("<IIIIIIIIII")}
_SYM64 = struct.Struct("<IBBHQQ")        # st_name st_info st_other st_shndx st_value st_size
_SYM32 = struct.Struct("<IIIBBH")        # st_name st_value st_size st_info st_other st_shndx
MAX_SYMBOLS = 1 << 20


class Symbol(NamedTuple):
    value: int          # for an executable: the symbol's address
    size: int
    type: int           # STT_*


def _section_headers(buf: memoryview, cls_id: int, eh) -> list[tuple]:
    shdr = _SHDR[cls_id]
    if eh.e_shnum == 0 or eh.e_shoff == 0:
        return []
    if eh.e_shentsize < shdr.size:
        raise LoaderError(f"e_shentsize={eh.e_shentsize:#x} is smaller than a section header ({shdr.size:#x})")
    if eh.e_shoff + eh.e_shnum * eh.e_shentsize > len(buf):
        raise LoaderError(f"section header table (e_shoff={eh.e_shoff:#x}, e_shnum={eh.e_shnum}) "
                          f"runs past the end of the file (size {len(buf):#x})")
    return [shdr.unpack_from(buf, eh.e_shoff + i * eh.e_shentsize) for i in range(eh.e_shnum)]


def _span(buf: memoryview, offset: int, size: int, what: str) -> memoryview:
    if offset + size > len(buf):
        raise LoaderError(f"{what} (offset {offset:#x}, size {size:#x}) runs past the end of the file "
                          f"(size {len(buf):#x})")
    return buf[offset:offset + size]


def _name(strtab: memoryview, index: int) -> str:
    if index >= len(strtab):
        raise LoaderError(f"symbol name index {index:#x} is outside its string table ({len(strtab):#x})")
    end = bytes(strtab[index:]).find(b"\0")
    if end < 0:
        raise LoaderError("a symbol name runs past the end of its string table")
    return bytes(strtab[index:index + end]).decode("utf-8", "replace")


def symbols(data: bytes) -> dict[str, Symbol]:
    """The defined symbols of ELF ``data`` by name (the first definition of a name wins)."""
    buf = memoryview(data)
    _, eh = read_header(buf)
    cls_id = buf[EI_CLASS]
    sections = _section_headers(buf, cls_id, eh)
    sym = _SYM64 if cls_id == ELFCLASS64 else _SYM32
    out: dict[str, Symbol] = {}
    for sh in sections:
        # both layouts: sh_name sh_type sh_flags sh_addr sh_offset sh_size sh_link sh_info sh_addralign sh_entsize
        if sh[1] != SHT_SYMTAB:
            continue
        offset, size, link, entsize = sh[4], sh[5], sh[6], sh[9]
        if entsize < sym.size:
            raise LoaderError(f"symbol table entries of {entsize:#x} bytes are smaller than a symbol ({sym.size:#x})")
        if size // entsize > MAX_SYMBOLS:
            raise LoaderError(f"symbol table of {size // entsize} entries (at most {MAX_SYMBOLS})")
        if link >= len(sections):
            raise LoaderError(f"symbol table's string table index {link} is out of range ({len(sections)} sections)")
        table = _span(buf, offset, size, "symbol table")
        strtab = _span(buf, sections[link][4], sections[link][5], "string table")
        for i in range(size // entsize):
            f = sym.unpack_from(table, i * entsize)
            if cls_id == ELFCLASS64:
                name_i, info, _, shndx, value, sz = f
            else:
                name_i, value, sz, info, _, shndx = f
            if shndx == SHN_UNDEF or name_i == 0 or info & 0xF not in (STT_NOTYPE, STT_OBJECT, STT_FUNC):
                continue
            out.setdefault(_name(strtab, name_i), Symbol(value, sz, info & 0xF))
    return out
