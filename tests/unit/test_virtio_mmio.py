"""The virtio-mmio v2 transport: register widths, status machine, queues, interrupts."""
import os
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.devices.bus import Device
from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio.blk import VirtioBlk
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_WRITE, VirtqueueError
from kvmpy.kvm.memory import GuestMemory

RAM = 0x10000
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
VERSION_1 = 1 << R.VIRTIO_F_VERSION_1
ALL_OK = R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK


class FakeDevice:
    """Two queues of at most 8; notify pops and completes every chain, or fails on demand."""

    device_id = 42
    device_features = VERSION_1 | 0b101
    num_queues = 2
    queue_num_max = 8
    config_size = 12

    def __init__(self):
        self.config = bytearray(range(0x10, 0x10 + self.config_size))
        self.notified = []
        self.config_writes = []
        self.resets = 0
        self.fail = False

    def read_config(self, offset, size):
        return int.from_bytes(self.config[offset:offset + size], "little")

    def write_config(self, offset, size, value):
        self.config_writes.append((offset, size, value))

    def notify(self, queue_index, queue):
        self.notified.append(queue_index)
        while (chain := queue.pop()) is not None:
            queue.push_used(chain.head, 0)
        if self.fail:
            raise VirtqueueError("fake device failure")

    def reset(self):
        self.resets += 1


def make():
    mem = GuestMemory.anonymous(RAM)
    fake = FakeDevice()
    irq = RecordingTrigger()
    return R.VirtioMmioTransport(fake, mem, irq), fake, mem, irq


def w(dev, off, value):
    dev.write(off, 4, value)


def live(dev, mem, queue=0):
    """Negotiate VERSION_1, set up ``queue`` with 8 entries, DRIVER_OK."""
    w(dev, R.Status, R.ACKNOWLEDGE | R.DRIVER)
    w(dev, R.DriverFeaturesSel, 1)
    w(dev, R.DriverFeatures, 1)
    w(dev, R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK)
    assert dev.read(R.Status, 4) & R.FEATURES_OK
    w(dev, R.QueueSel, queue)
    w(dev, R.QueueNum, 8)
    w(dev, R.QueueDescLow, DESC)
    w(dev, R.QueueDriverLow, AVAIL)
    w(dev, R.QueueDeviceLow, USED)
    w(dev, R.QueueReady, 1)
    w(dev, R.Status, ALL_OK)


def offer_one(mem, avail_idx=1, flags=0):
    mem.write(DESC, struct.pack("<QIHH", 0x8000, 1, VIRTQ_DESC_F_WRITE, 0))
    mem.write(AVAIL, struct.pack("<HHH", flags, avail_idx, 0))


def test_the_transport_is_a_bus_device():
    """It satisfies the Device protocol the buses use."""
    dev, *_ = make()
    assert isinstance(dev, Device) and isinstance(dev.device, R.VirtioDevice)


def test_identity_registers():
    """MagicValue, Version, DeviceID and VendorID read their fixed values."""
    dev, *_ = make()
    assert [dev.read(o, 4) for o in (R.MagicValue, R.Version, R.DeviceID, R.VendorID)] == [
        0x74726976, 2, 42, R.VIRTIO_MMIO_VENDOR]


@pytest.mark.parametrize("size", [1, 2, 8])
def test_control_registers_ignore_other_widths(size):
    """Non-32-bit control accesses read 0 and writes are dropped."""
    dev, *_ = make()
    assert dev.read(R.MagicValue, size) == 0
    dev.write(R.Status, size, R.ACKNOWLEDGE)
    assert dev.read(R.Status, 4) == 0


@pytest.mark.parametrize("offset", [R.MagicValue + 1, R.Status + 2, 0x0FF])
def test_control_registers_ignore_unaligned_offsets(offset):
    """A 32-bit access at an unaligned control offset reads 0 and does nothing."""
    dev, *_ = make()
    assert dev.read(offset, 4) == 0
    dev.write(offset, 4, 0xFFFF_FFFF)
    assert dev.state()["status"] == 0


@pytest.mark.parametrize("offset", [R.DeviceFeaturesSel, R.DriverFeatures, R.DriverFeaturesSel,
                                    R.QueueSel, R.QueueNum, R.QueueNotify, R.InterruptACK,
                                    R.QueueDescLow, R.QueueDescHigh, R.QueueDriverLow,
                                    R.QueueDriverHigh, R.QueueDeviceLow, R.QueueDeviceHigh,
                                    R.SHMSel, R.QueueReset, 0x028, 0x03C, 0x040, 0x0F8])
def test_write_only_and_unassigned_registers_read_zero(offset):
    """Reading a write-only or unassigned control register gives 0."""
    dev, *_ = make()
    w(dev, offset, 0x1234)
    assert dev.read(offset, 4) == 0


def test_read_only_registers_ignore_writes():
    """Writes to MagicValue, DeviceFeatures, QueueNumMax, InterruptStatus and friends change nothing."""
    dev, *_ = make()
    before = dev.state()
    for off in (R.MagicValue, R.Version, R.DeviceID, R.VendorID, R.DeviceFeatures, R.QueueNumMax,
                R.InterruptStatus, R.ConfigGeneration, R.SHMLenLow, R.SHMBaseHigh):
        w(dev, off, 0xFFFF_FFFF)
    assert dev.state() == before and dev.read(R.MagicValue, 4) == 0x74726976


def test_shared_memory_registers_report_no_region():
    """SHMLen and SHMBase read all ones: no shared memory region exists."""
    dev, *_ = make()
    assert {dev.read(o, 4) for o in (R.SHMLenLow, R.SHMLenHigh, R.SHMBaseLow, R.SHMBaseHigh)} == {
        0xFFFF_FFFF}


def test_device_features_are_selected_by_word():
    """DeviceFeaturesSel 0/1 give the low/high 32 bits; other selectors give 0."""
    dev, *_ = make()
    got = []
    for sel in (0, 1, 2, 0xFFFF_FFFF):
        w(dev, R.DeviceFeaturesSel, sel)
        got.append(dev.read(R.DeviceFeatures, 4))
    assert got == [0b101, 1, 0, 0]


def test_driver_features_are_written_by_word_and_frozen_by_features_ok():
    """DriverFeatures lands in the selected word; selectors >= 2 and writes after FEATURES_OK are ignored."""
    dev, *_ = make()
    w(dev, R.DriverFeaturesSel, 0)
    w(dev, R.DriverFeatures, 0b100)
    w(dev, R.DriverFeaturesSel, 1)
    w(dev, R.DriverFeatures, 1)
    w(dev, R.DriverFeaturesSel, 2)
    w(dev, R.DriverFeatures, 0xFFFF_FFFF)
    assert dev.state()["driver_features"] == VERSION_1 | 0b100
    w(dev, R.Status, R.FEATURES_OK)
    w(dev, R.DriverFeaturesSel, 0)
    w(dev, R.DriverFeatures, 0b001)
    assert dev.state()["driver_features"] == VERSION_1 | 0b100


def test_status_bits_accumulate_and_cannot_be_cleared_by_the_driver():
    """Non-zero writes OR into Status; only bits 0-7 count; DEVICE_NEEDS_RESET is device-owned."""
    dev, *_ = make()
    w(dev, R.Status, R.ACKNOWLEDGE | R.DRIVER)
    w(dev, R.Status, R.ACKNOWLEDGE)
    assert dev.read(R.Status, 4) == R.ACKNOWLEDGE | R.DRIVER
    w(dev, R.Status, R.DEVICE_NEEDS_RESET | 0x100)
    assert dev.read(R.Status, 4) == R.ACKNOWLEDGE | R.DRIVER
    w(dev, R.Status, R.FAILED)
    assert dev.read(R.Status, 4) == R.ACKNOWLEDGE | R.DRIVER | R.FAILED


def test_features_ok_refused_without_version_1():
    """FEATURES_OK does not stick when VIRTIO_F_VERSION_1 was not accepted."""
    dev, *_ = make()
    w(dev, R.DriverFeatures, 0b1)
    w(dev, R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK)
    assert dev.read(R.Status, 4) == R.ACKNOWLEDGE | R.DRIVER


def test_config_space_accepts_every_width_and_alignment_inside_it():
    """Config reads of 1/2/4/8 bytes at any offset return the little-endian slice."""
    dev, *_ = make()
    assert dev.read(R.Config, 1) == 0x10
    assert dev.read(R.Config + 1, 2) == 0x1211
    assert dev.read(R.Config + 3, 4) == 0x16151413
    assert dev.read(R.Config + 4, 8) == 0x1B1A191817161514
    assert dev.read(R.Config + 11, 1) == 0x1B


@pytest.mark.parametrize("offset,size", [(12, 1), (11, 2), (8, 8), (0x100, 4), (0, 3), (0, 16)])
def test_config_accesses_outside_or_of_odd_width_read_zero(offset, size):
    """A config access not wholly inside the space, or not 1/2/4/8 bytes, reads 0 and is not written."""
    dev, fake, _, _ = make()
    assert dev.read(R.Config + offset, size) == 0
    dev.write(R.Config + offset, size, 0xFF)
    assert fake.config_writes == []


def test_config_writes_reach_the_device_masked_to_width():
    """A config write inside the space is passed on with the value cut to its width."""
    dev, fake, _, _ = make()
    dev.write(R.Config + 2, 2, 0x12345)
    assert fake.config_writes == [(2, 2, 0x2345)]


def test_queue_registers_follow_queue_sel():
    """QueueNumMax and QueueReady are per queue; a missing queue reads 0 and ignores writes."""
    dev, *_ = make()
    w(dev, R.QueueSel, 1)
    assert dev.read(R.QueueNumMax, 4) == 8
    w(dev, R.QueueSel, 2)
    assert dev.read(R.QueueNumMax, 4) == 0
    w(dev, R.QueueNum, 4)
    w(dev, R.QueueReady, 1)
    assert dev.read(R.QueueReady, 4) == 0 and dev.state()["status"] == 0


def test_ring_addresses_take_low_and_high_words():
    """QueueDesc/Driver/Device Low+High build 64-bit addresses for the selected queue."""
    dev, *_ = make()
    w(dev, R.QueueSel, 1)
    for off, val in ((R.QueueDescLow, 0x1000), (R.QueueDescHigh, 0x2), (R.QueueDriverLow, 0x3000),
                     (R.QueueDriverHigh, 0x4), (R.QueueDeviceLow, 0x5000), (R.QueueDeviceHigh, 0x6)):
        w(dev, off, val)
    q = dev.state()["queues"][1]
    assert (q["desc"], q["driver"], q["device"]) == (0x2_0000_1000, 0x4_0000_3000, 0x6_0000_5000)
    assert dev.state()["queues"][0]["desc"] == 0


def test_queue_registers_are_frozen_while_ready():
    """While QueueReady is 1, QueueNum and the ring addresses ignore writes."""
    dev, _, mem, _ = make()
    live(dev, mem)
    w(dev, R.QueueNum, 2)
    w(dev, R.QueueDescLow, 0x4000)
    q = dev.state()["queues"][0]
    assert (q["num"], q["desc"], q["ready"]) == (8, DESC, True)
    w(dev, R.QueueReady, 0)
    w(dev, R.QueueDescLow, 0x4000)
    assert dev.state()["queues"][0]["desc"] == 0x4000 and dev.read(R.QueueReady, 4) == 0


@pytest.mark.parametrize("num", [0, 3, 16, 0x10000])
def test_queue_ready_with_a_bad_queue_num_needs_reset(num):
    """QueueNum not a power of two in 1..QueueNumMax: DEVICE_NEEDS_RESET and the queue stays off."""
    dev, _, _, irq = make()
    w(dev, R.QueueNum, num)
    w(dev, R.QueueDescLow, DESC)
    w(dev, R.QueueDriverLow, AVAIL)
    w(dev, R.QueueDeviceLow, USED)
    w(dev, R.QueueReady, 1)
    assert dev.read(R.QueueReady, 4) == 0
    assert dev.read(R.Status, 4) == R.DEVICE_NEEDS_RESET and irq.levels == []
    assert dev.state()["last_error"]


def test_queue_ready_with_rings_outside_ram_needs_reset():
    """A used ring beyond RAM (high word set) is refused at QueueReady."""
    dev, *_ = make()
    w(dev, R.QueueNum, 8)
    w(dev, R.QueueDeviceHigh, 1)
    w(dev, R.QueueReady, 1)
    assert dev.read(R.Status, 4) & R.DEVICE_NEEDS_RESET
    assert "used ring" in dev.state()["last_error"]


def test_notify_is_ignored_until_the_device_is_live():
    """Before DRIVER_OK (or after FAILED) QueueNotify does not reach the device."""
    dev, fake, mem, _ = make()
    live(dev, mem)
    w(dev, R.Status, 0)
    w(dev, R.Status, R.ACKNOWLEDGE | R.DRIVER)
    w(dev, R.QueueNotify, 0)
    assert fake.notified == []
    live(dev, mem)
    w(dev, R.Status, R.FAILED)
    w(dev, R.QueueNotify, 0)
    assert fake.notified == []


def test_notify_of_a_missing_or_unready_queue_is_ignored():
    """QueueNotify for an index >= num_queues, or a queue not ready, does nothing."""
    dev, fake, mem, _ = make()
    live(dev, mem, queue=0)
    for index in (1, 2, 0x10000, 0xFFFF_FFFF):
        w(dev, R.QueueNotify, index)
    assert fake.notified == []
    w(dev, R.QueueNotify, 0)
    assert fake.notified == [0]


def test_used_buffers_raise_bit_0_and_ack_clears_only_acked_bits():
    """A completion sets InterruptStatus bit 0; InterruptACK clears just the bits written."""
    dev, fake, mem, irq = make()
    live(dev, mem)
    offer_one(mem)
    w(dev, R.QueueNotify, 0)
    assert dev.read(R.InterruptStatus, 4) == 1 and irq.levels == [True]
    w(dev, R.InterruptACK, 2)
    assert dev.read(R.InterruptStatus, 4) == 1 and irq.levels == [True]
    w(dev, R.InterruptACK, 0xFFFF_FFFF)
    assert dev.read(R.InterruptStatus, 4) == 0 and irq.levels == [True, False]


def test_notify_without_new_used_buffers_raises_nothing():
    """A spurious notification (nothing available) leaves the line low."""
    dev, fake, mem, irq = make()
    live(dev, mem)
    w(dev, R.QueueNotify, 0)
    assert fake.notified == [0] and irq.levels == [] and dev.read(R.InterruptStatus, 4) == 0


def test_no_interrupt_flag_suppresses_bit_0():
    """VIRTQ_AVAIL_F_NO_INTERRUPT set: buffers are used but no interrupt is raised."""
    dev, fake, mem, irq = make()
    live(dev, mem)
    offer_one(mem, flags=1)
    w(dev, R.QueueNotify, 0)
    assert struct.unpack("<H", mem.read(USED + 2, 2)) == (1,)
    assert irq.levels == [] and dev.read(R.InterruptStatus, 4) == 0


def test_device_error_after_driver_ok_sets_needs_reset_and_config_interrupt():
    """A VirtqueueError from notify: DEVICE_NEEDS_RESET, bit 1, plus bit 0 for buffers already used."""
    dev, fake, mem, irq = make()
    live(dev, mem)
    offer_one(mem)
    fake.fail = True
    w(dev, R.QueueNotify, 0)
    assert dev.read(R.Status, 4) == ALL_OK | R.DEVICE_NEEDS_RESET
    assert dev.read(R.InterruptStatus, 4) == 3 and irq.levels == [True]
    assert not dev.live and dev.state()["last_error"] == "fake device failure"
    w(dev, R.QueueNotify, 0)
    assert fake.notified == [0]                         # nothing runs until reset


def test_a_bad_avail_ring_is_a_device_error():
    """The queue's own checks (here: avail idx too far ahead) reach NEEDS_RESET through notify."""
    dev, fake, mem, irq = make()
    live(dev, mem)
    offer_one(mem, avail_idx=100)
    w(dev, R.QueueNotify, 0)
    assert dev.read(R.Status, 4) & R.DEVICE_NEEDS_RESET
    assert dev.read(R.InterruptStatus, 4) == R.VIRTIO_MMIO_INT_CONFIG and irq.levels == [True]


def test_reset_restores_power_on_state_and_resets_the_device():
    """Status 0: every register back to its initial value, device.reset() called, line low."""
    dev, fake, mem, irq = make()
    initial = dev.state()
    live(dev, mem)
    offer_one(mem)
    w(dev, R.QueueSel, 1)
    w(dev, R.DeviceFeaturesSel, 1)
    w(dev, R.QueueNotify, 0)
    w(dev, R.Status, 0)
    assert dev.state() == initial and fake.resets == 1 and irq.levels == [True, False]


def test_requeue_after_queue_ready_zero_starts_from_index_zero():
    """Dropping a queue with QueueReady=0 and enabling it again restarts at avail/used idx 0."""
    dev, fake, mem, _ = make()
    live(dev, mem)
    offer_one(mem)
    w(dev, R.QueueNotify, 0)
    assert dev.state()["queues"][0]["last_avail_idx"] == 1
    w(dev, R.QueueReady, 0)
    assert dev.state()["queues"][0]["last_avail_idx"] == 0
    w(dev, R.QueueReady, 1)
    mem.write(USED + 2, b"\0\0")
    w(dev, R.QueueNotify, 0)                            # avail idx is 1: chain 0 again
    assert dev.state()["queues"][0]["used_idx"] == 1


# --- hypothesis: random register traffic never raises ------------------------------------------

REGS = [R.MagicValue, R.Version, R.DeviceID, R.VendorID, R.DeviceFeatures, R.DeviceFeaturesSel,
        R.DriverFeatures, R.DriverFeaturesSel, R.QueueSel, R.QueueNumMax, R.QueueNum, R.QueueReady,
        R.QueueNotify, R.InterruptStatus, R.InterruptACK, R.Status, R.QueueDescLow,
        R.QueueDescHigh, R.QueueDriverLow, R.QueueDriverHigh, R.QueueDeviceLow, R.QueueDeviceHigh,
        R.SHMSel, R.SHMLenLow, R.QueueReset, R.ConfigGeneration, R.Config, R.Config + 8]
offsets = st.one_of(st.sampled_from(REGS), st.integers(0, 0x1000), st.integers(-8, 1 << 40))
sizes = st.one_of(st.sampled_from([4, 4, 4, 1, 2, 8]), st.integers(-1, 16))
values = st.one_of(st.sampled_from([0, 1, 2, 4, 8, 0x40, 0x80, 0xF, DESC, AVAIL, USED]),
                   st.integers(0, 0xFFFF_FFFF), st.integers(0, (1 << 64) - 1))
access = st.tuples(st.sampled_from(["r", "w", "w"]), offsets, sizes, values)
setup = st.tuples(st.just("init"), st.sampled_from([1, 2, 4, 8, 16, 256, 3]),
                  st.sampled_from([DESC, 0x1008, 0x8000, 0xFFF0]),
                  st.sampled_from([AVAIL, 0x2001, 0xFFFE]),
                  st.sampled_from([USED, 0x3002, 0xFFFC]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.one_of(access, setup), max_size=40), ram=st.binary(min_size=256, max_size=256))
def test_random_register_traffic_never_raises(ops, ram):
    """Any register access sequence on a blk transport over garbage RAM is handled, never raised."""
    mem = GuestMemory.anonymous(RAM)
    for k in range(0, RAM, 256):
        mem.write(k, ram)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "d.img")
        with open(path, "wb") as f:
            f.write(b"\x5A" * 4096)
        irq = RecordingTrigger()
        with VirtioBlk(path) as blk:
            dev = R.VirtioMmioTransport(blk, mem, irq)
            for op in ops:
                if op[0] == "init":
                    _, num, desc, avail, used = op
                    for off, val in ((R.Status, R.ACKNOWLEDGE | R.DRIVER), (R.DriverFeaturesSel, 1),
                                     (R.DriverFeatures, 1), (R.Status, 0xB), (R.QueueSel, 0),
                                     (R.QueueNum, num), (R.QueueDescLow, desc),
                                     (R.QueueDriverLow, avail), (R.QueueDeviceLow, used),
                                     (R.QueueReady, 1), (R.Status, 0xF), (R.QueueNotify, 0)):
                        w(dev, off, val)
                elif op[0] == "r":
                    value = dev.read(op[1], op[2])
                    assert isinstance(value, int) and 0 <= value < 1 << 64
                else:
                    dev.write(op[1], op[2], op[3])
                state = dev.state()
                assert state["irq_level"] == (state["interrupt_status"] != 0) == irq.level
                assert state["status"] < 0x100 and state["interrupt_status"] < 4
            assert all(a != b for a, b in zip(irq.levels, irq.levels[1:]))   # only edges
        with open(path, "rb") as f:
            assert len(f.read()) == 4096


# --- save_state / load_state ---------------------------------------------------------

def fresh(mem):
    """A new transport over the same RAM, as a restore would make it."""
    irq = RecordingTrigger()
    return R.VirtioMmioTransport(FakeDevice(), mem, irq), irq


def test_save_state_is_json_and_has_every_register():
    """save_state gives the documented keys, plain JSON values, queue indices included."""
    import json
    dev, fake, mem, irq = make()
    live(dev, mem)
    offer_one(mem)
    w(dev, R.QueueNotify, 0)
    s = dev.save_state()
    assert set(s) == set(R.STATE_FIELDS) and json.loads(json.dumps(s)) == s
    assert s["status"] == ALL_OK and s["interrupt_status"] == 1 and s["irq_level"] is True
    assert s["driver_features"] == VERSION_1
    assert s["queues"][0] == {"num": 8, "ready": True, "desc": DESC, "driver": AVAIL,
                              "device": USED, "last_avail_idx": 1, "used_idx": 1}
    assert s["queues"][1]["ready"] is False and s["queues"][1]["num"] == 8


def test_load_state_round_trips_and_continues_the_ring():
    """A fresh transport loaded with a saved state saves the same state and serves the next
    request at the saved ring position, without driving the interrupt line on load."""
    dev, fake, mem, irq = make()
    live(dev, mem)
    offer_one(mem)
    w(dev, R.QueueNotify, 0)
    s = dev.save_state()
    new, irq2 = fresh(mem)
    new.load_state(s)
    assert new.save_state() == s and irq2.levels == [] and new.irq_level
    assert new.state()["queues"][0]["used_idx"] == 1
    w(new, R.InterruptACK, 1)
    assert irq2.levels == [False]
    offer_one(mem, avail_idx=2)
    w(new, R.QueueNotify, 0)
    assert struct.unpack_from("<H", mem.read(USED + 2, 2))[0] == 2
    assert mem.read(USED + 4 + 8, 4) == b"\0\0\0\0" and irq2.levels == [False, True]


def test_load_state_keeps_a_device_error():
    """DEVICE_NEEDS_RESET survives a restore (with a stand-in message) and still blocks notify."""
    dev, fake, mem, irq = make()
    live(dev, mem)
    mem.write(AVAIL, struct.pack("<HH", 0, 9))        # 9 pending on a queue of 8: driver error
    w(dev, R.QueueNotify, 0)
    s = dev.save_state()
    assert s["status"] & R.DEVICE_NEEDS_RESET and s["interrupt_status"] == 2
    new, _ = fresh(mem)
    new.load_state(s)
    assert new.last_error == R.RESTORED_ERROR and not new.live
    w(new, R.Status, 0)
    assert new.last_error is None and new.save_state()["status"] == 0


def test_load_state_accepts_a_missing_status_byte_error_with_one_chain_taken():
    """A chain taken but never returned is reachable only with DEVICE_NEEDS_RESET."""
    dev, fake, mem, irq = make()
    live(dev, mem)
    s = dev.save_state()
    s["queues"][0]["last_avail_idx"] = 1
    with pytest.raises(ValueError, match="never returned"):
        fresh(mem)[0].load_state(s)
    s["status"] |= R.DEVICE_NEEDS_RESET
    s["interrupt_status"], s["irq_level"] = 2, True
    fresh(mem)[0].load_state(s)


def _saved():
    dev, fake, mem, irq = make()
    live(dev, mem)
    return dev.save_state(), mem


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s.pop("status"), "exactly the keys"),
    (lambda s: s.update(extra=1), "exactly the keys"),
    (lambda s: s.update(status=0x100), "status"),
    (lambda s: s.update(status=-1), "status"),
    (lambda s: s.update(status="15"), "status"),
    (lambda s: s.update(status=True), "status"),
    (lambda s: s.update(driver_features=1 << 64), "driver_features"),
    (lambda s: s.update(driver_features=0), "FEATURES_OK"),
    (lambda s: s.update(driver_features=VERSION_1 | 1 << 40), "FEATURES_OK"),
    (lambda s: s.update(interrupt_status=4), "InterruptStatus"),
    (lambda s: s.update(interrupt_status=1), "irq_level"),
    (lambda s: s.update(irq_level=1), "irq_level"),
    (lambda s: s.update(queues=[]), "queues saved"),
    (lambda s: s.update(queues=None), "queues"),
    (lambda s: s["queues"][0].update(num=16), "QueueNum"),
    (lambda s: s["queues"][0].update(num=6), "power of two"),
    (lambda s: s["queues"][0].update(num=0), "QueueNum"),
    (lambda s: s["queues"][0].update(desc=DESC + 8), "aligned"),
    (lambda s: s["queues"][0].update(device=RAM - 8), "outside guest RAM"),
    (lambda s: s["queues"][0].update(driver=2**64 - 2), "outside guest RAM"),
    (lambda s: s["queues"][0].update(used_idx=0x10000), "used_idx"),
    (lambda s: s["queues"][0].update(last_avail_idx=3, used_idx=1), "never returned"),
    (lambda s: s["queues"][1].update(used_idx=1), "not ready"),
    (lambda s: s["queues"][1].pop("desc"), "exactly the keys"),
])
def test_load_state_refuses_unreachable_states_and_changes_nothing(mutate, match):
    """Edited snapshots are refused with a ValueError naming the problem; the device is untouched."""
    s, mem = _saved()
    mutate(s)
    new, irq = fresh(mem)
    before = new.save_state()
    with pytest.raises(ValueError, match=match):
        new.load_state(s)
    assert new.save_state() == before and irq.levels == []


def test_load_state_accepts_any_register_value_the_driver_could_write():
    """Selectors and a not-ready queue's registers take any 32/64-bit value, as the driver can."""
    s, mem = _saved()
    s.update(status=R.ACKNOWLEDGE | R.DRIVER, driver_features=2**64 - 1, queue_sel=0xFFFFFFFF,
             device_features_sel=7, driver_features_sel=0xFFFFFFFF)
    s["queues"][1].update(num=0xFFFFFFFF, desc=2**64 - 1, driver=3, device=1)
    new, _ = fresh(mem)
    new.load_state(s)
    assert new.save_state() == s
