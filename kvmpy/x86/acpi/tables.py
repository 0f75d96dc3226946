"""The ACPI tables of a kvmpy machine: RSDP, XSDT, FADT, MADT and DSDT (ACPI 6.5, chapter 5).

What each says, and why:

* **RSDP** (5.2.5): revision 2, pointing at the XSDT. No RSDT: an ACPI 2.0+ OS reads the
  XSDT (Linux, from 2.6 on), as with QEMU's microvm and Firecracker.
* **XSDT** (5.2.8): the FADT and the MADT, and the MCFG when there is PCI.
* **FADT** (5.2.9), revision 6.5, **hardware-reduced** (``HW_REDUCED_ACPI``): kvmpy has no
  PM1 event/control blocks, no PM timer, no GPEs and no SCI, and hardware-reduced ACPI is
  the mode in which an OS expects none (4.1). Linux then also leaves the 8259 PIC and the
  PIT alone (its timer is the local APIC's) and routes every interrupt through the IOAPIC.
  It points at the DSDT (``X_DSDT``, and ``DSDT`` too since it lies below 4 GiB); no FACS
  (allowed when hardware-reduced). ``IAPC_BOOT_ARCH`` says what kvmpy has: legacy
  devices (COM1 and the rest on "the ISA bus"), an 8042 when it has one, no VGA, and a
  CMOS RTC unless there is none; ``CENTURY`` is the RTC's century byte (0x32). The
  reset register is the PIIX Reset Control Register at port 0xcf9 with value 6, when the
  machine has it. No sleep registers: kvmpy cannot power off or sleep.
* **MADT** (5.2.12): the local APIC address, ``PCAT_COMPAT`` (KVM's in-kernel 8259 pair
  is there), one enabled local APIC per vCPU (APIC ID = ACPI processor UID = vCPU
  index; an x2APIC entry for IDs above 254), the in-kernel IOAPIC (GSI base 0, the same
  ID as kvmpy's MP table gives it), the local APIC NMI on LINT1 of every CPU, and one
  *interrupt source override* per virtio-mmio line below 16, saying it is level-triggered
  and active high (a virtio-mmio device holds its line up while its InterruptStatus is
  non-zero; QEMU describes its PCI lines in the ISA range the same way). There is no
  override of ISA IRQ 0 to GSI 2, unlike QEMU's: kvmpy keeps KVM's default GSI routing,
  in which the PIT's GSI 0 reaches IOAPIC pin 0 (kvmpy/x86/mptable.py says the same).
* **DSDT**: under ``\\_SB``, a device for each thing an OS cannot find by probing
  (:func:`dsdt`): COM1 (PNP0501), the CMOS RTC (PNP0B00; no IRQ, since kvmpy's RTC
  raises none, so Linux does not wait for alarms that never come), the i8042 (PNP0303,
  IRQ 1), fw_cfg (QEMU0002) and each virtio-mmio device (LNRO0005, the id Linux's
  virtio_mmio driver matches) with its MMIO window and its level-triggered GSI.
  With PCI (:class:`Pci`), also the host bridge ``PCI0`` (PNP0A08, compatible with
  PNP0A03): segment 0, bus 0 only; its _CRS is the bus number, the I/O ports other
  than 0xcf8-0xcff and the MMIO window it forwards; its _PRT wires INTA# of each device
  to its own GSI (16 and up: level-triggered, active low, which is what an OS assumes for
  a GSI in a _PRT; KVM's IOAPIC takes asserted as 1 whatever the polarity). ``MCFG``'s
  ECAM range is also claimed by a motherboard-resources device (PNP0C02), which Linux
  wants to see before it trusts MMCONFIG.
* **MCFG** (PCI Firmware 3.2, 4.1.2): one entry, segment 0, buses 0-0, the ECAM base.

:func:`build` lays them out from one address (the RSDP first, 16-byte aligned, where a
BIOS-area scan finds it) and returns the bytes with the address of each table.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import layout, mptable
from . import aml

OEM_ID = b"KVMPY "                  # 6 bytes
OEM_TABLE_ID = b"KVMPYVM "          # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"KVMP"                # who made the table (for compiled tables: the ASL compiler)
CREATOR_REVISION = 1
HEADER = struct.Struct("<4sIBB6s8sI4sI")    # the 36-byte System Description Table header
ALIGN = 16

# --- RSDP (5.2.5.3) ------------------------------------------------------------------------
RSDP_SIGNATURE = b"RSD PTR "
RSDP = struct.Struct("<8sB6sBIIQB3x")       # 36 bytes; the first 20 are the ACPI 1.0 part
RSDP_V1_SIZE = 20

# --- FADT (5.2.9, table 5.9) ------------------------------------------------------------------
FADT_REVISION, FADT_MINOR = 6, 5
FADT_SIZE = 276
GAS = struct.Struct("<BBBBQ")               # Generic Address Structure (5.2.3.2)
SPACE_SYSTEM_IO = 1
ACCESS_BYTE = 1
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5
FADT_WBINVD = 1 << 0
FADT_PWR_BUTTON = 1 << 4            # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5            # set: no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
C_STATE_LATENCY_NONE = 0x0FFF       # P_LVL2_LAT > 100 / P_LVL3_LAT > 1000: no C2/C3
RESET_VALUE = 0x06                  # Reset Control Register: SYS_RST | RST_CPU (devices/reset.py)
HYPERVISOR_VENDOR = b"KVMPY\0\0\0"
CMOS_CENTURY = 0x32                 # the CMOS byte holding the century (devices/rtc.py RTC_CENTURY)

# --- MADT (5.2.12) ---------------------------------------------------------------------------
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1
LAPIC_ENABLED = 1
MADT_LAPIC, MADT_IOAPIC, MADT_ISO, MADT_LAPIC_NMI, MADT_X2APIC, MADT_X2APIC_NMI = 0, 1, 2, 4, 9, 10
ISO_ACTIVE_HIGH_LEVEL = 0b1101      # polarity 01 (high), trigger 11 (level)
ALL_PROCESSORS = 0xFF
LINT1 = 1
MAX_XAPIC_ID = 254                  # 0xFF is the xAPIC broadcast ID

DSDT_REVISION = 2                   # 2 and later: 64-bit AML integers
VIRTIO_MMIO_HID = "LNRO0005"        # Linux's drivers/virtio/virtio_mmio.c matches it
FW_CFG_HID = "QEMU0002"             # Linux's drivers/firmware/qemu_fw_cfg.c matches it
STA_PRESENT_NOT_SHOWN = 0x0B        # _STA: present, enabled, functioning, not shown in UI


@dataclass(frozen=True)
class VirtioMmio:
    """One virtio-mmio device: its MMIO window and its GSI."""

    base: int
    size: int
    gsi: int


@dataclass(frozen=True)
class Pci:
    """A PCI host bridge: its ECAM window (bus 0), the MMIO window it forwards, and the
    GSI of each device's INTA# as ``(device number, GSI)``."""

    ecam_base: int
    mmio_base: int
    mmio_size: int
    intx: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Platform:
    """What the tables describe. ``None`` for a device the machine does not have; ``serial``
    lists the 16550s as ``(port, ISA IRQ)``; ``reset_port`` is the PIIX Reset Control Register."""

    cpus: int
    virtio_mmio: tuple[VirtioMmio, ...] = ()
    serial: tuple[tuple[int, int], ...] = ()
    rtc_port: int | None = None
    i8042_port: int | None = None
    fw_cfg_port: int | None = None
    reset_port: int | None = None
    pci: Pci | None = None
    ioapic_addr: int = layout.IOAPIC_ADDR
    lapic_addr: int = layout.LAPIC_ADDR

    @property
    def ioapic_id(self) -> int:
        return mptable.default_ioapic_id(self.cpus)


@dataclass(frozen=True)
class Tables:
    """The tables laid out from ``base``: ``data`` goes there; ``addresses`` maps each
    signature ("RSD PTR ", "XSDT", "FACP", "APIC", "DSDT") to its guest-physical address."""

    base: int
    data: bytes
    addresses: dict

    @property
    def rsdp(self) -> int:
        return self.addresses[RSDP_SIGNATURE.decode()]

    @property
    def end(self) -> int:
        return self.base + len(self.data)


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to zero modulo 256."""
    return mptable.checksum(data)


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header (checksummed over the whole table) + body."""
    length = HEADER.size + len(body)
    header = HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION,
                         CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def rsdp(xsdt_addr: int) -> bytes:
    """The Root System Description Pointer, revision 2: both checksums, no RSDT."""
    data = bytearray(RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, 2, 0, RSDP.size, xsdt_addr, 0))
    data[8] = checksum(data[:RSDP_V1_SIZE])
    data[32] = checksum(data)
    return bytes(data)


def xsdt(addresses: list[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in addresses))


def _gas_io(port: int) -> bytes:
    return GAS.pack(SPACE_SYSTEM_IO, 8, 0, ACCESS_BYTE, port)


def iapc_boot_arch(p: Platform) -> int:
    """The FADT's IA-PC boot architecture flags for ``p``."""
    flags = IAPC_VGA_NOT_PRESENT
    if p.serial or p.i8042_port is not None or p.rtc_port is not None:
        flags |= IAPC_LEGACY_DEVICES
    if p.i8042_port is not None:
        flags |= IAPC_8042
    if p.rtc_port is None:
        flags |= IAPC_CMOS_RTC_NOT_PRESENT
    return flags


def fadt(dsdt_addr: int, p: Platform) -> bytes:
    """The hardware-reduced FADT, revision 6.5 (276 bytes): see the module docstring."""
    flags = FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_HW_REDUCED_ACPI
    body = bytearray(FADT_SIZE - HEADER.size)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - HEADER.size, *values)

    # Offsets from the table's start (ACPI 6.5 table 5.9). Everything not set stays 0:
    # FIRMWARE_CTRL/X_FIRMWARE_CTRL (no FACS), SCI_INT, SMI_CMD, every PM and GPE block.
    put(40, "<I", dsdt_addr if dsdt_addr < 1 << 32 else 0)             # DSDT
    put(96, "<HH", C_STATE_LATENCY_NONE, C_STATE_LATENCY_NONE)          # P_LVL2_LAT, P_LVL3_LAT
    if p.rtc_port is not None:
        put(108, "<B", CMOS_CENTURY)                                    # CENTURY
    put(109, "<H", iapc_boot_arch(p))                                   # IAPC_BOOT_ARCH
    if p.reset_port is not None:
        flags |= FADT_RESET_REG_SUP
        put(116, "<12sB", _gas_io(p.reset_port), RESET_VALUE)           # RESET_REG, RESET_VALUE
    put(112, "<I", flags)                                               # Flags
    put(131, "<B", FADT_MINOR)                                          # FADT Minor Version
    put(140, "<Q", dsdt_addr)                                           # X_DSDT
    put(268, "<8s", HYPERVISOR_VENDOR)                                  # Hypervisor Vendor Identity
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def madt(p: Platform) -> bytes:
    """The MADT ("APIC"): see the module docstring."""
    entries = []
    for cpu in range(p.cpus):               # APIC ID = ACPI processor UID = vCPU index
        if cpu <= MAX_XAPIC_ID:
            entries.append(struct.pack("<BBBBI", MADT_LAPIC, 8, cpu, cpu, LAPIC_ENABLED))
        else:
            entries.append(struct.pack("<BBHIII", MADT_X2APIC, 16, 0, cpu, LAPIC_ENABLED, cpu))
    entries.append(struct.pack("<BBBBII", MADT_IOAPIC, 12, p.ioapic_id, 0, p.ioapic_addr, 0))
    for gsi in sorted({d.gsi for d in p.virtio_mmio if d.gsi < 16}):
        entries.append(struct.pack("<BBBBIH", MADT_ISO, 10, 0, gsi, gsi, ISO_ACTIVE_HIGH_LEVEL))
    entries.append(struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, ALL_PROCESSORS, 0, LINT1))
    if p.cpus > MAX_XAPIC_ID + 1:
        entries.append(struct.pack("<BBHIB3x", MADT_X2APIC_NMI, 12, 0, 0xFFFF_FFFF, LINT1))
    body = struct.pack("<II", p.lapic_addr, MADT_PCAT_COMPAT) + b"".join(entries)
    return sdt(b"APIC", MADT_REVISION, body)


def dsdt_devices(p: Platform) -> list[bytes]:
    """The Device terms for ``\\_SB``: serial ports, RTC, i8042, fw_cfg, virtio-mmio."""
    a = aml
    devices = []
    for i, (port, irq) in enumerate(p.serial):
        devices.append(a.device(f"COM{i + 1}", a.name("_HID", a.eisa_id("PNP0501")), a.name("_UID", i + 1),
                                a.name("_CRS", a.resource_template(a.io(port, 8), a.irq_no_flags(irq)))))
    if p.rtc_port is not None:
        devices.append(a.device("RTC", a.name("_HID", a.eisa_id("PNP0B00")),
                                a.name("_CRS", a.resource_template(a.io(p.rtc_port, 2)))))
    if p.i8042_port is not None:
        devices.append(a.device("PS2K", a.name("_HID", a.eisa_id("PNP0303")),
                                a.name("_CRS", a.resource_template(a.io(p.i8042_port, 1), a.io(p.i8042_port + 4, 1),
                                                                   a.irq_no_flags(1)))))
    if p.fw_cfg_port is not None:
        devices.append(a.device("FWCF", a.name("_HID", FW_CFG_HID), a.name("_STA", STA_PRESENT_NOT_SHOWN),
                                a.name("_CRS", a.resource_template(a.io(p.fw_cfg_port, 2)))))
    for i, d in enumerate(p.virtio_mmio):
        devices.append(a.device(f"VR{i:02d}", a.name("_HID", VIRTIO_MMIO_HID), a.name("_UID", i), a.name("_CCA", 1),
                                a.name("_CRS", a.resource_template(a.memory32_fixed(d.base, d.size),
                                                                   a.interrupt(d.gsi, level=True)))))
    if p.pci is not None:
        devices += pci_devices(p.pci)
    return devices


def pci_devices(pci: Pci) -> list[bytes]:
    """``PCI0`` (the host bridge) and ``MRES`` (the ECAM window as a motherboard resource)."""
    a = aml
    prt = a.package(*(a.package(a.integer(dev << 16 | 0xFFFF), a.integer(0), a.integer(0), a.integer(gsi))
                      for dev, gsi in pci.intx))     # (address, INTA#, no link device, GSI)
    crs = a.resource_template(a.word_bus_number(0, 0), a.word_io(0, layout.PCI_CONFIG_ADDRESS_PORT - 1),
                              a.word_io(layout.PCI_CONFIG_DATA_PORT + layout.PCI_CONFIG_DATA_PORT_COUNT, 0xFFFF),
                              a.dword_memory(pci.mmio_base, pci.mmio_base + pci.mmio_size - 1))
    return [a.device("PCI0", a.name("_HID", a.eisa_id("PNP0A08")), a.name("_CID", a.eisa_id("PNP0A03")),
                     a.name("_SEG", 0), a.name("_BBN", 0), a.name("_UID", 0), a.name("_CRS", crs),
                     a.name("_PRT", prt)),
            a.device("MRES", a.name("_HID", a.eisa_id("PNP0C02")), a.name("_UID", 0),
                     a.name("_CRS", a.resource_template(a.memory32_fixed(pci.ecam_base, layout.PCI_ECAM_SIZE))))]


def mcfg(pci: Pci) -> bytes:
    """The MCFG: 8 reserved bytes, then one allocation (base, segment 0, buses 0-0)."""
    return sdt(b"MCFG", 1, bytes(8) + struct.pack("<QHBB4x", pci.ecam_base, 0, 0, 0))


def dsdt(p: Platform) -> bytes:
    """The DSDT: ``Scope (\\_SB)`` holding :func:`dsdt_devices`."""
    return sdt(b"DSDT", DSDT_REVISION, aml.scope("\\_SB", *dsdt_devices(p)))


def check(p: Platform) -> None:
    """ValueError unless ``p`` can be described."""
    if p.cpus < 1:
        raise ValueError(f"cpus must be at least 1, got {p.cpus}")
    if len(p.virtio_mmio) > 100 or len(p.serial) > 9:
        raise ValueError("at most 100 virtio-mmio devices (VR00-VR99) and 9 serial ports (COM1-COM9)")
    if len({d.gsi for d in p.virtio_mmio}) != len(p.virtio_mmio):
        raise ValueError("two virtio-mmio devices share a GSI; kvmpy's lines are exclusive")
    if p.pci is not None and (any(not 0 < dev < 32 or gsi < 16 for dev, gsi in p.pci.intx)
                              or len({g for _, g in p.pci.intx}) != len(p.pci.intx)):
        raise ValueError("PCI devices are 1-31 and their INTx GSIs distinct and above the ISA lines")
    for name, addr in (("ioapic_addr", p.ioapic_addr), ("lapic_addr", p.lapic_addr)):
        if not 0 <= addr < 1 << 32:
            raise ValueError(f"{name} must be a 32-bit address, got {addr:#x}")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def build(p: Platform, base: int = layout.ACPI_BASE, max_size: int = layout.ACPI_MAX_SIZE) -> Tables:
    """Every table for ``p``, laid out from ``base`` (16-byte aligned): the RSDP, then the
    XSDT, FADT, MADT and DSDT, each 16-byte aligned. ValueError if they need more than
    ``max_size`` bytes or ``base`` is not 16-byte aligned below 4 GiB."""
    check(p)
    if base % ALIGN or not 0 <= base < 1 << 32:
        raise ValueError(f"the RSDP must be 16-byte aligned below 4 GiB, got {base:#x}")
    apic, dsdt_ = madt(p), dsdt(p)
    extra = {"MCFG": mcfg(p.pci)} if p.pci is not None else {}
    at: dict[str, int] = {}
    pos = base
    for sig, size in (("RSD PTR ", RSDP.size), ("XSDT", HEADER.size + 8 * (2 + len(extra))), ("FACP", FADT_SIZE),
                      ("APIC", len(apic)), *((k, len(v)) for k, v in extra.items()), ("DSDT", len(dsdt_))):
        at[sig] = pos
        pos = _align(pos + size)
    blobs = {"RSD PTR ": rsdp(at["XSDT"]), "XSDT": xsdt([at["FACP"], at["APIC"], *(at[k] for k in extra)]),
             "FACP": fadt(at["DSDT"], p), "APIC": apic, **extra, "DSDT": dsdt_}
    data = bytearray(at["DSDT"] + len(dsdt_) - base)
    if len(data) > max_size:
        raise ValueError(f"the ACPI tables need {len(data)} bytes; {max_size} are reserved for them")
    for sig, blob in blobs.items():
        data[at[sig] - base:at[sig] - base + len(blob)] = blob
    return Tables(base, bytes(data), at)
