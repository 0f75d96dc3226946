"""The 16550A model, driven the way Linux's 8250 driver drives it."""
import io

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.serial import (
    FCR, FCR_CLEAR_RCVR, FCR_ENABLE_FIFO, IER, IER_MSI, IER_RDI, IER_RLSI, IER_THRI,
    IIR, IIR_MSI, IIR_NO_INT, IIR_RDI, IIR_RLSI, IIR_THRI, LCR, LCR_DLAB, LSR, LSR_DR,
    LSR_OE, LSR_TEMT, LSR_THRE, MCR, MCR_DTR, MCR_LOOP, MCR_OUT2, MCR_RTS, MSR, RBR,
    SCR, THR, DLL, DLM, Serial16550,
)


def make(**kw):
    out, irq = io.BytesIO(), RecordingTrigger()
    return Serial16550(output=out, trigger=irq, **kw), out, irq


def linux_init(uart, ier=0):
    """What 8250 set_termios + startup do: 115200 8N1, FIFOs on, DTR|RTS|OUT2, IER."""
    uart.write(LCR, 1, LCR_DLAB | 0x03)
    uart.write(DLL, 1, 0x01)
    uart.write(DLM, 1, 0x00)
    uart.write(LCR, 1, 0x03)
    uart.write(FCR, 1, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | 0x04)
    uart.write(MCR, 1, MCR_DTR | MCR_RTS | MCR_OUT2)
    uart.write(IER, 1, ier)


def test_init_sequence_then_output_reaches_the_file():
    """After a Linux-like init, THR bytes (polled on LSR.THRE) land in the output as written."""
    uart, out, irq = make()
    linux_init(uart)
    for ch in b"hello\n":
        assert uart.read(LSR, 1) & LSR_THRE
        uart.write(THR, 1, ch)
    assert out.getvalue() == b"hello\n"
    assert irq.levels == []          # IER = 0: no interrupt ever


def test_divisor_latch_is_separate_from_thr_and_ier():
    """With DLAB set, offsets 0/1 are DLL/DLM: nothing is transmitted and IER is untouched."""
    uart, out, _ = make()
    uart.write(IER, 1, IER_RDI)
    uart.write(LCR, 1, LCR_DLAB)
    uart.write(DLL, 1, 0x0C)
    uart.write(DLM, 1, 0x34)
    assert (uart.read(DLL, 1), uart.read(DLM, 1)) == (0x0C, 0x34)
    uart.write(LCR, 1, 0x03)
    assert uart.read(IER, 1) == IER_RDI
    assert out.getvalue() == b""


def test_16550a_autodetection_answers():
    """IIR bits 7:6 read 0b11 once FIFOs are on; IER keeps only bits 0-3; SCR holds a byte."""
    uart, _, _ = make()
    assert uart.read(IIR, 1) == IIR_NO_INT
    uart.write(FCR, 1, FCR_ENABLE_FIFO)
    assert uart.read(IIR, 1) >> 6 == 3
    uart.write(IER, 1, 0xFF)
    assert uart.read(IER, 1) == 0x0F
    uart.write(SCR, 1, 0xA5)
    assert uart.read(SCR, 1) == 0xA5
    assert uart.read(LSR, 1) == LSR_THRE | LSR_TEMT


def test_thre_interrupt_raised_by_ier_and_cleared_by_iir_read():
    """Enabling THRI with THR empty raises the line; reading IIR (THRE) lowers it."""
    uart, _, irq = make()
    linux_init(uart)
    uart.write(IER, 1, IER_THRI)
    assert irq.levels == [True]
    assert uart.read(IIR, 1) == 0xC0 | IIR_THRI
    assert irq.levels == [True, False]
    assert uart.read(IIR, 1) == 0xC0 | IIR_NO_INT


def test_thr_write_re_raises_thre():
    """After IIR cleared THRE, the next THR write (transmitted at once) raises it again."""
    uart, out, irq = make()
    linux_init(uart, IER_THRI)
    uart.read(IIR, 1)
    uart.write(THR, 1, ord("x"))
    assert irq.levels == [True, False, True]
    assert out.getvalue() == b"x"


def test_linux_startup_thre_retest_sees_a_working_uart():
    """Toggling IER.THRI off and on re-asserts THRE (so Linux does not set UART_BUG_THRE)."""
    uart, _, _ = make()
    linux_init(uart)
    uart.write(IER, 1, IER_THRI)
    iir1 = uart.read(IIR, 1)
    uart.write(IER, 1, 0)
    uart.write(IER, 1, IER_THRI)
    iir2 = uart.read(IIR, 1)
    assert iir1 & 0x0F == IIR_THRI and iir2 & 0x0F == IIR_THRI


def test_disabling_thri_lowers_the_line():
    """Clearing IER.THRI while THRE is pending lowers the line."""
    uart, _, irq = make()
    linux_init(uart, IER_THRI)
    uart.write(IER, 1, 0)
    assert irq.levels == [True, False]


def test_out2_gates_the_interrupt_line():
    """A pending enabled interrupt drives the line only while MCR.OUT2 is set."""
    uart, _, irq = make()
    uart.write(IER, 1, IER_THRI)
    assert irq.levels == [] and uart.read(IIR, 1) & 0x0F == IIR_THRI
    uart.write(IER, 1, 0)
    uart.write(IER, 1, IER_THRI)
    uart.write(MCR, 1, MCR_OUT2)
    assert irq.levels == [True]
    uart.write(MCR, 1, 0)
    assert irq.levels == [True, False]


def test_received_data_interrupt_on_feed_and_cleared_by_reading():
    """feed() sets LSR.DR and raises RDA; reading RBR in order drains it and lowers the line."""
    uart, _, irq = make()
    linux_init(uart, IER_RDI)
    assert uart.feed(b"ab") == 2
    assert irq.levels == [True]
    assert uart.read(IIR, 1) == 0xC0 | IIR_RDI
    assert uart.read(LSR, 1) & LSR_DR
    assert uart.read(RBR, 1) == ord("a")
    assert irq.levels == [True]
    assert uart.read(RBR, 1) == ord("b")
    assert irq.levels == [True, False]
    assert not uart.read(LSR, 1) & LSR_DR


def test_interrupt_priority_rls_over_rda_over_thre_over_msi():
    """IIR reports line status, then received data, then THRE, then modem status."""
    uart, _, _ = make(rx_fifo_size=1)
    uart.write(IER, 1, IER_RLSI | IER_RDI | IER_THRI | IER_MSI)
    uart.write(MCR, 1, MCR_LOOP | MCR_RTS)      # loopback: MSR.CTS changes -> delta
    uart.write(THR, 1, 1)                       # fills the 1-byte FIFO
    uart.write(THR, 1, 2)                       # overrun
    assert uart.read(IIR, 1) & 0x0F == IIR_RLSI
    assert uart.read(LSR, 1) & LSR_OE           # reading LSR clears OE
    assert uart.read(IIR, 1) & 0x0F == IIR_RDI
    assert uart.read(RBR, 1) == 1
    assert uart.read(IIR, 1) & 0x0F == IIR_THRI  # this read clears THRE
    assert uart.read(IIR, 1) & 0x0F == IIR_MSI
    uart.read(MSR, 1)
    assert uart.read(IIR, 1) & 0x0F == IIR_NO_INT


def test_rx_fifo_is_bounded_and_refuses_the_excess():
    """feed() beyond capacity accepts only what fits; the FIFO never grows past its size."""
    uart, _, _ = make(rx_fifo_size=8)
    assert uart.feed(b"0123456") == 7
    assert uart.rx_space == 1
    assert uart.feed(b"789") == 1
    assert uart.feed(b"x") == 0
    assert uart.rx_pending == 8 and uart.rx_space == 0
    assert not uart.read(LSR, 1) & LSR_OE       # refused bytes are the host's, not lost
    assert bytes(uart.read(RBR, 1) for _ in range(8)) == b"01234567"
    assert uart.read(RBR, 1) == 0 and uart.rx_space == 8


def test_fcr_clear_rcvr_empties_the_fifo():
    """FCR with enable|clear-receiver drops waiting input and clears LSR.DR."""
    uart, _, _ = make()
    uart.write(FCR, 1, FCR_ENABLE_FIFO)
    uart.feed(b"junk")
    uart.write(FCR, 1, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR)
    assert uart.rx_pending == 0 and not uart.read(LSR, 1) & LSR_DR


def test_loopback_echoes_thr_and_mirrors_mcr_in_msr():
    """In loopback, THR bytes are received, not output; MSR follows MCR (8250 probe reads 0x90)."""
    uart, out, _ = make()
    uart.write(MCR, 1, MCR_LOOP | 0x0A)          # RTS | OUT2, as autoconfig writes
    assert uart.read(MSR, 1) & 0xF0 == 0x90
    uart.write(THR, 1, 0x5A)
    assert out.getvalue() == b""
    assert uart.read(LSR, 1) & LSR_DR and uart.read(RBR, 1) == 0x5A
    assert uart.feed(b"host") == 0               # serial input is cut off in loopback
    uart.write(MCR, 1, MCR_OUT2)
    uart.write(THR, 1, 0x5A)
    assert out.getvalue() == b"\x5a"


def test_msr_deltas_cleared_on_read():
    """MSR delta bits latch modem-line changes and a read clears them."""
    uart, _, _ = make()
    uart.write(MCR, 1, MCR_LOOP)                 # host lines CTS|DSR|DCD drop to 0
    assert uart.read(MSR, 1) == 0x0B             # DCTS | DDSR | DDCD
    assert uart.read(MSR, 1) == 0x00
    uart.write(MCR, 1, MCR_LOOP | MCR_DTR)
    assert uart.read(MSR, 1) == 0x22             # DSR | DDSR


def test_wide_access_uses_the_low_byte():
    """A 4-byte access acts on the register at the offset with the value's low byte."""
    uart, out, _ = make()
    uart.write(THR, 4, 0x12345641)
    uart.write(SCR, 2, 0xBEEF)
    assert out.getvalue() == b"A"
    assert uart.read(SCR, 4) == 0xEF


# --- hostile register traffic ----------------------------------------------

class UartMachine(RuleBasedStateMachine):
    """Random register accesses and host input never break the model's invariants."""

    CAP = 16

    def __init__(self):
        super().__init__()
        self.uart, self.out, self.irq = make(rx_fifo_size=self.CAP)

    @rule(offset=st.integers(-2, 10), size=st.sampled_from([1, 2, 4, 8]), value=st.integers(0, 2**64 - 1))
    def write(self, offset, size, value):
        self.uart.write(offset, size, value)

    @rule(offset=st.integers(0, 7), size=st.sampled_from([1, 2, 4]), value=st.integers(0, 255))
    def write_register(self, offset, size, value):
        self.uart.write(offset, size, value)

    @rule(offset=st.integers(-2, 10), size=st.sampled_from([1, 2, 4, 8]))
    def read(self, offset, size):
        v = self.uart.read(offset, size)
        assert 0 <= v <= 0xFF

    @rule(data=st.binary(max_size=40))
    def feed(self, data):
        before = self.uart.rx_pending
        space = self.uart.rx_space
        n = self.uart.feed(data)
        assert n == min(len(data), space)
        assert self.uart.rx_pending == before + n

    @invariant()
    def fifo_bounded(self):
        assert 0 <= self.uart.rx_pending <= self.CAP
        assert 0 <= self.uart.rx_space <= self.CAP - self.uart.rx_pending

    @invariant()
    def irq_level_follows_the_formula(self):
        u = self.uart
        pending = u.peek(IIR) & IIR_NO_INT == 0
        out2 = bool(u.peek(MCR) & MCR_OUT2)
        assert u.irq_level == (pending and out2)
        assert self.irq.level == u.irq_level
        levels = self.irq.levels
        assert all(a != b for a, b in zip(levels, levels[1:]))   # only changes are signalled
        assert not levels or levels[0] is True

    @invariant()
    def rda_and_rls_are_never_missed(self):
        u = self.uart
        lcr = u.peek(LCR)
        ier = u.peek(IER) if not lcr & LCR_DLAB else None
        if ier is not None and u.peek(MCR) & MCR_OUT2:
            if ier & IER_RDI and u.rx_pending:
                assert u.irq_level
            if ier & IER_RLSI and u.peek(LSR) & LSR_OE:
                assert u.irq_level
        if ier == 0:
            assert not u.irq_level

    @invariant()
    def data_ready_iff_fifo_non_empty(self):
        lsr = self.uart.peek(LSR)
        assert bool(lsr & LSR_DR) == (self.uart.rx_pending > 0)
        assert lsr & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


UartMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestUartStateMachine = UartMachine.TestCase
