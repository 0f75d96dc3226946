"""kvmpy's ACPI tables, found and read the way an OS does (ACPI 6.5 chapter 5), independently
of tables.py: the RSDP by scanning 0xE0000-0xFFFFF, then the XSDT, the FADT, the MADT and
the DSDT by their pointers, every checksum and length checked. ACPICA's own reading of the
same tables is in test_acpi_iasl.py.
"""
import struct

import pytest
from hypothesis import given, strategies as st

from kvmpy.devices import reset, rtc
from kvmpy.x86 import acpi, layout, mptable
from kvmpy.x86.acpi import tables as T

HEADER = struct.Struct("<4sIBB6s8sI4sI")


def sums_to_zero(b: bytes) -> bool:
    return sum(b) % 256 == 0


class Image:
    """The first MiB with the tables written in, read back like physical memory."""

    def __init__(self, t: acpi.Tables):
        self.mem = bytearray(1 << 20)
        self.mem[t.base:t.end] = t.data

    def read(self, addr: int, n: int) -> bytes:
        assert 0 <= addr and addr + n <= len(self.mem), f"{addr:#x}+{n} outside the first MiB"
        return bytes(self.mem[addr:addr + n])

    def find_rsdp(self) -> int:
        """ACPI 6.5 5.2.5.1: "RSD PTR " on a 16-byte boundary in 0xE0000-0xFFFFF, whose first
        20 bytes sum to zero (and, from revision 2, all ``length`` bytes too)."""
        for addr in range(0xE0000, 0x100000, 16):
            b = self.read(addr, 36)
            if b[:8] == b"RSD PTR " and sums_to_zero(b[:20]):
                assert b[15] >= 2 and sums_to_zero(self.read(addr, struct.unpack_from("<I", b, 20)[0]))
                return addr
        raise AssertionError("no RSDP")

    def table(self, addr: int, signature: bytes) -> bytes:
        head = self.read(addr, 36)
        sig, length = struct.unpack_from("<4sI", head)
        assert sig == signature
        data = self.read(addr, length)
        assert sums_to_zero(data), f"{signature} checksum"
        return data

    def walk(self) -> dict:
        rsdp = self.read(self.find_rsdp(), 36)
        xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
        assert struct.unpack_from("<I", rsdp, 16)[0] == 0, "no RSDT"
        xsdt = self.table(xsdt_addr, b"XSDT")
        found = {"XSDT": xsdt}
        for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
            sig = self.read(addr, 4)
            found[sig.decode()] = self.table(addr, sig)
        facp = found["FACP"]
        found["DSDT"] = self.table(struct.unpack_from("<Q", facp, 140)[0], b"DSDT")
        return found


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 44
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        assert length >= 2 and off + length <= len(madt)
        out.append((kind, madt[off:off + length]))
        off += length
    assert off == len(madt)
    return out


PC = acpi.Platform(cpus=4, virtio_mmio=(acpi.VirtioMmio(0xD0000000, 0x1000, 5), acpi.VirtioMmio(0xD0001000, 0x1000, 6)),
                   serial=((0x3F8, 4),), rtc_port=0x70, i8042_port=0x60, fw_cfg_port=0x510, reset_port=0xCF9)


def test_an_os_finds_every_table_from_the_rsdp():
    t = acpi.build(PC)
    assert t.base == t.rsdp == layout.ACPI_BASE == 0xE0000
    found = Image(t).walk()
    assert sorted(found) == ["APIC", "DSDT", "FACP", "XSDT"]
    for sig, data in found.items():
        assert t.addresses[sig] % 16 == 0
        sig_, length, revision, _, oem, oem_table, *_ = HEADER.unpack_from(data)
        assert length == len(data) and oem == b"KVMPY " and oem_table == b"KVMPYVM "
    assert t.end - t.base < 4096               # one page of ACPI data for a usual machine


def test_the_fadt_is_hardware_reduced_and_says_what_kvmpy_has():
    facp = Image(acpi.build(PC)).walk()["FACP"]
    assert len(facp) == 276 and facp[8] == 6 and facp[131] == 5          # FADT 6.5
    flags = struct.unpack_from("<I", facp, 112)[0]
    assert flags & (1 << 20), "HW_REDUCED_ACPI"
    assert flags & (1 << 10), "RESET_REG_SUP"
    assert struct.unpack_from("<BBBBQ", facp, 116) == (1, 8, 0, 1, 0xCF9)     # SystemIO byte at 0xcf9
    assert facp[128] & reset.RST_CPU                                   # the value resets kvmpy's RCR
    boot = struct.unpack_from("<H", facp, 109)[0]
    assert boot == 0b111, "legacy devices, 8042, no VGA; a CMOS RTC (bit 5 clear)"
    assert facp[108] == rtc.RTC_CENTURY
    assert struct.unpack_from("<II", facp, 36) == (0, struct.unpack_from("<Q", facp, 140)[0])   # no FACS
    assert facp[46:88] == bytes(42), "no SCI, SMI port or PM blocks"
    assert facp[244:268] == bytes(24), "no sleep control/status registers"


def test_a_machine_without_the_legacy_devices_says_so():
    facp = Image(acpi.build(acpi.Platform(cpus=1))).walk()["FACP"]
    boot = struct.unpack_from("<H", facp, 109)[0]
    assert boot == (1 << 2) | (1 << 5), "no legacy devices, no 8042, no VGA, no CMOS RTC"
    assert not struct.unpack_from("<I", facp, 112)[0] & (1 << 10) and facp[108] == 0


def test_the_madt_lists_each_cpu_the_ioapic_and_the_level_triggered_virtio_lines():
    t = acpi.build(PC)
    madt = Image(t).walk()["APIC"]
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_ADDR, 1)     # PCAT_COMPAT: the 8259s are there
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for k, e in entries if k == 0]
    assert lapics == [(0, 8, i, i, 1) for i in range(4)]
    (ioapic,) = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert ioapic == (1, 12, mptable.default_ioapic_id(4), 0, layout.IOAPIC_ADDR, 0)
    isos = [struct.unpack("<BBBBIH", e) for k, e in entries if k == 2]
    assert isos == [(2, 10, 0, 5, 5, 0b1101), (2, 10, 0, 6, 6, 0b1101)]   # level, active high; no IRQ0 -> 2
    assert [struct.unpack("<BBBHB", e) for k, e in entries if k == 4] == [(4, 6, 0xFF, 0, 1)]


def test_the_madt_and_the_mp_table_agree_on_the_ioapic():
    for cpus in (1, 2, 254, 255):
        table = mptable.mp_table(cpus)[1][1]
        off = 44 + cpus * 20 + 8                                       # after the processors and the bus
        mp_id, mp_addr = table[off + 1], struct.unpack_from("<I", table, off + 4)[0]
        madt = acpi.tables.madt(acpi.Platform(cpus=cpus))
        (ioapic,) = [struct.unpack("<BBBBII", e) for k, e in madt_entries(madt) if k == 1]
        assert (ioapic[2], ioapic[4]) == (mp_id, mp_addr)


def test_cpus_past_apic_id_254_get_x2apic_entries():
    madt = T.madt(acpi.Platform(cpus=300))
    entries = madt_entries(madt)
    assert sum(1 for k, _ in entries if k == 0) == 255
    x2 = [struct.unpack("<BBHIII", e) for k, e in entries if k == 9]
    assert x2 == [(9, 16, 0, i, 1, i) for i in range(255, 300)]
    assert [struct.unpack("<BBHIB3x", e) for k, e in entries if k == 10] == [(10, 12, 0, 0xFFFF_FFFF, 1)]


def test_the_dsdt_names_every_device():
    dsdt = Image(acpi.build(PC)).walk()["DSDT"]
    assert dsdt[8] == 2                                           # 64-bit integers
    body = dsdt[36:]
    for needle in (b"COM1", b"\x0c\x41\xd0\x05\x01", b"RTC_", b"\x0c\x41\xd0\x0b\x00", b"PS2K",
                   b"\x0c\x41\xd0\x03\x03", b"FWCF", b"QEMU0002\0", b"VR00", b"VR01", b"LNRO0005\0"):
        assert needle in body, needle
    assert body.count(b"LNRO0005\0") == 2
    # Memory32Fixed (ReadWrite, 0xD0001000, 0x1000) and Interrupt (..., Level, ActiveHigh, Exclusive) {6}
    assert bytes.fromhex("860900010010" "00d000100000" "890600010106000000") in body
    # the RTC's resources: its two ports and no interrupt
    rtc_crs = T.aml.resource_template(T.aml.io(0x70, 2))
    assert rtc_crs in body


def test_build_refuses_what_it_cannot_describe():
    with pytest.raises(ValueError, match="16-byte"):
        acpi.build(PC, base=0xE0008)
    with pytest.raises(ValueError, match="bytes"):
        acpi.build(acpi.Platform(cpus=255), max_size=1024)
    with pytest.raises(ValueError, match="share a GSI"):
        acpi.build(acpi.Platform(cpus=1, virtio_mmio=(acpi.VirtioMmio(0xD0000000, 0x1000, 5),) * 2))
    with pytest.raises(ValueError, match="at least 1"):
        acpi.build(acpi.Platform(cpus=0))


def test_the_largest_machine_fits_in_the_reserved_area():
    t = acpi.build(acpi.Platform(cpus=255, virtio_mmio=tuple(
        acpi.VirtioMmio(layout.VIRTIO_MMIO_BASE + i * 0x1000, 0x1000, g) for i, g in enumerate(layout.VIRTIO_MMIO_IRQS)),
        serial=((0x3F8, 4),), rtc_port=0x70, i8042_port=0x60, fw_cfg_port=0x510, reset_port=0xCF9))
    assert t.end <= layout.ACPI_BASE + layout.ACPI_MAX_SIZE and t.end <= 0xF0000
    Image(t).walk()


platforms = st.builds(
    acpi.Platform,
    cpus=st.integers(1, 300),
    virtio_mmio=st.lists(st.integers(0, 23), max_size=8, unique=True).map(
        lambda gsis: tuple(acpi.VirtioMmio(0xD0000000 + i * 0x1000, 0x1000, g) for i, g in enumerate(gsis))),
    serial=st.sampled_from([(), ((0x3F8, 4),), ((0x3F8, 4), (0x2F8, 3))]),
    rtc_port=st.sampled_from([None, 0x70]), i8042_port=st.sampled_from([None, 0x60]),
    fw_cfg_port=st.sampled_from([None, 0x510]), reset_port=st.sampled_from([None, 0xCF9]))


@given(platforms)
def test_every_platform_gives_consistent_tables(p):
    t = acpi.build(p)
    found = Image(t).walk()
    entries = madt_entries(found["APIC"])
    cpus = sum(1 for k, _ in entries if k in (0, 9))
    assert cpus == p.cpus
    isos = [e[3] for k, e in entries if k == 2]
    assert isos == sorted(d.gsi for d in p.virtio_mmio if d.gsi < 16)
    assert found["DSDT"].count(b"LNRO0005\0") == len(p.virtio_mmio)
    spans = sorted((a, a + (36 if s == "RSD PTR " else len(found[s]))) for s, a in t.addresses.items())
    assert all(a_end <= b for (_, a_end), (b, _) in zip(spans, spans[1:])), "tables overlap"
    assert spans[-1][1] == t.end
