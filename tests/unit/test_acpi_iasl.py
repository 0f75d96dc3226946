"""ACPICA reads kvmpy's ACPI tables: ``iasl -d`` disassembles each without an error or a
warning (checksums, lengths, subtable sizes, AML), the disassembled DSDT compiles back into
the very same AML, and ``acpiexec`` (ACPICA's interpreter: Linux's ACPI code outside a
kernel) loads the FADT, MADT and DSDT and decodes every device's _CRS.

The tools come from Debian's acpica-tools, fetched into kvmpy's cache by
kvmpy.images.acpica (``apt-get download``, nothing installed); without apt the tests
skip, except with KVMPY_REQUIRE_KVM=1 (CI), where they fail.
"""
import os
import re
import struct
import subprocess

import pytest

from kvmpy.images import acpica
from kvmpy.x86 import acpi, layout

FILES = {"XSDT": "xsdt.dat", "FACP": "facp.dat", "APIC": "apic.dat", "DSDT": "dsdt.dat"}
COMPLAINTS = re.compile(r"warning|error|invalid|should be|\*\*\*\*|unknown|abort", re.I)


@pytest.fixture(scope="module")
def tools():
    try:
        return acpica.fetch()
    except acpica.FetchError as e:
        if os.environ.get("KVMPY_REQUIRE_KVM") == "1":
            pytest.fail(f"cannot fetch ACPICA's tools: {e}")
        pytest.skip(f"cannot fetch ACPICA's tools: {e}")


def disks(n: int) -> tuple:
    return tuple(acpi.VirtioMmio(layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_MMIO_SIZE, g)
                 for i, g in enumerate(layout.VIRTIO_MMIO_IRQS[:n]))


PCI = acpi.Pci(layout.PCI_ECAM_BASE, layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE, ((1, 16), (2, 17)))
LEGACY = dict(serial=((0x3F8, 4),), rtc_port=0x70, i8042_port=0x60, fw_cfg_port=0x510, reset_port=0xCF9)
PLATFORMS = {
    "bare": acpi.Platform(cpus=1),
    "pc": acpi.Platform(cpus=4, virtio_mmio=disks(2), **LEGACY),
    "largest": acpi.Platform(cpus=255, virtio_mmio=disks(6), **LEGACY),
    "x2apic": acpi.Platform(cpus=300, virtio_mmio=disks(1), **LEGACY),
    "pci": acpi.Platform(cpus=2, virtio_mmio=disks(1), pci=PCI, **LEGACY),
}


def write_tables(t: acpi.Tables, where) -> None:
    for sig, name in {**FILES, "MCFG": "mcfg.dat"}.items():
        if sig not in t.addresses:
            continue
        off = t.addresses[sig] - t.base
        length = struct.unpack_from("<I", t.data, off + 4)[0]
        (where / name).write_bytes(t.data[off:off + length])


def run(argv, cwd) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", PLATFORMS)
def test_iasl_disassembles_every_table_without_a_complaint(tools, tmp_path, kind):
    write_tables(acpi.build(PLATFORMS[kind]), tmp_path)
    files = {**FILES, "MCFG": "mcfg.dat"} if PLATFORMS[kind].pci else FILES
    for sig, name in files.items():
        out = run([str(tools.iasl), "-d", name], tmp_path)
        dsl = (tmp_path / name.replace(".dat", ".dsl")).read_text()
        body = dsl.split("*/", 1)[1]               # past the banner, which names the file
        for text in (out, body):
            assert not COMPLAINTS.search(text), f"{sig}: {COMPLAINTS.search(text).group()}\n{out}\n{dsl[:4000]}"
        assert f'Signature : "{sig}"' in dsl or f'"{sig}", ' in dsl


def test_the_dsdt_disassembles_to_the_devices(tools, tmp_path):
    write_tables(acpi.build(PLATFORMS["pc"]), tmp_path)
    run([str(tools.iasl), "-d", "dsdt.dat"], tmp_path)
    dsl = re.sub(r"//[^\n]*|/\*.*?\*/", "", (tmp_path / "dsdt.dsl").read_text(), flags=re.S)    # comments
    dsl = re.sub(r"\s+\)", ")", re.sub(r"\s+", " ", dsl))
    expect = [
        'Scope (\\_SB) { Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_UID, One) Name (_CRS, '
        'ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08,) IRQNoFlags () {4} }) }',
        'Device (RTC) { Name (_HID, EisaId ("PNP0B00")) Name (_CRS, ResourceTemplate () { IO (Decode16, '
        '0x0070, 0x0070, 0x01, 0x02,) }) }',
        'Device (PS2K) { Name (_HID, EisaId ("PNP0303")) Name (_CRS, ResourceTemplate () { IO (Decode16, '
        '0x0060, 0x0060, 0x01, 0x01,) IO (Decode16, 0x0064, 0x0064, 0x01, 0x01,) IRQNoFlags () {1} }) }',
        'Device (FWCF) { Name (_HID, "QEMU0002") Name (_STA, 0x0B) Name (_CRS, ResourceTemplate () '
        '{ IO (Decode16, 0x0510, 0x0510, 0x01, 0x02,) }) }',
    ]
    for i, (base, gsi) in enumerate(((0xD0000000, 5), (0xD0001000, 6))):
        expect.append(f'Device (VR{i:02d}) {{ Name (_HID, "LNRO0005") Name (_UID, {("Zero", "One")[i]}) '
                      f'Name (_CCA, One) Name (_CRS, ResourceTemplate () {{ Memory32Fixed (ReadWrite, '
                      f'0x{base:08X}, 0x00001000,) Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,,) '
                      f'{{ 0x{gsi:08X}, }} }}) }}')
    for e in expect:
        assert e in dsl, f"missing {e!r} in\n{dsl}"


@pytest.mark.parametrize("kind", PLATFORMS)
def test_the_disassembled_dsdt_compiles_back_to_the_same_aml(tools, tmp_path, kind):
    """iasl picks the shortest encodings; kvmpy's encoder must have picked the same. ``-on``
    keeps the root prefix of ``\\_SB`` that iasl would otherwise optimise away."""
    write_tables(acpi.build(PLATFORMS[kind]), tmp_path)
    run([str(tools.iasl), "-d", "dsdt.dat"], tmp_path)
    run([str(tools.iasl), "-on", "-p", "again", "dsdt.dsl"], tmp_path)
    ours, theirs = (tmp_path / "dsdt.dat").read_bytes(), (tmp_path / "again.aml").read_bytes()
    assert theirs[36:] == ours[36:], "the AML after the table header differs"
    assert theirs[:4] == b"DSDT" and theirs[4:8] == ours[4:8] and theirs[8] == ours[8]


def test_acpiexec_loads_the_tables_and_decodes_each_devices_resources(tools, tmp_path):
    write_tables(acpi.build(PLATFORMS["pc"]), tmp_path)
    devices = ["COM1", "RTC_", "PS2K", "FWCF", "VR00", "VR01"]
    out = run([str(tools.acpiexec), "-b", ";".join(f"resources \\_SB.{d}" for d in devices),
               "facp.dat", "apic.dat", "dsdt.dat"], tmp_path)
    assert "ACPI: FACP" in out and "ACPI: APIC" in out and "ACPI: DSDT" in out
    assert re.search(r"DSDT.*24 Objects with\s+6 Devices", out), out
    for d in devices:
        assert f"Device: \\_SB.{d.rstrip('_')}" in out     # acpiexec prints names without their padding
    text = re.sub(r"\s+", " ", out)
    for base, gsi in ((0xD0000000, 5), (0xD0001000, 6)):
        assert (f"32-Bit Fixed Memory Range Resource Write Protect : ReadWrite Address : {base:08X} "
                f"Address Length : 00001000") in text
        assert ("Extended IRQ Resource Type : ResourceConsumer Triggering : Level Polarity : ActiveHigh "
                "Sharing : Exclusive") in text and f"Dword00 : {gsi:08X}" in text
    assert "Triggering : Edge Polarity : ActiveHigh Sharing : Exclusive Interrupt Count : 01 Interrupt List : 4" in text
    lines = [ln for ln in out.splitlines() if COMPLAINTS.search(ln) or re.search(r"fail|AE_|mismatch", ln, re.I)]
    assert lines == ["AcpiSetCurrentResources failed: AE_NOT_FOUND"] * len(devices), lines   # no _SRS: fixed devices


def test_the_pci_host_bridge_and_the_mcfg_disassemble_to_what_kvmpy_means(tools, tmp_path):
    write_tables(acpi.build(PLATFORMS["pci"]), tmp_path)
    run([str(tools.iasl), "-d", "dsdt.dat"], tmp_path)
    run([str(tools.iasl), "-d", "mcfg.dat"], tmp_path)
    dsl = re.sub(r"//[^\n]*|/\*.*?\*/", "", (tmp_path / "dsdt.dsl").read_text(), flags=re.S)
    dsl = re.sub(r"\s+\)", ")", re.sub(r"\s+", " ", dsl))
    for e in ['Device (PCI0) { Name (_HID, EisaId ("PNP0A08")) Name (_CID, EisaId ("PNP0A03")) '
              'Name (_SEG, Zero) Name (_BBN, Zero) Name (_UID, Zero)',
              'WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, 0x0000, 0x0000, 0x0000, 0x0001, ,,)',
              'WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0x0000, 0x0000, 0x0CF7, '
              '0x0000, 0x0CF8, ,, , TypeStatic, DenseTranslation)',
              'WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0x0000, 0x0D00, 0xFFFF, '
              '0x0000, 0xF300, ,, , TypeStatic, DenseTranslation)',
              'DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0x00000000, '
              '0xC0000000, 0xCFFFFFFF, 0x00000000, 0x10000000, ,, , AddressRangeMemory, TypeStatic)',
              'Name (_PRT, Package (0x02) { Package (0x04) { 0x0001FFFF, Zero, Zero, 0x10 }, '
              'Package (0x04) { 0x0002FFFF, Zero, Zero, 0x11 } })',
              'Device (MRES) { Name (_HID, EisaId ("PNP0C02")) Name (_UID, Zero) Name (_CRS, ResourceTemplate () '
              '{ Memory32Fixed (ReadWrite, 0xE0000000, 0x00100000,) }) }']:
        assert e in dsl, f"missing {e!r} in\n{dsl}"
    mcfg = re.sub(r"\s+", " ", (tmp_path / "mcfg.dsl").read_text())
    for e in ["Base Address : 00000000E0000000", "Segment Group Number : 0000", "Start Bus Number : 00",
              "End Bus Number : 00"]:
        assert e in mcfg, f"missing {e!r} in\n{mcfg}"
