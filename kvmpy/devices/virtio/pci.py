"""The virtio-pci transport, modern interface only (virtio 1.2, section 4.1).

A virtio device is a PCI function: vendor 0x1af4, device 0x1040 + the virtio device ID,
revision 1 (no legacy interface, no transitional ID). Its registers live in memory BAR 0
(32-bit, 32 KiB), found through vendor-specific capabilities (ID 0x09, ``struct
virtio_pci_cap``) in its configuration space:

    BAR 0 offset   capability          what
    0x0000         COMMON (type 1)     struct virtio_pci_common_cfg (0x38 bytes: no
                                       queue_notify_data, no queue_reset)
    0x1000         ISR (type 3)        one byte: bit 0 queue, bit 1 configuration;
                                       reading it clears it and lowers INTx
    0x2000         DEVICE (type 4)     the device's configuration space (when it has one)
    0x3000         NOTIFY (type 2)     queue i at 0x3000 + 4 * i (notify_off_multiplier 4)
    0x4000         (MSI-X table)       one vector per queue plus one for configuration
    0x5000         (MSI-X PBA)

plus a PCI_CFG capability (type 5), the configuration-space window onto the BAR that the
spec requires (4.1.4.9): the driver sets its bar, offset and length, and reading or
writing ``pci_cfg_data`` accesses the BAR there.

The meaning of every register is core.py's (shared with virtio-mmio). What this file adds:

- **Common configuration**: each field answers an access of its own width at its own
  offset; the 64-bit ring addresses also as two aligned dwords. Anything else reads 0
  and is ignored. ``queue_size`` of a queue that does not exist reads 0;
  ``queue_notify_off`` is the queue's index. ``queue_msix_vector`` and
  ``config_msix_vector`` take a vector below the table size or NO_VECTOR (0xffff);
  anything else stores NO_VECTOR, which is what the driver reads back to learn the
  mapping failed. A device reset sets every vector to NO_VECTOR.
- **Interrupts**: with MSI-X enabled, a queue or configuration event goes to its vector
  (NO_VECTOR: none), and the ISR is not touched; otherwise the ISR bit is set and INTx
  asserted while the ISR is non-zero (Command's INTx disable applies).
- **Notifications**: a write of any width into queue i's notify slot notifies queue i.
- **Bus mastering** is not enforced: a driver that clears Command.BusMaster still has
  its rings served (every address is checked against guest RAM either way).
- **Saved state**: ``{"virtio": <core.py's state>, "pci": <configuration space>,
  "msix": <table and pending bits>, "config_vector": n, "queue_vectors": [...]}``;
  ``load_state`` checks all of it before changing anything.
"""
from __future__ import annotations

import struct

from ...kvm.memory import GuestMemory
from ..pci.config import Bar, PciFunction
from ..pci.msix import MsiSink, Msix
from .core import OverCore, VirtioCore, VirtioDevice

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_DEVICE_BASE = 0x1040          # + virtio device ID: a modern-only device
VIRTIO_PCI_REVISION = 1
VIRTIO_PCI_SUBSYSTEM_BASE = 0x40         # "0x40 or higher" for non-transitional devices
PCI_CAP_ID_VNDR = 0x09

# cfg_type of struct virtio_pci_cap (4.1.4)
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

NO_VECTOR = 0xFFFF

# BAR 0
BAR_INDEX = 0
BAR_SIZE = 0x8000
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x38
ISR_OFFSET, ISR_SIZE = 0x1000, 1
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000
REGION = 0x1000                          # each region's span in the BAR

# struct virtio_pci_common_cfg: offset -> (field, width)
device_feature_select, device_feature = 0x00, 0x04
driver_feature_select, driver_feature = 0x08, 0x0C
config_msix_vector, num_queues = 0x10, 0x12
device_status, config_generation = 0x14, 0x15
queue_select, queue_size, queue_msix_vector = 0x16, 0x18, 0x1A
queue_enable, queue_notify_off = 0x1C, 0x1E
queue_desc, queue_driver, queue_device = 0x20, 0x28, 0x30
COMMON_FIELDS = {0x00: 4, 0x04: 4, 0x08: 4, 0x0C: 4, 0x10: 2, 0x12: 2, 0x14: 1, 0x15: 1, 0x16: 2,
                 0x18: 2, 0x1A: 2, 0x1C: 2, 0x1E: 2, 0x20: 8, 0x28: 8, 0x30: 8}
_RINGS = {queue_desc: "desc", queue_driver: "driver", queue_device: "device"}

# PCI class codes (base, sub, interface) by virtio device ID: storage, network, else "other"
_CLASS = {1: 0x020000, 2: 0x018000}
_CLASS_OTHER = 0xFF0000
PCI_CFG_DATA = 16                        # pci_cfg_data's offset in the PCI_CFG capability


class _Intx:
    """The core's interrupt line, as the function's INTx#."""

    def __init__(self, config: PciFunction):
        self.config = config

    def set_level(self, level: bool) -> None:
        self.config.set_intx(level)


def _virtio_cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """The body of a struct virtio_pci_cap after cap_vndr and cap_next."""
    return struct.pack("<BBBB2xII", 16 + len(extra), cfg_type, BAR_INDEX, 0, offset, length) + extra


class VirtioPciFunction(OverCore):
    """A :class:`VirtioDevice` as a PCI function (see the module docstring). ``intx`` is its
    INTA# line, ``msi`` where its MSI-X messages go."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, intx=None, msi: MsiSink | None = None):
        self.device = device
        self.config = PciFunction(VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BASE + device.device_id,
                                  _CLASS.get(device.device_id, _CLASS_OTHER), revision=VIRTIO_PCI_REVISION,
                                  subsystem_vendor=VIRTIO_PCI_VENDOR,
                                  subsystem=VIRTIO_PCI_SUBSYSTEM_BASE + device.device_id, intx=intx)
        self.config.add_bar(BAR_INDEX, Bar(BAR_SIZE))
        self.core = VirtioCore(device, mem, _Intx(self.config), deliver=self._deliver)
        self.msix = Msix(device.num_queues + 1, msi)
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * device.num_queues
        c = self.config
        c.add_capability(PCI_CAP_ID_VNDR, _virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE))
        c.add_capability(PCI_CAP_ID_VNDR, _virtio_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER * device.num_queues,
            struct.pack("<I", NOTIFY_OFF_MULTIPLIER)))
        c.add_capability(PCI_CAP_ID_VNDR, _virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE))
        if device.config_size:
            c.add_capability(PCI_CAP_ID_VNDR, _virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET,
                                                          device.config_size))
        # PCI_CFG: bar, offset and length writable; pci_cfg_data is served by config_read/write
        self.pci_cfg = c.add_capability(PCI_CAP_ID_VNDR, _virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bytes(4)),
                                        wmask=b"\0\0\xff\0\0\0" + b"\xff" * 8)
        self.msix.add_to(c, BAR_INDEX, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET)
        if device.config_size > REGION or device.num_queues * NOTIFY_OFF_MULTIPLIER > REGION or \
                self.msix.table_size > REGION:
            raise ValueError("the device does not fit virtio-pci's BAR layout")

    # --- configuration space (the PCI host calls these) ------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        data = self.pci_cfg + PCI_CFG_DATA
        if data <= offset < data + 4 and size in (1, 2, 4) and offset + size <= data + 4:
            bar, off, length = self._pci_cfg_window()
            if bar == BAR_INDEX and length in (1, 2, 4):
                return self.bar_read(BAR_INDEX, off, length) >> (8 * (offset - data)) & ((1 << (8 * size)) - 1)
            return 0
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        data = self.pci_cfg + PCI_CFG_DATA
        if data <= offset < data + 4:
            bar, off, length = self._pci_cfg_window()
            if offset == data and size == length and bar == BAR_INDEX and length in (1, 2, 4):
                self.bar_write(BAR_INDEX, off, length, value)
            return
        control = self.msix.cap + 2
        self.config.write(offset, size, value)
        if offset < control + 2 and offset + size > control:
            self.msix.release_pending()

    def _pci_cfg_window(self) -> tuple[int, int, int]:
        c = self.config
        return c.data[self.pci_cfg + 4], c.word(self.pci_cfg + 8, 4), c.word(self.pci_cfg + 12, 4)

    # --- BAR 0 -----------------------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index != BAR_INDEX:
            return 0
        region, off = offset & ~(REGION - 1), offset & (REGION - 1)
        if region == COMMON_OFFSET:
            return self._common_read(off, size)
        if region == ISR_OFFSET:
            if off != 0:
                return 0
            isr = self.core.interrupt_status & 0xFF
            self.core.acknowledge(0xFF)     # reading the ISR clears it and lowers INTx
            return isr
        if region == DEVICE_OFFSET:
            return self.core.read_config(off, size)
        if region == MSIX_TABLE_OFFSET:
            return self.msix.table_read(off, size)
        if region == MSIX_PBA_OFFSET:
            return self.msix.pba_read(off, size)
        return 0                            # the notify region reads 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index != BAR_INDEX:
            return
        region, off = offset & ~(REGION - 1), offset & (REGION - 1)
        if region == COMMON_OFFSET:
            self._common_write(off, size, value)
        elif region == DEVICE_OFFSET:
            self.core.write_config(off, size, value)
        elif region == NOTIFY_OFFSET:
            self.core.notify(off // NOTIFY_OFF_MULTIPLIER)
        elif region == MSIX_TABLE_OFFSET:
            self.msix.table_write(off, size, value)

    # --- common configuration ------------------------------------------------------------------
    @staticmethod
    def _field(offset: int, size: int) -> tuple[int, int] | None:
        """(field offset, shift) of an access the common configuration answers."""
        width = COMMON_FIELDS.get(offset)
        if width == size:
            return offset, 0
        if size == 4 and COMMON_FIELDS.get(offset - 4) == 8:
            return offset - 4, 32
        if size == 4 and width == 8:
            return offset, 0
        return None

    def _common_read(self, offset: int, size: int) -> int:
        f = self._field(offset, size)
        if f is None:
            return 0
        field, shift = f
        core, q = self.core, self.core.selected()
        if field in _RINGS:
            return (getattr(q, _RINGS[field]) >> shift & ((1 << (8 * size)) - 1)) if q else 0
        value = {
            device_feature_select: lambda: core.device_features_sel,
            device_feature: core.device_feature_word,
            driver_feature_select: lambda: core.driver_features_sel,
            driver_feature: core.driver_feature_word,
            config_msix_vector: lambda: self.config_vector,
            num_queues: lambda: self.device.num_queues,
            device_status: lambda: core.status,
            config_generation: lambda: 0,
            queue_select: lambda: core.queue_sel & 0xFFFF,
            queue_size: lambda: q.num & 0xFFFF if q else 0,
            queue_msix_vector: lambda: self.queue_vectors[core.queue_sel] if q else NO_VECTOR,
            queue_enable: lambda: int(q.ready) if q else 0,
            queue_notify_off: lambda: core.queue_sel & 0xFFFF if q else 0,
        }[field]()
        return value

    def _common_write(self, offset: int, size: int, value: int) -> None:
        f = self._field(offset, size)
        if f is None:
            return
        field, shift = f
        value &= (1 << (8 * size)) - 1
        core = self.core
        if field in _RINGS:
            core.set_queue_field(_RINGS[field], value, shift, 8 * size)
        elif field == device_feature_select:
            core.device_features_sel = value
        elif field == driver_feature_select:
            core.driver_features_sel = value
        elif field == driver_feature:
            core.write_driver_features(value)
        elif field == config_msix_vector:
            self.config_vector = self._vector(value)
        elif field == device_status:
            core.write_status(value)
            if value == 0:
                self.config_vector = NO_VECTOR
                self.queue_vectors = [NO_VECTOR] * len(self.queue_vectors)
        elif field == queue_select:
            core.queue_sel = value
        elif field == queue_size:
            core.set_queue_field("num", value, 0, 32)
        elif field == queue_msix_vector:
            if core.selected() is not None:
                self.queue_vectors[core.queue_sel] = self._vector(value)
        elif field == queue_enable:
            core.set_queue_ready(bool(value))
        # device_feature, num_queues, config_generation, queue_notify_off: read-only

    def _vector(self, value: int) -> int:
        return value if value < self.msix.vectors else NO_VECTOR

    # --- interrupts ----------------------------------------------------------------------------
    def _deliver(self, kind: int, queue: int | None) -> bool:
        if not self.msix.enabled:
            return False                    # the ISR and INTx
        vector = self.config_vector if queue is None else self.queue_vectors[queue]
        if vector != NO_VECTOR:
            self.msix.fire(vector)
        return True

    # --- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {**self.core.state(), "config_vector": self.config_vector, "queue_vectors": list(self.queue_vectors),
                "msix_enabled": self.msix.enabled}

    def save_state(self) -> dict:
        return {"virtio": self.core.save_state(), "pci": self.config.save_state(), "msix": self.msix.save_state(),
                "config_vector": self.config_vector, "queue_vectors": list(self.queue_vectors)}

    def load_state(self, state: dict) -> None:
        """Restore :meth:`save_state` output; ValueError (changing nothing) if any part is bad."""
        keys = {"virtio", "pci", "msix", "config_vector", "queue_vectors"}
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"virtio-pci state: expected the keys {sorted(keys)}")
        vectors = [state["config_vector"], *state["queue_vectors"]] if isinstance(state["queue_vectors"], list) else []
        if len(vectors) != 1 + len(self.queue_vectors) or any(
                type(v) is not int or not (v == NO_VECTOR or 0 <= v < self.msix.vectors) for v in vectors):
            raise ValueError("virtio-pci state: bad MSI-X vector numbers")
        self.config.check_state(state["pci"])
        self.msix.check_state(state["msix"])
        self.core.load_state(state["virtio"])          # checks, then changes (or raises, changing nothing)
        self.config.load_state(state["pci"])
        self.msix.load_state(state["msix"])
        self.config_vector, self.queue_vectors = vectors[0], vectors[1:]
