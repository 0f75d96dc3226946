"""docs/devices.md stays honest: its numbers and register names are the code's.

Cheap textual checks: every ``NAME`` = value pair and port range on a "Where it lives"
line matches kvmpy/x86/layout.py, and every register name in a section's register table
is a constant of that device's module with the offset the table gives.
"""
import ast
import re
from pathlib import Path

import pytest

from kvmpy.devices import fwcfg, i8042, reset, rtc, serial, testdev
from kvmpy.devices.virtio import blk, mmio, rng
from kvmpy.devices.virtio import pci as virtio_pci
from kvmpy.x86 import layout

DOC = Path(__file__).resolve().parents[2] / "docs" / "devices.md"

# section heading -> module whose constants the register table names
SECTION_MODULES = {
    "16550A UART (COM1)": serial,
    "i8042 keyboard controller": i8042,
    "CMOS RTC (MC146818)": rtc,
    "fw_cfg": fwcfg,
    "Reset lines (port 0x92, 0xcf9)": reset,
    "virtio-mmio transport and virtio-blk": mmio,
    "pc-testdev (QEMU's test device, off by default)": testdev,
    "PCI host bridge and virtio-pci (off by default)": virtio_pci,
}
# sections whose "Where it lives" constants live in the device's module, not in layout.py
WHERE_MODULES = {"pc-testdev (QEMU's test device, off by default)": testdev}
EXPECTED_SECTIONS = ["16550A UART (COM1)", "isa-debug-exit", "i8042 keyboard controller",
                     "CMOS RTC (MC146818)", "fw_cfg", "Reset lines (port 0x92, 0xcf9)",
                     "virtio-mmio transport and virtio-blk", "virtio-rng (entropy device, off by default)",
                     "virtio-vsock (socket device, off by default)",
                     "pc-testdev (QEMU's test device, off by default)",
                     "PCI host bridge and virtio-pci (off by default)", "Unclaimed ports and MMIO"]


def _sections() -> dict[str, str]:
    text = DOC.read_text()
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _where_lines() -> list[tuple[str, str]]:
    out = []
    for name, body in _sections().items():
        lines = [ln for ln in body.splitlines() if ln.startswith("**Where it lives:**")]
        assert len(lines) == 1, f"section {name!r} needs exactly one 'Where it lives' line"
        out.append((name, lines[0]))
    return out


def _register_rows(body: str) -> list[tuple[int, list[str]]]:
    """(offset, [backticked names]) of every row of tables headed '| offset | name |'."""
    rows, in_table = [], False
    for line in body.splitlines():
        if line.startswith("| offset | name |"):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if not in_table or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((int(cells[0], 0), re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[1])))
    return rows


def test_every_device_has_a_section_with_spec_threats_and_location():
    sections = _sections()
    assert list(sections) == EXPECTED_SECTIONS
    for name, body in sections.items():
        assert "**Where it lives:**" in body, name
        assert "**Spec:**" in body, name
        assert "**Implementations:**" in body, name
        assert "**Threat model**" in body and "| a hostile guest tries | what stops it |" in body, name


def test_where_it_lives_constants_match_layout():
    checked = 0
    for section, line in _where_lines():
        home = WHERE_MODULES.get(section, layout)
        for const, value in re.findall(r"`([A-Z][A-Z0-9_]+)` = (\([^)]*\)|0x[0-9A-Fa-f]+|\d+)", line):
            assert hasattr(home, const), f"{section}: {home.__name__} has no {const}"
            assert getattr(home, const) == ast.literal_eval(value), f"{section}: {const} = {value}"
            checked += 1
    assert checked >= 10


def test_where_it_lives_port_ranges_match_base_and_count():
    ranges = {"16550A UART (COM1)": (layout.COM1_PORT, layout.COM_PORT_COUNT),
              "i8042 keyboard controller": (layout.I8042_PORT, layout.I8042_PORT_COUNT),
              "CMOS RTC (MC146818)": (layout.RTC_PORT, layout.RTC_PORT_COUNT),
              "fw_cfg": (layout.FW_CFG_PORT, layout.FW_CFG_PORT_COUNT)}
    lines = dict(_where_lines())
    for section, (base, count) in ranges.items():
        m = re.search(r"ports (0x[0-9A-Fa-f]+)-(0x[0-9A-Fa-f]+)", lines[section])
        assert m, section
        assert (int(m[1], 16), int(m[2], 16)) == (base, base + count - 1), section
    ports = re.findall(r"port (0x[0-9A-Fa-f]+)", lines["Reset lines (port 0x92, 0xcf9)"])
    assert [int(p, 16) for p in ports] == [layout.SYS_CTRL_A_PORT, layout.RESET_CONTROL_PORT]
    m = re.search(r"port (0x[0-9A-Fa-f]+)", lines["isa-debug-exit"])
    assert int(m[1], 16) == layout.DEBUG_EXIT_PORT and layout.DEBUG_EXIT_PORT_COUNT == 1
    spans = re.findall(r"(?:ports|MMIO) (0x[0-9A-Fa-f]+)-(0x[0-9A-Fa-f]+)", lines["pc-testdev (QEMU's test device, off by default)"])
    assert [(int(a, 16), int(b, 16) + 1) for a, b in spans] == [
        (testdev.PORT_BASE, testdev.PORT_BASE + testdev.PORT_COUNT),
        (testdev.IRQ_PORT_BASE, testdev.IRQ_PORT_BASE + testdev.IRQ_LINES),
        (testdev.IOMEM_BASE, testdev.IOMEM_BASE + testdev.IOMEM_SIZE)]


def test_where_it_lives_irqs_match_layout():
    lines = dict(_where_lines())
    assert re.search(r"IRQ (\d+)", lines["16550A UART (COM1)"])[1] == str(layout.COM1_IRQ)
    irqs = re.search(r"IRQs ([\d, ]+)", lines["virtio-mmio transport and virtio-blk"])[1]
    assert tuple(int(x) for x in irqs.strip(" ,").split(",")) == layout.VIRTIO_MMIO_IRQS
    m = re.search(r"MMIO (0x[0-9A-Fa-f]+) \+ i \* (0x[0-9A-Fa-f]+)", lines["virtio-mmio transport and virtio-blk"])
    assert (int(m[1], 16), int(m[2], 16)) == (layout.VIRTIO_MMIO_BASE, layout.VIRTIO_MMIO_SIZE)
    for section in ("isa-debug-exit", "i8042 keyboard controller", "CMOS RTC (MC146818)", "fw_cfg",
                    "Reset lines (port 0x92, 0xcf9)",
                    "Unclaimed ports and MMIO"):
        assert lines[section].rstrip().endswith("no IRQ.") or "no IRQ." in lines[section], section


@pytest.mark.parametrize("section", sorted(SECTION_MODULES))
def test_register_table_names_are_code_constants_with_the_same_offset(section):
    module = SECTION_MODULES[section]
    rows = _register_rows(_sections()[section])
    assert rows, f"{section}: no register table"
    for offset, names in rows:
        assert names, f"{section}: row at offset {offset:#x} names no register"
        # the first backticked name is the register; later ones are bits/constants it mentions
        reg = names[0]
        assert hasattr(module, reg), f"{section}: {module.__name__} has no {reg}"
        assert getattr(module, reg) == offset, f"{section}: {reg} is {getattr(module, reg):#x}, doc says {offset:#x}"


def test_virtio_table_covers_every_register_constant():
    documented = {names[0] for _, names in _register_rows(_sections()["virtio-mmio transport and virtio-blk"])}
    regs = {n for n, v in vars(mmio).items()
            if n[:1].isupper() and not n.isupper() and isinstance(v, int) and v <= mmio.Config}
    assert regs == documented


def test_uart_table_covers_every_register_constant():
    documented = {names[0] for _, names in _register_rows(_sections()["16550A UART (COM1)"])}
    assert documented == {"RBR", "THR", "DLL", "IER", "DLM", "IIR", "FCR", "LCR", "MCR", "LSR", "MSR", "SCR"}


def test_every_backticked_uart_bit_name_exists_in_serial_py():
    body = _sections()["16550A UART (COM1)"]
    table = "\n".join(ln for ln in body.splitlines() if ln.startswith("| ") and "|---" not in ln)
    for name in re.findall(r"`((?:IER|IIR|FCR|LCR|MCR|LSR|MSR)_[A-Z0-9_]+)`", table):
        assert hasattr(serial, name), name


def test_virtio_numbers_quoted_in_the_doc_match_the_code():
    body = _sections()["virtio-mmio transport and virtio-blk"]
    assert f"{mmio.VIRTIO_MMIO_MAGIC:#x}".upper().replace("0X", "0x") in body
    assert f"{mmio.VIRTIO_MMIO_VENDOR:#X}".replace("0X", "0x") in body
    assert f"{blk.QUEUE_NUM_MAX} (`QUEUE_NUM_MAX`)" in body
    assert f"({blk.CONFIG_SIZE} bytes" in body


def test_rng_numbers_quoted_in_the_doc_match_the_code():
    body = _sections()["virtio-rng (entropy device, off by default)"]
    assert rng.MAX_REQUEST_BYTES == 64 << 10 and "at most 64 KiB (`MAX_REQUEST_BYTES`)" in body
    assert rng.DEFAULT_LIMITS.iops == 4096 and rng.DEFAULT_LIMITS.bps == 1 << 20
    assert "`DEFAULT_LIMITS`, 4096 requests and 1 MiB a" in body and f"Device ID {rng.VIRTIO_ID_ENTROPY}" in body


def test_rtc_cmos_table_names_are_constants_with_the_same_index():
    rows = [ln for ln in _sections()["CMOS RTC (MC146818)"].splitlines() if re.match(r"\| 0x[0-9A-F]{2} \|", ln)]
    assert len(rows) == 15
    for line in rows:
        index, name = re.match(r"\| (0x[0-9A-F]+) \| `([A-Z_0-9]+)`", line).groups()
        assert getattr(rtc, name) == int(index, 16), name


def test_every_backticked_i8042_and_rtc_name_exists():
    for section, module in (("i8042 keyboard controller", i8042), ("CMOS RTC (MC146818)", rtc)):
        for name in re.findall(r"`((?:STR|CTR|CMD|OUTP|REG|RTC|POWER_ON|AUX|SELFTEST|UIP|NMI|CMOS)_?[A-Z0-9_]*)`",
                               _sections()[section]):
            if name.startswith("RTC_PORT"):
                continue                # a layout constant, checked above
            assert hasattr(module, name), f"{section}: {name}"
