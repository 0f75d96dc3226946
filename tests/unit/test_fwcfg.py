"""QEMU's fw_cfg over ports 0x510/0x511, read the way firmware and Linux read it."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.devices import FwCfg
from kvmpy.devices.fwcfg import (
    DATA, FW_CFG_CMDLINE_DATA, FW_CFG_CMDLINE_SIZE, FW_CFG_FILE_DIR, FW_CFG_FILE_FIRST,
    FW_CFG_ID, FW_CFG_NB_CPUS, FW_CFG_RAM_SIZE, FW_CFG_SIGNATURE, MAX_FILES, SELECTOR,
    FileEntry, check_file_name, parse_file_spec,
)
from kvmpy.errors import DeviceError
from kvmpy.x86 import layout


def select(dev, key):
    """outw key, 0x510."""
    dev.write(SELECTOR, 2, key)


def read_bytes(dev, n):
    """n times inb 0x511."""
    return bytes(dev.read(DATA, 1) for _ in range(n))


def fetch(dev, key, n):
    """Select key and read n bytes, as a guest does."""
    select(dev, key)
    return read_bytes(dev, n)


def decode_directory(dev):
    """Read FW_CFG_FILE_DIR byte by byte and decode it (big-endian) like a guest."""
    count = struct.unpack(">I", fetch(dev, FW_CFG_FILE_DIR, 4))[0]
    entries = []
    for _ in range(count):
        size, key, reserved = struct.unpack(">IHH", read_bytes(dev, 8))
        name = read_bytes(dev, 56)
        assert reserved == 0 and b"\0" in name
        entries.append((name.split(b"\0")[0].decode(), key, size))
    return entries


def test_ports_are_qemus():
    """The device sits at QEMU's x86 ports: selector 0x510, data 0x511."""
    assert (layout.FW_CFG_PORT, layout.FW_CFG_PORT_COUNT) == (0x510, 2)
    assert (SELECTOR, DATA) == (0, 1)


def test_signature_reads_qemu():
    """Key 0x0000 reads the four bytes 'QEMU', then zeros."""
    assert fetch(FwCfg(64 << 20, 1), FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"


def test_power_on_selection_is_the_signature():
    """Before any selector write the data port reads the signature (QEMU's reset selects it)."""
    assert read_bytes(FwCfg(64 << 20, 1), 4) == b"QEMU"


def test_id_is_le32_traditional_interface_only():
    """FW_CFG_ID is le32 1: the traditional interface, no DMA bit."""
    assert fetch(FwCfg(64 << 20, 1), FW_CFG_ID, 4) == b"\x01\0\0\0"


@pytest.mark.parametrize("ram", [0, 64 << 20, (3 << 30) + 4096, 0x1_2345_6789_A000, (1 << 64) - 1])
def test_ram_size_is_le64(ram):
    """FW_CFG_RAM_SIZE is the RAM size as 8 little-endian bytes."""
    assert fetch(FwCfg(ram, 1), FW_CFG_RAM_SIZE, 8) == struct.pack("<Q", ram)


@pytest.mark.parametrize("cpus", [1, 2, 255, 0x1234, 0xFFFF])
def test_cpu_count_is_le16(cpus):
    """FW_CFG_NB_CPUS is the vCPU count as 2 little-endian bytes, then zeros."""
    assert fetch(FwCfg(64 << 20, cpus), FW_CFG_NB_CPUS, 3) == struct.pack("<H", cpus) + b"\0"


def test_cmdline_size_counts_the_nul_and_data_ends_with_it():
    """CMDLINE_SIZE is le32 len+1 and CMDLINE_DATA is the line plus NUL, as QEMU's x86 loader does."""
    dev = FwCfg(64 << 20, 1, cmdline=b"console=ttyS0 quiet")
    n = struct.unpack("<I", fetch(dev, FW_CFG_CMDLINE_SIZE, 4))[0]
    assert n == len(b"console=ttyS0 quiet") + 1
    assert fetch(dev, FW_CFG_CMDLINE_DATA, n + 2) == b"console=ttyS0 quiet\0\0\0"


def test_empty_cmdline_is_a_lone_nul():
    """Without a command line, the size is 1 and the data a single NUL."""
    dev = FwCfg(64 << 20, 1)
    assert fetch(dev, FW_CFG_CMDLINE_SIZE, 4) == b"\x01\0\0\0"
    assert fetch(dev, FW_CFG_CMDLINE_DATA, 2) == b"\0\0"


def test_set_cmdline_replaces_it_and_accepts_str():
    """set_cmdline (str is UTF-8 encoded) changes both command-line items."""
    dev = FwCfg(64 << 20, 1, cmdline="a")
    dev.set_cmdline("root=/dev/vda \u00e9")
    want = "root=/dev/vda \u00e9".encode()
    assert dev.cmdline == want
    assert fetch(dev, FW_CFG_CMDLINE_SIZE, 4) == struct.pack("<I", len(want) + 1)
    assert fetch(dev, FW_CFG_CMDLINE_DATA, len(want) + 1) == want + b"\0"


def test_file_directory_is_big_endian_sorted_by_name_and_keys_read_the_files():
    """The directory lists files by name with be32 size / be16 key; each key reads its file."""
    files = {"opt/kvmpy/greeting": b"hello\n", "etc/zzz": b"", "opt/a": bytes(range(256)) * 3}
    dev = FwCfg(64 << 20, 1, files=files)
    entries = decode_directory(dev)
    assert [e[0] for e in entries] == sorted(files)
    assert [e[1] for e in entries] == [FW_CFG_FILE_FIRST + i for i in range(len(files))]
    for name, key, size in entries:
        assert size == len(files[name])
        assert fetch(dev, key, size + 1) == files[name] + b"\0"
    assert dev.files == [FileEntry(*e) for e in entries]


def test_directory_raw_bytes():
    """One file: be32 count 1, be32 size, be16 0x0020, be16 0, the name NUL-padded to 56."""
    dev = FwCfg(64 << 20, 1, files={"opt/x": b"abc"})
    want = (b"\0\0\0\x01" + b"\0\0\0\x03" + b"\0\x20" + b"\0\0" + b"opt/x".ljust(56, b"\0"))
    assert fetch(dev, FW_CFG_FILE_DIR, len(want) + 1) == want + b"\0"


def test_empty_directory_is_a_zero_count():
    """With no files the directory is be32 0 and key 0x20 reads zeros."""
    dev = FwCfg(64 << 20, 1)
    assert fetch(dev, FW_CFG_FILE_DIR, 5) == b"\0" * 5
    assert fetch(dev, FW_CFG_FILE_FIRST, 4) == b"\0" * 4


def test_adding_a_file_resorts_the_keys():
    """A file added later with a smaller name takes key 0x20 and moves the others up."""
    dev = FwCfg(64 << 20, 1, files={"opt/b": b"B"})
    dev.add_file("opt/a", b"A")
    assert decode_directory(dev) == [("opt/a", 0x20, 1), ("opt/b", 0x21, 1)]
    assert fetch(dev, 0x20, 1) == b"A" and fetch(dev, 0x21, 1) == b"B"


def test_reads_past_the_end_return_zero_and_the_offset_stops():
    """After an item's last byte every read returns 0 and the offset stays at the item length."""
    dev = FwCfg(64 << 20, 1)
    assert fetch(dev, FW_CFG_NB_CPUS, 2 + 1000)[2:] == bytes(1000)
    assert dev.state()["offset"] == 2


@pytest.mark.parametrize("key", [0x02, 0x04, 0x13, 0x18, 0x1F, 0x21, 0x3FFF, 0x8000, 0x8003, 0xFFFF])
def test_unknown_selectors_read_zero(key):
    """Keys with no item (including the empty arch-specific range) read as zeros."""
    assert fetch(FwCfg(64 << 20, 1, files={"opt/x": b"x"}), key, 8) == bytes(8)


def test_write_channel_bit_is_ignored_when_selecting():
    """Bit 14 (the retired write channel) is masked off: 0x4000 reads the signature."""
    dev = FwCfg(64 << 20, 1)
    assert fetch(dev, 0x4000 | FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert fetch(dev, 0x4000 | FW_CFG_NB_CPUS, 2) == b"\x01\0"


def test_reselecting_rewinds_the_offset():
    """Writing the selector again, same key or another, starts at byte 0."""
    dev = FwCfg(64 << 20, 1)
    assert fetch(dev, FW_CFG_SIGNATURE, 2) == b"QE"
    assert fetch(dev, FW_CFG_SIGNATURE, 4) == b"QEMU"
    read_bytes(dev, 2)
    assert fetch(dev, FW_CFG_ID, 1) == b"\x01"
    assert fetch(dev, FW_CFG_SIGNATURE, 1) == b"Q"


def test_data_port_writes_are_ignored():
    """Byte writes to either port change neither the item nor the offset (QEMU >= 2.4)."""
    dev = FwCfg(64 << 20, 1)
    select(dev, FW_CFG_SIGNATURE)
    dev.write(DATA, 1, 0x41)
    dev.write(SELECTOR, 1, 0x42)
    assert read_bytes(dev, 4) == b"QEMU"


def test_byte_read_of_the_selector_port_reads_data():
    """QEMU's combined region: inb 0x510 is a data read too and advances the offset."""
    dev = FwCfg(64 << 20, 1)
    select(dev, FW_CFG_SIGNATURE)
    assert dev.read(SELECTOR, 1) == ord("Q")
    assert dev.read(DATA, 1) == ord("E")


def test_wide_accesses_follow_qemu():
    """inw 0x510 reads 0 without advancing; inl adds all-ones above our ports; inw 0x511 reads one byte."""
    dev = FwCfg(64 << 20, 1)
    select(dev, FW_CFG_SIGNATURE)
    assert dev.read(SELECTOR, 2) == 0
    assert dev.read(SELECTOR, 4) == 0xFFFF_0000
    assert dev.read(DATA, 2) == 0xFF00 | ord("Q")
    assert dev.read(DATA, 4) == 0xFFFF_FF00 | ord("E")
    assert read_bytes(dev, 2) == b"MU"


def test_dword_selector_write_selects_low_16_bits_and_word_data_write_does_not():
    """outl 0x510 selects with its low half; outw 0x511 is a (dropped) data write."""
    dev = FwCfg(64 << 20, 7)
    dev.write(SELECTOR, 4, 0xABCD_0000 | FW_CFG_NB_CPUS)
    assert read_bytes(dev, 1) == b"\x07"
    dev.write(DATA, 2, FW_CFG_SIGNATURE)
    assert read_bytes(dev, 1) == b"\0"            # still NB_CPUS, at offset 1


def test_accesses_outside_the_two_ports_do_nothing():
    """Offsets the bus never sends read all ones and write nothing."""
    dev = FwCfg(64 << 20, 1)
    assert dev.read(2, 1) == 0xFF and dev.read(-1, 2) == 0xFFFF and dev.read(0, 0) == 0
    dev.write(2, 2, FW_CFG_ID)
    dev.write(-1, 2, FW_CFG_ID)
    assert read_bytes(dev, 1) == b"Q"


def test_reset_selects_the_signature_and_state_reports_registers():
    """reset() is a select of key 0; state() has the selector, offset and configuration."""
    dev = FwCfg(1 << 30, 2, cmdline=b"x", files={"opt/f": b"12"})
    fetch(dev, FW_CFG_RAM_SIZE, 3)
    assert dev.state() == {"selector": FW_CFG_RAM_SIZE, "offset": 3, "ram_size": 1 << 30,
                           "cpus": 2, "cmdline": b"x",
                           "files": [{"name": "opt/f", "select": 0x20, "size": 2}]}
    dev.reset()
    assert (dev.state()["selector"], dev.state()["offset"]) == (0, 0)
    assert read_bytes(dev, 4) == b"QEMU"


def test_item_returns_what_a_guest_would_read():
    """item(key) is the whole item; the arch range and unknown keys are empty."""
    dev = FwCfg(64 << 20, 3)
    assert dev.item(FW_CFG_SIGNATURE) == b"QEMU"
    assert dev.item(FW_CFG_NB_CPUS) == b"\x03\0"
    assert dev.item(0x8000 | FW_CFG_NB_CPUS) == b"" and dev.item(0x1234) == b""


# --- configuration errors ------------------------------------------------------------

@pytest.mark.parametrize("name,why", [
    ("", "empty"), ("opt/a\0b", "NUL"), ("x" * 56, "56 bytes"), ("\u00e9" * 28, "56 bytes"),
])
def test_bad_file_names_are_rejected(name, why):
    """Empty names, NULs and names over 55 bytes (UTF-8) raise DeviceError saying why."""
    with pytest.raises(DeviceError, match=why):
        FwCfg(64 << 20, 1).add_file(name, b"")


def test_longest_name_fits_with_its_nul():
    """A 55-byte name is accepted and read back NUL-terminated in the directory."""
    dev = FwCfg(64 << 20, 1, files={"n" * 55: b"!"})
    assert decode_directory(dev) == [("n" * 55, 0x20, 1)]


def test_non_str_name_and_non_bytes_data_are_rejected():
    """A bytes name is a DeviceError; str data is a TypeError (encode it yourself)."""
    with pytest.raises(DeviceError, match="must be a str"):
        FwCfg(64 << 20, 1).add_file(b"opt/x", b"")
    with pytest.raises(TypeError, match="must be bytes"):
        FwCfg(64 << 20, 1).add_file("opt/x", "text")


def test_duplicate_names_are_rejected():
    """A second file with the same name raises DeviceError and leaves the first intact."""
    dev = FwCfg(64 << 20, 1, files={"opt/x": b"1"})
    with pytest.raises(DeviceError, match="duplicate"):
        dev.add_file("opt/x", b"2")
    assert fetch(dev, 0x20, 1) == b"1"


def test_at_most_max_files():
    """The (MAX_FILES + 1)th file raises DeviceError."""
    dev = FwCfg(64 << 20, 1, files={f"opt/{i:02}": b"" for i in range(MAX_FILES)})
    with pytest.raises(DeviceError, match=f"at most {MAX_FILES}"):
        dev.add_file("opt/one-too-many", b"")
    assert len(decode_directory(dev)) == MAX_FILES


@pytest.mark.parametrize("kw,why", [
    ({"ram_size": -1}, "RAM size"), ({"ram_size": 1 << 64}, "RAM size"),
    ({"cpus": 0}, "CPU count"), ({"cpus": 0x10000}, "CPU count"),
    ({"cmdline": b"a\0b"}, "NUL"),
])
def test_bad_configuration_is_rejected(kw, why):
    """Out-of-range RAM size or CPU count and a NUL in the command line raise DeviceError."""
    args = {"ram_size": 64 << 20, "cpus": 1, **kw}
    with pytest.raises(DeviceError, match=why):
        FwCfg(**args)


def test_parse_file_spec():
    """'NAME=FILE' splits at the first '='; a missing part or a bad name is a DeviceError."""
    assert parse_file_spec("opt/kvmpy/greeting=/tmp/a=b.txt") == ("opt/kvmpy/greeting", "/tmp/a=b.txt")
    for bad in ("opt/x", "opt/x=", "=file", "x" * 60 + "=f"):
        with pytest.raises(DeviceError):
            parse_file_spec(bad)
    assert check_file_name("opt/x") == b"opt/x"


# --- hostile guests: random access sequences against a reference model --------------

class Reference:
    """An independent model of fw_cfg's guest side, built from the spec's item list."""

    def __init__(self, ram, cpus, cmdline, files):
        names = sorted(n.encode() for n in files)
        directory = struct.pack(">I", len(names)) + b"".join(
            struct.pack(">IHH", len(files[n.decode()]), 0x20 + i, 0) + n + bytes(56 - len(n))
            for i, n in enumerate(names))
        self.items = {0x00: b"QEMU", 0x01: (1).to_bytes(4, "little"),
                      0x03: ram.to_bytes(8, "little"), 0x05: cpus.to_bytes(2, "little"),
                      0x14: (len(cmdline) + 1).to_bytes(4, "little"), 0x15: cmdline + b"\0",
                      0x19: directory}
        self.items.update({0x20 + i: files[n.decode()] for i, n in enumerate(names)})
        self.key, self.pos = 0, 0

    def data_byte(self):
        item = b"" if self.key & 0x8000 else self.items.get(self.key & 0x3FFF, b"")
        if self.pos < len(item):
            self.pos += 1
            return item[self.pos - 1]
        return 0

    def read(self, offset, size):
        if size <= 0:
            return 0
        if offset not in (0, 1):                           # the bus never sends these
            return (1 << (8 * size)) - 1
        out = []
        for port in range(offset, offset + size):          # byte lanes, low to high
            out.append(0xFF if port not in (0, 1) else None)
        ours = [i for i, b in enumerate(out) if b is None]
        if len(ours) == 1:
            out[ours[0]] = self.data_byte()
        else:
            out = [0 if b is None else b for b in out]     # a 16-bit read: rejected, reads 0
        return int.from_bytes(bytes(out), "little")

    def write(self, offset, size, value):
        if offset == 0 and size >= 2:
            self.key, self.pos = value & 0xFFFF, 0


names = st.text(st.characters(blacklist_characters="\0", codec="utf-8"), min_size=1, max_size=20)
keys = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 0x14, 0x15, 0x19, 0x20, 0x21, 0x22, 0x4000,
                                  0x4019, 0x8000, 0xFFFF]), st.integers(0, 0xFFFF))
ops = st.one_of(
    st.tuples(st.just("select"), keys),
    st.tuples(st.just("read"), st.integers(1, 64)),                       # n data-port bytes
    st.tuples(st.just("raw_read"), st.integers(-2, 3), st.sampled_from([0, 1, 2, 4, 8])),
    st.tuples(st.just("raw_write"), st.integers(-2, 3), st.sampled_from([0, 1, 2, 4, 8]),
              st.integers(0, (1 << 64) - 1)),
)


@settings(max_examples=300, deadline=None)
@given(ram=st.integers(0, (1 << 64) - 1), cpus=st.integers(1, 0xFFFF),
       cmdline=st.binary(max_size=40).filter(lambda b: b"\0" not in b),
       files=st.dictionaries(names.filter(lambda n: len(n.encode()) <= 55), st.binary(max_size=80),
                             max_size=5),
       seq=st.lists(ops, max_size=60))
def test_random_access_sequences_match_the_reference(ram, cpus, cmdline, files, seq):
    """Any access sequence never raises, and every read equals the reference model's."""
    dev, ref = FwCfg(ram, cpus, cmdline, files), Reference(ram, cpus, cmdline, files)
    for op in seq:
        if op[0] == "select":
            select(dev, op[1])
            ref.write(0, 2, op[1])
        elif op[0] == "read":
            assert read_bytes(dev, op[1]) == bytes(ref.read(1, 1) for _ in range(op[1]))
        elif op[0] == "raw_read":
            assert dev.read(op[1], op[2]) == ref.read(op[1], op[2])
        else:
            dev.write(op[1], op[2], op[3] & ((1 << (8 * op[2])) - 1) if op[2] else 0)
            ref.write(op[1], op[2], op[3] & ((1 << (8 * op[2])) - 1) if op[2] else 0)
        st_ = dev.state()
        assert 0 <= st_["offset"] <= len(dev.item(st_["selector"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.one_of(names, st.binary(max_size=60).map(
    lambda b: b.decode("latin-1"))), st.binary(max_size=8)), max_size=40))
def test_adding_arbitrary_files_only_raises_device_error(entries):
    """add_file with any names either succeeds or raises DeviceError; the directory stays consistent."""
    dev = FwCfg(64 << 20, 1)
    added = {}
    for name, data in entries:
        try:
            dev.add_file(name, data)
        except DeviceError:
            assert (name in added or not name or "\0" in name or len(name.encode()) > 55
                    or len(added) == MAX_FILES)
        else:
            added[name] = data
    assert [e.name for e in dev.files] == sorted(added, key=str.encode)
    for e in dev.files:
        assert dev.item(e.select) == added[e.name]
