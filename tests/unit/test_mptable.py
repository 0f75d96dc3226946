"""The MP table, found and decoded the way an OS does it, independently of mptable.py.

The parser below follows the MultiProcessor Specification 1.4, chapter 4, field by
field (floating pointer: table 4-1 and figure 4-2; header: table 4-2; entries:
tables 4-4 to 4-9), and searches for the pointer where section 4 says an OS looks.
"""
import pathlib
import re

import pytest
from hypothesis import given, strategies as st

from kvmpy import guests
from kvmpy.kvm.memory import GuestMemory
from kvmpy.x86 import layout
from kvmpy.x86.mptable import mp_table, mp_table_size

MiB = 1 << 20


def u16(b, off):
    return b[off] | b[off + 1] << 8


def u32(b, off):
    return u16(b, off) | u16(b, off + 2) << 16


def sums_to_zero(b: bytes) -> bool:
    return sum(b) % 256 == 0


def find_floating_pointer(mem: GuestMemory, base_mem_kib: int = 640):
    """Scan EBDA's first KiB, the last KiB of base memory, then 0xF0000-0xFFFFF (MP spec 4)."""
    ebda = u16(mem.read(0x40E, 2), 0) << 4
    areas = ([(ebda, 1024)] if ebda else []) + [((base_mem_kib - 1) * 1024, 1024), (0xF0000, 0x10000)]
    for start, length in areas:
        data = mem.read(start, length)
        for off in range(0, length, 16):
            if data[off:off + 4] == b"_MP_" and data[off + 8] == 1 and sums_to_zero(data[off:off + 16]):
                return start + off
    return None


def parse(mem: GuestMemory) -> dict:
    """Decode the floating pointer and the base configuration table into plain values."""
    fp_addr = find_floating_pointer(mem)
    assert fp_addr is not None, "no valid _MP_ floating pointer in the spec's search areas"
    fp = mem.read(fp_addr, 16)
    out = {"fp_addr": fp_addr, "spec_rev": fp[9], "feature1": fp[11], "feature2": fp[12],
           "fp_reserved": fp[13:16]}
    table_addr = u32(fp, 4)
    hdr = mem.read(table_addr, 44)
    assert hdr[0:4] == b"PCMP"
    length = u16(hdr, 4)
    table = mem.read(table_addr, length)
    assert sums_to_zero(table), "configuration table checksum"
    out.update(table_addr=table_addr, length=length, table_rev=hdr[6], oem=hdr[8:16], product=hdr[16:28],
               oem_table=u32(hdr, 28), oem_size=u16(hdr, 32), lapic_addr=u32(hdr, 36),
               ext_length=u16(hdr, 40), ext_checksum=hdr[42])
    count = u16(hdr, 34)
    cpus, buses, ioapics, ioints, lints, types = [], [], [], [], [], []
    off = 44
    for _ in range(count):
        t = table[off]
        types.append(t)
        if t == 0:
            e = table[off:off + 20]
            cpus.append({"apic_id": e[1], "version": e[2], "enabled": bool(e[3] & 1), "bsp": bool(e[3] & 2),
                         "signature": u32(e, 4), "features": u32(e, 8), "reserved": e[12:20]})
            off += 20
            continue
        e = table[off:off + 8]
        if t == 1:
            buses.append((e[1], e[2:8]))
        elif t == 2:
            ioapics.append({"id": e[1], "version": e[2], "enabled": bool(e[3] & 1), "addr": u32(e, 4)})
        elif t in (3, 4):
            rec = {"type": e[1], "flags": u16(e, 2), "bus": e[4], "irq": e[5], "dst": e[6], "pin": e[7]}
            (ioints if t == 3 else lints).append(rec)
        else:
            raise AssertionError(f"unknown entry type {t}")
        off += 8
    assert off == length, "entries end exactly at the base table length"
    out.update(cpus=cpus, buses=buses, ioapics=ioapics, ioints=ioints, lints=lints, types=types)
    return out


def written(ncpus, mem_size=2 * MiB, **kw) -> GuestMemory:
    mem = GuestMemory.anonymous(mem_size)
    for gpa, blob in mp_table(ncpus, **kw):
        mem.write(gpa, blob)
    return mem


def test_floating_pointer_is_found_in_the_last_kib_of_base_memory():
    """With the default base the pointer sits where an OS without an EBDA looks: 639 KiB."""
    t = parse(written(2))
    assert t["fp_addr"] == layout.MP_TABLE_BASE == 639 * 1024
    assert (t["spec_rev"], t["table_rev"]) == (4, 4)
    assert t["feature1"] == 0, "a configuration table is present (no default configuration)"
    assert t["feature2"] == 0, "no IMCR: virtual wire mode"
    assert t["fp_reserved"] == b"\0\0\0"
    assert t["table_addr"] == t["fp_addr"] + 16


def test_four_cpus_bus_ioapic_and_isa_irqs():
    """Four processors with APIC IDs 0-3 (BSP 0), one ISA bus, the IOAPIC and identity-routed IRQs."""
    t = parse(written(4))
    assert [c["apic_id"] for c in t["cpus"]] == [0, 1, 2, 3]
    assert [c["bsp"] for c in t["cpus"]] == [True, False, False, False]
    assert all(c["enabled"] and c["version"] == 0x14 and c["reserved"] == bytes(8) for c in t["cpus"])
    assert t["buses"] == [(0, b"ISA   ")]
    assert t["ioapics"] == [{"id": 4, "version": 0x11, "enabled": True, "addr": 0xFEC00000}]
    assert t["lapic_addr"] == 0xFEE00000
    assert [(i["bus"], i["irq"], i["dst"], i["pin"], i["type"]) for i in t["ioints"]] == \
        [(0, irq, 4, irq, 0) for irq in range(16)]
    assert [(x["type"], x["dst"], x["pin"]) for x in t["lints"]] == [(3, 0, 0), (1, 0xFF, 1)]
    assert (t["oem_table"], t["oem_size"], t["ext_length"], t["ext_checksum"]) == (0, 0, 0, 0)
    assert t["types"] == sorted(t["types"]), "entries are sorted by type (MP spec 4.3)"


def test_addresses_and_ioapic_id_are_honoured():
    """Explicit IOAPIC ID and APIC addresses appear in the table."""
    t = parse(written(3, ioapic_id=9, ioapic_addr=0xFEC01000, lapic_addr=0xFEE10000))
    assert t["ioapics"][0]["id"] == 9 and t["ioapics"][0]["addr"] == 0xFEC01000
    assert {i["dst"] for i in t["ioints"]} == {9}
    assert t["lapic_addr"] == 0xFEE10000


def test_pointer_in_the_bios_area_is_found_too():
    """A table placed in 0xF0000-0xFFFFF is found by the same search."""
    t = parse(written(2, base=0xF5A30))
    assert t["fp_addr"] == 0xF5A30


@given(ncpus=st.integers(1, 255), slot=st.integers(0, (0x10000 - 5328) // 16))
def test_any_cpu_count_decodes_back(ncpus, slot):
    """For 1-255 CPUs the table decodes back: checksums, count, IDs, one BSP, size as promised."""
    base = 0xF0000 + slot * 16
    mem = written(ncpus, base=base)
    t = parse(mem)
    assert t["fp_addr"] == base
    assert [c["apic_id"] for c in t["cpus"]] == list(range(ncpus))
    assert sum(c["bsp"] for c in t["cpus"]) == 1 and t["cpus"][0]["bsp"]
    ioapic_id = t["ioapics"][0]["id"]
    assert ioapic_id != 0xFF and (ncpus == 255 or ioapic_id not in range(ncpus))
    assert 16 + t["length"] == mp_table_size(ncpus) <= layout.MP_TABLE_MAX_SIZE
    assert len(t["ioints"]) == 16


def test_default_region_stays_clear_of_the_other_low_structures():
    """The reserved MP table region overlaps none of the host's other low-memory structures."""
    start, end = layout.MP_TABLE_BASE, layout.MP_TABLE_BASE + layout.MP_TABLE_MAX_SIZE
    others = [(layout.BOOT_GDT, 0x1000), (layout.BOOT_TSS, layout.BOOT_TSS_SIZE),
              (layout.RING0_STACK_TOP - 0x1000, 0x1000), (layout.PML4, 0x1000), (layout.PDPT, 0x1000),
              (layout.PD_BASE, layout.PD_MAX * 0x1000), (layout.AP_TRAMPOLINE, 0x1000)]
    for addr, size in others:
        assert addr + size <= start or addr >= end, hex(addr)
    assert end <= layout.KERNEL_START


@pytest.mark.parametrize("kw, match", [
    ({"ncpus": 0}, "1 to 255"),
    ({"ncpus": 256}, "1 to 255"),
    ({"ncpus": 2, "ioapic_id": 255}, "ioapic_id"),
    ({"ncpus": 2, "base": 0x9FC08}, "16-byte aligned"),
    ({"ncpus": 2, "base": (1 << 32) - 64}, "4 GiB"),
    ({"ncpus": 2, "lapic_addr": 1 << 32}, "lapic_addr"),
])
def test_bad_arguments_are_refused(kw, match):
    """Impossible CPU counts, IDs, alignments and addresses raise ValueError naming the problem."""
    with pytest.raises(ValueError, match=match):
        mp_table(**kw)


def test_smp_guest_uses_the_layout_addresses():
    """The smp guest's trampoline page and exit value agree with layout.py and the manifest."""
    src = pathlib.Path(__file__).resolve().parents[2] / "guests"
    if not (src / "smp.c").is_file():
        pytest.skip("guest sources not in this tree")
    for name in ("smp.c", "smp-ap.S"):
        m = re.search(r"#define\s+AP_TRAMPOLINE\s+(0x[0-9a-fA-F]+)", (src / name).read_text())
        assert m and int(m.group(1), 16) == layout.AP_TRAMPOLINE, name
    m = re.search(r"#define\s+EXIT_OK\s+(0x[0-9a-fA-F]+)", (src / "smp.c").read_text())
    assert m and int(m.group(1), 16) == guests.get("smp").expect_rax
