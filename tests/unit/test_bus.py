"""Bus: range bookkeeping and lookup."""
import pytest
from hypothesis import given, strategies as st

from kvmpy.devices.bus import Bus, Device
from kvmpy.errors import DeviceError


class Dummy:
    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        pass


def test_lookup_returns_device_offset_and_name():
    """lookup() finds the device whose range holds the address and the offset into it."""
    bus, a, b = Bus("pio"), Dummy(), Dummy()
    bus.attach(0x3F8, 8, a, "com1")
    bus.attach(0x60, 5, b, "i8042")
    assert bus.lookup(0x3F8) == (a, 0, "com1")
    assert bus.lookup(0x3FF) == (a, 7, "com1")
    assert bus.lookup(0x64) == (b, 4, "i8042")


def test_lookup_outside_every_range_is_none():
    """Addresses before, between and just past the ranges are unclaimed."""
    bus = Bus("pio")
    bus.attach(0x10, 4, Dummy(), "x")
    bus.attach(0x20, 4, Dummy(), "y")
    for addr in (0, 0xF, 0x14, 0x1F, 0x24, 1 << 40):
        assert bus.lookup(addr) is None


@pytest.mark.parametrize("base,length", [(0x3F0, 0x10), (0x3FF, 1), (0x3F8, 8), (0x3F9, 2), (0x3F0, 0x100)])
def test_overlap_is_rejected_naming_both_devices(base, length):
    """An overlapping attach raises DeviceError naming the new and the existing device."""
    bus = Bus("pio")
    bus.attach(0x3F8, 8, Dummy(), "com1")
    with pytest.raises(DeviceError) as e:
        bus.attach(base, length, Dummy(), "intruder")
    assert "com1" in str(e.value) and "intruder" in str(e.value)
    assert len(bus) == 1


def test_adjacent_ranges_are_allowed():
    """Ranges that touch but do not overlap can both be attached."""
    bus = Bus("mmio")
    bus.attach(0x1000, 0x1000, Dummy(), "a")
    bus.attach(0x2000, 0x1000, Dummy(), "b")
    bus.attach(0x0, 0x1000, Dummy(), "c")
    assert [d.name for d in bus.devices] == ["c", "a", "b"]


@pytest.mark.parametrize("base,length", [(0x100, 0), (0x100, -4), (-1, 4)])
def test_empty_or_negative_ranges_are_rejected(base, length):
    """A zero or negative length, or a negative base, is a DeviceError."""
    with pytest.raises(DeviceError):
        Bus("pio").attach(base, length, Dummy(), "bad")


def test_default_name_is_the_class_name():
    """Without a name, the attachment is named after the device's class."""
    bus = Bus("pio")
    bus.attach(0xF4, 1, Dummy())
    assert bus.lookup(0xF4)[2] == "Dummy"
    assert isinstance(Dummy(), Device)


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(-2, 20)), max_size=30),
       st.lists(st.integers(-5, 260), max_size=50))
def test_bus_matches_a_naive_model(ranges, probes):
    """Whatever is attached or refused, lookup agrees with a linear scan of accepted ranges."""
    bus, accepted = Bus("p"), []
    for n, (base, length) in enumerate(ranges):
        dev = Dummy()
        clash = length <= 0 or any(b < base + length and base < b + l for b, l, _ in accepted)
        if clash:
            with pytest.raises(DeviceError):
                bus.attach(base, length, dev, f"d{n}")
        else:
            bus.attach(base, length, dev, f"d{n}")
            accepted.append((base, length, dev))
    for addr in probes:
        hits = [(d, addr - b) for b, l, d in accepted if b <= addr < b + l]
        got = bus.lookup(addr)
        assert (got[:2] if got else None) == (hits[0] if hits else None)
