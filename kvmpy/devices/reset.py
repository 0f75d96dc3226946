"""The PC's other two reset lines: System Control Port A (0x92) and the Reset Control Register (0xcf9).

* **Port 0x92, System Control Port A** (IBM PS/2 "fast A20 and reset"; Intel's PIIX/ICH
  datasheets, "Port 92h"; QEMU's hw/i386/port92.c). Bit 0 ``FAST_RESET``: a 0 -> 1
  transition pulses the CPU's reset line. Bit 1 ``A20_GATE``: the A20 gate. A20 is
  always on in a kvmpy guest, so the bit is only latched and read back (Linux's
  ``enable_a20_fast`` reads, sets it and writes back). Reads return the latched byte.
* **Port 0xcf9, Reset Control Register** (Intel 82371 PIIX3 "RC", ICH9 "RST_CNT";
  QEMU's ``rcr_write`` in hw/isa/piix.c and ``ich9_rst_cnt_write`` in hw/isa/lpc_ich9.c).
  A write with bit 2 ``RST_CPU`` set resets; bits 1 ``SYS_RST`` (hard/soft) and 3
  ``FULL_RST`` choose the kind of reset and are latched, as ICH9 does; RST_CPU itself
  is never latched. Linux's ``reboot=pci`` writes ``inb(0xcf9) & ~6 | 2`` and then
  ``| 6``. Reads return the latched bits.

Both call ``on_reset()`` (the Machine's callback ends the run with reason "reset", as
the i8042's 0xFE does). A reset here is the run's end, not a CPU reset, so bit 0 of
port 0x92 reads 0 afterwards, as it does on QEMU once the reset has happened: every
write with bit 0 set is then a 0 -> 1 transition and resets again.

Each register is one port. An access wider than a byte starting at it acts on its low
byte only; the other bytes are ports nobody claims (reads 0xFF, writes dropped), which
is what QEMU's one-byte regions do. kvmpy attaches 0xcf9 alone, so a 4-byte access at
0xcf8 (PCI CONFIG_ADDRESS) stays unclaimed: docs/devices.md says how a PCI host bridge
must share the port.
"""
from __future__ import annotations

from typing import Callable

SYS_CTRL_A = 0x0            # port 0x92, the register's only offset
FAST_RESET = 0x01           # bit 0: 0 -> 1 resets
A20_GATE = 0x02             # bit 1: A20 enable (always on here; latched, read back)
SYS_CTRL_A_POWER_ON = A20_GATE      # A20 is on from the start in a kvmpy guest

RST_CNT = 0x0               # port 0xcf9, the register's only offset
SYS_RST = 0x02              # bit 1: hard (1) or soft (0) reset
RST_CPU = 0x04              # bit 2: reset now
FULL_RST = 0x08             # bit 3: full reset (power cycle)
RST_CNT_LATCHED = SYS_RST | FULL_RST


def _read_byte(latched: int, offset: int, size: int) -> int:
    """The latched byte at offset 0; every byte beyond the one port floats high."""
    ones = (1 << (8 * size)) - 1
    return (ones & ~0xFF) | latched if offset == 0 else ones


def _check_byte(state: dict, key: str, allowed: int) -> int:
    value = state[key]
    if type(value) is not int or value & ~allowed or value < 0:
        raise ValueError(f"{key} must be an int within {allowed:#x}, not {value!r}")
    return value


class SystemControlA:
    """Port 0x92: bit 0 rising -> ``on_reset()``; the other bits latched and read back."""

    def __init__(self, on_reset: Callable[[], None]):
        self.on_reset = on_reset
        self.value = SYS_CTRL_A_POWER_ON

    def read(self, offset: int, size: int) -> int:
        return _read_byte(self.value, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != SYS_CTRL_A:
            return
        value &= 0xFF
        rising = value & FAST_RESET and not self.value & FAST_RESET
        self.value = value & ~FAST_RESET        # the pulse ends with the reset it asks for
        if rising:
            self.on_reset()

    def save_state(self) -> dict:
        return {"value": self.value}

    def load_state(self, state: dict) -> None:
        self.value = _check_byte(state, "value", 0xFF & ~FAST_RESET)


class ResetControl:
    """Port 0xcf9: ``RST_CPU`` set -> ``on_reset()``; ``SYS_RST``/``FULL_RST`` latched."""

    def __init__(self, on_reset: Callable[[], None]):
        self.on_reset = on_reset
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        return _read_byte(self.value, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != RST_CNT:
            return
        if value & RST_CPU:
            self.on_reset()                     # QEMU: reset, nothing latched
        else:
            self.value = value & RST_CNT_LATCHED

    def save_state(self) -> dict:
        return {"value": self.value}

    def load_state(self, state: dict) -> None:
        self.value = _check_byte(state, "value", RST_CNT_LATCHED)
