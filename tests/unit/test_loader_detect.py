"""detect() picks an image's loader, the one place that does; load() is the front door that
reads the files, detects and dispatches. Known headers are recognised as QEMU's -kernel
does; any bytes give a known loader name (auto) or a LoaderError (a named format)."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.errors import LoaderError
from kvmpy.kvm.memory import GuestMemory
from kvmpy.loader import FORMATS, LOADERS, default_reserved, detect, load, load_path
from kvmpy.loader.linux import CMDLINE
from kvmpy.x86 import layout

MiB = 1 << 20
RAM = 64 * MiB
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODE = b"\xb0\x41\xe6\xf4"                  # mov al, 'A'; out 0xf4, al


# --- minimal images: just enough header for each loader ------------------------------
def multiboot(load_addr=MiB, body=CODE, flags=0x10003) -> bytes:
    """A flat multiboot kernel whose header (with address fields) opens the file."""
    magic = 0x1BADB002
    hdr = struct.pack("<8I", magic, flags, -(magic + flags) & 0xFFFFFFFF, load_addr, load_addr, 0, 0,
                      load_addr + 32)
    return hdr + body


def bzimage() -> bytes:
    """A bzImage (boot protocol 2.15, 64-bit entry): 4 setup sectors, then a 1 KiB kernel."""
    setup = bytearray(5 * 512)
    kernel = b"\x90" * 0x200 + b"\xf4" * 0x200
    setup[0x1F1] = 4
    struct.pack_into("<I", setup, 0x1F4, len(kernel) // 16)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x201] = 0x26C - 0x202
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    setup[0x211] = 0x01                                     # LOADED_HIGH
    struct.pack_into("<IIBxH", setup, 0x22C, 0x7FFF_FFFF, 0x20_0000, 1, 0x1)   # initrd max, align, reloc, xlf
    struct.pack_into("<I", setup, 0x238, 0x7FF)
    struct.pack_into("<Q", setup, 0x258, 0x100_0000)
    struct.pack_into("<I", setup, 0x260, 0x20_0000)
    return bytes(setup) + kernel


def elf64(paddr=MiB, notes=b"") -> bytes:
    """An ELF64 executable: one PT_LOAD of CODE at ``paddr``, and a PT_NOTE if ``notes``."""
    phnum = 2 if notes else 1
    data_at = 64 + 56 * phnum
    ehdr = (b"\x7fELF\x02\x01\x01" + bytes(9)
            + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, paddr, 64, 0, 0, 64, 56, phnum, 0, 0, 0))
    phdrs = struct.pack("<IIQQQQQQ", 1, 7, data_at, paddr, paddr, len(CODE), 0x1000, 0x1000)
    if notes:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, data_at + len(CODE), 0, 0, len(notes), len(notes), 4)
    return ehdr + phdrs + CODE + notes


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def vmlinux(entry=0x100_0000) -> bytes:
    """A PVH-bootable vmlinux: the Xen PHYS32_ENTRY note (type 18) names the entry."""
    return elf64(0x100_0000, note(b"GNU\0", 3, b"\x11" * 20) + note(b"Xen\0", 18, struct.pack("<Q", entry)))


KNOWN = {
    "multiboot a.out": (multiboot(), "multiboot"),
    "multiboot ELF": (elf64(notes=note(b"GNU\0", 3, b"x" * 4)) + multiboot(), "multiboot"),
    "bzImage": (bzimage(), "bzimage"),
    "PVH vmlinux": (vmlinux(), "pvh"),
    "ELF64": (elf64(), "elf"),
    "vmlinux without the PVH note": (elf64(0x100_0000, note(b"GNU\0", 3, b"x" * 20)), "elf"),
    "boot sector": (CODE + bytes(508), "raw"),
    "empty": (b"", "raw"),
}


@pytest.fixture
def mem():
    with GuestMemory.anonymous(RAM) as m:
        yield m


# --- detect(): known images ------------------------------------------------------------
@pytest.mark.parametrize("name", KNOWN)
def test_known_images_are_detected(name):
    data, expected = KNOWN[name]
    assert detect(data) == expected
    assert detect(bytearray(data)) == detect(memoryview(data)) == expected


def test_a_multiboot_header_is_looked_for_before_linux():
    """A bzImage that also carries a multiboot header in its first 8 KiB boots as multiboot."""
    bz = bytearray(bzimage())
    bz[0x800:0x820] = multiboot(body=b"")
    assert detect(bytes(bz)) == "multiboot"


def test_linux_picks_bzimage_or_pvh():
    assert detect(bzimage(), "linux") == "bzimage"
    assert detect(vmlinux(), "linux") == "pvh"


def test_linux_on_something_else_says_what_a_linux_kernel_looks_like():
    with pytest.raises(LoaderError, match=r"not a Linux kernel.*HdrS"):
        detect(b"\x90" * 1024, "linux")


@pytest.mark.parametrize("fmt", LOADERS)
def test_a_named_loader_is_taken_as_given(fmt):
    """Naming the loader overrides detection; that loader then validates the bytes."""
    assert detect(b"\x7fELF junk", fmt) == fmt


@pytest.mark.parametrize("fmt", ["coff", "", "AUTO", "ELF", "vmlinux", "bzImage"])
def test_unknown_format_names_list_the_choices(fmt):
    with pytest.raises(LoaderError, match=rf"unknown image format {fmt!r}; expected one of "
                                          r"auto, raw, elf, multiboot, linux, bzimage, pvh$"):
        detect(b"", fmt)


def test_formats_are_the_loaders_plus_auto_and_linux():
    assert set(FORMATS) == set(LOADERS) | {"auto", "linux"}


# --- detect(): any bytes ---------------------------------------------------------------
@FAST
@given(data=st.binary(max_size=12288))
def test_auto_never_raises_and_answers_a_loader(data):
    assert detect(data) in LOADERS


@FAST
@given(data=st.binary(max_size=4096), fmt=st.sampled_from(FORMATS))
def test_named_formats_raise_only_loader_errors(data, fmt):
    try:
        found = detect(data, fmt)
    except LoaderError:
        assert fmt == "linux"
        return
    assert found in LOADERS and (found == fmt or fmt in ("auto", "linux"))


@FAST
@given(fmt=st.text(max_size=12))
def test_any_format_string_is_known_or_a_loader_error(fmt):
    try:
        assert detect(b"\0" * 16, fmt) in LOADERS
    except LoaderError as e:
        if fmt == "linux":                  # named, but sixteen zero bytes are no Linux kernel
            assert "not a Linux kernel" in str(e)
        else:
            assert fmt not in FORMATS and "expected one of" in str(e)


@pytest.mark.parametrize("name", [n for n in KNOWN if KNOWN[n][0]])
@FAST
@given(cut=st.integers(0, 1 << 16), flip=st.integers(0, 1 << 16), tail=st.binary(max_size=256))
def test_hostile_edits_of_known_images_never_make_auto_raise(name, cut, flip, tail):
    """Truncated, corrupted or extended headers still give a loader (which then explains)."""
    data = bytearray(KNOWN[name][0][:cut % (len(KNOWN[name][0]) + 1)] + tail)
    if data:
        data[flip % len(data)] ^= 0xFF
    assert detect(bytes(data)) in LOADERS


# --- load(): the front door ------------------------------------------------------------
def test_load_dispatches_on_what_detect_found(mem):
    assert load(mem, multiboot()).format == "multiboot"
    assert load(mem, elf64()).format == "elf"
    assert load(mem, CODE).format == "raw"
    assert load(mem, vmlinux()).format == "pvh"
    assert load(mem, bzimage()).format == "bzimage"


def test_linux_gets_the_extra_command_line_and_others_do_not(mem):
    extra = "virtio_mmio.device=4K@0xd0000000:5"
    img = load(mem, bzimage(), cmdline="console=ttyS0", linux_cmdline_extra=extra)
    assert img.cmdline == f"console=ttyS0 {extra}"
    assert mem.read(CMDLINE, len(img.cmdline) + 1) == img.cmdline.encode() + b"\0"
    assert load(mem, vmlinux(), linux_cmdline_extra=extra).cmdline == extra
    assert load(mem, elf64(), cmdline="n=3", linux_cmdline_extra=extra).cmdline == "n=3"
    assert load(mem, multiboot(), cmdline="n=3", linux_cmdline_extra=extra).cmdline == "n=3"


def test_files_are_read_for_image_initrd_and_modules(mem, tmp_path):
    kernel, rd, mod = tmp_path / "vmlinux", tmp_path / "rd.img", tmp_path / "mod"
    kernel.write_bytes(vmlinux())
    rd.write_bytes(b"RD" * 100)
    mod.write_bytes(b"MOD")
    img = load(mem, kernel, initrd=rd)
    gpa, size = img.segments[-1]
    assert mem.read(gpa, size) == b"RD" * 100
    mb = tmp_path / "mb"
    mb.write_bytes(multiboot())
    img = load(mem, str(mb), modules=[mod, (str(mod), "a b"), (b"raw", "given as is")])
    assert [mem.read(gpa, n) for gpa, n in img.segments[2:]] == [b"MOD", b"MOD", b"raw"]
    info = mem.read(*img.segments[1])                    # module strings are "FILE ARGS", as QEMU's
    assert f"\0{mod}\0{mod} a b\0given as is\0{mb} \0".encode() in info


def test_unreadable_inputs_name_the_file_and_what_it_is(mem, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(LoaderError, match=rf"^cannot read image '{missing}': No such file or directory$"):
        load(mem, missing)
    with pytest.raises(LoaderError, match=rf"^cannot read initrd '{missing}': No such file"):
        load(mem, bzimage(), initrd=missing)
    with pytest.raises(LoaderError, match=rf"^cannot read module '{missing}': No such file"):
        load(mem, multiboot(), modules=[(missing, "x")])


def test_loader_errors_are_prefixed_with_the_image_name(mem, tmp_path):
    p = tmp_path / "bad.elf"
    p.write_bytes(b"\x7fELF" + bytes(10))
    with pytest.raises(LoaderError, match=rf"^{p}: .*ELF"):
        load(mem, p)
    with pytest.raises(LoaderError, match=r"^image: raw image is empty$"):
        load(mem, b"", "raw")


@pytest.mark.parametrize("image, kw, message", [
    (elf64(), dict(initrd=b"rd"), "an initrd is for Linux kernels, not for elf images"),
    (multiboot(), dict(initrd=b"rd"), "multiboot kernel takes modules"),
    (bzimage(), dict(modules=[b"m"]), "modules are for multiboot kernels.*Linux takes an initrd"),
    (multiboot(), dict(load_addr=MiB), "load_addr and entry apply to raw images only"),
    (vmlinux(), dict(entry=MiB), "load_addr and entry apply to raw images only"),
    (multiboot(), dict(mode="long"), "multiboot kernel enters in protected mode, not mode='long'"),
    (vmlinux(), dict(mode="real"), "pvh kernel enters in protected mode"),
    (CODE, dict(mode="smm"), "unknown mode 'smm'"),
])
def test_options_the_loader_cannot_honour_are_refused_before_writing(image, kw, message):
    with GuestMemory.anonymous(RAM) as m:
        m.fill(0, RAM, 0xAA)
        with pytest.raises(LoaderError, match=message):
            load(m, image, **kw)
        assert m.read(0, RAM) == b"\xaa" * RAM


def test_a_bzimage_mode_picks_its_32_or_64_bit_entry(mem):
    assert load(mem, bzimage(), mode="long").mode == "long"
    img = load(mem, bzimage(), mode="protected")
    assert img.mode == "protected" and img.entry == 0x100_0000


def test_reserved_defaults_to_the_legacy_hole_linux_to_the_first_mib_real_mode_raw_nothing(mem):
    """Images may load below 1 MiB, but not in the EBDA/VGA/BIOS hole; Linux keeps above 1 MiB."""
    assert default_reserved("raw", None) == default_reserved("raw", "real") == ()
    for found, mode in [("raw", "long"), ("elf", None), ("multiboot", None)]:
        assert default_reserved(found, mode) == (layout.LEGACY_HOLE,)
    assert default_reserved("bzimage", None) == default_reserved("pvh", None) == (layout.LOW_RESERVED,)
    assert load(mem, CODE).entry == 0x7C00                     # a boot sector lives in the first MiB
    with pytest.raises(LoaderError, match="overlaps the reserved range 0x9fc00..0x100000"):
        load(mem, CODE, mode="long", load_addr=0xB8000)
    with pytest.raises(LoaderError, match="overlaps the reserved range 0x9fc00..0x100000"):
        load(mem, elf64(paddr=0x9F000))
    with pytest.raises(LoaderError, match="overlaps the reserved range 0x0..0x100000"):
        load(mem, elf64(paddr=0x2000), reserved=[layout.LOW_RESERVED])


def test_an_image_in_low_memory_moves_the_boot_tables_out_of_its_way(mem):
    """An image where the GDT/TSS/page tables live loads; their place moves clear of its pages."""
    from kvmpy.x86 import boottables
    img = load(mem, CODE, mode="protected", load_addr=0x8000)   # clear of the protected-mode tables
    assert img.segments == ((0x8000, len(CODE)),) and img.tables == boottables.DEFAULT
    img = load(mem, elf64(paddr=0x2000))                        # inside the TSS: the tables move
    assert img.entry == 0x2000 and img.segments == ((0x2000, 0x1000),)
    assert img.tables == boottables.BootTables.at(0x3000)      # the first free pages above it
    used = boottables.pages(img.tables.ranges("long", mem.end))
    assert not any(boottables.overlaps(u, (0x2000, 0x3000)) for u in used)


def test_load_path_takes_paths_only(mem, tmp_path):
    with pytest.raises(TypeError, match="takes a path"):
        load_path(mem, CODE)
    p = tmp_path / "boot.bin"
    p.write_bytes(CODE)
    assert load_path(mem, p, mode="real").entry == 0x7C00
