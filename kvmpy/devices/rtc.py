"""The PC's CMOS real-time clock: a Motorola MC146818 at ports 0x70/0x71.

Port 0x70 (offset ``INDEX``) selects one of 128 CMOS bytes (bit 7 is the NMI mask on a
PC: stored, no effect); port 0x71 (offset ``DATA``) reads or writes the selected byte.
Register names and bits follow the MC146818A datasheet and Linux's
``include/linux/mc146818rtc.h``; QEMU's ``hw/rtc/mc146818rtc.c`` and cloud-hypervisor's
``devices/src/legacy/cmos.rs`` are the reference for what a VMM answers.

The time registers read the host clock (UTC) at the moment of the read, in BCD or
binary as register B's ``REG_B_DM`` says, 24- or 12-hour as ``REG_B_24H`` says. Update-
in-progress (``REG_A_UIP``) is set in the last 244 microseconds of each second, as the
datasheet's timing has it, so Linux's "wait for UIP to clear, read, check again" loop
finishes at once. Register C's update flag ``REG_C_UF`` is set once a second has ticked
since C was last read. The other 114 bytes (0x0E-0x7F, plus the alarm bytes 1, 3 and 5)
are plain RAM, zero at power-on.

Left out: interrupts (no IRQ 8: periodic, alarm and update-ended interrupts are never
raised, and ``REG_C_PF``/``REG_C_AF``/``REG_C_IRQF`` stay 0); guest writes to the time
registers (ignored: the guest reads the host's clock and cannot move it, as in
cloud-hypervisor); daylight saving (``REG_B_DSE``); the square-wave output.
"""
from __future__ import annotations

import time
from typing import Callable

from ..errors import DeviceError

INDEX = 0x0         # port 0x70: write the register index (bit 7: NMI mask); reads 0xFF
DATA = 0x1          # port 0x71: the selected register

# CMOS register indices
RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06      # 1..7, Sunday = 1
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09             # 0..99
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32          # the PC/ACPI convention (FADT "century" field)
CMOS_SIZE = 128
NMI_MASK = 0x80

REG_A_UIP = 0x80            # update in progress (read-only)
REG_B_SET = 0x80            # updates halted for setting the time
REG_B_PIE = 0x40
REG_B_AIE = 0x20
REG_B_UIE = 0x10
REG_B_SQWE = 0x08
REG_B_DM = 0x04             # 1 = binary, 0 = BCD
REG_B_24H = 0x02            # 1 = 24-hour, 0 = 12-hour with bit 7 of the hour = PM
REG_B_DSE = 0x01
REG_C_IRQF = 0x80
REG_C_PF = 0x40
REG_C_AF = 0x20
REG_C_UF = 0x10
REG_D_VRT = 0x80            # valid RAM and time: the battery is fine

POWER_ON_REG_A = 0x26       # divider 010 (32.768 kHz time base, running), rate 0110 (1024 Hz)
POWER_ON_REG_B = REG_B_24H  # 24-hour, BCD, no interrupts
UIP_WINDOW = 244e-6         # UIP rises 244 us before the update; the update itself is instant here
_DIVIDER_RUNNING = 0x20     # register A bits 6:4 = 010
_TIME = (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH, RTC_MONTH,
         RTC_YEAR, RTC_CENTURY)


def _bcd(n: int) -> int:
    return (n // 10) << 4 | n % 10


class Rtc:
    """MC146818 CMOS RTC; ``clock()`` returns the host time in seconds since the epoch."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.index = 0
        self.ram = bytearray(CMOS_SIZE)     # the registers' stored bytes; time bytes unused
        self.ram[RTC_REG_A], self.ram[RTC_REG_B] = POWER_ON_REG_A, POWER_ON_REG_B
        self.last_c_read = int(clock())     # the second in which register C was last read

    # --- the guest's side ----------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset != DATA:
            return 0xFF                     # the index port is write-only (QEMU: 0xFF)
        return self.register(self.index & ~NMI_MASK)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == INDEX:
            self.index = value
        elif offset == DATA:
            self._store(self.index & ~NMI_MASK, value)

    def register(self, reg: int) -> int:
        """What a read of CMOS byte ``reg`` returns (register C: and clears it)."""
        if reg in _TIME:
            return self._time_field(reg, self.clock())
        if reg == RTC_REG_A:
            return self.ram[reg] | (REG_A_UIP if self._updating(self.clock()) else 0)
        if reg == RTC_REG_C:
            now = int(self.clock())
            flags = REG_C_UF if now != self.last_c_read else 0
            self.last_c_read = now
            return flags
        if reg == RTC_REG_D:
            return REG_D_VRT
        return self.ram[reg]

    def _store(self, reg: int, value: int) -> None:
        if reg == RTC_REG_A:
            self.ram[reg] = value & ~REG_A_UIP
        elif reg == RTC_REG_B:
            self.ram[reg] = value & ~REG_B_UIE if value & REG_B_SET else value   # SET clears UIE
        elif reg in _TIME or reg in (RTC_REG_C, RTC_REG_D):
            pass                            # read-only here: the time is the host's
        else:
            self.ram[reg] = value

    def _updating(self, now: float) -> bool:
        running = self.ram[RTC_REG_A] & 0x70 == _DIVIDER_RUNNING and not self.ram[RTC_REG_B] & REG_B_SET
        return running and now - int(now) >= 1 - UIP_WINDOW

    def _time_field(self, reg: int, now: float) -> int:
        t = time.gmtime(int(now))
        b = self.ram[RTC_REG_B]
        pm = 0
        if reg == RTC_HOURS:
            value = t.tm_hour
            if not b & REG_B_24H:
                pm = 0x80 if value >= 12 else 0
                value = value % 12 or 12
        else:
            value = {RTC_SECONDS: min(t.tm_sec, 59), RTC_MINUTES: t.tm_min,
                     RTC_DAY_OF_WEEK: (t.tm_wday + 1) % 7 + 1, RTC_DAY_OF_MONTH: t.tm_mday,
                     RTC_MONTH: t.tm_mon, RTC_YEAR: t.tm_year % 100, RTC_CENTURY: t.tm_year // 100}[reg]
        return pm | (value if b & REG_B_DM else _bcd(value))

    # --- state -----------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The index and the CMOS bytes; the time is the host's and is not saved."""
        return {"index": self.index, "ram": self.ram.hex()}

    def load_state(self, state: dict) -> None:
        """The inverse of save_state(); a bad state raises DeviceError and changes nothing."""
        try:
            index, ram = state["index"], bytes.fromhex(state["ram"])
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceError(f"bad rtc state: {e!r}") from None
        if type(index) is not int or not 0 <= index <= 0xFF:
            raise DeviceError(f"bad rtc state: index {index!r}")
        if len(ram) != CMOS_SIZE:
            raise DeviceError(f"bad rtc state: {len(ram)} CMOS bytes, expected {CMOS_SIZE}")
        ram = bytearray(ram)
        ram[RTC_REG_A] &= ~REG_A_UIP
        self.index, self.ram = index, ram
