"""Every fixed guest-physical address, port and IRQ kvmpy uses, each with its reason.

The VMM's boot structures (GDT, TSS, page tables, Linux's boot information, the MP
table) have their homes in the first MiB. Only the MP table's and Linux's are fixed:
the GDT, TSS and page tables move out of the way of an image loaded where they would
be (``boottables.place``). Images may load anywhere in RAM except the PC's legacy
hole (``LEGACY_HOLE``: EBDA, VGA window, BIOS), which memory maps report as not RAM;
Linux kernels stay above 1 MiB. kvmpy's own ELF guests are linked at 1 MiB
(``KERNEL_START``), the traditional x86 kernel address, and raw real-mode images sit
at 0x7C00 like a boot sector.
"""
from __future__ import annotations

from ..kvm.memory import PAGE_SIZE as PAGE   # 4 KiB; its one home is kvm/memory.py

MiB = 1 << 20
GiB = 1 << 30

# --- boot structures in low memory (host-written, read by the CPU) ---------------
BOOT_GDT = 0x1000          # flat GDT: code/data for rings 0 and 3, plus the TSS descriptor
BOOT_TSS = 0x2000          # 64-bit TSS; RSP0 is the stack for ring-3 -> ring-0 transitions
TSS_IOMAP_OFFSET = 0x68    # the I/O permission bitmap follows the 104-byte TSS proper
# 65536 ports / 8 = 8 KiB of bitmap, plus the all-ones byte the SDM requires after it (SDM 20.5.2).
# Ring-3 guests get every port through this bitmap: on some hosts (kvm_pvm) IOPL=3 does
# not survive into user mode, but the bitmap is honoured everywhere.
BOOT_TSS_SIZE = TSS_IOMAP_OFFSET + 8192 + 1
RING0_STACK_TOP = 0x7000   # RSP0 in the TSS; 0x6000-0x6FFF is reserved for it
FUZZ_TRAPS = 0x5000        # kvmpy.fuzz: an IDT of 32 gates (512 bytes), one 16-byte stub per vector
FUZZ_TRAPS_SIZE = 0x408    # that reports it, the saved RAX (fuzz/traps.py); free page between the TSS and stack
PML4 = 0x9000              # 4-level paging: PML4 -> PDPT -> PD with 2 MiB pages
PDPT = 0xA000
PD_BASE = 0x10000          # one page directory (1 GiB of 2 MiB pages) per GiB mapped
PD_MAX = (0x80000 - PD_BASE) // PAGE     # page directories that fit below 0x80000
IDENTITY_MAP_MIN = 4 * GiB  # always map the first 4 GiB (RAM and the MMIO hole below 4 GiB)

# Linux's boot information (loader/linux.py): the boot_params "zero page", or for PVH the
# hvm_start_info with its module list and memory map, in the page between the ring-0 stack
# and the AP trampoline; the command line after the boot page directories, below the EBDA.
LINUX_BOOT_INFO = 0x7000
LINUX_BOOT_INFO_SIZE = 0x1000
LINUX_CMDLINE = 0x80000
LINUX_CMDLINE_MAX = 0x10000    # bytes reserved for the command line, NUL included

REAL_MODE_LOAD = 0x7C00    # where BIOSes load a boot sector; raw real-mode images go here
KERNEL_START = MiB         # ELF and raw protected/long-mode images are linked at 1 MiB
LOW_RESERVED = (0, MiB)    # Linux kernels (and their initrds) keep out of the first MiB

# --- the PC's first MiB, as the memory maps kvmpy hands guests describe it ----------------
IVT_BDA = (0, 0x500)       # real-mode interrupt vector table and BIOS data area: RAM in the
#                            maps (as SeaBIOS reports it), but the VMM puts nothing there
LEGACY_HOLE = (0x9FC00, MiB)   # EBDA (the MP table's home), VGA window, option ROMs, BIOS:
#                            reserved or absent in every map, so no image may load there
BASE_MEMORY = (IVT_BDA[1], LEGACY_HOLE[0])   # the rest of the first 640 KiB: where the VMM
#                            prefers to put what it writes for an image (boottables.place)

# --- KVM-internal pages (needed on Intel VMX for real-mode emulation) -------------
# Placed in the 4 GiB hole where RAM never lives, as QEMU does.
KVM_TSS_ADDR = 0xFFFB_D000          # three pages
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000  # one page, just below the TSS pages

# --- I/O ports and IRQs -----------------------------------------------------------
COM1_PORT, COM1_IRQ = 0x3F8, 4     # PC standard: first serial port, ISA IRQ 4
COM_PORT_COUNT = 8                 # 16550 registers occupy 8 consecutive ports
I8042_PORT = 0x60                  # PS/2 controller: data 0x60, command/status 0x64
I8042_PORT_COUNT = 5
RTC_PORT = 0x70                    # CMOS/RTC (MC146818): index 0x70 (bit 7 masks NMI), data 0x71
RTC_PORT_COUNT = 2                 # no IRQ: IRQ 8 (the RTC's line) is never raised
DEBUG_EXIT_PORT = 0xF4             # QEMU's isa-debug-exit default iobase
DEBUG_EXIT_PORT_COUNT = 1
# QEMU's fw_cfg on x86 (docs/specs/fw_cfg.rst, "Register Locations"): the 16-bit selector
# at 0x510 and the 8-bit data port at 0x511, one 2-port range. Firmware (SeaBIOS, OVMF) and
# Linux's qemu_fw_cfg driver look there. The DMA address register QEMU puts at 0x514 is not
# implemented (FW_CFG_ID says so), so those ports stay unclaimed.
FW_CFG_PORT = 0x510
FW_CFG_PORT_COUNT = 2
# The reset lines besides the i8042's (devices/reset.py): System Control Port A and the
# PIIX/ICH Reset Control Register. 0xcf9 lies inside PCI configuration mechanism #1's
# CONFIG_ADDRESS (0xcf8-0xcfb); only the byte port is claimed (docs/devices.md, "Reset lines").
SYS_CTRL_A_PORT = 0x92
SYS_CTRL_A_PORT_COUNT = 1
RESET_CONTROL_PORT = 0xCF9
RESET_CONTROL_PORT_COUNT = 1

# --- GDT selectors (index << 3 | RPL), matching gdt.boot_gdt() ----------------------
SEL_CODE64 = 0x08
SEL_DATA = 0x10
SEL_CODE32 = 0x18
SEL_USER_CODE64 = 0x20 | 3
SEL_USER_DATA = 0x28 | 3
SEL_TSS = 0x30

# --- virtio-mmio devices (virtio 1.2, section 4.2) ------------------------------------
# In the hole below 4 GiB, away from RAM (which stops at 3 GiB) and the LAPIC/IOAPIC at
# 0xFEC00000/0xFEE00000; the same place Firecracker puts them. One 4 KiB page each.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x1000
# ISA lines nobody else uses on a PC (3/4 serial, 8 RTC, 12 PS/2 mouse, 14/15 IDE).
VIRTIO_MMIO_IRQS = (5, 6, 7, 9, 10, 11)
MAX_VIRTIO_DEVICES = len(VIRTIO_MMIO_IRQS)

# --- PCI (devices/pci/): one host bridge, bus 0 -----------------------------------------------
# Configuration mechanism #1 (PCI 3.0, 3.2.2.3.2): CONFIG_ADDRESS at 0xcf8 (dword accesses
# only: 0xcf9 is the reset control register above), CONFIG_DATA at 0xcfc-0xcff.
PCI_CONFIG_ADDRESS_PORT = 0xCF8
PCI_CONFIG_DATA_PORT = 0xCFC
PCI_CONFIG_DATA_PORT_COUNT = 4
# ECAM (PCI Express "MMCONFIG"): 1 MiB per bus, bus 0 only, in the hole below 4 GiB above
# the virtio-mmio windows and below the IOAPIC. The ACPI MCFG table says where.
PCI_ECAM_BASE = 0xE000_0000
PCI_ECAM_SIZE = 1 * MiB
# The window the memory BARs are placed in (and the DSDT's PCI0 forwards): the first 256 MiB
# of the hole below 4 GiB, from where RAM stops (3 GiB) up to the virtio-mmio windows.
PCI_MMIO_BASE = 0xC000_0000
PCI_MMIO_SIZE = 0x1000_0000
# INTA# of PCI device N (1-8) goes to IOAPIC input PCI_INTX_GSIS[N - 1] (the DSDT's _PRT says
# so): the inputs above the 16 ISA lines, one per device, never shared.
PCI_INTX_GSIS = tuple(range(16, 24))
MAX_PCI_DEVICES = len(PCI_INTX_GSIS)
# MSI-X vectors are routed to GSIs from here up (KVM_SET_GSI_ROUTING; the IOAPIC has 0-23).
MSI_GSI_BASE = 24

# --- several CPUs: APICs and the MP table (Intel MultiProcessor Specification 1.4) -------
LAPIC_ADDR = 0xFEE0_0000   # each CPU's local APIC at its power-on default (IA32_APIC_BASE, SDM 10.4.4)
IOAPIC_ADDR = 0xFEC0_0000  # the in-kernel IOAPIC of KVM_CREATE_IRQCHIP, at the PC default
# An OS looks for the MP floating pointer in the first KiB of the EBDA, in the last KiB of
# base memory, or in the BIOS ROM at 0xF0000-0xFFFFF (MP spec 4.0). kvmpy has no BIOS and no
# EBDA, so the pointer goes in the last KiB of 640 KiB base memory, as in Firecracker; the
# configuration table follows it (past 0xA0000 with many CPUs: plain RAM here, no VGA hole).
MP_TABLE_BASE = 0x9FC00
MP_TABLE_MAX_SIZE = 0x1800  # 6 KiB: mptable.mp_table_size(255) is 5320 bytes
# ACPI (kvmpy/x86/acpi/): the RSDP and then the other tables, in the BIOS area where an OS
# scans for the RSDP (16-byte aligned in 0xE0000-0xFFFFF, ACPI 6.5 5.2.5.1), as Firecracker
# puts its RSDP. A Linux kernel is also told the address (boot_params.acpi_rsdp_addr,
# hvm_start_info.rsdp_paddr); the e820 map lists their pages as ACPI data.
ACPI_BASE = 0xE0000
ACPI_MAX_SIZE = 0x10000     # up to 0xF0000; 255 CPUs and 6 disks take about 3.2 KiB
# Free page below 1 MiB for a guest's application-processor start-up code: a SIPI starts an
# AP in real mode at vector << 12 (SDM 10.4.4.1), so it must be a page below 1 MiB. The
# smp demo guest copies its trampoline here (SIPI vector 0x08).
AP_TRAMPOLINE = 0x8000

# --- benchmark marker port -------------------------------------------------------------
# Guests that measure themselves write a phase number here; the host timestamps each write.
BENCH_MARK_PORT = 0x5E0
