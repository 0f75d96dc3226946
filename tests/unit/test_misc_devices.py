"""isa-debug-exit, the i8042 reset line and the IRQ triggers (the rest of the i8042: test_i8042.py)."""
import pytest

from kvmpy.devices.debugexit import DebugExit
from kvmpy.devices.i8042 import I8042
from kvmpy.devices.irq import NullTrigger, RecordingTrigger, Trigger


@pytest.mark.parametrize("v,status", [(0, 1), (1, 3), (0x15, 0x2B), (0x7F, 0xFF)])
def test_debug_exit_reports_value_shifted_with_low_bit_set(v, status):
    """Writing v to isa-debug-exit calls on_exit((v << 1) | 1)."""
    got = []
    DebugExit(got.append).write(0, 1, v)
    assert got == [status]


def test_debug_exit_masks_value_to_access_size():
    """A byte write uses only the low byte of the value."""
    got = []
    DebugExit(got.append).write(0, 1, 0x1234)
    assert got == [(0x34 << 1) | 1]


@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)])
def test_debug_exit_reads_all_ones(size, ones):
    """Reads return all ones for the access size and do not end the run."""
    got = []
    dev = DebugExit(got.append)
    assert dev.read(0, size) == ones
    assert got == [] and dev.iosize == 1


def test_i8042_reset_command_calls_on_reset():
    """0xFE written to the command port (offset 4) pulses reset once per write."""
    resets = []
    kbd = I8042(lambda: resets.append(1))
    kbd.write(4, 1, 0xFE)
    assert resets == [1]
    kbd.write(4, 1, 0xFE)
    assert resets == [1, 1]


@pytest.mark.parametrize("offset,value", [(0, 0xFE), (4, 0xAA), (4, 0xFF), (4, 0xD1), (1, 0xFE)])
def test_i8042_other_writes_do_not_reset(offset, value):
    """0xFE to the data port or any other command does not reset."""
    resets = []
    I8042(lambda: resets.append(1)).write(offset, 1, value)
    assert resets == []


def test_i8042_power_on_status_has_nothing_to_read():
    """Status at power-on: no data, input buffer empty, POST passed, not keylocked."""
    kbd = I8042(lambda: None)
    assert kbd.read(4, 1) == 0x14       # STR_SYSFLAG | STR_KEYLOCK


def test_recording_trigger_keeps_every_change():
    """RecordingTrigger records levels in order; .level is the last one."""
    t = RecordingTrigger()
    assert t.level is False
    t.set_level(True)
    t.set_level(False)
    assert t.levels == [True, False] and t.level is False
    assert isinstance(t, Trigger) and isinstance(NullTrigger(), Trigger)
    NullTrigger().set_level(True)
