"""Multiboot v1 loader: header search, a.out kludge and ELF kernels, the information structure, modules."""
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.errors import LoaderError
from kvmpy.loader import is_multiboot, load_multiboot
from kvmpy.loader.multiboot import (INFO, INFO_FIELDS, MMAP_ENTRY, MODULE, MULTIBOOT_AOUT_KLUDGE,
                                    MULTIBOOT_BOOTLOADER_MAGIC, MULTIBOOT_HEADER_MAGIC, MULTIBOOT_VIDEO_MODE,
                                    MultibootHeader, find_header, memory_map, module_string)
from kvmpy.kvm.memory import GuestMemory, MemoryRegion
from kvmpy.x86.boottables import BootTables

from .guestram import RAM, fresh_mem, untouched_outside

MiB = 0x10_0000
PAGE = 0x1000
TEXT = bytes(range(1, 0x41))
KLUDGE = MULTIBOOT_AOUT_KLUDGE | 3           # page-aligned modules, memory info, address fields
PF_X, PF_W, PF_R = 1, 2, 4
MMAP_2MIB = [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2), (MiB, MiB, 1)]
INFO_AT = 0x5000          # the first free page after the boot GDT (0x1000) and TSS (0x2000-0x4069)
# What a kernel at 1 MiB without modules is told: the GDT, TSS and information pages reserved.
MMAP_LOADED = [(0, 0x1000, 1), (0x1000, INFO_AT + PAGE - 0x1000, 2), (INFO_AT + PAGE, 0x9FC00 - INFO_AT - PAGE, 1),
               (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2), (MiB, MiB, 1)]


# --- building images ------------------------------------------------------------------------
def mb_header(flags=3, addr=None, checksum=None, video=None) -> bytes:
    """A multiboot header; ``addr`` = (header, load, load_end, bss_end, entry) for flags bit 16."""
    if checksum is None:
        checksum = -(MULTIBOOT_HEADER_MAGIC + flags) & 0xFFFFFFFF
    out = struct.pack("<3I", MULTIBOOT_HEADER_MAGIC, flags, checksum)
    if addr is not None:
        out += struct.pack("<5I", *addr)
    if video is not None:
        out += struct.pack("<4I", *video)
    return out


def aout(load_addr=MiB, prefix=0x10, skip=0, bss=0x2000, entry_off=None, load_end=True, flags=KLUDGE,
         header_addr=None, body=TEXT):
    """A flat kernel: ``skip`` unloaded bytes, then (loaded at load_addr) ``prefix`` bytes, header, body."""
    hdr_len = 32
    loaded_len = prefix + hdr_len + len(body)
    header_addr = load_addr + prefix if header_addr is None else header_addr
    load_end_addr = load_addr + loaded_len if load_end else 0
    bss_end = load_addr + loaded_len + bss if bss is not None else 0
    entry = load_addr + prefix + hdr_len if entry_off is None else load_addr + entry_off
    hdr = mb_header(flags, (header_addr, load_addr, load_end_addr, bss_end, entry))
    return b"\xee" * skip + b"\x11" * prefix + hdr + body


def elf32(segs, entry, machine=3, cls=1, header=None) -> bytes:
    """A little-endian ELF with segs = [(paddr, data, memsz, vaddr, flags)]; header in segment 0's data."""
    ehsize, phsize = (52, 32) if cls == 1 else (64, 56)
    data_start = ehsize + phsize * len(segs)
    body, phdrs = b"", b""
    for i, (paddr, data, memsz, vaddr, flags) in enumerate(segs):
        if i == 0 and header is not None:
            data = header + data
        off = data_start + len(body)
        body += data
        if cls == 1:
            phdrs += struct.pack("<8I", 1, off, vaddr, paddr, len(data), max(memsz, len(data)), flags, PAGE)
        else:
            phdrs += struct.pack("<IIQQQQQQ", 1, flags, off, vaddr, paddr, len(data), max(memsz, len(data)), PAGE)
    ident = b"\x7fELF" + bytes([cls, 1, 1]) + bytes(9)
    fmt = "<HHIIIIIHHHHHH" if cls == 1 else "<HHIQQQIHHHHHH"
    return ident + struct.pack(fmt, 2, machine, 1, entry, ehsize, 0, 0, ehsize, phsize, len(segs), 0, 0, 0) \
        + phdrs + body


def elf_kernel(entry=MiB + 0x30, vaddr_base=0, bss=0x3000, header=None):
    """A two-segment ELF32 multiboot kernel: text at 1 MiB, data+bss at 1 MiB + 4 KiB."""
    header = mb_header(3) if header is None else header
    segs = [(MiB, TEXT, 0, MiB + vaddr_base, PF_R | PF_X),
            (MiB + PAGE, b"\x5a" * 0x20, 0x20 + bss, MiB + PAGE + vaddr_base, PF_R | PF_W)]
    return elf32(segs, entry, header=header)


# --- reading results back ------------------------------------------------------------------


@pytest.fixture
def mem():
    with fresh_mem() as m:
        yield m


def cstr(mem, gpa) -> bytes:
    out = b""
    while b"\0" not in out:
        out += mem.read(gpa + len(out), 1)
    return out[:-1]


def decode(mem, img):
    """The information structure at EBX, with its module list and memory map unpacked."""
    regs = dict(img.registers)
    assert regs["rax"] == MULTIBOOT_BOOTLOADER_MAGIC
    info = dict(zip(INFO_FIELDS, INFO.unpack(mem.read(regs["rbx"], INFO.size))))
    info["mods"] = [MODULE.unpack(mem.read(info["mods_addr"] + MODULE.size * i, MODULE.size))
                    for i in range(info["mods_count"])]
    mmap, pos = [], info["mmap_addr"]
    while pos < info["mmap_addr"] + info["mmap_length"]:
        size, base, length, kind = MMAP_ENTRY.unpack(mem.read(pos, MMAP_ENTRY.size))
        assert size == 20
        mmap.append((base, length, kind))
        pos += size + 4
    info["mmap"] = mmap
    return info


# --- the header search ------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [0, 4, 0x74, 8192 - 12])
def test_header_found_at_any_aligned_offset_in_first_8k(offset):
    """A header whose 12 bytes lie in the first 8 KiB at a 4-aligned offset is found there."""
    data = b"\x90" * offset + mb_header(3) + b"\x90" * 64
    h = find_header(data)
    assert h == MultibootHeader(offset=offset, flags=3, checksum=-(MULTIBOOT_HEADER_MAGIC + 3) & 0xFFFFFFFF)
    assert is_multiboot(data)


@pytest.mark.parametrize("offset", [2, 8192 - 8, 8192])
def test_header_unaligned_or_past_8k_is_not_found(offset):
    """A header at an unaligned offset, or not wholly inside the first 8 KiB, is not a header."""
    data = b"\x90" * offset + mb_header(3) + b"\x90" * 64
    assert find_header(data) is None and not is_multiboot(data)


def test_bad_checksum_candidate_is_skipped_for_a_later_valid_one():
    """The magic with a bad checksum is passed over and the search continues."""
    data = mb_header(3, checksum=0) + mb_header(2)
    assert find_header(data).offset == 12


def test_header_address_and_video_fields_are_parsed():
    """With flags bits 16 and 2 the address and video fields are returned."""
    data = mb_header(KLUDGE | MULTIBOOT_VIDEO_MODE, (1, 2, 3, 4, 5), video=(6, 7, 8, 9))
    h = find_header(data)
    assert (h.header_addr, h.load_addr, h.load_end_addr, h.bss_end_addr, h.entry_addr) == (1, 2, 3, 4, 5)
    assert (h.mode_type, h.width, h.height, h.depth) == (6, 7, 8, 9) and h.aout_kludge


def test_truncated_address_fields_raise_but_still_count_as_multiboot():
    """A valid-checksum header with bit 16 cut off by the end of file raises; is_multiboot says True."""
    data = mb_header(KLUDGE) + b"\0" * 8
    with pytest.raises(LoaderError, match=r"flags bit 16 .*\(truncated header\)"):
        find_header(data)
    assert is_multiboot(data)


def test_elf_without_header_is_not_multiboot():
    """An ordinary ELF has no multiboot header."""
    assert not is_multiboot(elf_kernel(header=b""))
    assert is_multiboot(elf_kernel())


# --- a.out kludge kernels ---------------------------------------------------------------------
def test_aout_kernel_loads_zeroes_bss_and_enters_with_magic(mem):
    """The loaded bytes land at load_addr, bss up to bss_end_addr is zero, EAX/EBX follow the spec."""
    data = aout(bss=0x2000)
    img = load_multiboot(mem, data)
    assert (img.entry, img.mode, img.format) == (MiB + 0x10 + 32, "protected", "multiboot")
    assert mem.read(MiB, len(data)) == data
    assert mem.read(MiB + len(data), 0x2000) == bytes(0x2000)
    kernel_end = MiB + len(data) + 0x2000
    assert img.segments[0] == (MiB, kernel_end - MiB)
    assert dict(img.registers) == {"rax": 0x2BADB002, "rbx": INFO_AT}     # low memory, as QEMU
    assert untouched_outside(mem, img.segments)


@pytest.mark.parametrize("kernel", [aout, elf_kernel], ids=["aout", "elf"])
def test_entry_control_registers_are_qemus(mem, kernel):
    """CR0 = PE|ET (0x11) and CR4 = 0 at entry, what QEMU's multiboot option ROM leaves."""
    assert load_multiboot(mem, kernel()).control_registers == (("cr0", 0x11), ("cr4", 0))


def test_aout_header_offset_selects_the_file_start(mem):
    """Bytes before offset - (header_addr - load_addr) are not loaded."""
    data = aout(skip=0x100, prefix=0x20)
    img = load_multiboot(mem, data)
    assert mem.read(MiB, len(data) - 0x100) == data[0x100:]
    assert img.segments[0][0] == MiB


def test_aout_zero_load_end_and_bss_end_load_the_rest_of_the_file(mem):
    """load_end_addr 0 loads to the end of the file; bss_end_addr 0 means no bss."""
    data = aout(load_end=False, bss=None) + b"tail"
    img = load_multiboot(mem, data)
    assert img.segments[0] == (MiB, len(data)) and mem.read(MiB, len(data)) == data


def test_aout_kludge_wins_over_elf_when_bit_16_is_set(mem):
    """An ELF file whose header sets bit 16 is loaded by its address fields, as QEMU does."""
    segs = [(2 * MiB, TEXT, 0, 2 * MiB, PF_X)]          # outside RAM: the ELF path would refuse it
    off = find_header(elf32(segs, 0, header=mb_header(KLUDGE, (0,) * 5))).offset
    data = elf32(segs, 0, header=mb_header(KLUDGE, (MiB + off, MiB, 0, 0, MiB + off + 32)))
    img = load_multiboot(mem, data)
    assert img.segments[0] == (MiB, len(data)) and mem.read(MiB, len(data)) == data
    assert img.entry == MiB + off + 32


# --- ELF kernels --------------------------------------------------------------------------------
def test_elf_kernel_loads_its_segments(mem):
    """Without bit 16 the ELF program headers place the kernel; bss is zeroed."""
    data = elf_kernel(bss=0x3000)
    img = load_multiboot(mem, data)
    assert img.entry == MiB + 0x30 and img.segments[:2] == ((MiB, 12 + 0x40), (MiB + PAGE, 0x3020))
    assert mem.read(MiB + 12, 0x40) == TEXT
    assert mem.read(MiB + PAGE + 0x20, 0x3000) == bytes(0x3000)
    assert dict(img.registers)["rbx"] == INFO_AT


def test_elf_virtual_entry_is_translated_to_physical(mem):
    """A higher-half kernel's virtual e_entry in an executable segment becomes its physical address."""
    img = load_multiboot(mem, elf_kernel(entry=0xC0000000 + MiB + 0x30, vaddr_base=0xC0000000))
    assert img.entry == MiB + 0x30 and img.segments[0] == (MiB, 12 + 0x40)


def test_video_mode_request_is_ignored_like_qemu(mem):
    """Flags bit 2 (video mode) does not stop the load and no video information is passed."""
    img = load_multiboot(mem, elf_kernel(header=mb_header(3 | MULTIBOOT_VIDEO_MODE, video=(0, 80, 25, 0))))
    assert decode(mem, img)["flags"] & (1 << 11) == 0


# --- the information structure ------------------------------------------------------------------
def test_information_structure_fields(mem):
    """flags, memory sizes, boot device, command line, modules, memory map and loader name, field by field."""
    img = load_multiboot(mem, aout(), cmdline="console=ttyS0 x=1", image_name="/boot/kernel.bin")
    info = decode(mem, img)
    assert info["flags"] == 0x24F                      # MEMORY BOOTDEV CMDLINE MODS MEM_MAP LOADER_NAME
    assert (info["mem_lower"], info["mem_upper"]) == (639, 1024)
    assert info["boot_device"] == 0x8000FFFF
    assert cstr(mem, info["cmdline"]) == b"/boot/kernel.bin console=ttyS0 x=1"
    assert (info["mods_count"], info["mods"]) == (0, [])
    assert info["mmap"] == MMAP_LOADED and info["mmap_length"] == 24 * 6
    assert cstr(mem, info["boot_loader_name"]) == b"kvmpy"
    assert info["syms"] == bytes(16) and info["vbe_mode"] == 0 and info["drives_length"] == 0
    ebx = dict(img.registers)["rbx"]
    assert info["mods_addr"] == ebx + 88 and info["mmap_addr"] == ebx + 88
    assert img.segments[1][0] == ebx


def test_cmdline_is_image_name_space_args_even_without_args(mem):
    """As QEMU: the kernel's string is its file name, a space, then the arguments."""
    info = decode(mem, load_multiboot(mem, aout()))
    assert cstr(mem, info["cmdline"]) == b"kernel "


def test_modules_bytes_strings_and_placement(mem):
    """Modules sit page-aligned after the kernel and its bss (as QEMU puts them); their strings
    are in the information block, in low memory."""
    mods = [(b"first module" * 100, "mod1.bin a=b"), (b"", "empty"), (bytes(range(256)) * 20, module_string("m3"))]
    data = aout(bss=0x1800)
    img = load_multiboot(mem, data, modules=mods, cmdline="x")
    info = decode(mem, img)
    kernel_end = MiB + len(data) + 0x1800
    ebx = dict(img.registers)["rbx"]
    assert ebx == INFO_AT
    assert info["mods_count"] == 3 and len(info["mods"]) == 3
    info_end = img.segments[1][0] + img.segments[1][1]
    assert info["mods"][0][0] == (kernel_end + PAGE - 1) & -PAGE
    prev_end = kernel_end
    for (start, end, string, reserved), (blob, name) in zip(info["mods"], mods):
        assert start % PAGE == 0 and start >= prev_end and end == start + len(blob) and reserved == 0
        assert mem.read(start, len(blob)) == blob
        assert cstr(mem, string) == name.encode()
        assert ebx <= string < info_end
        prev_end = end
    assert info["mmap_addr"] == ebx + 88 + 16 * 3
    assert img.segments[2:] == ((info["mods"][0][0], 1200), (info["mods"][2][0], 5120))
    assert untouched_outside(mem, img.segments)


def test_module_string_is_qemu_form():
    """module_string gives 'FILE ARGS', or 'FILE' without arguments."""
    assert module_string("a.bin", "x y") == "a.bin x y" and module_string("a.bin") == "a.bin"


def test_memory_map_covers_regions_with_low_holes_and_high_ram():
    """RAM above 4 GiB is listed; mem_upper stops at the first gap; a region from 1 MiB has no lower memory."""
    mem = GuestMemory([MemoryRegion.anonymous(0, RAM), MemoryRegion.anonymous(1 << 32, RAM)])
    with mem:
        assert memory_map(mem) == MMAP_2MIB + [(1 << 32, RAM, 1)]
        info = decode(mem, load_multiboot(mem, aout()))
        assert info["mmap"] == MMAP_LOADED + [(1 << 32, RAM, 1)] and info["mem_upper"] == 1024
    with GuestMemory.anonymous(RAM, gpa=MiB) as high:
        assert memory_map(high) == [(MiB, RAM, 1)]
        img = load_multiboot(high, aout(load_addr=2 * MiB))
        info = decode(high, img)
        assert (info["mem_lower"], info["mem_upper"]) == (0, 2048)
        assert img.tables.gdt == MiB and dict(img.registers)["rbx"] == MiB + 4 * PAGE   # no low memory
        assert info["mmap"] == [(MiB, 5 * PAGE, 2), (MiB + 5 * PAGE, RAM - 5 * PAGE, 1)]


def test_mem_lower_is_capped_at_640k_and_mem_upper_follows_an_unordered_map():
    """mem_lower never exceeds 640 KiB; mem_upper chains available entries from 1 MiB in any order."""
    from kvmpy.loader.multiboot import _mem_lower_upper
    assert _mem_lower_upper([(0, 4 * MiB, 1)]) == (640, 3072)
    assert _mem_lower_upper([(2 * MiB, MiB, 1), (MiB, MiB, 1), (3 * MiB, MiB, 2)]) == (0, 2048)
    assert _mem_lower_upper([(MiB, (1 << 32), 1)]) == (0, ((1 << 32) - MiB) >> 10)


def test_reserved_ranges_are_respected(mem):
    """The kernel must stay clear of reserved ranges; the information block and the modules are
    placed clear of them."""
    data = aout(bss=0)
    after = (MiB + len(data) + PAGE - 1) & -PAGE
    with pytest.raises(LoaderError, match=r"multiboot kernel at 0x100000.* overlaps the reserved range"):
        load_multiboot(mem, data, reserved=[(0, MiB + 1)])
    assert untouched_outside(mem, ())
    img = load_multiboot(mem, data, modules=[(b"m", "m")], reserved=[(INFO_AT + 8, INFO_AT + 9), (after, after + 1)])
    info = decode(mem, img)
    assert dict(img.registers)["rbx"] == INFO_AT + PAGE and info["mods"][0][0] == after + PAGE
    img = load_multiboot(mem, data, reserved=[(0, MiB)])
    assert img.entry == MiB + 0x30 and dict(img.registers)["rbx"] == after     # no low memory: after the kernel


def available(mmap) -> list[tuple[int, int]]:
    return [(base, base + length) for base, length, kind in mmap if kind == 1]


def written_by_loader_and_vmm(mem, img, info) -> list[tuple[int, int]]:
    """Ranges the kernel must not mistake for free memory: the boot GDT and TSS, the
    information structure, its module list, memory map and strings, and every module."""
    ranges = list(img.tables.ranges("protected", mem.end))
    ranges.append((dict(img.registers)["rbx"], dict(img.registers)["rbx"] + INFO.size))
    ranges.append((info["mods_addr"], info["mods_addr"] + MODULE.size * info["mods_count"]))
    ranges.append((info["mmap_addr"], info["mmap_addr"] + info["mmap_length"]))
    for gpa in [info["cmdline"], info["boot_loader_name"], *(string for _, _, string, _ in info["mods"])]:
        ranges.append((gpa, gpa + len(cstr(mem, gpa)) + 1))
    ranges += [(start, end) for start, end, _, _ in info["mods"] if end > start]
    return ranges


def test_the_memory_map_marks_the_information_modules_and_boot_tables_reserved(mem):
    """No available entry overlaps what the loader or the VMM wrote: the kernel's allocator,
    fed the map, can take no byte of it (QEMU's map does not say; kvmpy's does)."""
    mods = [(b"a" * 5000, "first"), (b"", "empty"), (b"z", "last")]
    img = load_multiboot(mem, aout(bss=0x1800), modules=mods, cmdline="root=/dev/ram0")
    info = decode(mem, img)
    for taken in written_by_loader_and_vmm(mem, img, info):
        for free in available(info["mmap"]):
            assert not (taken[0] < free[1] and free[0] < taken[1]), (hex(taken[0]), hex(free[0]))
    assert dict(img.registers)["rbx"] < 0x9FC00                        # in low memory, as QEMU
    assert (info["mem_lower"], info["mem_upper"]) == (639, 1024)       # RAM, as the BIOS would say


@pytest.mark.parametrize("load_addr", [0x8000, 0x1000, 0x500, 0x90000])
def test_a_kernel_loaded_below_1_mib_loads_and_nothing_lands_on_it(mem, load_addr):
    """QEMU loads a kernel linked below 1 MiB; so does kvmpy, moving its GDT and TSS and the
    information block out of the kernel's pages and telling it so in the memory map."""
    data = aout(load_addr=load_addr, bss=0x3000)
    img = load_multiboot(mem, data, modules=[(b"mod" * 100, "m")])
    info = decode(mem, img)
    kernel = (load_addr, load_addr + len(data) + 0x3000)
    assert img.segments[0] == (kernel[0], kernel[1] - kernel[0]) and mem.read(load_addr, len(data)) == data
    for taken in written_by_loader_and_vmm(mem, img, info):
        assert not (taken[0] < kernel[1] and kernel[0] < taken[1]), hex(taken[0])
    assert (img.tables == BootTables()) == (load_addr >= 0x5000)      # the GDT and TSS moved if they had to
    assert untouched_outside(mem, img.segments)


def test_an_information_block_that_fits_nowhere_is_a_loader_error(mem):
    """A kernel that leaves one free page in low memory and one at the top, and a command line
    longer than a page: refused, nothing written."""
    data = aout(load_addr=0x6000, prefix=0, bss=RAM - 0x1000 - 0x6000 - 0x60, entry_off=0x20)
    with pytest.raises(LoaderError, match=r"the multiboot information \(0x1[0-9a-f]{3} bytes\) does not fit in guest RAM below 4 GiB"):
        load_multiboot(mem, data, cmdline="x" * 0x1800)
    assert untouched_outside(mem, ())


def test_everything_must_stay_below_4gib():
    """A module that would cross 4 GiB is refused: the structure holds 32-bit addresses."""
    with GuestMemory.anonymous(4 * MiB, gpa=(1 << 32) - 2 * MiB) as mem:
        data = aout(load_addr=(1 << 32) - 2 * MiB)
        with pytest.raises(LoaderError, match=r"module 0 \(0x200000 bytes\) does not fit .* below 4 GiB"):
            load_multiboot(mem, data, modules=[(bytes(2 * MiB), "big")])


# --- every error path ------------------------------------------------------------------------------
def _patch(data, off, value):
    b = bytearray(data)
    struct.pack_into("<I", b, off, value)
    return bytes(b)


BAD = [
    ("empty", b"", r"too short for a multiboot header \(size 0x0, need 0xc\)"),
    ("no header", b"\x90" * 0x3000, r"no multiboot header \(magic 0x1badb002 at a 4-byte aligned offset\) "
                                    r"in the first 8 KiB of the file \(size 0x3000\)"),
    ("bad checksum", mb_header(3, checksum=5) + TEXT,
     r"magic 0x1badb002 at file offset 0x0 has a bad checksum 0x5 \(magic \+ flags 0x3 \+ checksum = "
     r"0x1badb00a mod 2\^32, must be 0\)"),
    ("truncated header", mb_header(KLUDGE)[:12] + b"\0" * 4, r"truncated header"),
    ("truncated file", aout()[:-8], r"past the end of the file \(size 0x68; truncated file\?\)"),
    ("load outside RAM", aout(load_addr=RAM - 0x40),
     r"multiboot kernel at 0x1fffc0\.\.0x202030 .* does not fit in guest RAM"),
    ("entry outside image", aout(entry_off=0x1000),
     r"entry_addr 0x101000 is outside the loaded image 0x100000\.\.0x100070"),
    ("entry in bss", aout(entry_off=0x70), r"entry_addr 0x100070 is outside the loaded image"),
    ("bss before load end", _patch(aout(), 0x10 + 24, MiB + 0x20), r"invalid bss_end_addr 0x100020: before the end"),
    ("load_addr above header_addr", aout(header_addr=MiB - 4),
     r"invalid load_addr 0x100000: above header_addr 0xffffc"),
    ("header_addr too far", aout(header_addr=MiB + 0x20),
     r"invalid header_addr 0x100020: 0x20 bytes after load_addr .* only 0x10 bytes into the file"),
    ("load_end below load", _patch(aout(), 0x10 + 20, MiB - 1), r"invalid load_end_addr 0xfffff: below load_addr"),
    ("past 4 GiB", aout(load_addr=0xFFFFFFF0, prefix=0, load_end=False, bss=None, entry_off=0),
     r"kernel at load_addr 0xfffffff0 with 0x60 bytes does not fit in the 32-bit address space"),
    ("not ELF", mb_header(3) + TEXT,
     r"flags bit 16 clear\), so the kernel must be an ELF file, but it starts with 02b0ad1b"),
    ("ELF64", elf32([(MiB, TEXT, 0, MiB, PF_X)], MiB, machine=62, cls=2, header=mb_header(3)),
     r"ELF64 multiboot kernel: multiboot v1 enters in 32-bit protected mode"),
    ("bad ELF", b"\x7fELF" + bytes([1, 2, 1]) + bytes(9) + mb_header(3), r"big-endian ELF"),
    ("ELF entry outside", elf_kernel(entry=0x200000), r"entry point e_entry=0x200000 is not inside any loaded segment"),
    ("ELF segment outside RAM", elf32([(RAM - 8, TEXT, 0, RAM - 8, PF_X)], RAM - 8, header=mb_header(3)),
     r"segment 0 at 0x1ffff8\.\.0x200044 .* does not fit in guest RAM"),
    ("no room for the tables", aout(load_addr=0, prefix=0, bss=RAM - 0x60, entry_off=0x20),
     r"no room in guest RAM for the protected-mode boot tables"),
]


@pytest.mark.parametrize("name,data,message", BAD, ids=[b[0] for b in BAD])
def test_bad_kernel_raises_loader_error_and_writes_nothing(mem, name, data, message):
    """Each malformed kernel raises LoaderError naming the problem and leaves RAM untouched."""
    with pytest.raises(LoaderError, match=message):
        load_multiboot(mem, data)
    assert untouched_outside(mem, ())


def test_modules_not_fitting_in_ram_raise_and_write_nothing(mem):
    """A module past the end of RAM is refused before the kernel is written."""
    with pytest.raises(LoaderError, match=r"module 1 \(0x100000 bytes\) does not fit in guest RAM after 0x1"):
        load_multiboot(mem, elf_kernel(), modules=[(b"ok", "a"), (bytes(MiB), "b")])
    assert untouched_outside(mem, ())


@pytest.mark.parametrize("kw,message", [
    (dict(cmdline="a\0b"), r"command line contains a NUL byte"),
    (dict(modules=[(b"x", "m\0")]), r"module 0 string contains a NUL byte"),
    (dict(image_name="\udcff"), r"command line cannot be encoded as UTF-8"),
])
def test_bad_strings_raise(mem, kw, message):
    """Strings with NUL bytes or unencodable characters are refused."""
    with pytest.raises(LoaderError, match=message):
        load_multiboot(mem, aout(), **kw)
    assert untouched_outside(mem, ())


def test_bundled_guest_loads():
    """The bundled multiboot-hello kernel (if built) has its header in the first 8 KiB and loads at 1 MiB."""
    from kvmpy import guests
    try:
        path = guests.path("multiboot-hello")          # the installed package's, or this checkout's
    except FileNotFoundError:
        if os.environ.get("KVMPY_REQUIRE_KVM") == "1":
            raise
        pytest.skip("guest images not built (make -C guests)")
    data = path.read_bytes()
    assert find_header(data).offset < 8192 and not find_header(data).aout_kludge
    with fresh_mem(8 * MiB) as mem:
        img = load_multiboot(mem, data, cmdline="hi", modules=[(b"mod", "m")], reserved=[(0, MiB)])
        assert img.entry >= MiB and dict(img.registers)["rbx"] >= img.segments[0][0]


# --- hypothesis ---------------------------------------------------------------------------------------
HSET = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
U32 = st.one_of(st.integers(0, 0xFFFFFFFF),
                st.sampled_from([0, 1, 4, 0xFFFFFFFF, 0x80000000, MiB, MiB + 0x10, MiB + 0x70, RAM, RAM - 1]))


def check_loaded_or_refused(mem, data, **kw):
    """Either LoaderError with RAM untouched, or a load whose every range lies in RAM."""
    try:
        img = load_multiboot(mem, data, **kw)
    except LoaderError:
        assert untouched_outside(mem, ())
        return None
    assert img.mode == "protected" and img.format == "multiboot"
    assert all(0 <= gpa and gpa + n <= RAM for gpa, n in img.segments)
    kernel = img.segments[:-1 - sum(1 for m, _ in kw.get("modules", ()) if m)]
    assert any(gpa <= img.entry < gpa + n for gpa, n in kernel)
    ebx = dict(img.registers)["rbx"]
    assert not any(gpa < ebx + 88 and ebx < gpa + n for gpa, n in kernel) and ebx + 88 <= RAM
    assert untouched_outside(mem, img.segments)
    return img


@settings(HSET, max_examples=150)
@given(load_addr=st.integers(0, RAM // PAGE - 8).map(lambda p: p * PAGE + 0x10),
       bss=st.integers(0, 0x20000), sizes=st.lists(st.integers(0, 0x9000), max_size=4),
       cmdline=st.text(max_size=300))
def test_any_placement_keeps_available_memory_clear_of_what_was_written(load_addr, bss, sizes, cmdline):
    """Wherever the kernel lies and whatever the modules, either LoaderError, or no available
    map entry overlaps the tables, the information, its strings or the modules, and nothing
    the loader or the VMM wrote overlaps the kernel."""
    with fresh_mem() as mem:
        mods = [(bytes([k]) * n, f"m{k}") for k, n in enumerate(sizes)]
        img = check_loaded_or_refused(mem, aout(load_addr=load_addr, bss=bss), modules=mods, cmdline=cmdline,
                                      reserved=[(0x9FC00, MiB)])
        if img is None:
            return
        info = decode(mem, img)
        kernel = img.segments[0]
        for taken in written_by_loader_and_vmm(mem, img, info):
            assert not (taken[0] < kernel[0] + kernel[1] and kernel[0] < taken[1])
            assert not any(taken[0] < free[1] and free[0] < taken[1] for free in available(info["mmap"]))


@HSET
@given(prefix=st.sampled_from([b"", mb_header(3), mb_header(KLUDGE), b"\x7fELF\x01\x01\x01" + bytes(9)]),
       tail=st.binary(max_size=600))
def test_arbitrary_bytes_only_raise_loader_error(prefix, tail):
    """Any byte string (some starting like a header or an ELF) loads in RAM or raises LoaderError."""
    with fresh_mem() as mem:
        check_loaded_or_refused(mem, prefix + tail)
        assert is_multiboot(prefix + tail) in (True, False)


@st.composite
def mutated_kernel(draw):
    """A valid a.out or ELF kernel with header fields overwritten, checksum fixed or not, maybe cut short."""
    data = bytearray(draw(st.sampled_from([aout(), aout(skip=8, bss=0), elf_kernel()])))
    off = find_header(bytes(data)).offset
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.integers(1, 7))                       # flags .. entry_addr (not the magic)
        struct.pack_into("<I", data, off + 4 * field, draw(U32))
    if draw(st.booleans()):
        flags = struct.unpack_from("<I", data, off + 4)[0]
        struct.pack_into("<I", data, off + 8, -(MULTIBOOT_HEADER_MAGIC + flags) & 0xFFFFFFFF)
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@settings(HSET, max_examples=400)
@given(data=mutated_kernel(), nmods=st.integers(0, 2))
def test_mutated_headers_load_in_bounds_or_raise_loader_error(data, nmods):
    """A mutated multiboot header either loads inside RAM (nothing outside its ranges written) or raises LoaderError."""
    with fresh_mem() as mem:
        check_loaded_or_refused(mem, data, modules=[(b"m" * 300, "mod")] * nmods)
