"""A 16550A UART (the PC's COM1 at 0x3f8) as Linux's 8250 driver expects it.

Register semantics follow the National Semiconductor / TI PC16550D datasheet
("UART with FIFOs", TI SNLS378); bit names are those of the datasheet and of
Linux's include/uapi/linux/serial_reg.h. Where the datasheet is silent, we do what
drivers/tty/serial/8250/8250_port.c probes for and what QEMU's hw/char/serial.c
does: the 16550A autodetection (FCR enable -> IIR bits 7:6 read 0b11, IER keeps only
bits 0-3, loopback test MCR=LOOP|0x0A -> MSR high nibble 0x90) and the THRE test at
startup (enabling IER.THRI while THR is empty raises the THRE interrupt again).

Model choices, each a simplification of the chip:
- The transmitter is infinitely fast: a THR byte goes to ``output.write`` at once
  (no flush; the caller flushes), so LSR.THRE and LSR.TEMT are always set.
- The receive FIFO is host-sized (``rx_fifo_size``, not the chip's 16 bytes) and is
  used whether or not FCR enables FIFOs. ``feed()`` accepts only what fits and
  returns the count; the rest stays with the caller (never dropped, never
  unbounded). The only overrun (LSR.OE) is a loopback byte with the FIFO full.
- The RX trigger level is stored but "received data available" is raised as soon
  as one byte waits (the character-timeout interrupt is folded into it).
- No parity/framing/break errors occur; the host modem lines read CTS|DSR|DCD.
- Offsets 0..7; an access wider than one byte acts on the register at ``offset``
  with the low byte of the value, and a read returns that register zero-extended.
  Other offsets read 0xff and ignore writes (the bus never sends them).

The interrupt line: level = (some enabled interrupt pending) AND MCR.OUT2 (the PC
gates the UART's INTR pin with OUT2). ``trigger.set_level`` is called only on change.
"""
from __future__ import annotations

from collections import deque
from typing import BinaryIO

from .irq import NullTrigger, Trigger

# Register offsets (DLAB = LCR bit 7 selects DLL/DLM at 0/1).
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01     # received data available
IER_THRI = 0x02    # transmitter holding register empty
IER_RLSI = 0x04    # receiver line status
IER_MSI = 0x08     # modem status
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
FCR_STORED = 0xC9  # enable, DMA mode select, RX trigger level (bits 7:6)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01      # data ready
LSR_OE = 0x02      # overrun error
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20    # transmitter holding register empty
LSR_TEMT = 0x40    # transmitter empty
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI   # cleared by reading LSR

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04    # trailing edge of RI
MSR_DDCD = 0x08
MSR_ANY_DELTA = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

HOST_MODEM_LINES = MSR_CTS | MSR_DSR | MSR_DCD
DEFAULT_DIVISOR = 12   # 9600 baud from the PC's 1.8432 MHz clock; undefined at reset


class Serial16550:
    """16550A register model; ``feed()`` is host input, ``output`` gets THR bytes."""

    def __init__(self, output: BinaryIO | None = None, trigger: Trigger | None = None,
                 rx_fifo_size: int = 4096):
        if rx_fifo_size < 1:
            raise ValueError("rx_fifo_size must be at least 1")
        self.output = output
        self.trigger = trigger if trigger is not None else NullTrigger()
        self.rx_capacity = rx_fifo_size
        self._rx: deque[int] = deque()
        self._dll, self._dlm = DEFAULT_DIVISOR, 0
        self._ier = self._fcr = self._lcr = self._mcr = self._scr = 0
        self._lsr_errors = 0
        self._msr_delta = 0
        self._modem = HOST_MODEM_LINES     # MSR bits 7:4 as last seen
        self._thr_pending = False          # THRE interrupt latched, cleared by IIR read
        self._level = False

    # --- host side -------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Queue host input; returns how many bytes fit (0 in loopback: input is cut off)."""
        n = min(len(data), self.rx_space)
        if n:
            self._rx.extend(data[:n])
            self._update_irq()
        return n

    @property
    def rx_space(self) -> int:
        """How many bytes ``feed()`` would accept now."""
        if self._mcr & MCR_LOOP:
            return 0
        return self.rx_capacity - len(self._rx)

    @property
    def rx_pending(self) -> int:
        """Bytes waiting for the guest to read RBR."""
        return len(self._rx)

    @property
    def irq_level(self) -> bool:
        """The level last driven on the interrupt line."""
        return self._level

    # --- snapshots -------------------------------------------------------

    def save_state(self) -> dict:
        """Every register and the receive FIFO as plain values (the same form as the C twin's)."""
        return {"ier": self._ier, "fcr": self._fcr, "lcr": self._lcr, "mcr": self._mcr,
                "scr": self._scr, "dll": self._dll, "dlm": self._dlm, "lsr_errors": self._lsr_errors,
                "msr_delta": self._msr_delta, "modem": self._modem,
                "thr_pending": int(self._thr_pending), "rx": bytes(self._rx).hex()}

    def load_state(self, state: dict) -> None:
        rx = bytes.fromhex(state["rx"])
        if len(rx) > self.rx_capacity:
            raise ValueError(f"UART state has {len(rx)} bytes of input, more than the FIFO holds")
        self._ier, self._fcr, self._lcr = state["ier"] & IER_MASK, state["fcr"], state["lcr"]
        self._mcr, self._scr = state["mcr"] & MCR_MASK, state["scr"]
        self._dll, self._dlm = state["dll"], state["dlm"]
        self._lsr_errors, self._msr_delta, self._modem = state["lsr_errors"], state["msr_delta"], state["modem"]
        self._thr_pending = bool(state["thr_pending"])
        self._rx = deque(rx)
        self._update_irq()

    # --- guest side ------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        value = self.peek(offset)
        if offset == RBR and not self._lcr & LCR_DLAB:
            if self._rx:
                self._rx.popleft()
        elif offset == IIR:
            if value & 0x0F == IIR_THRI:     # datasheet: reading IIR clears THRE
                self._thr_pending = False
        elif offset == LSR:
            self._lsr_errors = 0
        elif offset == MSR:
            self._msr_delta = 0
        else:
            return value
        self._update_irq()
        return value

    def peek(self, offset: int) -> int:
        """What ``read(offset, 1)`` would return, without its side effects."""
        dlab = self._lcr & LCR_DLAB
        if offset == RBR:
            return self._dll if dlab else (self._rx[0] if self._rx else 0)
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            fifo = IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE_FIFO else 0
            return self._interrupt_id() | fifo
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return (LSR_DR if self._rx else 0) | self._lsr_errors | LSR_THRE | LSR_TEMT
        if offset == MSR:
            return self._modem | self._msr_delta
        if offset == SCR:
            return self._scr
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        dlab = self._lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self._dll = value
                return
            self._transmit(value)
        elif offset == IER:
            if dlab:
                self._dlm = value
                return
            self._write_ier(value & IER_MASK)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
            return
        elif offset == MCR:
            self._mcr = value & MCR_MASK
            self._update_modem()
        elif offset == SCR:
            self._scr = value
            return
        else:                     # LSR, MSR (factory test) and out of range: ignored
            return
        self._update_irq()

    # --- internals -------------------------------------------------------

    def _transmit(self, byte: int) -> None:
        if self._mcr & MCR_LOOP:
            if len(self._rx) < self.rx_capacity:
                self._rx.append(byte)
            else:
                self._lsr_errors |= LSR_OE
        elif self.output is not None:
            self.output.write(bytes([byte]))
        self._thr_pending = True          # THR is empty again at once

    def _write_ier(self, ier: int) -> None:
        # QEMU/Bochs: a rising edge of IER.THRI with THR empty re-raises THRE;
        # Linux's startup THRE test (UART_BUG_THRE) depends on it.
        if (ier ^ self._ier) & IER_THRI:
            self._thr_pending = bool(ier & IER_THRI)
        self._ier = ier

    def _write_fcr(self, value: int) -> None:
        if (value ^ self._fcr) & FCR_ENABLE_FIFO:
            value |= FCR_CLEAR_RCVR | FCR_CLEAR_XMIT   # mode change empties both FIFOs
        if value & (FCR_CLEAR_RCVR | FCR_CLEAR_XMIT) and (value | self._fcr) & FCR_ENABLE_FIFO:
            if value & FCR_CLEAR_RCVR:
                self._rx.clear()
            if value & FCR_CLEAR_XMIT:
                self._thr_pending = True
        self._fcr = value & FCR_STORED if value & FCR_ENABLE_FIFO else 0

    def _update_modem(self) -> None:
        """Recompute MSR bits 7:4 and latch the deltas (loopback: from MCR)."""
        if self._mcr & MCR_LOOP:
            m = self._mcr
            new = ((MSR_DSR if m & MCR_DTR else 0) | (MSR_CTS if m & MCR_RTS else 0)
                   | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
        else:
            new = HOST_MODEM_LINES
        changed = new ^ self._modem
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if changed & MSR_RI and not new & MSR_RI:
            self._msr_delta |= MSR_TERI
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD
        self._modem = new

    def _interrupt_id(self) -> int:
        """IIR bits 3:0: the highest-priority enabled pending interrupt."""
        ier = self._ier
        if ier & IER_RLSI and self._lsr_errors:
            return IIR_RLSI
        if ier & IER_RDI and self._rx:
            return IIR_RDI
        if ier & IER_THRI and self._thr_pending:
            return IIR_THRI
        if ier & IER_MSI and self._msr_delta:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._interrupt_id() != IIR_NO_INT and bool(self._mcr & MCR_OUT2)
        if level != self._level:
            self._level = level
            self.trigger.set_level(level)
