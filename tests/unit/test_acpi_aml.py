"""The AML encoder (kvmpy/x86/acpi/aml.py) against the ACPI 6.5 grammar (chapter 20) and
against bytes ACPICA's iasl 20200925 compiled from the same ASL.

The decoders here are written from the specification, not from aml.py: PkgLength (20.2.4),
integer constants (20.2.3) and name strings (20.2.2).
"""
import pytest
from hypothesis import given, strategies as st

from kvmpy.x86.acpi import aml

# --- independent decoders ----------------------------------------------------------------------


def spec_pkg_length(data: bytes) -> tuple[int, int]:
    """ACPI 6.5 20.2.4: bits 7-6 of the lead byte count the bytes that follow; with none,
    bits 5-0 are the length; else bits 3-0 are its low nibble and the bytes follow."""
    follow = data[0] >> 6
    if follow == 0:
        return data[0] & 0x3F, 1
    assert data[0] & 0x30 == 0, "bits 5-4 of a multi-byte lead must be 0"
    value = data[0] & 0x0F
    for i in range(follow):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + follow


def spec_integer(data: bytes) -> tuple[int, int]:
    op = data[0]
    if op in (0x00, 0x01):
        return op, 1
    if op == 0xFF:
        return (1 << 64) - 1, 1
    size = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[op]
    return int.from_bytes(data[1:1 + size], "little"), 1 + size


# --- PkgLength ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, encoded", [
    (0, b"\x01"), (62, b"\x3f"),                                # one byte holds up to 63, itself included
    (63, b"\x41\x04"),                                          # 65 = 0x41: two bytes from here
    (4093, b"\x4f\xff"),                                        # 4095, the largest two-byte value
    (4094, b"\x81\x00\x01"),                                    # 4097 needs three
    ((1 << 20) - 4, b"\x8f\xff\xff"),
    ((1 << 20) - 3, b"\xc1\x00\x00\x01"),                        # 2^20 + 1: four bytes
    ((1 << 28) - 5, b"\xcf\xff\xff\xff"),                      # the largest PkgLength there is
])
def test_pkg_length_at_its_boundaries(content, encoded):
    assert aml.pkg_length(content) == encoded
    assert spec_pkg_length(encoded) == (content + len(encoded), len(encoded))


def test_pkg_length_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="PkgLength"):
        aml.pkg_length((1 << 28) - 4)
    with pytest.raises(ValueError):
        aml.pkg_length(-1)


@given(st.integers(0, (1 << 28) - 5))
def test_pkg_length_counts_itself_and_is_as_short_as_possible(content):
    encoded = aml.pkg_length(content)
    value, used = spec_pkg_length(encoded)
    assert used == len(encoded) and value == content + used
    assert aml.decode_pkg_length(encoded) == (value, used)
    limits = {1: 0x3F, 2: (1 << 12) - 1, 3: (1 << 20) - 1, 4: (1 << 28) - 1}
    assert value <= limits[used]
    if used > 1:                            # one byte less could not have held it
        assert content + used - 1 > limits[used - 1]


# --- names ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, encoded", [
    ("_HID", b"_HID"), ("RTC", b"RTC_"), ("A", b"A___"),
    ("\\_SB", b"\\_SB_"), ("^COM1", b"^COM1"), ("^^X1", b"^^X1__"),
    ("\\_SB.VR00", b"\\\x2e_SB_VR00"), ("_SB.PCI0.ISA", b"\x2f\x03_SB_PCI0ISA_"),
    ("\\", b"\\\x00"), ("", b"\x00"),
])
def test_name_strings(path, encoded):
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("bad", ["1ABC", "ABCDE", "ab", "A-B", "\\_SB.", "_SB..X"])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError):
        aml.name_string(bad)


# --- data --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"), (0x100, b"\x0b\x00\x01"),
    (0xFFFF, b"\x0b\xff\xff"), (0x10000, b"\x0c\x00\x00\x01\x00"),
    (0xD0000000, b"\x0c\x00\x00\x00\xd0"), (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
    ((1 << 64) - 1, b"\xff"),
])
def test_integers_take_the_shortest_form(value, encoded):
    assert aml.integer(value) == encoded


@given(st.integers(0, (1 << 64) - 1))
def test_integers_decode_to_themselves(value):
    encoded = aml.integer(value)
    assert spec_integer(encoded) == (value, len(encoded))
    size = len(encoded) - 1                 # bytes after the prefix: 0 for Zero/One/Ones
    smaller = {2: 1, 4: 2, 8: 4}.get(size)
    if smaller is not None:
        assert value >= 1 << (8 * smaller), "a shorter prefix would do"


@pytest.mark.parametrize("bad", [-1, 1 << 64])
def test_integers_are_64_bit_unsigned(bad):
    with pytest.raises(ValueError):
        aml.integer(bad)


@pytest.mark.parametrize("pnp, value", [("PNP0501", 0x0105D041), ("PNP0A03", 0x030AD041),
                                        ("PNP0303", 0x0303D041), ("PNP0B00", 0x000BD041)])
def test_eisa_ids_compress_as_iasl_does(pnp, value):
    assert aml.eisa_id(pnp) == aml.integer(value)


def test_strings_buffers_and_packages():
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    assert aml.buffer(b"\x01\x02") == b"\x11\x05\x0a\x02\x01\x02"
    assert aml.package(aml.integer(1), aml.string("a")) == b"\x12\x06\x02\x01\x0da\x00"
    assert aml.package() == b"\x12\x02\x00"
    with pytest.raises(ValueError):
        aml.string("a\0b")
    with pytest.raises(ValueError):
        aml.package(*[aml.integer(0)] * 256)


@given(st.binary(max_size=5000))
def test_a_buffer_says_its_size_after_its_length(data):
    encoded = aml.buffer(data)
    assert encoded[0] == aml.BUFFER_OP
    length, used = spec_pkg_length(encoded[1:])
    assert length == len(encoded) - 1
    size, n = spec_integer(encoded[1 + used:])
    assert size == len(data) and encoded[1 + used + n:] == data


# --- resources and whole devices, against iasl's output ------------------------------------------------
def test_resource_descriptors_match_iasl():
    assert aml.io(0x3F8, 8) == bytes.fromhex("4701f803f8030108")          # IO (Decode16, 0x3F8, 0x3F8, 1, 8)
    assert aml.irq_no_flags(4) == bytes.fromhex("221000")                # IRQNoFlags () {4}
    assert aml.irq_no_flags(1, 12) == bytes.fromhex("220210")
    assert aml.memory32_fixed(0xD0000000, 0x1000) == bytes.fromhex("860900" "01" "000000d0" "00100000")
    # Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) {5}
    assert aml.interrupt(5, level=True) == bytes.fromhex("890600" "01" "01" "05000000")
    assert aml.interrupt(9, level=False, active_low=True, shared=True) == bytes.fromhex("890600" "0f" "01" "09000000")
    assert aml.resource_template() == bytes.fromhex("11050a027900")     # just the end tag


@pytest.mark.parametrize("call", [lambda: aml.io(0xFFFF, 2), lambda: aml.io(0x60, 0), lambda: aml.irq_no_flags(16),
                                  lambda: aml.irq_no_flags(), lambda: aml.memory32_fixed(0xFFFFF000, 0x2000),
                                  lambda: aml.interrupt(level=True), lambda: aml.interrupt(1 << 32, level=True)])
def test_impossible_resources_are_refused(call):
    with pytest.raises(ValueError):
        call()


def test_a_device_matches_iasl_byte_for_byte():
    """Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_UID, One)
    Name (_CRS, ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08) IRQNoFlags () {4} }) },
    as iasl 20200925 compiled it."""
    com1 = aml.device("COM1", aml.name("_HID", aml.eisa_id("PNP0501")), aml.name("_UID", 1),
                      aml.name("_CRS", aml.resource_template(aml.io(0x3F8, 8), aml.irq_no_flags(4))))
    assert com1 == bytes.fromhex("5b822b434f4d31085f4849440c41d00501085f55494401085f435253"
                                 "11100a0d4701f803f80301082210007900")
    vr00 = aml.device("VR00", aml.name("_HID", "LNRO0005"), aml.name("_UID", 0),
                      aml.name("_CRS", aml.resource_template(aml.memory32_fixed(0xD0000000, 0x1000),
                                                             aml.interrupt(5, level=True))))
    assert vr00 == bytes.fromhex("5b823a5652303008" "5f4849440d4c4e524f3030303500" "085f55494400"
                                 "085f435253111a0a17860900010000" "00d000100000890600010105000000" "7900")
    sb = aml.scope("\\_SB", com1, vr00)
    length, used = spec_pkg_length(sb[1:])
    assert sb[0] == aml.SCOPE_OP and length == len(sb) - 1
    assert sb[1 + used:] == b"\\_SB_" + com1 + vr00


def test_name_takes_ints_strings_and_terms_but_not_bools():
    assert aml.name("_UID", 2) == b"\x08_UID\x0a\x02"
    assert aml.name("_HID", "QEMU0002") == b"\x08_HID\x0dQEMU0002\x00"
    assert aml.name("_HID", aml.eisa_id("PNP0B00")) == b"\x08_HID\x0c\x41\xd0\x0b\x00"
    with pytest.raises(TypeError):
        aml.name("_CCA", True)
