"""What a Machine leaves a Linux kernel where a PC's firmware would: the ACPI tables
(``x86.acpi``), a reset entry at F000:FFF0 (``x86.bios``) and an initialised, masked 8259
pair (``mask_pic``).

kvmpy has no firmware; what a BIOS would leave a kernel, the VMM writes (the MP table in
``Machine.__init__``, these at ``Machine.load`` of a Linux kernel). The description is
read off the slots, so a device attached in its usual place is described wherever it was
attached from: COM1, the RTC, the i8042, fw_cfg, the reset control register, and every
virtio-mmio device (``Platform.virtio_mmio``: the disks, then the rng) with its GSI, and
with virtio-pci the host bridge (MCFG, PCI0 and its _PRT from ``Platform.virtio_pci``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..x86 import bios, layout

if TYPE_CHECKING:                               # imported when a Linux kernel is loaded: x86/acpi
    from ..x86 import acpi                      # is a tenth of a small guest's start-up


def describe(platform, cpus: int) -> acpi.Platform:
    """The ``acpi.Platform`` of a machine with ``cpus`` vCPUs and ``platform``'s slots."""
    from ..x86 import acpi
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
    from ..x86 import acpi
    if platform.pci is None:
        return None
    return acpi.Pci(layout.PCI_ECAM_BASE, layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE,
                    tuple((s.base, s.irq) for s in platform.virtio_pci))


def acpi_tables(platform, cpus: int) -> acpi.Tables:
    """The tables for ``describe(platform, cpus)``, laid out at ``layout.ACPI_BASE``."""
    from ..x86 import acpi
    return acpi.build(describe(platform, cpus))


def reset_entry(platform) -> tuple[int, bytes]:
    """``(address, code)`` of the BIOS reset entry for ``platform``'s reset lines."""
    port = {s.name: s.base for s in platform.slots if s.bus == "pio"}
    return bios.RESET_ENTRY, bios.reset_entry(port.get("reset-control"), port.get("i8042"))


#: Where a PC's firmware leaves the 8259 pair (SeaBIOS's pic_setup, with the vectors moved out
#: of the exception range): initialised (ICW1-4 done, 8086 mode), every line masked but the
#: master's cascade input (IRQ 2). Offsets are those of ``struct kvm_pic_state``.
PIC_MASTER_BASE, PIC_SLAVE_BASE = 0x20, 0x28
PIC_MASTER_IMR, PIC_SLAVE_IMR = 0xFB, 0xFF
_PIC_IRR, _PIC_IMR, _PIC_ISR, _PIC_IRQ_BASE, _PIC_INIT_STATE, _PIC_INIT4 = 1, 2, 3, 5, 9, 13
_IRQCHIP_DATA = 8                   # struct kvm_irqchip: chip_id, pad, then the chip's state


def mask_pic(vm) -> None:
    """Put KVM's in-kernel 8259 pair where firmware leaves it: initialised and masked.

    KVM creates the PICs in their power-on state: never initialised, vector base 0 and
    nothing masked, while the bootstrap vCPU's LINT0 takes ExtINT (virtual wire). A kernel
    told by a hardware-reduced FADT that there is no legacy PIC (``acpi_reduced_hw_init``:
    Linux's null_legacy_pic) never programs or masks it and keeps LINT0 as it found it.
    KVM's default routing sends GSIs 0-15 to the PIC as well as to the IOAPIC, so the first
    edge on an ISA line (COM1's IRQ 4, a virtio-mmio device's 5, 6, 7, 9, 10 or 11) would
    reach vCPU 0 a second time as an external interrupt with vector = IRQ number, an
    exception vector (#OF, #BR, #UD, ..., #TS for IRQ 10), until Linux masks LINT0 in
    setup_local_APIC. In the nested testbed that window is ~10 ms with interrupts on, and
    no traced boot raised a line in it (issue 13's L2 faults are not explained by it), but
    nothing else closes it. Firmware programs the pair and masks it before any OS runs;
    kvmpy does the same through KVM_SET_IRQCHIP. A guest that wants the PIC initialises it
    itself (ICW1 resets the mask).
    """
    for chip, base, imr in ((0, PIC_MASTER_BASE, PIC_MASTER_IMR), (1, PIC_SLAVE_BASE, PIC_SLAVE_IMR)):
        state = bytearray(vm.get_irqchip(chip))
        pic = _IRQCHIP_DATA
        state[pic + _PIC_IRR] = 0
        state[pic + _PIC_ISR] = 0
        state[pic + _PIC_IMR] = imr
        state[pic + _PIC_IRQ_BASE] = base
        state[pic + _PIC_INIT_STATE] = 0
        state[pic + _PIC_INIT4] = 1
        vm.set_irqchip(bytes(state))
