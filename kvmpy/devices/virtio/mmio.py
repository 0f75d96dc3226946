"""The virtio-mmio transport, version 2 register layout (virtio 1.2, section 4.2).

One 4 KiB window per device: control registers at 0x000-0x0ff, the device-specific
configuration space from 0x100. The transport owns everything generic: device
status and its state machine, feature negotiation, the per-queue registers, the
interrupt status and the interrupt line. The device model behind it
(:class:`VirtioDevice`, e.g. ``VirtioBlk``) only supplies its ID, features,
configuration space and what to do when a queue is notified.

Decisions where the spec leaves room (each also in docs/virtio.md):

- Control registers answer only 32-bit accesses at 4-byte-aligned offsets (the
  driver MUST use those). Any other width or offset, a read of a write-only
  register and an offset no register lives at read 0; such writes, and writes to
  read-only registers, are ignored. The configuration space accepts widths 1, 2,
  4 and 8 at any alignment when the access lies inside it; otherwise reads are 0
  and writes ignored.
The transport-independent rules (status, features, queues, device errors,
interrupts, saved state) are core.py's, shared with virtio-pci; here they read:

- Status: writing 0 resets the device. Any other value is masked to 8 bits and
  ORed in: the driver cannot clear a bit (only reset can) and cannot set or clear
  DEVICE_NEEDS_RESET. FEATURES_OK is refused (left clear) if the driver accepted
  a feature that is not offered or did not accept VIRTIO_F_VERSION_1 (we are not
  a legacy device). DriverFeatures writes are ignored once FEATURES_OK is set;
  feature words with a select value >= 2 do not exist (read 0, writes ignored).
- The device is live while Status has FEATURES_OK and DRIVER_OK and neither
  DEVICE_NEEDS_RESET nor FAILED. QueueNotify is ignored unless the device is live
  and the notified queue is ready; the value is the queue index (no
  VIRTIO_F_NOTIFICATION_DATA), an index >= the number of queues is ignored.
- QueueReady: a non-zero write makes the queue live, checking QueueNum (a power
  of two, 1..QueueNumMax) and the three ring addresses (see queue.py); failure is
  a device error and the queue stays not ready. Reads give 1 or 0. Writing 0
  drops the queue; making it ready again starts from avail/used index 0. While a
  queue is ready, writes to its QueueNum and ring address registers are ignored.
  QueueNum starts at QueueNumMax after reset.
- A device error (VirtqueueError from the queue or the device) sets
  DEVICE_NEEDS_RESET once; if DRIVER_OK is set it also raises a configuration
  change interrupt (InterruptStatus bit 1). Nothing is processed until reset.
- Notification: ``QueueNotify`` runs ``device.notify(index, queue)`` synchronously.
  If that added used buffers (even if it then failed) and the driver did not set
  VIRTQ_AVAIL_F_NO_INTERRUPT (read once, after processing), InterruptStatus bit 0
  is set. The line level is always ``InterruptStatus != 0``; ``trigger.set_level``
  is called only when it changes.
- Snapshots: ``save_state``/``load_state`` give and take the registers and ring
  indices as a JSON-able dict (the C twin uses the same form; see
  :func:`check_state` for what a loadable state is). Requests complete
  synchronously, so nothing is ever in flight inside the device at a save point.
- ConfigGeneration is always 0: nothing in the configuration changes at run time.
  VendorID is 0x706d766b ("kvmp"). The shared-memory registers report "no such
  region" (length and base all ones); QueueReset is absent (VIRTIO_F_RING_RESET is
  never offered).
"""
from __future__ import annotations

from ...kvm.memory import GuestMemory
from ..irq import Trigger
from .core import (ACKNOWLEDGE, OverCore, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,  # noqa: F401 (re-exported)
                   QUEUE_STATE_FIELDS, RESTORED_ERROR, STATE_FIELDS, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
                   VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, QueueRegisters, VirtioCore,
                   VirtioDevice, check_state, check_state_shape)

# --- register offsets (spec names) -----------------------------------------------
MagicValue = 0x000
Version = 0x004
DeviceID = 0x008
VendorID = 0x00C
DeviceFeatures = 0x010
DeviceFeaturesSel = 0x014
DriverFeatures = 0x020
DriverFeaturesSel = 0x024
QueueSel = 0x030
QueueNumMax = 0x034
QueueNum = 0x038
QueueReady = 0x044
QueueNotify = 0x050
InterruptStatus = 0x060
InterruptACK = 0x064
Status = 0x070
QueueDescLow = 0x080
QueueDescHigh = 0x084
QueueDriverLow = 0x090
QueueDriverHigh = 0x094
QueueDeviceLow = 0x0A0
QueueDeviceHigh = 0x0A4
SHMSel = 0x0AC
SHMLenLow = 0x0B0
SHMLenHigh = 0x0B4
SHMBaseLow = 0x0B8
SHMBaseHigh = 0x0BC
QueueReset = 0x0C0
ConfigGeneration = 0x0FC
Config = 0x100

VIRTIO_MMIO_MAGIC = 0x74726976      # "virt" little-endian
VIRTIO_MMIO_VERSION = 2             # non-legacy layout
VIRTIO_MMIO_VENDOR = 0x706D766B     # "kvmp" little-endian; the spec leaves it to us

_U32 = 0xFFFF_FFFF


class VirtioMmioTransport(OverCore):
    """virtio-mmio v2 register machine in front of a :class:`VirtioDevice` (the meaning of
    each register is :class:`~kvmpy.devices.virtio.core.VirtioCore`'s)."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, trigger: Trigger | None = None):
        self.core = VirtioCore(device, mem, trigger)
        self.device, self.mem, self.trigger = device, mem, self.core.trigger

    # --- Device protocol ---------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        core = self.core
        if offset >= Config:
            return core.read_config(offset - Config, size)
        if size != 4 or offset % 4:
            return 0
        if offset == MagicValue:
            return VIRTIO_MMIO_MAGIC
        if offset == Version:
            return VIRTIO_MMIO_VERSION
        if offset == DeviceID:
            return self.device.device_id
        if offset == VendorID:
            return VIRTIO_MMIO_VENDOR
        if offset == DeviceFeatures:
            return core.device_feature_word()
        if offset == QueueNumMax:
            return self.device.queue_num_max if core.selected() else 0
        if offset == QueueReady:
            q = core.selected()
            return int(q is not None and q.ready)
        if offset == InterruptStatus:
            return core.interrupt_status
        if offset == Status:
            return core.status
        if offset in (SHMLenLow, SHMLenHigh, SHMBaseLow, SHMBaseHigh):
            return _U32           # "no such region": length -1, base all ones
        if offset == ConfigGeneration:
            return 0
        return 0                  # write-only or unassigned

    def write(self, offset: int, size: int, value: int) -> None:
        core = self.core
        if offset >= Config:
            core.write_config(offset - Config, size, value)
            return
        if size != 4 or offset % 4:
            return
        value &= _U32
        if offset == DeviceFeaturesSel:
            core.device_features_sel = value
        elif offset == DriverFeatures:
            core.write_driver_features(value)
        elif offset == DriverFeaturesSel:
            core.driver_features_sel = value
        elif offset == QueueSel:
            core.queue_sel = value
        elif offset == QueueNotify:
            core.notify(value)
        elif offset == InterruptACK:
            core.acknowledge(value)
        elif offset == Status:
            core.write_status(value)
        elif offset == QueueReady:
            core.set_queue_ready(bool(value))
        elif offset == QueueNum:
            core.set_queue_field("num", value, 0, 32)
        elif offset in _QUEUE_FIELDS:
            name, high = _QUEUE_FIELDS[offset]
            core.set_queue_field(name, value, 32 if high else 0, 32)
        # everything else: read-only, reserved or unassigned -> ignored

    # --- state (core.py's) --------------------------------------------------------

    @property
    def irq_level(self) -> bool:
        """The level last driven on the interrupt line."""
        return self.core.irq_level

    @property
    def status(self) -> int:
        return self.core.status

    @property
    def interrupt_status(self) -> int:
        return self.core.interrupt_status

    @property
    def queues(self) -> list[QueueRegisters]:
        return self.core.queues

    def state(self) -> dict:
        return self.core.state()

    def save_state(self) -> dict:
        return self.core.save_state()

    def load_state(self, state: dict) -> None:
        self.core.load_state(state)

    def reset(self) -> None:
        self.core.reset()


# Ring address registers: offset -> (QueueRegisters field, is the high word)
_QUEUE_FIELDS = {
    QueueDescLow: ("desc", False), QueueDescHigh: ("desc", True),
    QueueDriverLow: ("driver", False), QueueDriverHigh: ("driver", True),
    QueueDeviceLow: ("device", False), QueueDeviceHigh: ("device", True),
}
