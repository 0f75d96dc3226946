"""ELF loader: valid images land where their program headers say, bad ones raise LoaderError."""
import shutil
import struct
import subprocess
import tracemalloc
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.errors import LoaderError
from kvmpy.loader import load, load_elf
from kvmpy.kvm.memory import GuestMemory
from kvmpy.loader.elf import PT_LOAD

from .guestram import RAM, fresh_mem, untouched_outside

MiB = 0x10_0000
PT_NOTE = 4

EHDR = {32: ("<HHIIIIIHHHHHH", 52), 64: ("<HHIQQQIHHHHHH", 64)}
EHDR_FIELDS = ("e_type e_machine e_version e_entry e_phoff e_shoff e_flags e_ehsize "
               "e_phentsize e_phnum e_shentsize e_shnum e_shstrndx").split()
PHDR = {32: ("<8I", ("p_type", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz", "p_flags", "p_align")),
        64: ("<IIQQQQQQ", ("p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz", "p_align"))}


@dataclass
class Seg:
    paddr: int
    data: bytes = b""
    memsz: int | None = None      # defaults to len(data)
    p_type: int = PT_LOAD
    vaddr: int | None = None      # defaults to paddr
    offset: int | None = None     # defaults to where build_elf puts data


def build_elf(bits=64, segs=(), entry=MiB, e_type=2, machine=None, phentsize=None,
              ident=None, e_version=1) -> bytes:
    """A minimal little-endian ELF: header, program headers, then segment data."""
    efmt, ehsize = EHDR[bits]
    pfmt, pnames = PHDR[bits]
    phsize = struct.calcsize(pfmt)
    phentsize = phentsize or phsize
    machine = machine if machine is not None else (62 if bits == 64 else 3)
    ident = ident or (b"\x7fELF" + bytes([1 if bits == 32 else 2, 1, 1]) + bytes(9))
    body, phdrs = b"", b""
    data_start = ehsize + phentsize * len(segs)
    for s in segs:
        off = s.offset if s.offset is not None else data_start + len(body)
        body += s.data
        vals = dict(p_type=s.p_type, p_flags=7, p_offset=off, p_vaddr=s.paddr if s.vaddr is None else s.vaddr,
                    p_paddr=s.paddr, p_filesz=len(s.data), p_memsz=len(s.data) if s.memsz is None else s.memsz,
                    p_align=0x1000)
        phdrs += struct.pack(pfmt, *(vals[n] for n in pnames)).ljust(phentsize, b"\0")
    ehdr = ident + struct.pack(efmt, e_type, machine, e_version, entry, ehsize if segs else 0, 0, 0,
                               ehsize, phentsize, len(segs), 0, 0, 0)
    return ehdr + phdrs + body


def fields(bits, nphdr):
    """(name, offset, size) of every header field, for mutation."""
    out = [(f"e_ident[{i}]", i, 1) for i in range(16)]
    efmt, ehsize = EHDR[bits]
    for i, name in enumerate(EHDR_FIELDS):
        out.append((name, 16 + struct.calcsize(efmt[:i + 1]), struct.calcsize("<" + efmt[i + 1])))
    pfmt, pnames = PHDR[bits]
    pfmt = pfmt if bits == 64 else "<IIIIIIII"
    for k in range(nphdr):
        base = ehsize + k * struct.calcsize(pfmt)
        for i, name in enumerate(pnames):
            out.append((f"{name}[{k}]", base + struct.calcsize(pfmt[:i + 1]), struct.calcsize("<" + pfmt[i + 1])))
    return out


TEXT = bytes(range(1, 0x41))        # nonzero so misplacement shows
DATA = b"\x5a" * 0x20


def sample_segs():
    return [Seg(MiB, TEXT), Seg(MiB + 0x1000, DATA, memsz=0x1000), Seg(0, b"note", p_type=PT_NOTE)]


@pytest.fixture
def mem():
    with fresh_mem() as m:
        yield m


# --- valid images ---------------------------------------------------------------

@pytest.mark.parametrize("bits,mode", [(64, "long"), (32, "protected")])
def test_loads_segments_and_zeroes_bss(mem, bits, mode):
    """Each PT_LOAD lands at p_paddr, the p_memsz tail is zeroed, entry/mode come from the header."""
    img = load_elf(mem, build_elf(bits, sample_segs(), entry=MiB + 4))
    assert (img.entry, img.mode, img.format) == (MiB + 4, mode, "elf")
    assert img.segments == ((MiB, 0x40), (MiB + 0x1000, 0x1000)) and img.end == MiB + 0x2000
    assert mem.read(MiB, 0x40) == TEXT
    assert mem.read(MiB + 0x1000, 0x20) == DATA
    assert mem.read(MiB + 0x1020, 0x1000 - 0x20) == bytes(0x1000 - 0x20)
    assert untouched_outside(mem, img.segments)


def test_load_auto_detects_elf(mem):
    """load() with format='auto' recognises the ELF magic."""
    img = load(mem, build_elf(64, sample_segs()))
    assert img.format == "elf" and img.mode == "long" and mem.read(MiB, 0x40) == TEXT


def test_segments_placed_at_physical_not_virtual_address(mem):
    """A segment linked high (p_vaddr) but placed low (p_paddr) goes to p_paddr."""
    img = load_elf(mem, build_elf(64, [Seg(MiB, TEXT, vaddr=0xFFFFFFFF80000000 + MiB)]))
    assert img.segments == ((MiB, 0x40),) and mem.read(MiB, 0x40) == TEXT


def test_et_dyn_loads_at_linked_address(mem):
    """An ET_DYN (PIE) image is placed at its linked addresses, unrelocated."""
    img = load_elf(mem, build_elf(64, sample_segs(), e_type=3))
    assert img.segments[0] == (MiB, 0x40) and mem.read(MiB, 0x40) == TEXT


def test_non_load_and_empty_segments_are_skipped(mem):
    """Non-PT_LOAD headers are ignored even if bogus, and a PT_LOAD with p_memsz 0 places nothing."""
    segs = [Seg(MiB, TEXT), Seg(0xFFFF_FFFF, p_type=PT_NOTE, memsz=0xFFFF, offset=0xFFFF_FFFF),
            Seg(0x1_0000_0000, b"", memsz=0)]
    img = load_elf(mem, build_elf(64, segs))
    assert img.segments == ((MiB, 0x40),)


def test_larger_phentsize_is_honoured(mem):
    """Program headers are found by stepping e_phentsize, which may exceed the struct size."""
    img = load_elf(mem, build_elf(32, sample_segs(), phentsize=48))
    assert img.segments == ((MiB, 0x40), (MiB + 0x1000, 0x1000)) and mem.read(MiB, 0x40) == TEXT


def test_entry_in_bss_part_is_accepted(mem):
    """The entry may lie anywhere in a segment's p_memsz, including its zeroed tail."""
    assert load_elf(mem, build_elf(64, sample_segs(), entry=MiB + 0x1FFF)).entry == MiB + 0x1FFF


def test_large_bss_zeroed(tmp_path):
    """A multi-MiB .bss is zeroed completely (in bounded chunks)."""
    with fresh_mem(8 * MiB) as mem:
        img = load_elf(mem, build_elf(64, [Seg(MiB, TEXT, memsz=5 * MiB)]))
        assert mem.read(MiB + 0x40, 5 * MiB - 0x40) == bytes(5 * MiB - 0x40)
        assert untouched_outside(mem, img.segments, 8 * MiB)


def test_mode_argument_must_match_class(mem):
    """load(mode=...) accepts the ELF's own mode and rejects the other, before writing."""
    assert load(mem, build_elf(32, sample_segs()), mode="protected").mode == "protected"
    with fresh_mem() as m2:
        with pytest.raises(LoaderError, match=r"ELF64 image enters in long mode, but mode='protected'"):
            load(m2, build_elf(64, sample_segs()), mode="protected")
        assert untouched_outside(m2, ())


def test_load_addr_and_entry_rejected_for_elf(mem):
    """load_addr/entry are raw-only options; passing them with an ELF is an error."""
    with pytest.raises(LoaderError, match="raw images only"):
        load(mem, build_elf(64, sample_segs()), load_addr=MiB)
    with pytest.raises(LoaderError, match="raw images only"):
        load(mem, build_elf(64, sample_segs()), "elf", entry=MiB)


def test_real_gcc_built_elf64(tmp_path):
    """An ELF64 built by gcc loads: .text, .data and zeroed .bss at their linked addresses."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not available")
    src = tmp_path / "g.c"
    src.write_text("volatile unsigned long long marker = 0x1122334455667788ULL;\n"
                   "char bss_buf[8192];\n"
                   "void _start(void) { bss_buf[0] = (char)marker; for (;;) __asm__ volatile(\"hlt\"); }\n")
    exe = tmp_path / "g"
    subprocess.run(["gcc", "-m64", "-nostdlib", "-static", "-Wl,-Ttext=0x100000", "-o", exe, src], check=True)
    syms = {line.split()[2]: int(line.split()[0], 16)
            for line in subprocess.run(["nm", exe], check=True, capture_output=True, text=True).stdout.splitlines()
            if len(line.split()) == 3}
    text = tmp_path / "text.bin"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.text", exe, text], check=True)
    with fresh_mem(8 * MiB) as mem:       # ld may put the build-id note at 4 MiB
        img = load_elf(mem, exe.read_bytes())
        assert img.mode == "long" and img.entry == syms["_start"] == 0x100000
        assert mem.read(0x100000, len(text.read_bytes())) == text.read_bytes()
        assert mem.read(syms["marker"], 8) == (0x1122334455667788).to_bytes(8, "little")
        assert mem.read(syms["bss_buf"], 8192) == bytes(8192)
        assert untouched_outside(mem, img.segments, 8 * MiB)


# --- every error path -----------------------------------------------------------

def ident(cls=2, data=1, version=1):
    return b"\x7fELF" + bytes([cls, data, version]) + bytes(9)


BAD = [
    ("too short", b"\x7fELF\x02", r"too short for an ELF identification \(size 0x5, need 0x10\)"),
    ("bad magic", b"MZ" + bytes(100), r"bad ELF magic 4d5a0000, expected 7f454c46"),
    ("class 0", build_elf(64, sample_segs(), ident=ident(cls=0)), r"unsupported ELF class EI_CLASS=0"),
    ("class 3", build_elf(64, sample_segs(), ident=ident(cls=3)), r"unsupported ELF class EI_CLASS=3"),
    ("big endian", build_elf(64, sample_segs(), ident=ident(data=2)), r"big-endian ELF \(EI_DATA=2\)"),
    ("data 0", build_elf(64, sample_segs(), ident=ident(data=0)), r"bad ELF data encoding EI_DATA=0"),
    ("ident version", build_elf(64, sample_segs(), ident=ident(version=2)), r"EI_VERSION=2"),
    ("short header", build_elf(64, sample_segs())[:40], r"too short for an ELF64 header \(size 0x28, need 0x40\)"),
    ("short header 32", build_elf(32, sample_segs())[:51], r"too short for an ELF32 header \(size 0x33, need 0x34\)"),
    ("ET_REL", build_elf(64, sample_segs(), e_type=1), r"e_type=1 is not loadable"),
    ("ET_CORE", build_elf(64, sample_segs(), e_type=4), r"e_type=4 is not loadable"),
    ("wrong machine 64", build_elf(64, sample_segs(), machine=3), r"ELF64 file has e_machine=3; expected 62 \(EM_X86_64\)"),
    ("wrong machine 32", build_elf(32, sample_segs(), machine=62), r"ELF32 file has e_machine=62; expected 3 \(EM_386\)"),
    ("e_version", build_elf(64, sample_segs(), e_version=0), r"e_version=0"),
    ("no phdrs", build_elf(64, []), r"no program headers \(e_phnum=0\)"),
    ("small phentsize", build_elf(64, sample_segs(), phentsize=32), r"e_phentsize=0x20 is smaller than an ELF64 program header \(0x38\)"),
    ("phdrs past eof", build_elf(64, sample_segs())[:64 + 56 * 2],
     r"program header table \(e_phoff=0x40, e_phnum=3, e_phentsize=0x38\) runs past end of file \(size 0xb0\)"),
    ("filesz > memsz", build_elf(64, [Seg(MiB, TEXT, memsz=0x10)]), r"segment 0 has p_filesz=0x40 larger than p_memsz=0x10"),
    ("offset past eof", build_elf(64, [Seg(MiB, TEXT), Seg(MiB + 0x100, b"abcd", offset=0x1000)]),
     r"segment 1 \(p_offset=0x1000, p_filesz=0x4\) runs past end of file \(size 0xf4\)"),
    ("wraps 64", build_elf(64, [Seg(2**64 - 0x1000, b"", memsz=0x2000)]),
     r"segment 0 \(p_paddr=0xfffffffffffff000, p_memsz=0x2000\) wraps past the end of the 64-bit address space"),
    ("wraps 32", build_elf(32, [Seg(0xFFFF_F000, b"", memsz=0x2000)]), r"wraps past the end of the 32-bit address space"),
    ("outside ram", build_elf(64, [Seg(RAM - 0x10, TEXT)]),
     r"segment 0 at 0x1ffff0\.\.0x200030 \(size 0x40\) does not fit in guest RAM \(ends at 0x200000\)"),
    ("overlapping segments", build_elf(64, [Seg(MiB, TEXT), Seg(MiB + 0x3F, b"x")]),
     r"segment 1 at 0x10003f\.\.0x100040 overlaps segment 0 at 0x100000\.\.0x100040"),
    ("no PT_LOAD", build_elf(64, [Seg(MiB, TEXT, p_type=PT_NOTE), Seg(MiB, b"", memsz=0)]), r"no loadable segment"),
    ("entry outside", build_elf(64, sample_segs(), entry=MiB + 0x40),
     r"entry point e_entry=0x100040 is not inside any loaded segment \(0x100000\.\.0x100040, 0x101000\.\.0x102000\)"),
    ("PN_XNUM", None, r"extended program header numbering"),
]


@pytest.mark.parametrize("name,data,message", BAD, ids=[b[0] for b in BAD])
def test_bad_elf_raises_loader_error_and_writes_nothing(mem, name, data, message):
    """Each malformed ELF raises LoaderError naming the problem and leaves RAM untouched."""
    if data is None:                                       # e_phnum = 0xffff
        data = bytearray(build_elf(64, sample_segs()))
        data[56:58] = struct.pack("<H", 0xFFFF)
    with pytest.raises(LoaderError, match=message):
        load(mem, bytes(data), "elf")
    assert untouched_outside(mem, ())


def test_reserved_range_rejected(mem):
    """A segment overlapping a reserved range is rejected; an adjacent one is fine."""
    data = build_elf(64, sample_segs())
    with pytest.raises(LoaderError, match=r"segment 1 at 0x101000\.\.0x102000 overlaps the reserved range 0x101fff\.\.0x103000"):
        load_elf(mem, data, reserved=[(0, MiB), (0x101FFF, 0x103000)])
    assert untouched_outside(mem, ())
    assert load_elf(mem, data, reserved=[(0, MiB), (0x102000, 0x103000)]).entry == MiB


def test_absurd_memsz_allocates_nothing(mem):
    """A 2^63-byte segment is rejected before any large allocation happens."""
    data = build_elf(64, [Seg(MiB, TEXT, memsz=1 << 63)])
    tracemalloc.start()
    try:
        with pytest.raises(LoaderError, match=r"does not fit in guest RAM"):
            load_elf(mem, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_failure_in_later_segment_writes_nothing(mem):
    """Validation covers all segments before the first write: a bad segment 1 leaves segment 0 unwritten."""
    with pytest.raises(LoaderError, match="segment 1"):
        load_elf(mem, build_elf(64, [Seg(MiB, TEXT), Seg(RAM, b"x")]))
    assert untouched_outside(mem, ())


# --- hypothesis -----------------------------------------------------------------

HSET = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
ELF_PREFIXES = st.sampled_from([b"", b"\x7fELF", ident(2), ident(1), ident(2) + b"\x02\x00\x3e\x00\x01\x00\x00\x00"])


@HSET
@given(prefix=ELF_PREFIXES, tail=st.binary(max_size=512), fmt=st.sampled_from(["auto", "elf"]))
def test_arbitrary_bytes_only_raise_loader_error(prefix, tail, fmt):
    """Any byte string either loads or raises LoaderError, never another exception."""
    with GuestMemory.anonymous(RAM) as mem:
        try:
            load(mem, prefix + tail, fmt)
        except LoaderError:
            pass


VALID = {bits: build_elf(bits, sample_segs(), entry=MiB + 8) for bits in (32, 64)}
FIELDS = {bits: fields(bits, 3) for bits in (32, 64)}


@st.composite
def mutated_elf(draw):
    bits = draw(st.sampled_from([32, 64]))
    data = bytearray(VALID[bits])
    for _ in range(draw(st.integers(1, 4))):
        name, off, size = draw(st.sampled_from(FIELDS[bits]))
        top = (1 << (8 * size)) - 1
        value = draw(st.one_of(
            st.integers(0, top),
            st.sampled_from([0, 1, 2, 3, 4, 0x38, 0x40, 0x1000, MiB, MiB + 0x1000, RAM - 1, RAM, top, top // 2 + 1])
            .map(lambda v: v & top)))
        data[off:off + size] = value.to_bytes(size, "little")
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bits, bytes(data)


@settings(HSET, max_examples=300)
@given(case=mutated_elf())
def test_mutated_headers_load_in_bounds_or_raise_loader_error(case):
    """A mutated ELF either loads inside RAM writing only its segments, or raises LoaderError writing nothing."""
    bits, data = case
    with fresh_mem() as mem:
        try:
            img = load(mem, data, "elf")
        except LoaderError:
            assert untouched_outside(mem, ())
            return
        assert img.mode == {32: "protected", 64: "long"}[bits]
        assert all(0 <= gpa and gpa + n <= RAM for gpa, n in img.segments)
        assert any(gpa <= img.entry < gpa + n for gpa, n in img.segments)
        assert untouched_outside(mem, img.segments)
