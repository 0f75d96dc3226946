"""The i8042 controller answers the commands Linux's i8042 driver sends at probe at once."""
import pytest
from hypothesis import given, strategies as st

from kvmpy.devices.i8042 import (AUX_CLOCK_STUCK, COMMAND, CTR_AUXDIS, CTR_KBDDIS, CTR_SYSFLAG, DATA,
                                 POWER_ON_CTR, SELFTEST_OK, STR_AUXDATA, STR_CMDDAT, STR_IBF, STR_OBF,
                                 STR_SYSFLAG,
                                 I8042)
from kvmpy.errors import DeviceError


def kbd():
    resets = []
    return I8042(lambda: resets.append(1)), resets


def command(dev, cmd, *params):
    """What Linux's __i8042_command does, minus the timeouts: None if no byte came back."""
    assert not dev.read(COMMAND, 1) & STR_IBF
    dev.write(COMMAND, 1, cmd)
    for p in params:
        dev.write(DATA, 1, p)
    return dev.read(DATA, 1) if dev.read(COMMAND, 1) & STR_OBF else None


def test_read_ctr_answers_the_configuration_byte():
    dev, _ = kbd()
    assert command(dev, 0x20) == POWER_ON_CTR
    assert not dev.read(COMMAND, 1) & STR_OBF         # the read emptied the output buffer


def test_write_ctr_then_read_it_back():
    dev, _ = kbd()
    assert command(dev, 0x60, 0x47) is None
    assert command(dev, 0x20) == 0x47


@pytest.mark.parametrize("cmd,answer", [(0xAA, SELFTEST_OK), (0xAB, 0x00), (0xA9, AUX_CLOCK_STUCK)])
def test_self_tests_answer(cmd, answer):
    dev, _ = kbd()
    assert command(dev, cmd) == answer


def test_self_test_sets_the_system_flag():
    dev, _ = kbd()
    command(dev, 0x60, 0x00)
    assert not dev.read(COMMAND, 1) & STR_SYSFLAG
    command(dev, 0xAA)
    assert dev.read(COMMAND, 1) & STR_SYSFLAG and command(dev, 0x20) & CTR_SYSFLAG


@pytest.mark.parametrize("off,on,bit", [(0xA7, 0xA8, CTR_AUXDIS), (0xAD, 0xAE, CTR_KBDDIS)])
def test_disable_enable_commands_flip_the_ctr_bit(off, on, bit):
    dev, _ = kbd()
    command(dev, off)
    assert command(dev, 0x20) & bit
    command(dev, on)
    assert not command(dev, 0x20) & bit


def test_aux_loop_fails_like_an_absent_aux_port():
    """Linux's i8042_check_aux: the 0xD3 echo lacks STR_AUXDATA ("auxerr"), 0xA9 reports a
    stuck clock line (neither 0, 0xFA nor 0xFF), so the driver concludes "no aux" at once."""
    dev, _ = kbd()
    dev.write(COMMAND, 1, 0xD3)
    dev.write(DATA, 1, 0x5A)
    st_ = dev.read(COMMAND, 1)
    assert st_ & STR_OBF and not st_ & STR_AUXDATA
    assert command(dev, 0xA9) not in (0x00, 0xFA, 0xFF)


def test_keyboard_and_mouse_bytes_get_no_answer():
    dev, _ = kbd()
    assert command(dev, 0xD4, 0xF2) is None           # to the mouse
    dev.write(DATA, 1, 0xF2)                          # to the keyboard (GETID)
    assert not dev.read(COMMAND, 1) & STR_OBF


def test_output_port_and_reset():
    dev, resets = kbd()
    assert command(dev, 0xD0) == 0x03
    command(dev, 0xD1, 0x03)
    assert resets == []
    command(dev, 0xD1, 0x02)                          # bit 0 low: reset line asserted
    assert resets == [1]
    dev.write(COMMAND, 1, 0xFE)
    assert resets == [1, 1]


def test_status_bit_3_says_where_the_last_write_went():
    dev, _ = kbd()
    dev.write(COMMAND, 1, 0x60)
    assert dev.read(COMMAND, 1) & STR_CMDDAT
    dev.write(DATA, 1, 0x05)
    assert not dev.read(COMMAND, 1) & STR_CMDDAT


def test_a_command_cancels_a_pending_parameter():
    dev, _ = kbd()
    dev.write(COMMAND, 1, 0x60)
    assert command(dev, 0x20) == POWER_ON_CTR         # the 0x60 never got its byte


accesses = st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.sampled_from([1, 2, 4]),
                              st.integers(0, 2**32 - 1)), max_size=60)


@given(accesses)
def test_any_access_sequence_never_raises_and_state_round_trips(ops):
    dev, _ = kbd()
    for is_write, off, size, value in ops:
        if is_write:
            dev.write(off, size, value)
        else:
            assert 0 <= dev.read(off, size) <= 0xFF
        assert not dev.read(COMMAND, 1) & STR_IBF
    twin, _ = kbd()
    twin.load_state(dev.save_state())
    assert twin.save_state() == dev.save_state()
    assert twin.read(COMMAND, 1) == dev.read(COMMAND, 1)


@pytest.mark.parametrize("bad", [
    None, [], {}, {"ctr": 0, "outp": 3, "out": 0, "obf": False, "pending": 0},
    {"ctr": 256, "outp": 3, "out": 0, "obf": False, "pending": 0, "cmd_last": False},
    {"ctr": 0, "outp": 3, "out": -1, "obf": False, "pending": 0, "cmd_last": False},
    {"ctr": 0, "outp": 3, "out": 0, "obf": 1, "pending": 0, "cmd_last": False},
    {"ctr": 0, "outp": 3, "out": 0, "obf": False, "pending": 0x20, "cmd_last": False},
    {"ctr": True, "outp": 3, "out": 0, "obf": False, "pending": 0, "cmd_last": False},
])
def test_hostile_state_is_refused_and_changes_nothing(bad):
    dev, _ = kbd()
    command(dev, 0x60, 0x11)
    before = dev.save_state()
    with pytest.raises(DeviceError):
        dev.load_state(bad)
    assert dev.save_state() == before
