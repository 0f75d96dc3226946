"""The MP table: how a guest learns its CPUs, APIC IDs and IOAPIC (Intel MP Spec 1.4, ch. 4).

An OS looking for other processors scans for the 16-byte *MP floating pointer*
(signature ``_MP_``) on 16-byte boundaries in the first KiB of the EBDA, the last
KiB of base memory and 0xF0000-0xFFFFF. It points at the *MP configuration
table* (``PCMP``): a 44-byte header and then entries sorted by type. Both must
sum to zero, byte by byte, modulo 256.

``mp_table()`` builds what a PC BIOS would leave for ``ncpus`` vCPUs of a kvmpy
Machine: one processor entry per vCPU (APIC ID = vCPU index, vCPU 0 the
bootstrap processor), an ISA bus, the in-kernel IOAPIC, the 16 ISA IRQs and the
two local interrupt lines. It returns the (gpa, bytes) writes, like ``modes``;
the Machine applies them.

ISA IRQ *n* goes to IOAPIC pin *n*, IRQ 0 included, because kvmpy keeps KVM's
default GSI routing (``kvm_setup_default_irq_routing``: GSI *n* -> IOAPIC pin
*n*), as Firecracker does. QEMU (and Dragonball) send IRQ 0 to pin 2 only
because they install their own routing with that override.
"""
from __future__ import annotations

import struct

from . import layout

# --- sizes and signatures (MP spec tables 4-1 to 4-9) ------------------------------
FLOATING_POINTER_SIZE = 16
HEADER_SIZE = 44
PROCESSOR_ENTRY_SIZE = 20
ENTRY_SIZE = 8                      # every other base-table entry
SIGNATURE_FLOATING = b"_MP_"
SIGNATURE_TABLE = b"PCMP"
SPEC_REV = 4                        # MP spec 1.4
OEM_ID = b"KVMPY   "                # 8 bytes, space padded
PRODUCT_ID = b"KVMPY VM    "        # 12 bytes, space padded

# --- entry types, in the order the base table must list them ----------------------
ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4

CPU_FLAG_EN = 1 << 0                # processor usable
CPU_FLAG_BP = 1 << 1                # the bootstrap processor
IOAPIC_FLAG_EN = 1 << 0
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_SMI, INT_TYPE_EXTINT = 0, 1, 2, 3
INT_FLAGS_CONFORM = 0               # polarity and trigger "conform to the bus" (ISA: high, edge)
ALL_LAPICS = 0xFF                   # destination APIC ID "every local APIC"

# A local APIC with an integrated APIC reports version 0x1X; KVM's reads 0x14.
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11               # KVM's IOAPIC version register
# CPU signature (CPUID.1:EAX stepping/model/family: family 6) and feature flags
# (CPUID.1:EDX: FPU, APIC), the values Firecracker and crosvm put here.
CPU_SIGNATURE = 0x600
CPU_FEATURES = (1 << 0) | (1 << 9)

ISA_BUS_ID = 0
ISA_BUS_TYPE = b"ISA   "
ISA_IRQS = 16
MAX_CPUS = 255                      # APIC IDs 0..254; 0xFF is the broadcast ID


def mp_table_size(ncpus: int) -> int:
    """Bytes of floating pointer plus configuration table for ``ncpus`` processors."""
    entries = 1 + 1 + ISA_IRQS + 2              # bus, IOAPIC, ISA IRQs, LINT0/LINT1
    return FLOATING_POINTER_SIZE + HEADER_SIZE + ncpus * PROCESSOR_ENTRY_SIZE + entries * ENTRY_SIZE


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to 0 modulo 256."""
    return -sum(data) & 0xFF


def _with_checksum(data: bytes, offset: int) -> bytes:
    assert data[offset] == 0
    return data[:offset] + bytes([checksum(data)]) + data[offset + 1:]


def default_ioapic_id(ncpus: int) -> int:
    """The IOAPIC's ID beside ``ncpus`` processors: ``ncpus``, the first ID no processor has
    (as SeaBIOS does), or 0 when all 255 are taken (see :func:`mp_table`). The MADT uses it too."""
    return ncpus if ncpus < MAX_CPUS else 0


def _processor(apic_id: int, bsp: bool) -> bytes:
    flags = CPU_FLAG_EN | (CPU_FLAG_BP if bsp else 0)
    return struct.pack("<BBBBII8x", ENTRY_PROCESSOR, apic_id, LAPIC_VERSION, flags,
                       CPU_SIGNATURE, CPU_FEATURES)


def _interrupt(entry_type: int, int_type: int, src_irq: int, dst_id: int, dst_pin: int) -> bytes:
    return struct.pack("<BBHBBBB", entry_type, int_type, INT_FLAGS_CONFORM, ISA_BUS_ID, src_irq,
                       dst_id, dst_pin)


def mp_table(ncpus: int, *, base: int = layout.MP_TABLE_BASE, ioapic_id: int | None = None,
             ioapic_addr: int = layout.IOAPIC_ADDR,
             lapic_addr: int = layout.LAPIC_ADDR) -> list[tuple[int, bytes]]:
    """The MP floating pointer at ``base`` and the configuration table right after it.

    ``ncpus`` processors get APIC IDs 0..ncpus-1 (the vCPU index, which is what KVM's
    local APIC ID register and kvmpy's CPUID report); APIC ID 0 is the bootstrap
    processor. ``ioapic_id`` defaults to ``ncpus``, the first ID no processor has (as
    SeaBIOS does), or 0 when all 255 are taken: on xAPIC systems I/O APIC IDs only had
    to be distinct on the old serial APIC bus, and KVM's IOAPIC ID register resets to 0.
    Returns ``[(base, floating_pointer), (base + 16, table)]``.
    """
    if not 1 <= ncpus <= MAX_CPUS:
        raise ValueError(f"an MP table describes 1 to {MAX_CPUS} CPUs, got {ncpus}")
    if ioapic_id is None:
        ioapic_id = default_ioapic_id(ncpus)
    if not 0 <= ioapic_id < ALL_LAPICS:
        raise ValueError(f"ioapic_id must be 0..254, got {ioapic_id}")
    if base % 16:
        raise ValueError(f"the MP floating pointer must be 16-byte aligned, got base={base:#x}")
    if base < 0 or base + mp_table_size(ncpus) > 1 << 32:
        raise ValueError(f"the MP table at {base:#x} does not fit below 4 GiB")
    for name, addr in (("ioapic_addr", ioapic_addr), ("lapic_addr", lapic_addr)):
        if not 0 <= addr < 1 << 32:
            raise ValueError(f"{name} must be a 32-bit address, got {addr:#x}")

    table_addr = base + FLOATING_POINTER_SIZE
    entries = [_processor(i, i == 0) for i in range(ncpus)]
    entries.append(struct.pack("<BB6s", ENTRY_BUS, ISA_BUS_ID, ISA_BUS_TYPE))
    entries.append(struct.pack("<BBBBI", ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_FLAG_EN,
                               ioapic_addr))
    entries += [_interrupt(ENTRY_IO_INTERRUPT, INT_TYPE_INT, irq, ioapic_id, irq)
                for irq in range(ISA_IRQS)]
    # Virtual wire mode: the 8259 PIC's output reaches the BSP's LINT0 as ExtINT; NMI is
    # wired to LINT1 of every CPU (MP spec 3.6.2.2 and 5.1).
    entries.append(_interrupt(ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0))
    entries.append(_interrupt(ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, ALL_LAPICS, 1))
    body = b"".join(entries)

    header = struct.pack("<4sHBB8s12sIHHIHBx", SIGNATURE_TABLE, HEADER_SIZE + len(body), SPEC_REV, 0,
                         OEM_ID, PRODUCT_ID, 0, 0, len(entries), lapic_addr, 0, 0)
    table = _with_checksum(header + body, 7)
    # Feature byte 1 = 0: a configuration table is present (no default configuration);
    # feature byte 2 bit 7 (IMCRP) = 0: no IMCR, the PIC is in virtual wire mode.
    pointer = struct.pack("<4sIBBBB4x", SIGNATURE_FLOATING, table_addr, FLOATING_POINTER_SIZE // 16,
                          SPEC_REV, 0, 0)
    pointer = _with_checksum(pointer, 10)
    return [(base, pointer), (table_addr, table)]
