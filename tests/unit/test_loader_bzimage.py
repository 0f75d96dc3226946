"""bzImage loading: the setup header is checked field by field, the kernel, zero page, command
line and initrd land where the boot protocol says, and bad images raise LoaderError."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.errors import LoaderError
from kvmpy.loader import bzimage, linux
from kvmpy.loader.linux import BOOT_INFO, CMDLINE, load_linux
from kvmpy.kvm.memory import GuestMemory

MiB = 1 << 20
RAM = 64 * MiB
LOW = [(0, MiB)]                     # what the Machine reserves: the first MiB
FILL = 0xAA


def make_bzimage(*, version=0x020F, setup_sects=4, kernel=None, xloadflags=0x1, pref_address=0x100_0000,
                 init_size=0x20_0000, relocatable=1, alignment=0x20_0000, cmdline_size=0x7FF,
                 initrd_addr_max=0x7FFF_FFFF, loadflags=0x01, payload=b"", header_end=0x26C, syssize=None,
                 magic=b"HdrS", boot_flag=0xAA55) -> bytes:
    """A synthetic bzImage: boot sector + setup sectors, then the protected-mode kernel."""
    if kernel is None:
        kernel = b"\x90" * 0x200 + b"\xf4" * 0x200 + payload
    setup = bytearray((setup_sects or 4) * 512 + 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, (len(kernel) + 15) // 16 if syssize is None else syssize)
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200], setup[0x201] = 0xEB, header_end - 0x202
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, alignment)
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<II", setup, 0x248, 0x400 if payload else 0, len(payload))
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    kernel = kernel + b"\0" * (-len(kernel) % 16)
    return bytes(setup) + kernel


def memory(size=RAM) -> GuestMemory:
    mem = GuestMemory.anonymous(size)
    mem.fill(0, size, FILL)
    return mem


def u32(mem, gpa):
    return struct.unpack("<I", mem.read(gpa, 4))[0]


# --- the header parser -----------------------------------------------------------------
def test_parse_reads_the_fields_a_loader_needs():
    """A valid header decodes: version, sizes, alignment, pref_address, init_size, flags."""
    h = bzimage.parse_setup_header(make_bzimage())
    assert (h.version, h.setup_sects, h.kernel_offset) == (0x20F, 4, 5 * 512)
    assert (h.pref_address, h.init_size, h.kernel_alignment, h.relocatable_kernel) == (0x100_0000, 0x20_0000,
                                                                                     0x20_0000, True)
    assert h.has_entry64 and h.cmdline_size == 0x7FF and h.initrd_addr_max == 0x7FFF_FFFF
    assert len(h.header) == 0x26C - 0x1F1


def test_setup_sects_zero_means_four():
    """boot.rst: 'If this field is 0, the real value is 4'."""
    assert bzimage.parse_setup_header(make_bzimage(setup_sects=0)).setup_sects == 4


@pytest.mark.parametrize("kw, message", [
    (dict(magic=b"HdrX"), "magic"),
    (dict(version=0x0205), "too old"),
    (dict(version=0x0100), "too old"),
    (dict(boot_flag=0x1234), "boot_flag"),
    (dict(loadflags=0), "zImage"),
    (dict(syssize=0), "syssize"),
    (dict(syssize=0x10_0000), "truncated"),
    (dict(alignment=0x30_0000), "power of two"),
    (dict(pref_address=0x100_0800), "pref_address"),
    (dict(cmdline_size=0), "cmdline_size"),
    (dict(header_end=0x250), "0x26c"),
    (dict(header_end=0x202 + 0xFF), "0x290"),
])
def test_bad_headers_are_rejected_with_the_field_named(kw, message):
    """Each malformed header field gives a LoaderError naming the problem."""
    with pytest.raises(LoaderError, match=message):
        bzimage.parse_setup_header(make_bzimage(**kw))


@pytest.mark.parametrize("cut", [0, 0x100, 0x205, 0x250, 5 * 512, 5 * 512 + 100])
def test_truncated_files_are_rejected(cut):
    """A file cut anywhere before the end of its kernel is refused, never read past its end."""
    with pytest.raises(LoaderError, match="short|truncated|magic"):
        bzimage.parse_setup_header(make_bzimage()[:cut])


def test_an_elf_or_random_file_is_not_a_bzimage():
    """No HdrS magic: the message says it is not a bzImage."""
    with pytest.raises(LoaderError, match="not a bzImage"):
        bzimage.parse_setup_header(b"\x7fELF" + bytes(0x300))


def test_runtime_start_follows_boot_rst():
    """Relocatable: max(load, pref) aligned up; not relocatable: pref_address."""
    h = bzimage.parse_setup_header(make_bzimage(pref_address=0x100_0000, alignment=0x20_0000))
    assert bzimage.runtime_start(h, 0x20_0000) == 0x100_0000
    assert bzimage.runtime_start(h, 0x110_0000) == 0x120_0000
    fixed = bzimage.parse_setup_header(make_bzimage(relocatable=0))
    assert bzimage.runtime_start(fixed, 0x20_0000) == 0x100_0000


@pytest.mark.parametrize("magic, name", bzimage.PAYLOAD_MAGICS)
def test_payload_names_its_compression(magic, name):
    """The payload's magic names the compressor."""
    got, blob = bzimage.payload(make_bzimage(payload=magic + b"data"))
    assert got == name and bytes(blob) == magic + b"data"


def test_payload_outside_the_kernel_is_rejected():
    """payload_offset + payload_length past the protected-mode code is a LoaderError."""
    image = bytearray(make_bzimage(payload=b"\x1f\x8b" + bytes(30)))
    struct.pack_into("<I", image, 0x24C, 0x10_0000)
    with pytest.raises(LoaderError, match="payload"):
        bzimage.parse_setup_header(bytes(image))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=0x600))
def test_random_bytes_raise_only_loader_errors(data):
    """Garbage never crashes the parser: it returns a header or raises LoaderError."""
    try:
        bzimage.parse_setup_header(data)
    except LoaderError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0x1F1, 0x26B), st.integers(0, 255)), min_size=1, max_size=8),
       st.binary(max_size=64))
def test_mutated_headers_load_inside_ram_or_raise_loader_error(edits, initrd):
    """Any corruption of the header either loads within RAM (kernel, initrd clear of each other
    and of the first MiB) or raises LoaderError; nothing else escapes."""
    image = bytearray(make_bzimage())
    for off, value in edits:
        image[off] = value
    mem = GuestMemory.anonymous(32 * MiB)
    try:
        img = load_linux(mem, bytes(image), cmdline="console=ttyS0", initrd=initrd or None, reserved=LOW)
    except LoaderError:
        return
    for gpa, size in img.segments:
        assert MiB <= gpa and gpa + size <= mem.end
    if initrd:
        (ka, kn), (ra, rn) = img.segments
        assert ra >= ka + kn or ra + rn <= ka


# --- loading ---------------------------------------------------------------------------
def test_64_bit_entry_is_load_address_plus_0x200_with_rsi_at_the_zero_page():
    """A 64-bit capable kernel enters in long mode at load + 0x200, RSI = zero page."""
    mem, image = memory(), make_bzimage()
    img = load_linux(mem, image, cmdline="console=ttyS0 quiet", reserved=LOW)
    assert (img.mode, img.entry, img.format) == ("long", 0x100_0200, "bzimage")
    assert dict(img.registers) == {"rsi": BOOT_INFO}
    h = bzimage.parse_setup_header(image)
    assert mem.read(0x100_0000, h.kernel_size) == image[h.kernel_offset:]
    assert mem.read(CMDLINE, 21) == b"console=ttyS0 quiet\0\xaa"[:21]
    assert mem.read(BOOT_INFO + 0x1F1, len(h.header))[0x11:0x15] == b"HdrS"      # header copied (0x202)
    assert u32(mem, BOOT_INFO + 0x228) == CMDLINE
    assert mem.read(BOOT_INFO + 0x210, 1) == b"\xff"
    assert mem.read(BOOT_INFO + 0x1E8, 1) == b"\x02"                              # two e820 entries
    assert u32(mem, BOOT_INFO + 0x218) == 0 and u32(mem, BOOT_INFO + 0x21C) == 0  # no initrd


def test_32_bit_entry_is_the_load_address_with_esi_at_the_zero_page():
    """bits=32 (or a kernel without XLF_KERNEL_64) enters in protected mode at the load address."""
    img = load_linux(memory(), make_bzimage(), cmdline="", reserved=LOW, bits=32)
    assert (img.mode, img.entry) == ("protected", 0x100_0000)
    assert dict(img.registers) == {"rsi": BOOT_INFO, "rbp": 0, "rdi": 0, "rbx": 0}
    img = load_linux(memory(), make_bzimage(xloadflags=0), cmdline="", reserved=LOW)
    assert img.mode == "protected"


def test_64_bit_entry_needs_xlf_kernel_64():
    """Asking for the 64-bit entry of a kernel without one is a LoaderError."""
    with pytest.raises(LoaderError, match="XLF_KERNEL_64"):
        load_linux(memory(), make_bzimage(xloadflags=0), cmdline="", reserved=LOW, bits=64)


def test_initrd_goes_high_page_aligned_and_below_initrd_addr_max():
    """The initrd sits as high as RAM and initrd_addr_max allow, page-aligned, recorded in the zero page."""
    rd = bytes(range(256)) * 40
    mem = memory()
    load_linux(mem, make_bzimage(), cmdline="", initrd=rd, reserved=LOW)
    addr, size = u32(mem, BOOT_INFO + 0x218), u32(mem, BOOT_INFO + 0x21C)
    assert size == len(rd) and addr % 4096 == 0 and addr + size <= RAM and addr + size > RAM - 8192
    assert mem.read(addr, size) == rd
    mem = memory()
    load_linux(mem, make_bzimage(initrd_addr_max=0x1FF_FFFF, init_size=0x10_0000), cmdline="", initrd=rd,
               reserved=LOW)
    addr = u32(mem, BOOT_INFO + 0x218)
    assert addr + len(rd) <= 0x200_0000 and addr >= 0x110_0000


def test_initrd_that_does_not_fit_is_a_loader_error_and_memory_is_untouched():
    """An initrd too big for the RAM left after the kernel fails before anything is written."""
    mem = memory()
    with pytest.raises(LoaderError, match="initrd"):
        load_linux(mem, make_bzimage(), cmdline="x", initrd=bytes(RAM - 16 * MiB), reserved=LOW)
    assert mem.read(0x100_0000, 16) == bytes([FILL]) * 16
    assert mem.read(BOOT_INFO, 16) == bytes([FILL]) * 16
    with pytest.raises(LoaderError, match="initrd"):
        load_linux(mem, make_bzimage(initrd_addr_max=0xF_FFFF), cmdline="", initrd=b"x" * 4096, reserved=LOW)


def test_kernel_that_does_not_fit_in_ram_is_a_loader_error():
    """pref_address + init_size beyond RAM: the error says it does not fit."""
    with pytest.raises(LoaderError, match="does not fit in guest RAM"):
        load_linux(memory(16 * MiB), make_bzimage(), cmdline="", reserved=LOW)
    with pytest.raises(LoaderError, match="does not fit in guest RAM"):
        load_linux(memory(), make_bzimage(init_size=RAM), cmdline="", reserved=LOW)


def test_command_line_longer_than_cmdline_size_is_rejected():
    """cmdline_size is the longest command line without its NUL."""
    load_linux(memory(), make_bzimage(cmdline_size=8), cmdline="12345678", reserved=LOW)
    with pytest.raises(LoaderError, match="at most 8"):
        load_linux(memory(), make_bzimage(cmdline_size=8), cmdline="123456789", reserved=LOW)
    with pytest.raises(LoaderError, match="NUL"):
        load_linux(memory(), make_bzimage(), cmdline="a\0b", reserved=LOW)


def test_machine_too_small_for_the_boot_information():
    """Less RAM than the boot page and command line need: LoaderError, not an IndexError."""
    with pytest.raises(LoaderError, match="too small"):
        load_linux(GuestMemory.anonymous(0x10000), make_bzimage(), cmdline="", reserved=LOW)


def test_format_must_match_the_image():
    """format='pvh' on a bzImage, or an unknown format, is a LoaderError."""
    with pytest.raises(LoaderError, match="bzimage kernel"):
        load_linux(memory(), make_bzimage(), format="pvh", reserved=LOW)
    with pytest.raises(LoaderError, match="unknown"):
        load_linux(memory(), make_bzimage(), format="zimage", reserved=LOW)
    with pytest.raises(LoaderError, match="not a Linux kernel"):
        load_linux(memory(), b"\0" * 0x1000, reserved=LOW)


def test_boot_information_stays_clear_of_the_vmm_tables():
    """The zero page and command line do not overlap the GDT, TSS, stacks or page tables in layout.py."""
    from kvmpy.x86 import layout
    taken = [(layout.BOOT_GDT, layout.BOOT_GDT + 0x100), (layout.BOOT_TSS, layout.BOOT_TSS + layout.BOOT_TSS_SIZE),
             (layout.RING0_STACK_TOP - 0x1000, layout.RING0_STACK_TOP), (layout.PML4, layout.PDPT + 0x1000),
             (layout.PD_BASE, layout.PD_BASE + layout.PD_MAX * 0x1000)]
    for lo, hi in linux.BOOT_RANGES:
        assert hi <= 0x9FC00                    # below the EBDA/MP-table area and the VGA hole
        for a, b in taken:
            assert hi <= a or b <= lo, f"{lo:#x}..{hi:#x} overlaps {a:#x}..{b:#x}"


@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 8)), max_size=6), st.integers(1, 40 * 4096))
def test_place_initrd_finds_the_highest_free_slot(avoid_pages, size):
    """place_initrd returns a page-aligned slot in RAM clear of every avoided range, or raises."""
    avoid = [(p * 0x10000, p * 0x10000 + n * 4096) for p, n in avoid_pages]
    ram = [(0, 0x40_0000)]
    try:
        at = linux.place_initrd(ram, size, limit=0x40_0000, avoid=avoid)
    except LoaderError:
        return
    assert at % 4096 == 0 and at + size <= 0x40_0000
    assert all(at + size <= a or b <= at for a, b in avoid)
    higher = at + 4096
    if higher + size <= 0x40_0000:      # the next page up would clash with something
        assert any(higher < b and a < higher + size for a, b in avoid)


def test_linux_format_recognises_a_bzimage():
    """Auto-detection: HdrS at 0x202 means 'bzimage'; random data means None."""
    assert linux.linux_format(make_bzimage()) == "bzimage"
    assert linux.linux_format(bytes(0x1000)) is None


def test_acpi_tables_are_written_and_their_rsdp_goes_in_the_zero_page():
    """boot_params.acpi_rsdp_addr (0x070) names the RSDP; the e820 map lists the tables' page
    as ACPI data between the two low RAM entries."""
    from kvmpy.x86 import acpi
    tables = acpi.build(acpi.Platform(cpus=4))
    mem = memory()
    load_linux(mem, make_bzimage(), cmdline="", reserved=LOW, acpi=tables)
    assert mem.read(tables.base, len(tables.data)) == tables.data
    assert struct.unpack("<Q", mem.read(BOOT_INFO + 0x70, 8))[0] == tables.rsdp == 0xE0000
    assert mem.read(BOOT_INFO + 0x1E8, 1) == b"\x03"
    e820 = [struct.unpack("<QQI", mem.read(BOOT_INFO + 0x2D0 + 20 * i, 20)) for i in range(3)]
    assert e820 == [(0, 0x9FC00, 1), (0xE0000, 0x1000, 3), (MiB, RAM - MiB, 1)]


def test_without_acpi_tables_the_zero_page_has_no_rsdp():
    mem = memory()
    load_linux(mem, make_bzimage(), cmdline="", reserved=LOW)
    assert struct.unpack("<Q", mem.read(BOOT_INFO + 0x70, 8))[0] == 0
    assert mem.read(0xE0000, 4) == bytes([FILL]) * 4
