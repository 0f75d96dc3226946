"""The PC's i8042 keyboard controller, with nothing plugged into it.

The 8042 has a data port at 0x60 and a status/command port at 0x64; it is attached as
a 5-byte range at 0x60, so those are offsets 0 and 4. Bit names follow the Intel 8042
datasheet and Linux's ``drivers/input/serio/i8042.h``.

What it is for here: the classic reset (command 0xFE, "pulse output line 0", wired to
the CPU reset pin, Linux's ``reboot=k``), and answering the controller commands Linux's
i8042 driver sends at probe, at once, so the driver never spins 10,000 status polls
(each a VM exit) waiting for a reply that never comes. The answers follow Firecracker's
``devices/legacy/i8042.rs`` (read/write the controller configuration byte "CTR", read/
write the output port, 0xFE) plus the self-tests Linux and firmware send (QEMU's
``hw/input/pckbd.c`` answers them the same way).

No keyboard and no mouse: bytes for the keyboard (data-port writes with no command
pending) and for the mouse (after 0xD4) are dropped, so Linux's atkbd times out on its
own sleeping timer. The aux port is absent: the aux loopback command 0xD3 answers its
byte as keyboard-side data (no ``STR_AUXDATA``) and the aux interface test 0xA9 reports
a stuck clock line, which is what makes Linux's ``i8042_check_aux()`` give up at once.
No interrupts are raised (IRQ 1/12): Linux polls for controller replies. The controller
is infinitely fast, so ``STR_IBF`` is never set. Offsets 1..3 (ports 0x61..0x63) read 0;
port 0x61 is served by KVM itself when the VM has an in-kernel PIT.
"""
from __future__ import annotations

from typing import Callable

from ..errors import DeviceError

DATA = 0x0          # port 0x60: read the output buffer; write a command's parameter
COMMAND = 0x4       # port 0x64: write a controller command; read the status register

# status register (read at 0x64)
STR_OBF = 0x01      # output buffer full: a byte waits at 0x60
STR_IBF = 0x02      # input buffer full: never, the controller is instant
STR_SYSFLAG = 0x04  # system flag: POST passed (CTR bit 2, set by self-test)
STR_CMDDAT = 0x08   # the last write went to the command port
STR_KEYLOCK = 0x10  # 1 = keyboard not inhibited by the keylock
STR_AUXDATA = 0x20  # the byte in the output buffer came from the aux (mouse) port

# controller configuration byte "CTR" (commands 0x20/0x60)
CTR_KBDINT = 0x01   # keyboard interrupt enable
CTR_AUXINT = 0x02   # aux interrupt enable
CTR_SYSFLAG = 0x04
CTR_KBDDIS = 0x10   # keyboard interface disabled
CTR_AUXDIS = 0x20   # aux interface disabled
CTR_XLATE = 0x40    # scancode translation

# controller commands (written to 0x64)
CMD_CTL_RCTR = 0x20     # read CTR -> 1 byte
CMD_CTL_WCTR = 0x60     # write CTR <- next data byte
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9     # aux interface test -> 1 byte (0 = ok)
CMD_CTL_TEST = 0xAA     # controller self-test -> 0x55
CMD_KBD_TEST = 0xAB     # keyboard interface test -> 0x00
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTP = 0xD0    # read output port -> 1 byte
CMD_WRITE_OUTP = 0xD1   # write output port <- next data byte (bit 0 low: CPU reset)
CMD_KBD_LOOP = 0xD2     # next data byte comes back as keyboard data
CMD_AUX_LOOP = 0xD3     # next data byte comes back as aux data (here: as keyboard data)
CMD_AUX_SEND = 0xD4     # next data byte goes to the mouse (here: nowhere)
CMD_RESET = 0xFE        # pulse output port bit 0 low: CPU reset

# output port bits (commands 0xD0/0xD1)
OUTP_RESET = 0x01   # CPU reset line, active low
OUTP_A20 = 0x02     # A20 gate (not modelled: KVM guests always see A20 on)

SELFTEST_OK = 0x55
TEST_OK = 0x00
AUX_CLOCK_STUCK = 0x02  # "clock line stuck high": Linux's check_aux concludes "no aux port"

POWER_ON_CTR = CTR_KBDINT | CTR_SYSFLAG        # as Firecracker: POST passed, keyboard IRQ on
POWER_ON_OUTP = OUTP_RESET | OUTP_A20
_TAKES_DATA = (CMD_CTL_WCTR, CMD_WRITE_OUTP, CMD_KBD_LOOP, CMD_AUX_LOOP, CMD_AUX_SEND)


class I8042:
    """PS/2 controller without devices: answers controller commands, resets on 0xFE."""

    def __init__(self, on_reset: Callable[[], None]):
        self.on_reset = on_reset
        self.ctr = POWER_ON_CTR
        self.outp = POWER_ON_OUTP
        self.out = 0            # the output buffer (valid while obf)
        self.obf = False
        self.pending = 0        # a command waiting for its data byte, or 0
        self.cmd_last = False   # status bit 3

    # --- the guest's side ----------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == COMMAND:
            return self.status()
        if offset == DATA:
            self.obf = False
            return self.out
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == COMMAND:
            self.cmd_last = True
            self.pending = 0
            self._command(value)
        elif offset == DATA:
            self.cmd_last = False
            cmd, self.pending = self.pending, 0
            self._data(cmd, value)

    def status(self) -> int:
        # never STR_AUXDATA (no aux port), STR_IBF (instant), or the error bits
        return ((STR_OBF if self.obf else 0) | (STR_SYSFLAG if self.ctr & CTR_SYSFLAG else 0)
                | (STR_CMDDAT if self.cmd_last else 0) | STR_KEYLOCK)

    def _reply(self, byte: int) -> None:
        self.out, self.obf = byte & 0xFF, True

    def _command(self, cmd: int) -> None:
        if cmd in _TAKES_DATA:
            self.pending = cmd
        elif cmd == CMD_CTL_RCTR:
            self._reply(self.ctr)
        elif cmd == CMD_CTL_TEST:
            self.ctr |= CTR_SYSFLAG
            self._reply(SELFTEST_OK)
        elif cmd == CMD_KBD_TEST:
            self._reply(TEST_OK)
        elif cmd == CMD_AUX_TEST:
            self._reply(AUX_CLOCK_STUCK)
        elif cmd in (CMD_AUX_DISABLE, CMD_AUX_ENABLE):
            self.ctr = (self.ctr | CTR_AUXDIS) if cmd == CMD_AUX_DISABLE else (self.ctr & ~CTR_AUXDIS)
        elif cmd in (CMD_KBD_DISABLE, CMD_KBD_ENABLE):
            self.ctr = (self.ctr | CTR_KBDDIS) if cmd == CMD_KBD_DISABLE else (self.ctr & ~CTR_KBDDIS)
        elif cmd == CMD_READ_OUTP:
            self._reply(self.outp)
        elif cmd == CMD_RESET:
            self.on_reset()
        # any other command: no answer, like Firecracker

    def _data(self, cmd: int, value: int) -> None:
        if cmd == CMD_CTL_WCTR:
            self.ctr = value
        elif cmd == CMD_WRITE_OUTP:
            self.outp = value
            if not value & OUTP_RESET:
                self.on_reset()
        elif cmd in (CMD_KBD_LOOP, CMD_AUX_LOOP):   # no aux port, so never STR_AUXDATA
            self._reply(value)
        # otherwise a byte for the keyboard or (after CMD_AUX_SEND) the mouse: nobody is there

    # --- state -----------------------------------------------------------------------------
    def save_state(self) -> dict:
        return {"ctr": self.ctr, "outp": self.outp, "out": self.out, "obf": self.obf,
                "pending": self.pending, "cmd_last": self.cmd_last}

    def load_state(self, state: dict) -> None:
        """The inverse of save_state(); a bad state raises DeviceError and changes nothing."""
        try:
            b = {k: state[k] for k in ("ctr", "outp", "out")}
            f = {k: state[k] for k in ("obf", "cmd_last")}
            pending = state["pending"]
        except (KeyError, TypeError) as e:
            raise DeviceError(f"bad i8042 state: {e!r}") from None
        if not all(type(v) is int and 0 <= v <= 0xFF for v in b.values()):
            raise DeviceError(f"bad i8042 state: a register outside 0..255 ({b})")
        if not all(type(v) is bool for v in f.values()):
            raise DeviceError(f"bad i8042 state: a flag is not a bool ({f})")
        if type(pending) is not int or pending not in (0, *_TAKES_DATA):
            raise DeviceError(f"bad i8042 state: pending command {pending!r}")
        self.__dict__.update(b, **f, pending=pending)

    def prepare_load(self, state: dict):
        """``load_state(state)`` now, and a call that puts it back cheaply (a reset checkpoint's)."""
        self.load_state(state)
        saved = {k: getattr(self, k) for k in ("ctr", "outp", "out", "obf", "cmd_last", "pending")}
        return lambda: self.__dict__.update(saved)
