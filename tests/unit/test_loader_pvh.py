"""PVH loading: the Xen PHYS32_ENTRY note is found (or its absence reported), hvm_start_info,
module list and memory map are written as start_info.h lays them out, bad notes raise LoaderError."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.errors import LoaderError
from kvmpy.loader import pvh
from kvmpy.loader.linux import BOOT_INFO, CMDLINE, PVH_MEMMAP, PVH_MODLIST, load_linux
from kvmpy.kvm.memory import GuestMemory

MiB = 1 << 20
RAM = 64 * MiB
LOW = [(0, MiB)]
ENTRY = 0x100_0040
PT_LOAD, PT_NOTE = 1, 4


def note(name: bytes, ntype: int, desc: bytes, align: int = 4) -> bytes:
    """One ELF note: namesz, descsz, type, then name and desc padded to ``align``."""
    pad = lambda b: b + b"\0" * (-len(b) % align)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def xen_entry(value: int = ENTRY, size: int = 8) -> bytes:
    return note(b"Xen\0", pvh.XEN_ELFNOTE_PHYS32_ENTRY, value.to_bytes(size, "little"))


def make_vmlinux(notes: bytes = None, *, code: bytes = b"\x90" * 0x100, paddr: int = 0x100_0000,
                 memsz: int = 0x2000, note_align: int = 4, note_filesz: int | None = None) -> bytes:
    """A minimal ELF64 vmlinux: one PT_LOAD and one PT_NOTE (like Linux's .notes segment)."""
    notes = (note(b"GNU\0", 3, b"\x11" * 20) + xen_entry()) if notes is None else notes
    phoff, phnum = 64, 2
    data_at = phoff + phnum * 56
    notes_at = data_at + len(code)
    ehdr = (b"\x7fELF\x02\x01\x01" + bytes(9)
            + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, paddr, phoff, 0, 0, 64, 56, phnum, 0, 0, 0))
    load = struct.pack("<IIQQQQQQ", PT_LOAD, 7, data_at, 0xFFFF_FFFF_8000_0000 + paddr, paddr, len(code), memsz,
                       0x1000)
    nphdr = struct.pack("<IIQQQQQQ", PT_NOTE, 4, notes_at, 0, 0,
                        len(notes) if note_filesz is None else note_filesz, len(notes), note_align)
    return ehdr + load + nphdr + code + notes


def memory(size=RAM) -> GuestMemory:
    mem = GuestMemory.anonymous(size)
    mem.fill(0, size, 0xAA)
    return mem


# --- the note parser -------------------------------------------------------------------
@pytest.mark.parametrize("size", [4, 8])
def test_finds_the_phys32_entry_note_of_4_or_8_bytes(size):
    """Linux writes the entry as a pointer-sized value (8 bytes on x86-64); Xen's ABI says 4."""
    assert pvh.find_pvh_entry(make_vmlinux(xen_entry(ENTRY, size))) == ENTRY


def test_other_notes_are_ignored_and_no_note_means_none():
    """Notes of other owners or types don't count; a vmlinux without the note gives None."""
    notes = note(b"Xen\0", 6, b"linux\0") + note(b"Linux\0", 18, b"\1\0\0\0")
    assert pvh.find_pvh_entry(make_vmlinux(notes)) is None


def test_eight_byte_aligned_notes_are_read():
    """A PT_NOTE with p_align 8 pads names and descriptors to 8 bytes."""
    notes = note(b"GNU\0", 5, b"\1\2\3\4\5", align=8) + note(b"Xen\0", 18, struct.pack("<Q", ENTRY), align=8)
    assert pvh.find_pvh_entry(make_vmlinux(notes, note_align=8)) == ENTRY


@pytest.mark.parametrize("notes, message", [
    (struct.pack("<III", 4, 64, 18) + b"Xen\0" + b"\0" * 8, "runs past"),
    (b"\0" * 6, "truncated"),
    (note(b"Xen\0", 18, b"\0\0\0"), "3-byte"),
    (note(b"Xen\0", 18, struct.pack("<Q", 1 << 32)), "32-bit"),
])
def test_malformed_notes_are_loader_errors(notes, message):
    """Notes that run past their segment, short headers, odd sizes and >4 GiB entries are refused."""
    with pytest.raises(LoaderError, match=message):
        pvh.find_pvh_entry(make_vmlinux(notes))


def test_note_segment_past_end_of_file_is_refused():
    """A PT_NOTE whose p_filesz runs past the file is a LoaderError, not a short read."""
    with pytest.raises(LoaderError, match="past end of file"):
        pvh.find_pvh_entry(make_vmlinux(note_filesz=0x10000))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256), st.sampled_from([4, 8]))
def test_random_note_bytes_raise_only_loader_errors(blob, align):
    """Garbage in a PT_NOTE yields notes or LoaderError; iteration always ends."""
    try:
        for name, ntype, desc in pvh.iter_notes(memoryview(blob), align):
            assert isinstance(name, bytes) and len(desc) <= len(blob)
    except LoaderError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 0x1A0), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_vmlinux_headers_raise_only_loader_errors(edits):
    """Random byte edits in the ELF and program headers: an entry, None, or LoaderError."""
    image = bytearray(make_vmlinux())
    for off, value in edits:
        if off < len(image):
            image[off] = value
    try:
        pvh.find_pvh_entry(bytes(image))
        mem = GuestMemory.anonymous(32 * MiB)
        img = load_linux(mem, bytes(image), cmdline="x", reserved=LOW)
        assert all(MiB <= a and a + n <= mem.end for a, n in img.segments)
    except LoaderError:
        pass


# --- loading ---------------------------------------------------------------------------
def test_pvh_enters_32_bit_protected_mode_with_ebx_at_the_start_info():
    """Entry is the note's address in protected mode; EBX points to hvm_start_info."""
    mem = memory()
    img = load_linux(mem, make_vmlinux(), cmdline="console=ttyS0", reserved=LOW)
    assert (img.mode, img.entry, img.format) == ("protected", ENTRY, "pvh")
    assert dict(img.registers) == {"rbx": BOOT_INFO}
    assert mem.read(0x100_0000, 4) == b"\x90" * 4 and mem.read(0x100_0100, 4) == bytes(4)   # bss zeroed
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, reserved = \
        pvh.START_INFO.unpack(mem.read(BOOT_INFO, pvh.START_INFO.size))
    assert (magic, version, flags, nr_modules, modlist) == (0x336EC578, 1, 0, 0, 0)
    assert (cmdline, rsdp, memmap, entries, reserved) == (CMDLINE, 0, PVH_MEMMAP, 2, 0)
    assert mem.read(CMDLINE, 14) == b"console=ttyS0\0"
    assert pvh.MEMMAP_ENTRY.unpack(mem.read(PVH_MEMMAP, 24)) == (0, 0x9FC00, 1, 0)
    assert pvh.MEMMAP_ENTRY.unpack(mem.read(PVH_MEMMAP + 24, 24)) == (MiB, RAM - MiB, 1, 0)


def test_pvh_initrd_is_module_zero():
    """The initrd is the first hvm_modlist_entry, placed high and page-aligned."""
    mem, rd = memory(), b"initrd!" * 1000
    img = load_linux(mem, make_vmlinux(), cmdline="", initrd=rd, reserved=LOW)
    nr_modules, modlist = struct.unpack_from("<IQ", mem.read(BOOT_INFO + 12, 12))
    assert (nr_modules, modlist) == (1, PVH_MODLIST)
    paddr, size, cmdline, reserved = pvh.MODLIST_ENTRY.unpack(mem.read(PVH_MODLIST, 32))
    assert size == len(rd) and paddr % 4096 == 0 and paddr + size <= RAM and (cmdline, reserved) == (0, 0)
    assert mem.read(paddr, size) == rd and img.segments[-1] == (paddr, size)


def test_elf_without_the_note_is_not_pvh_bootable():
    """An ELF without XEN_ELFNOTE_PHYS32_ENTRY is refused with the reason (CONFIG_PVH)."""
    with pytest.raises(LoaderError, match="XEN_ELFNOTE_PHYS32_ENTRY"):
        load_linux(memory(), make_vmlinux(note(b"GNU\0", 3, b"x" * 20)), reserved=LOW)


def test_entry_outside_the_loaded_segments_is_refused():
    """The PVH entry must point into a PT_LOAD segment."""
    with pytest.raises(LoaderError, match="not inside"):
        load_linux(memory(), make_vmlinux(xen_entry(0x200_0000)), reserved=LOW)


def test_vmlinux_or_initrd_that_do_not_fit_are_loader_errors_and_memory_is_untouched():
    """Segments beyond RAM, or an initrd with no room left, fail before anything is written."""
    with pytest.raises(LoaderError, match="does not fit in guest RAM"):
        load_linux(memory(), make_vmlinux(paddr=RAM - 0x1000, memsz=0x2000,
                                          notes=xen_entry(RAM - 0x1000)), reserved=LOW)
    mem = memory(18 * MiB)          # free: 1..16 MiB below the kernel, 16 MiB + 8 KiB..18 MiB above it
    with pytest.raises(LoaderError, match="initrd"):
        load_linux(mem, make_vmlinux(), cmdline="", initrd=bytes(15 * MiB + 1), reserved=LOW)
    assert mem.read(0x100_0000, 4) == b"\xaa" * 4 and mem.read(BOOT_INFO, 4) == b"\xaa" * 4


def test_truncated_vmlinux_is_a_loader_error():
    """A vmlinux cut short anywhere raises LoaderError."""
    image = make_vmlinux()
    for cut in (3, 20, 64, 100, 64 + 2 * 56 + 10, len(image) - 4):
        with pytest.raises(LoaderError):
            load_linux(memory(), image[:cut], reserved=LOW)


def test_start_info_layout_matches_start_info_h():
    """struct hvm_start_info is 56 bytes; modlist entries 32; memmap entries 24."""
    assert (pvh.START_INFO.size, pvh.MODLIST_ENTRY.size, pvh.MEMMAP_ENTRY.size) == (56, 32, 24)
    blob = pvh.start_info(cmdline_paddr=0x80000, memmap_paddr=0x7080, memmap_entries=3, modlist_paddr=0x7040,
                          nr_modules=1, rsdp_paddr=0xE0000)
    assert struct.unpack_from("<IIII", blob) == (0x336EC578, 1, 0, 1)
    assert struct.unpack_from("<QQQQI", blob, 16) == (0x7040, 0x80000, 0xE0000, 0x7080, 3)


def test_linux_format_tells_pvh_kernels_from_other_elf_files():
    """Auto-detection: an ELF with the note is 'pvh', without it (or broken) None, never an error."""
    from kvmpy.loader.linux import linux_format
    assert linux_format(make_vmlinux()) == "pvh"
    assert linux_format(make_vmlinux(note(b"GNU\0", 3, b"x" * 20))) is None
    assert linux_format(make_vmlinux()[:70]) is None
    assert linux_format(b"") is None


def test_pvh_acpi_tables_are_written_announced_in_the_start_info_and_kept_in_the_memory_map():
    from kvmpy.x86 import acpi
    tables = acpi.build(acpi.Platform(cpus=2))
    mem = memory()
    load_linux(mem, make_vmlinux(), cmdline="", reserved=LOW, acpi=tables)
    assert mem.read(tables.base, len(tables.data)) == tables.data
    rsdp = pvh.START_INFO.unpack(mem.read(BOOT_INFO, pvh.START_INFO.size))[6]
    assert rsdp == tables.rsdp == 0xE0000 and mem.read(rsdp, 8) == b"RSD PTR "
    entries = [pvh.MEMMAP_ENTRY.unpack(mem.read(PVH_MEMMAP + 24 * i, 24)) for i in range(3)]
    assert entries == [(0, 0x9FC00, 1, 0), (0xE0000, 0x1000, 3, 0), (MiB, RAM - MiB, 1, 0)]   # type 3: ACPI data
    assert pvh.START_INFO.unpack(mem.read(BOOT_INFO, pvh.START_INFO.size))[8] == 3


def test_acpi_tables_that_clash_with_the_kernel_are_refused_before_anything_is_written():
    from kvmpy.x86 import acpi
    mem = memory()
    tables = acpi.build(acpi.Platform(cpus=1), base=0x100_0000)       # where the vmlinux loads
    with pytest.raises(LoaderError, match="overlaps"):
        load_linux(mem, make_vmlinux(), cmdline="", reserved=LOW, acpi=tables)
    with pytest.raises(LoaderError, match="boot information"):
        load_linux(mem, make_vmlinux(), cmdline="", reserved=LOW, acpi=acpi.build(acpi.Platform(cpus=1), base=0x7000))
    with pytest.raises(LoaderError, match="not in guest RAM"):
        load_linux(mem, make_vmlinux(), cmdline="", reserved=LOW,
                   acpi=acpi.build(acpi.Platform(cpus=1), base=RAM - 16))
    assert mem.read(BOOT_INFO, 8) == mem.read(0x100_0000, 8) == mem.read(0xE0000, 8) == b"\xaa" * 8   # untouched
