"""Port 0x92 (System Control Port A) and 0xcf9 (Reset Control Register): which writes reset."""
import pytest
from hypothesis import given, strategies as st

from kvmpy.devices.reset import (A20_GATE, FAST_RESET, RST_CPU, ResetControl, SystemControlA,
                                 SYS_RST)


def recording(cls):
    resets = []
    return cls(lambda: resets.append(1)), resets


def test_port92_bit0_resets_and_reads_back_a20():
    dev, resets = recording(SystemControlA)
    assert dev.read(0, 1) == A20_GATE                   # A20 on from power-on
    dev.write(0, 1, A20_GATE)
    assert resets == []
    dev.write(0, 1, A20_GATE | FAST_RESET)
    assert resets == [1]
    assert dev.read(0, 1) == A20_GATE                   # the pulse is over: bit 0 reads 0
    dev.write(0, 1, A20_GATE | FAST_RESET)              # 0 -> 1 again: resets again
    assert resets == [1, 1]


def test_port92_latches_the_other_bits_and_ignores_other_offsets():
    dev, resets = recording(SystemControlA)
    dev.write(0, 1, 0xF0)
    assert dev.read(0, 1) == 0xF0
    dev.write(1, 1, 0xFF)                               # not our port: nothing happens
    assert dev.read(0, 1) == 0xF0 and resets == []
    assert dev.read(0, 2) == 0xFFF0 and dev.read(1, 1) == 0xFF      # bytes beyond float high


@pytest.mark.parametrize("value,resets", [(0x06, 1), (0x04, 1), (0x0E, 1), (0x02, 0), (0x0A, 0), (0xFB, 0)])
def test_cf9_resets_on_rst_cpu(value, resets):
    dev, got = recording(ResetControl)
    dev.write(0, 1, value)
    assert len(got) == resets


def test_cf9_linux_reboot_pci_sequence():
    """Linux's reboot=pci: cf9 = inb & ~6; outb(cf9 | 2); outb(cf9 | 6)."""
    dev, resets = recording(ResetControl)
    cf9 = dev.read(0, 1) & ~6
    dev.write(0, 1, cf9 | SYS_RST)
    assert resets == [] and dev.read(0, 1) == SYS_RST
    dev.write(0, 1, cf9 | SYS_RST | RST_CPU)
    assert resets == [1] and dev.read(0, 1) == SYS_RST  # RST_CPU is never latched


@pytest.mark.parametrize("cls", [SystemControlA, ResetControl])
def test_state_round_trips_and_refuses_bad_values(cls):
    dev, _ = recording(cls)
    dev.write(0, 1, 0x0A)
    other, _ = recording(cls)
    other.load_state(dev.save_state())
    assert other.read(0, 1) == dev.read(0, 1)
    for bad in ({"value": -1}, {"value": 0x100}, {"value": "2"}, {"value": True}, {"value": 0x01 if cls is SystemControlA else 0x04}):
        with pytest.raises(ValueError):
            other.load_state(bad)
    with pytest.raises(KeyError):
        other.load_state({})


ACCESS = st.tuples(st.sampled_from(["r", "w"]), st.integers(0, 7), st.sampled_from([1, 2, 4]),
                   st.integers(0, (1 << 32) - 1))


def expected_resets(cls, accesses) -> int:
    """The reference: 0x92 resets on a byte write at offset 0 with bit 0 set whose latched bit 0 is
    clear (always, since the reset clears it); 0xcf9 on one with bit 2 set."""
    bit = FAST_RESET if cls is SystemControlA else RST_CPU
    return sum(1 for op, off, _, v in accesses if op == "w" and off == 0 and v & bit)


@pytest.mark.parametrize("cls", [SystemControlA, ResetControl])
@given(accesses=st.lists(ACCESS, max_size=40))
def test_any_access_sequence_never_raises_and_only_reset_writes_reset(cls, accesses):
    dev, resets = recording(cls)
    for op, off, size, v in accesses:
        v &= (1 << (8 * size)) - 1
        if op == "r":
            got = dev.read(off, size)
            assert 0 <= got < 1 << (8 * size)
        else:
            dev.write(off, size, v)
        dev.load_state(dev.save_state())                # the state is always a loadable one
    masked = [(op, off, size, v & ((1 << (8 * size)) - 1)) for op, off, size, v in accesses]
    assert len(resets) == expected_resets(cls, masked)
