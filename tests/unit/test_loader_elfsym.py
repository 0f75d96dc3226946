"""loader/elfsym.py: an ELF symbol table read from hostile bytes; fuzz/traps.py's IDT and stubs."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.errors import LoaderError
from kvmpy.fuzz import traps
from kvmpy.loader.elfsym import STT_FUNC, STT_OBJECT, Symbol, symbols

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
SHDR = struct.Struct("<IIQQQQIIQQ")
SYM = struct.Struct("<IBBHQQ")


def elf64(syms: list[tuple[str, int, int, int, int]]) -> bytes:
    """An ELF64 ET_EXEC with sections: null, .symtab, .strtab; syms: (name, info, shndx, value, size)."""
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n, *_ in syms)
    table, at = [SYM.pack(0, 0, 0, 0, 0, 0)], 1
    for name, info, shndx, value, size in syms:
        table.append(SYM.pack(at, info, 0, shndx, value, size))
        at += len(name) + 1
    symtab = b"".join(table)
    sym_off = EHDR.size
    str_off = sym_off + len(symtab)
    sh_off = str_off + len(strtab)
    sections = [SHDR.pack(*[0] * 10),
                SHDR.pack(0, 2, 0, 0, sym_off, len(symtab), 2, 1, 8, SYM.size),
                SHDR.pack(0, 3, 0, 0, str_off, len(strtab), 0, 0, 1, 0)]
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    hdr = EHDR.pack(ident, 2, 62, 1, 0x100000, 0, sh_off, 0, EHDR.size, 56, 0, SHDR.size, 3, 0)
    return hdr + symtab + strtab + b"".join(sections)


GOOD = elf64([("fuzz_input", STT_OBJECT, 5, 0x113000, 4096), ("main", STT_FUNC, 1, 0x100100, 40),
              ("undefined", STT_OBJECT, 0, 0, 0), ("a.c", 4, 0xFFF1, 0, 0)])


def test_defined_objects_and_functions_by_name():
    assert symbols(GOOD) == {"fuzz_input": Symbol(0x113000, 4096, STT_OBJECT),
                             "main": Symbol(0x100100, 40, STT_FUNC)}


@pytest.mark.parametrize("offset,value,error", [
    (EHDR.size - 4, 0xFFFF, "section header table"),          # e_shnum
    (EHDR.size - 6, 4, "smaller than a section header"),       # e_shentsize
])
def test_bad_headers_raise_loader_error(offset, value, error):
    bad = bytearray(GOOD)
    struct.pack_into("<H", bad, offset, value)
    with pytest.raises(LoaderError, match=error):
        symbols(bytes(bad))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_files_raise_only_loader_error(data):
    """Any byte of the file changed: symbols() returns, or raises LoaderError, nothing else."""
    bad = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 8))):
        bad[data.draw(st.integers(0, len(bad) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(bad)))
    try:
        symbols(bytes(bad[:cut]))
    except LoaderError:
        pass


def test_every_gate_points_at_its_stub_and_the_stub_reports_its_vector():
    base, blob, limit = traps.tables()
    assert limit == traps.VECTORS * 16 - 1 and len(blob) <= traps.layout.FUZZ_TRAPS_SIZE
    for v in range(traps.VECTORS):
        lo, sel, ist, attr, mid, hi, _ = traps.GATE.unpack_from(blob, v * 16)
        stub = lo | mid << 16 | hi << 32
        # present 64-bit interrupt gates, DPL 0 but #BP's, DPL 3 (an int3 at CPL 3 reaches it: end_at)
        assert (sel, ist, attr) == (traps.layout.SEL_CODE64, 0, 0xEE if v == traps.BP else 0x8E)
        code = blob[stub - base:stub - base + traps.STUB_SIZE]
        assert code[:2] == b"\x48\xA3"                                # movabs %rax, SAVED_RAX
        assert struct.unpack_from("<Q", code, 2)[0] == traps.SAVED_RAX
        assert code[10:14] == bytes([0xB0, v, 0xE6, 0xF4])           # mov $v, %al; out %al, $0xf4
        assert traps.vector_at(stub + traps.OUT_END) == v
        assert traps.vector_at(stub) is None
    assert traps.vector_at(0x100000) is None and traps.name(14) == "#PF" and traps.name(9) == "vector 9"


def test_frame_skips_the_error_code_only_where_the_cpu_pushes_one():
    stack = struct.pack("<QQ", 6, 0x1234)
    assert traps.frame(14, stack) == (6, 0x1234)
    frame = struct.pack("<5Q", 0x401000, 0x2B, 0x202, 0x7FF000, 0x23)
    want = {"rip": 0x401000, "cs": 0x2B, "rflags": 0x202, "rsp": 0x7FF000, "ss": 0x23}
    assert traps.context(14, struct.pack("<Q", 6) + frame) == want           # after the error code
    assert traps.context(6, frame + bytes(8)) == want                        # #UD pushes none
    assert traps.frame(6, stack) == (None, 6)


@settings(max_examples=200)
@given(st.integers(0, 31), st.binary(min_size=traps.FRAME.size + 8, max_size=traps.FRAME.size + 8))
def test_context_reads_any_stack_the_guest_left(vector, stack):
    """The frame is the guest's (it owns the stack): any 48 bytes give five 64-bit values."""
    ctx = traps.context(vector, stack)
    assert set(ctx) == {"rip", "cs", "rflags", "rsp", "ss"} and all(0 <= v < 1 << 64 for v in ctx.values())
    skip = 8 if vector in traps.WITH_ERROR_CODE else 0
    assert ctx["rip"] == int.from_bytes(stack[skip:skip + 8], "little")
