"""A Machine gives a Linux kernel ACPI tables that describe it (kvmpy/vmm/firmware.py), and only
a Linux kernel, only with the irqchip they describe, and not with ``acpi=False``.

The kernel here is a synthetic PVH vmlinux that is loaded, never run: what matters is what
the Machine wrote around it. Debian's kernel reading the tables is in test_linux.py.
"""
import struct

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.cli.options import build_parser
from kvmpy.loader import pvh
from kvmpy.loader.linux import BOOT_INFO
from kvmpy.vmm import firmware
from kvmpy.x86 import acpi, bios, layout, modes

ENTRY = 0x100_0040


def vmlinux() -> bytes:
    """An ELF64 with one PT_LOAD at 16 MiB and the PVH entry note."""
    desc = ENTRY.to_bytes(8, "little")
    notes = struct.pack("<III", 4, len(desc), pvh.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + desc
    code = b"\xf4" * 0x100
    data_at = 64 + 2 * 56
    ehdr = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x100_0000, 64, 0, 0,
                                                           64, 56, 2, 0, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 7, data_at, 0x100_0000, 0x100_0000, len(code), 0x1000, 0x1000)
    note = struct.pack("<IIQQQQQQ", 4, 4, data_at + len(code), 0, 0, len(notes), len(notes), 4)
    return ehdr + load + note + code + notes


def disk(tmp_path, name="d.img"):
    path = tmp_path / name
    path.write_bytes(bytes(1 << 16))
    return str(path)


def rsdp_of(m) -> int:
    return pvh.START_INFO.unpack(m.memory.read(BOOT_INFO, pvh.START_INFO.size))[6]


def test_a_linux_kernel_gets_tables_describing_the_machine(tmp_path):
    with kvmpy.Machine(mem_size=64 << 20, cpus=3, disks=[disk(tmp_path), disk(tmp_path, "e.img")]) as m:
        img = m.load(vmlinux(), cmdline="console=ttyS0")
        assert m.acpi and rsdp_of(m) == layout.ACPI_BASE
        assert firmware.describe(m.platform, 3) == expected_platform(3, 2)
        expected = acpi.build(expected_platform(3, 2))
        assert m.memory.read(layout.ACPI_BASE, len(expected.data)) == expected.data
    assert img.cmdline == "console=ttyS0", "the disks are in the DSDT, not on the command line"


def expected_platform(cpus, disks):
    return acpi.Platform(cpus=cpus, virtio_mmio=tuple(
        acpi.VirtioMmio(0xD0000000 + i * 0x1000, 0x1000, layout.VIRTIO_MMIO_IRQS[i]) for i in range(disks)),
        serial=((0x3F8, 4),), rtc_port=0x70, i8042_port=0x60, fw_cfg_port=0x510, reset_port=0xCF9)


def test_without_acpi_the_disks_go_on_the_command_line(tmp_path):
    with kvmpy.Machine(mem_size=64 << 20, disks=[disk(tmp_path)], acpi=False) as m:
        img = m.load(vmlinux(), cmdline="console=ttyS0")
        assert rsdp_of(m) == 0 and m.memory.read(layout.ACPI_BASE, 8) == bytes(8)
    assert img.cmdline == "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"


def test_no_irqchip_means_no_tables_and_acpi_true_needs_one():
    with kvmpy.Machine(mem_size=64 << 20, irqchip=False) as m:
        m.load(vmlinux())
        assert not m.acpi and rsdp_of(m) == 0
    with pytest.raises(ValueError, match="irqchip"):
        kvmpy.Machine(mem_size=64 << 20, irqchip=False, acpi=True)


def test_other_images_get_no_tables():
    g = guests.get("hello-long")
    with kvmpy.Machine() as m:
        m.load(g.path, g.format, mode=g.mode)
        assert m.memory.read(layout.ACPI_BASE, 8) == bytes(8)


def test_the_cli_has_no_acpi():
    args = build_parser("run").parse_args(["run", "vmlinux", "--no-acpi"])
    assert args.acpi is False
    assert build_parser("run").parse_args(["run", "vmlinux"]).acpi is None


@pytest.mark.parametrize("acpi_on", [True, False])
def test_a_jump_to_the_bios_reset_entry_resets_the_machine(acpi_on):
    """Linux with a hardware-reduced FADT reboots through F000:FFF0 (x86/bios.py): the code
    there writes the Reset Control Register, and the run ends as a reset."""
    with kvmpy.Machine(mem_size=64 << 20, acpi=acpi_on) as m:
        m.load(vmlinux())
        assert m.memory.read(bios.RESET_ENTRY, 16) == bios.reset_entry(0xCF9, 0x60)
        v = m.vcpus[0]
        setup = modes.setup("real", bios.RESET_ENTRY, v.get_sregs(), m.memory.end)
        v.set_sregs(setup.sregs)
        v.set_regs(setup.regs)
        result = m.run(timeout=30)
    assert result.reason == "reset" and m.stats.devices["reset-control"] == 1


def pic(m, chip: int) -> dict:
    """One 8259's state from KVM_GET_IRQCHIP (struct kvm_pic_state's leading bytes)."""
    b = m.vm.get_irqchip(chip)[8:8 + 16]
    return {"irr": b[1], "imr": b[2], "isr": b[3], "irq_base": b[5], "init_state": b[9], "init4": b[13]}


def test_a_linux_kernel_finds_the_8259_pair_initialised_and_masked():
    """KVM creates the PICs in their power-on state (vector base 0, nothing masked) with the
    BSP's LINT0 in ExtINT mode, and Linux told by the hardware-reduced FADT that there is no
    PIC never touches it: an ISA line kvmpy raised (GSIs 0-15 reach the PIC too) before Linux
    masks LINT0 came to vCPU 0 as vector = IRQ number, an exception vector. A Linux kernel
    gets the pair as firmware leaves it: initialised, vectors 0x20/0x28, masked but for the
    cascade, so a raised line stays in the IRR and never reaches a CPU."""
    with kvmpy.Machine(mem_size=64 << 20, cpus=2) as m:
        lvt0 = struct.unpack_from("<I", m.vcpus[0].get_lapic(), 0x350)[0]
        assert lvt0 == 0x700, "the BSP's LINT0 is ExtINT at power-on: the PIC reaches vCPU 0"
        assert pic(m, 0)["imr"] == 0 and pic(m, 0)["irq_base"] == 0, "KVM's power-on PIC"
        m.load(vmlinux())
        assert pic(m, 0) == {"irr": 0, "imr": 0xFB, "isr": 0, "irq_base": 0x20, "init_state": 0, "init4": 1}
        assert pic(m, 1) == {"irr": 0, "imr": 0xFF, "isr": 0, "irq_base": 0x28, "init_state": 0, "init4": 1}
        m.vm.irq_line(layout.VIRTIO_MMIO_IRQS[0], 1)          # a virtio-mmio device's line goes up
        m.vm.irq_line(layout.COM1_IRQ, 1)
        m.vm.irq_line(layout.COM1_IRQ, 0)
        master = pic(m, 0)
        assert master["irr"] & (1 << layout.VIRTIO_MMIO_IRQS[0]) and master["irr"] & (1 << layout.COM1_IRQ)
        assert master["imr"] & master["irr"] == master["irr"] and master["isr"] == 0


def test_other_images_find_the_pic_in_its_power_on_state():
    """Guests that use the 8259 program it themselves (ICW1 clears the mask); only a Linux
    kernel gets it pre-programmed."""
    g = guests.get("hello-long")
    with kvmpy.Machine() as m:
        m.load(g.path, g.format, mode=g.mode)
        assert pic(m, 0)["imr"] == 0 and pic(m, 0)["irq_base"] == 0
