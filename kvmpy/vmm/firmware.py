"""What a Machine leaves a Linux kernel where a PC's firmware would: the ACPI tables
(``x86.acpi``) and a reset entry at F000:FFF0 (``x86.bios``).

kvmpy has no firmware; what a BIOS would leave a kernel, the VMM writes (the MP table in
``Machine.__init__``, these at ``Machine.load`` of a Linux kernel). The description is
read off the slots, so a device attached in its usual place is described wherever it was
attached from: COM1, the RTC, the i8042, fw_cfg, the reset control register, and every
virtio-mmio device (``Platform.virtio_mmio``: the disks, then the rng) with its GSI, and
with virtio-pci the host bridge (MCFG, PCI0 and its _PRT from ``Platform.virtio_pci``).
"""
from __future__ import annotations

from ..x86 import acpi, bios, layout



def describe(platform, cpus: int) -> acpi.Platform:
    """The ``acpi.Platform`` of a machine with ``cpus`` vCPUs and ``platform``'s slots."""
    port = {s.name: s.base for s in platform.slots if s.bus == "pio"}
    virtio = platform.virtio_mmio               # the disks, then the rng: the one list of them
    return acpi.Platform(
        cpus=cpus,
        virtio_mmio=tuple(acpi.VirtioMmio(s.base, s.length, s.irq) for s in virtio),
        serial=tuple((s.base, s.irq) for s in platform.slots if s.name == "com1"),
        rtc_port=port.get("rtc"), i8042_port=port.get("i8042"), fw_cfg_port=port.get("fw_cfg"),
        reset_port=port.get("reset-control"), pci=_pci(platform))


def _pci(platform) -> acpi.Pci | None:
    """The host bridge and each virtio-pci function's INTA# GSI, if the machine has PCI."""
    if platform.pci is None:
        return None
    return acpi.Pci(layout.PCI_ECAM_BASE, layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE,
                    tuple((s.base, s.irq) for s in platform.virtio_pci))


def acpi_tables(platform, cpus: int) -> acpi.Tables:
    """The tables for ``describe(platform, cpus)``, laid out at ``layout.ACPI_BASE``."""
    return acpi.build(describe(platform, cpus))


def reset_entry(platform) -> tuple[int, bytes]:
    """``(address, code)`` of the BIOS reset entry for ``platform``'s reset lines."""
    port = {s.name: s.base for s in platform.slots if s.bus == "pio"}
    return bios.RESET_ENTRY, bios.reset_entry(port.get("reset-control"), port.get("i8042"))
