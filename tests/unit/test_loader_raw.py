"""Raw image loader, the LoadedImage value and the load()/load_path() front door."""
import dataclasses

import pytest

from kvmpy.errors import LoaderError
from kvmpy.loader import LoadedImage, load, load_path, load_raw
from kvmpy.kvm.memory import GuestMemory

RAM = 0x20_0000   # 2 MiB
CODE = bytes.fromhex("b02ae6e9f4")   # mov al,42; out 0xe9,al; hlt


@pytest.fixture
def mem():
    with GuestMemory.anonymous(RAM) as m:
        yield m


def test_real_mode_defaults_to_boot_sector_address(mem):
    """A raw image with no options loads and enters at 0x7c00 in real mode."""
    img = load_raw(mem, CODE)
    assert img == LoadedImage(entry=0x7C00, mode="real", format="raw", segments=((0x7C00, len(CODE)),))
    assert mem.read(0x7C00, len(CODE)) == CODE
    assert mem.read(0x7C00 - 1, 1) == b"\0" and mem.read(0x7C00 + len(CODE), 1) == b"\0"


@pytest.mark.parametrize("mode", ["protected", "long"])
def test_non_real_modes_default_to_one_mebibyte(mem, mode):
    """Protected- and long-mode raw images load and enter at 1 MiB."""
    img = load_raw(mem, CODE, mode=mode)
    assert (img.entry, img.mode, img.segments) == (0x10_0000, mode, ((0x10_0000, len(CODE)),))
    assert mem.read(0x10_0000, len(CODE)) == CODE


def test_explicit_load_addr_and_entry(mem):
    """load_addr and entry are honoured independently; entry need not be the first byte."""
    img = load_raw(mem, CODE, load_addr=0x1000, entry=0x1002)
    assert (img.entry, img.segments, img.end) == (0x1002, ((0x1000, 5),), 0x1005)
    assert mem.read(0x1000, 5) == CODE


def test_accepts_bytearray_and_memoryview(mem):
    """Any bytes-like object can be loaded."""
    load_raw(mem, bytearray(b"ab"), load_addr=0x2000)
    load_raw(mem, memoryview(b"cd"), load_addr=0x2002)
    assert mem.read(0x2000, 4) == b"abcd"


def test_image_may_end_exactly_at_end_of_ram(mem):
    """The last byte of the image may be the last byte of RAM."""
    img = load_raw(mem, b"xyz", load_addr=RAM - 3, mode="long")
    assert img.end == RAM and mem.read(RAM - 3, 3) == b"xyz"


def test_empty_image_rejected(mem):
    """An empty raw image is a LoaderError."""
    with pytest.raises(LoaderError, match="empty"):
        load_raw(mem, b"")


def test_image_past_end_of_ram_rejected(mem):
    """An image that would run past the end of RAM is rejected and nothing is written."""
    with pytest.raises(LoaderError, match=r"does not fit in guest RAM \(ends at 0x200000\)"):
        load_raw(mem, b"xyz", load_addr=RAM - 2, mode="long")
    assert mem.read(RAM - 2, 2) == b"\0\0"


def test_negative_load_addr_rejected(mem):
    """A negative load address is a LoaderError, not a wrap-around."""
    with pytest.raises(LoaderError, match="does not fit"):
        load_raw(mem, CODE, load_addr=-1)


def test_overlapping_reserved_range_rejected(mem):
    """An image touching a reserved (start, end) range is rejected, naming both ranges."""
    with pytest.raises(LoaderError, match=r"0x7c00\.\.0x7c05 overlaps the reserved range 0x7000\.\.0x7c01"):
        load_raw(mem, CODE, reserved=[(0x7000, 0x7C01)])
    assert mem.read(0x7C00, 5) == bytes(5)


def test_adjacent_reserved_ranges_allowed(mem):
    """Reserved ranges are end-exclusive: an image right next to them loads."""
    img = load_raw(mem, CODE, reserved=[(0x7000, 0x7C00), (0x7C05, 0x8000)])
    assert img.segments == ((0x7C00, 5),)


def test_entry_outside_ram_rejected(mem):
    """An entry point outside guest RAM is rejected."""
    with pytest.raises(LoaderError, match=r"entry point 0x200000 is outside guest RAM"):
        load_raw(mem, CODE, mode="long", entry=RAM)


def test_real_mode_entry_must_be_below_one_mebibyte(mem):
    """Real mode cannot reach 1 MiB, so a real-mode entry there is rejected."""
    with pytest.raises(LoaderError, match=r"real-mode entry point 0x100000 is not below 1 MiB"):
        load_raw(mem, CODE, load_addr=0x10_0000)
    assert load_raw(mem, CODE, load_addr=0x10_0000, mode="protected").entry == 0x10_0000


def test_unknown_mode_rejected(mem):
    """Only real, protected and long are modes."""
    with pytest.raises(LoaderError, match=r"unknown mode 'virtual86'"):
        load_raw(mem, CODE, mode="virtual86")


def test_loaded_image_is_frozen_and_checks_mode():
    """LoadedImage is immutable, its end is the highest segment end, and its mode is checked."""
    img = LoadedImage(entry=0, mode="long", format="elf", segments=((0x2000, 0x10), (0x1000, 0x5000)))
    assert img.end == 0x6000
    assert LoadedImage(entry=0, mode="real", format="raw", segments=()).end == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        img.entry = 1
    with pytest.raises(ValueError):
        LoadedImage(entry=0, mode="smm", format="raw", segments=())


def test_load_auto_treats_non_elf_as_raw(mem):
    """load() with the default format loads data without the ELF magic as raw."""
    img = load(mem, CODE, mode="real")
    assert img.format == "raw" and mem.read(0x7C00, 5) == CODE


def test_load_raw_format_forces_raw_even_with_elf_magic(mem):
    """format='raw' copies bytes verbatim even if they start with \\x7fELF."""
    img = load(mem, b"\x7fELF junk", "raw")
    assert img.format == "raw" and mem.read(0x7C00, 9) == b"\x7fELF junk"


def test_load_unknown_format_rejected(mem):
    """An unknown format name is a LoaderError listing the known ones."""
    with pytest.raises(LoaderError, match=r"unknown image format 'coff'.*auto, raw, elf"):
        load(mem, CODE, "coff")


def test_load_path_reads_file(mem, tmp_path):
    """load_path() loads the contents of a file."""
    p = tmp_path / "boot.bin"
    p.write_bytes(CODE)
    assert load_path(mem, p).entry == 0x7C00
    assert mem.read(0x7C00, 5) == CODE


def test_load_path_missing_file_gives_os_reason(mem, tmp_path):
    """An unreadable image is a LoaderError naming the file and the OS reason."""
    with pytest.raises(LoaderError, match=r"cannot read image '.*nope\.bin': No such file or directory"):
        load_path(mem, tmp_path / "nope.bin")
    with pytest.raises(LoaderError, match="Is a directory"):
        load_path(mem, tmp_path)


def test_load_path_prefixes_errors_with_file_name(mem, tmp_path):
    """A bad image read from a file reports the file's name in the error."""
    p = tmp_path / "empty.bin"
    p.write_bytes(b"")
    with pytest.raises(LoaderError, match=r"empty\.bin: raw image is empty"):
        load_path(mem, p)


def test_loader_imports_nothing_from_lower_or_upper_layers():
    """No loader module imports kvmpy.kvm, kvmpy.vmm.machine, kvmpy._native or kvmpy.cli."""
    import ast
    import pathlib
    import kvmpy.loader
    forbidden = {"kvm", "machine", "_native", "cli", "native"}
    for path in pathlib.Path(kvmpy.loader.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names if node.module in (None, "kvmpy")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not forbidden & set(name.replace("kvmpy.", "").split(".")), f"{path.name} imports {name}"
