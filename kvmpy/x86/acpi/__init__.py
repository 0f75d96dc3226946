"""ACPI for kvmpy machines: an AML encoder (:mod:`.aml`) and the tables (:mod:`.tables`).

``build(Platform(cpus=4, ...))`` returns a :class:`Tables`: the bytes of the RSDP, XSDT,
FADT, MADT and DSDT laid out from ``layout.ACPI_BASE`` (0xE0000), where a BIOS-area scan
finds the RSDP, plus the address of each. The Linux loader writes them, hands the RSDP's
address over in the boot protocol and keeps their memory in the e820 map; docs/linux.md
says what a kernel then sees.
"""
from .tables import Pci, Platform, Tables, VirtioMmio, build

__all__ = ["Pci", "Platform", "Tables", "VirtioMmio", "build"]
