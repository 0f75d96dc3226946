"""The PCI host bridge and a function's configuration space (kvmpy/devices/pci/)."""
import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.devices import RecordingTrigger
from kvmpy.devices.pci import Bar, PciFunction, PciHost
from kvmpy.devices.pci import config as C
from kvmpy.devices.pci.host import HOST_BRIDGE_DEVICE, HOST_BRIDGE_VENDOR
from kvmpy.errors import DeviceError
from kvmpy.x86 import layout


class Endpoint:
    """A function with a 32-bit BAR 0 (4 KiB) and a 64-bit BAR 2 (16 KiB) that records BAR accesses."""

    def __init__(self, intx=None):
        self.config = PciFunction(0x1AF4, 0x1042, 0x018000, intx=intx)
        self.config.add_bar(0, Bar(0x1000))
        self.config.add_bar(2, Bar(0x4000, is64=True))
        self.cap = self.config.add_capability(0x09, bytes([6, 0xAA, 0xBB, 0xCC]), wmask=b"\0\0\xff")
        self.config.add_capability(0x09, bytes([4, 1, 2]))
        self.accesses = []

    def config_read(self, offset, size):
        return self.config.read(offset, size)

    def config_write(self, offset, size, value):
        self.config.write(offset, size, value)

    def bar_read(self, index, offset, size):
        self.accesses.append(("r", index, offset, size))
        return 0x5A

    def bar_write(self, index, offset, size, value):
        self.accesses.append(("w", index, offset, size, value))


def host_with(ep=None):
    host = PciHost(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE)
    ep = ep or Endpoint()
    dev = host.add(ep)
    return host, ep, dev


def cf8(host, dev, reg, size=4, fn=0, bus=0, enable=True):
    host.cf8.write(0, 4, (1 << 31 if enable else 0) | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC))
    return host.cfc.read(reg & 3, size)


def cf8_write(host, dev, reg, size, value):
    host.cf8.write(0, 4, 1 << 31 | dev << 11 | (reg & 0xFC))
    host.cfc.write(reg & 3, size, value)


def test_the_host_bridge_answers_at_00_00_0_through_both_mechanisms():
    host, _, _ = host_with()
    assert cf8(host, 0, 0) == HOST_BRIDGE_DEVICE << 16 | HOST_BRIDGE_VENDOR
    assert host.ecam.read(0, 4) == HOST_BRIDGE_DEVICE << 16 | HOST_BRIDGE_VENDOR
    assert cf8(host, 0, 8) >> 8 == 0x060000                        # class: host bridge
    assert cf8(host, 0, 0x0E, 1) == 0                              # header type 0, one function


def test_empty_slots_other_buses_functions_and_disabled_addresses_read_all_ones():
    host, _, dev = host_with()
    assert dev == 1
    assert cf8(host, 5, 0) == 0xFFFF_FFFF
    assert cf8(host, dev, 0, bus=1) == 0xFFFF_FFFF
    assert cf8(host, dev, 0, fn=1) == 0xFFFF_FFFF
    assert cf8(host, dev, 0, enable=False) == 0xFFFF_FFFF
    assert cf8(host, dev, 0, size=2) == 0x1AF4
    assert host.ecam.read(5 << 15, 4) == 0xFFFF_FFFF and host.ecam.read(dev << 15 | 1 << 12, 2) == 0xFFFF
    assert host.cf8.read(0, 1) == 0xFF and host.cf8.read(0, 4) & 1 << 31


def test_bar_sizing_reads_back_the_size_mask_and_the_type_bits():
    host, ep, dev = host_with()
    placed0, placed2 = cf8(host, dev, 0x10), cf8(host, dev, 0x18)
    assert placed0 == layout.PCI_MMIO_BASE and placed2 & ~0xF == layout.PCI_MMIO_BASE + 0x4000 and placed2 & 0xF == 4
    for reg, expect in ((0x10, 0xFFFF_F000), (0x14, 0), (0x18, 0xFFFF_C004), (0x1C, 0xFFFF_FFFF), (0x20, 0),
                        (0x30, 0)):
        cf8_write(host, dev, reg, 4, 0xFFFF_FFFF)
        assert cf8(host, dev, reg) == expect, hex(reg)
    cf8_write(host, dev, 0x10, 4, placed0)
    assert cf8(host, dev, 0x10) == placed0


def test_a_bar_decodes_only_with_memory_space_on_and_where_the_guest_puts_it():
    host, ep, dev = host_with()
    base = layout.PCI_MMIO_BASE
    assert host.window.read(0x10, 4) == 0 and ep.accesses == []     # Command.Memory is off
    cf8_write(host, dev, C.COMMAND, 2, C.COMMAND_MEMORY)
    assert host.window.read(0x10, 4) == 0x5A and ep.accesses == [("r", 0, 0x10, 4)]
    host.window.write(0x4000 + 8, 2, 0x1234)
    assert ep.accesses[-1] == ("w", 2, 8, 2, 0x1234)
    cf8_write(host, dev, 0x10, 4, base + 0x100000)                    # the guest moves BAR 0
    assert host.window.read(0x10, 4) == 0 and host.window.read(0x100010, 4) == 0x5A
    assert ep.accesses[-1] == ("r", 0, 0x10, 4)


def test_command_keeps_only_its_writable_bits_and_status_and_identity_are_read_only():
    host, ep, dev = host_with()
    cf8_write(host, dev, 0, 4, 0)
    cf8_write(host, dev, C.COMMAND, 4, 0xFFFF_FFFF)
    assert cf8(host, dev, C.COMMAND, 2) == C.COMMAND_WRITABLE
    assert cf8(host, dev, C.STATUS, 2) == C.STATUS_CAP_LIST
    assert cf8(host, dev, 0) == 0x1042_1AF4


def test_the_capability_list_links_each_capability_and_masks_their_bits():
    host, ep, dev = host_with()
    first = cf8(host, dev, C.CAPABILITIES_POINTER, 1)
    assert first == ep.cap == 0x40
    second = cf8(host, dev, first + 1, 1)
    assert cf8(host, dev, second, 1) == 0x09 and cf8(host, dev, second + 1, 1) == 0
    cf8_write(host, dev, first, 4, 0xFFFF_FFFF)                       # ID, next, len, 0xAA: read-only
    assert cf8(host, dev, first) == 0xAA06_4809
    cf8_write(host, dev, first + 4, 1, 0x77)                          # 0xBB: writable
    assert cf8(host, dev, first + 4, 1) == 0x77


def test_intx_follows_the_function_and_command_s_interrupt_disable():
    irq = RecordingTrigger()
    host, ep, dev = host_with(Endpoint(intx=irq))
    assert cf8(host, dev, C.INTERRUPT_PIN, 1) == 1
    ep.config.set_intx(True)
    assert irq.levels == [True] and cf8(host, dev, C.STATUS, 2) & C.STATUS_INTERRUPT
    cf8_write(host, dev, C.COMMAND, 2, C.COMMAND_INTX_DISABLE)
    assert irq.levels == [True, False] and cf8(host, dev, C.STATUS, 2) & C.STATUS_INTERRUPT
    cf8_write(host, dev, C.COMMAND, 2, 0)
    ep.config.set_intx(False)
    assert irq.levels == [True, False, True, False]


def test_the_allocator_aligns_each_bar_and_refuses_when_the_window_is_full():
    host = PciHost(0xC000_0000, 0x10000)
    a, b = Endpoint(), Endpoint()
    host.add(a), host.add(b)
    assert [e.config.read(r, 4) & ~0xF for e in (a, b) for r in (0x10, 0x18)] == \
        [0xC000_0000, 0xC000_4000, 0xC000_8000, 0xC000_C000]
    with pytest.raises(DeviceError, match="no room"):
        host.add(Endpoint())


def test_state_round_trips_and_an_edited_state_cannot_change_read_only_bits():
    host, ep, dev = host_with()
    cf8_write(host, dev, C.COMMAND, 2, C.COMMAND_MEMORY | C.COMMAND_MASTER)
    cf8_write(host, dev, C.INTERRUPT_LINE, 1, 11)
    saved = ep.config.save_state()
    fresh = Endpoint()
    fresh.config.load_state(saved)
    assert fresh.config.data == ep.config.data
    evil = bytearray(bytes.fromhex(saved["config"]))
    evil[0:4] = b"\xde\xad\xbe\xef"                                   # vendor and device: read-only
    evil[0x10:0x14] = b"\xff\xff\xff\xff"
    fresh.config.load_state({"config": evil.hex(), "intx": False})
    assert fresh.config.read(0, 4) == 0x1042_1AF4 and fresh.config.read(0x10, 4) == 0xFFFF_F000
    for bad in ({"config": "zz", "intx": False}, {"config": "00" * 10, "intx": False}, {"config": saved["config"]},
                {"config": saved["config"], "intx": 1}, None):
        with pytest.raises(ValueError):
            fresh.config.load_state(bad)
    assert host.save_state()["config_address"] & 1 << 31
    with pytest.raises(ValueError):
        host.load_state({"config_address": -1, "bridge": host.save_state()["bridge"]})


OPS = st.lists(st.tuples(st.sampled_from(["cf8", "cfc", "ecam", "window"]), st.booleans(),
                         st.integers(0, (1 << 21) - 1), st.sampled_from([0, 1, 2, 3, 4, 8, 16]),
                         st.integers(0, (1 << 64) - 1)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_hostile_accesses_never_raise_and_never_change_identity(ops):
    host, ep, dev = host_with(Endpoint(intx=RecordingTrigger()))
    identity = bytes(ep.config.data[:0x10]), bytes(ep.config.data[0x2C:0x30])
    doors = {"cf8": host.cf8, "cfc": host.cfc, "ecam": host.ecam, "window": host.window}
    for door, write, offset, size, value in ops:
        d = doors[door]
        offset = offset % 8 if door in ("cf8", "cfc") else offset
        if write:
            d.write(offset, size, value)
        else:
            v = d.read(offset, size)
            assert 0 <= v < 1 << 64
    assert bytes(ep.config.data[:4]) == identity[0][:4] and bytes(ep.config.data[8:0x10]) == identity[0][8:]
    assert bytes(ep.config.data[0x2C:0x30]) == identity[1]
    assert len(ep.config.data) == C.CONFIG_SPACE_SIZE
