"""The C 16550 behaves exactly like the Python model (the specification) under any access sequence."""
import io

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.serial import Serial16550

OFFSETS = st.integers(0, 9)          # 8 and 9 are outside the register file
OPS = st.lists(st.one_of(
    st.tuples(st.just("read"), OFFSETS, st.sampled_from([1, 2, 4])),
    st.tuples(st.just("write"), OFFSETS, st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("write"), st.sampled_from([2, 3, 4]), st.just(1),          # FCR, LCR, MCR
              st.sampled_from([0x00, 0x01, 0x07, 0x80, 0x03, 0x10, 0x1B, 0x0B, 0xC7])),
    st.tuples(st.just("feed"), st.binary(max_size=12)),
    st.tuples(st.just("peek"), OFFSETS),
), max_size=120)


def make_pair(rx_fifo_size):
    from kvmpy.vmm.native import NativeUart
    trig, out = RecordingTrigger(), io.BytesIO()
    return Serial16550(output=out, trigger=trig, rx_fifo_size=rx_fifo_size), out, trig, NativeUart(rx_fifo_size)


@settings(max_examples=400, deadline=None)
@given(ops=OPS, rx_fifo_size=st.sampled_from([1, 4, 16]))
def test_native_uart_matches_the_python_model(ops, rx_fifo_size):
    """Register reads, IRQ level changes, output bytes and FIFO state agree after every operation."""
    py, out, trig, c = make_pair(rx_fifo_size)
    c_out = b""
    for op in ops:
        kind = op[0]
        if kind == "read":
            assert c.read(op[1], op[2]) == py.read(op[1], op[2]), op
        elif kind == "write":
            py.write(op[1], op[2], op[3])
            c.write(op[1], op[2], op[3])
        elif kind == "feed":
            assert c.feed(op[1]) == py.feed(op[1]), op
        else:
            assert c.peek(op[1]) == py.peek(op[1]), op
        c_out += c.take_output()
        state = c.state()
        assert c_out == out.getvalue()
        assert bool(state["level"]) == py.irq_level
        assert state["irq_changes"] == len(trig.levels)
        assert (state["rx_count"], c.rx_space) == (py.rx_pending, py.rx_space)


def test_native_uart_output_is_batched():
    """Bytes written to THR collect in C until taken, so a burst leaves in one host write."""
    from kvmpy.vmm.native import NativeUart
    c = NativeUart()
    for b in b"burst of output\n":
        c.write(0, 1, b)
    assert c.take_output() == b"burst of output\n"
    assert c.take_output() == b""


def test_native_uart_feed_is_bounded():
    """Host input beyond the receive FIFO is refused, never buffered without bound."""
    from kvmpy.vmm.native import NativeUart
    c = NativeUart(rx_fifo_size=8)
    assert c.feed(b"0123456789") == 8
    assert c.feed(b"x") == 0
    assert bytes(c.read(0, 1) for _ in range(8)) == b"01234567"


@settings(max_examples=150, deadline=None)
@given(ops=OPS)
def test_uart_state_saves_alike_and_restores_across_models(ops):
    """After any access sequence both models save the same state, and either restores the other's."""
    py, out, trig, c = make_pair(16)
    for op in ops:
        if op[0] == "write":
            py.write(op[1], op[2], op[3])
            c.write(op[1], op[2], op[3])
        elif op[0] == "read":
            py.read(op[1], op[2])
            c.read(op[1], op[2])
        elif op[0] == "feed":
            py.feed(op[1])
            c.feed(op[1])
    state = py.save_state()
    assert c.save_state() == state
    from kvmpy.vmm.native import NativeUart
    c2, p2 = NativeUart(16), Serial16550(rx_fifo_size=16)
    c2.load_state(state)
    p2.load_state(c.save_state())
    assert c2.save_state() == state == p2.save_state()
    assert c2.read(5, 1) == py.read(5, 1) and c2.read(2, 1) == p2.read(2, 1)
