"""C hygiene against hostile guests (issue 11, item 9), where it is observable.

* Configuration-space reads are bounded without integer overflow: an offset near
  2^64 reads as zero in both virtio twins, for any (offset, size).
* A failed KVM_IRQ_LINE is counted (irq_errors, irq_errno), not ignored, in the C
  UART and the C virtio-blk.
"""
import errno

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio.blk import VirtioBlk
from kvmpy.kvm.memory import GuestMemory

RAM = 0x40000
U64 = 2**64 - 1


def blk_pair(tmp_path):
    from kvmpy.vmm.native import NativeVirtioBlk
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 16)
    py = R.VirtioMmioTransport(VirtioBlk(path), GuestMemory.anonymous(RAM), RecordingTrigger())
    return py, NativeVirtioBlk(path, GuestMemory.anonymous(RAM))


OFFSETS = st.one_of(st.integers(0, U64), st.integers(R.Config - 8, R.Config + 48),
                    st.integers(U64 - 64, U64), st.sampled_from([U64, U64 - 3, U64 - 7, 2**63, 2**32 - 1]))
SIZES = st.one_of(st.sampled_from([1, 2, 4, 8]), st.integers(0, 16), st.sampled_from([2**32 - 1, 2**31]))


@settings(max_examples=500, deadline=None)
@given(accesses=st.lists(st.tuples(OFFSETS, SIZES), min_size=1, max_size=30))
def test_config_reads_agree_for_any_offset_and_size(tmp_path_factory, accesses):
    """Both twins answer every (offset, size) alike; outside the 36-byte config: 0."""
    py, c = blk_pair(tmp_path_factory.mktemp("d"))
    try:
        for off, size in accesses:
            v = c.read(off, size)
            assert v == py.read(off, size), (hex(off), size)
            if off >= R.Config and not (size in (1, 2, 4, 8) and off - R.Config + size <= 36):
                assert v == 0, (hex(off), size)
            c.write(off, size, 0xFF) if size <= 8 else None     # config writes are ignored
            py.write(off, size, 0xFF) if size <= 8 else None
    finally:
        c.close()
        py.device.close()


def test_config_read_near_2_64_is_refused(tmp_path):
    """The classic wrap: off + len past 2^64 must not look like a small, valid end."""
    py, c = blk_pair(tmp_path)
    try:
        assert c.read(R.Config, 8) == py.read(R.Config, 8) == 8      # capacity: 4096 / 512
        for off in (U64, U64 - 1, U64 - 3, U64 - 7, U64 - 8, U64 - 0xFF, 2**63):
            for size in (1, 2, 4, 8):
                assert c.read(off, size) == 0 == py.read(off, size), (hex(off), size)
    finally:
        c.close()
        py.device.close()


# --- KVM_IRQ_LINE failures ------------------------------------------------------------

def test_uart_counts_failed_irq_line():
    """No VM behind vm_fd: each level change is an ioctl failure, counted with its errno."""
    from kvmpy.vmm.native import NativeUart
    u = NativeUart(vm_fd=-1, gsi=4)
    u.write(1, 1, 0x02)          # IER: THRI
    u.write(4, 1, 0x08)          # MCR: OUT2 -> the line rises
    s = u.state()
    assert s["level"] == 1
    assert s["irq_errors"] == 1 and s["irq_errno"] == errno.EBADF
    u.read(2, 1)                 # IIR read clears THRE -> the line falls
    assert u.irq_errors == 2
    # without a line nothing is attempted, so nothing fails
    quiet = NativeUart()
    quiet.write(1, 1, 0x02)
    quiet.write(4, 1, 0x08)
    assert quiet.state()["level"] == 1 and quiet.irq_errors == 0


def test_blk_counts_failed_irq_line(tmp_path):
    """A device error with DRIVER_OK raises the config interrupt: the failed ioctl is counted."""
    from kvmpy.vmm.native import NativeVirtioBlk
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    c = NativeVirtioBlk(path, GuestMemory.anonymous(RAM), vm_fd=-1, gsi=5)
    try:
        c.write(R.Status, 4, R.ACKNOWLEDGE | R.DRIVER)
        c.write(R.DriverFeaturesSel, 4, 1)
        c.write(R.DriverFeatures, 4, 1)                  # VIRTIO_F_VERSION_1
        c.write(R.Status, 4, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)
        c.write(R.QueueNum, 4, 3)                        # not a power of two
        c.write(R.QueueReady, 4, 1)                      # -> DEVICE_NEEDS_RESET, config interrupt
        s = c.raw_state()
        assert s.level == 1 and s.status & R.DEVICE_NEEDS_RESET
        assert s.irq_errors == 1 and s.irq_errno == errno.EBADF
        c.write(R.InterruptACK, 4, R.VIRTIO_MMIO_INT_CONFIG)
        assert c.irq_errors == 2 and not c.irq_level
    finally:
        c.close()
