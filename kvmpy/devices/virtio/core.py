"""What every virtio transport shares (virtio 1.2, sections 2 and 4): the device status
state machine, feature negotiation, the per-queue registers, the interrupt status and
the interrupt line, in front of a transport-independent :class:`VirtioDevice`.

A transport (``mmio.py``, ``pci.py``) decodes its own register layout and calls a
:class:`VirtioCore` for the meaning. The rules (docs/virtio.md has them for both):

- Status: writing 0 resets the device. Any other value is masked to 8 bits and ORed
  in: the driver cannot clear a bit (only reset can) and cannot set or clear
  DEVICE_NEEDS_RESET. FEATURES_OK is refused (left clear) if the driver accepted a
  feature that is not offered or did not accept VIRTIO_F_VERSION_1 (there is no legacy
  interface). Driver feature writes are ignored once FEATURES_OK is set; feature words
  with a select value >= 2 do not exist (read 0, writes ignored).
- The device is live while Status has FEATURES_OK and DRIVER_OK and neither
  DEVICE_NEEDS_RESET nor FAILED. A notification is ignored unless the device is live
  and the notified queue is ready; an index >= the number of queues is ignored.
- Enabling a queue checks its size (a power of two, 1..queue_num_max) and the three
  ring addresses (queue.py); failure is a device error and the queue stays disabled.
  Disabling drops the queue; enabling again starts from index 0. While a queue is
  enabled, writes to its size and addresses are ignored.
- A device error (VirtqueueError) sets DEVICE_NEEDS_RESET once; with DRIVER_OK set it
  also raises a configuration change interrupt. Nothing is processed until reset.
- An interrupt (used buffers added to a queue whose driver did not set
  VIRTQ_AVAIL_F_NO_INTERRUPT, or a configuration change) goes first to the transport's
  ``deliver(kind, queue)`` hook (virtio-pci's MSI-X); if that does not take it, its bit
  is set in the interrupt status (virtio-mmio's InterruptStatus, virtio-pci's ISR) and
  the line is held at ``interrupt_status != 0`` (``trigger.set_level`` on changes only).
- Saved state: the same JSON-able dict for every transport (``STATE_FIELDS``);
  :func:`check_state` says which states are loadable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

from ...kvm.memory import GuestMemory
from ..irq import NullTrigger, Trigger
from .queue import VirtQueue, VirtqueueError

# --- device status bits (section 2.1) ---------------------------------------------
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80

# --- InterruptStatus bits ---------------------------------------------------------------
VIRTIO_MMIO_INT_VRING = 1           # used buffer notification
VIRTIO_MMIO_INT_CONFIG = 2          # configuration change notification

# --- device-independent feature bits (section 6) ---------------------------------------
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

_U32 = 0xFFFF_FFFF
_CONFIG_WIDTHS = (1, 2, 4, 8)

# --- saved state (save_state / load_state) ------------------------------------------------
# Key -> bits of its unsigned value, or bool. The transport's registers:
STATE_FIELDS = {"status": 8, "device_features_sel": 32, "driver_features_sel": 32,
                "driver_features": 64, "queue_sel": 32, "interrupt_status": 32,
                "irq_level": bool, "queues": list}
# ... and each entry of "queues":
QUEUE_STATE_FIELDS = {"num": 32, "ready": bool, "desc": 64, "driver": 64, "device": 64,
                      "last_avail_idx": 16, "used_idx": 16}
# The error message is not saved (it differs between the C and Python models); a
# state restored with DEVICE_NEEDS_RESET set records this one instead.
RESTORED_ERROR = "DEVICE_NEEDS_RESET restored from a saved state"


def _check_fields(d, fields: dict, what: str) -> None:
    if not isinstance(d, dict) or set(d) != set(fields):
        got = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"virtio state: {what} must have exactly the keys {sorted(fields)}, got {got}")
    for key, kind in fields.items():
        v = d[key]
        if kind is bool or kind is list:
            if type(v) is not kind:
                raise ValueError(f"virtio state: {what}[{key!r}] must be a {kind.__name__}, got {v!r}")
        elif type(v) is not int or not 0 <= v < 1 << kind:
            raise ValueError(f"virtio state: {what}[{key!r}] must be an integer in 0..2**{kind}-1, got {v!r}")


def check_state_shape(state, num_queues: int) -> None:
    """ValueError unless ``state`` has every key, of the right type and width, and no other."""
    _check_fields(state, STATE_FIELDS, "state")
    if len(state["queues"]) != num_queues:
        raise ValueError(f"virtio state: {len(state['queues'])} queues saved, the device has {num_queues}")
    for i, q in enumerate(state["queues"]):
        _check_fields(q, QUEUE_STATE_FIELDS, f"queues[{i}]")


def check_state(state, device_features: int, num_queues: int, queue_num_max: int,
                mem: GuestMemory) -> list[VirtQueue | None]:
    """Validate a saved transport state (hostile input: a snapshot file can be edited).

    A state is accepted only if the transport could have reached it: FEATURES_OK
    only with acceptable driver features (a subset of ``device_features`` including
    VIRTIO_F_VERSION_1); InterruptStatus only bits 0 and 1, and the line level
    equal to ``InterruptStatus != 0``; a ready queue passes every QueueReady check
    (QueueNum a power of two in 1..queue_num_max, aligned rings inside guest RAM)
    and has returned every chain it took (``last_avail_idx == used_idx``), except
    one more taken when a driver error set DEVICE_NEEDS_RESET; a queue that is not
    ready has both indices 0. Returns the live queues to install (None: not ready);
    raises ValueError saying what is wrong. csrc/virtio_blk.c applies the same rules.
    """
    check_state_shape(state, num_queues)
    status, feats = state["status"], state["driver_features"]
    if status & FEATURES_OK and (feats & ~device_features or not feats >> VIRTIO_F_VERSION_1 & 1):
        raise ValueError(f"virtio state: FEATURES_OK with driver features {feats:#x} the device "
                         f"would have refused (offered {device_features:#x})")
    irq = state["interrupt_status"]
    if irq & ~(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG):
        raise ValueError(f"virtio state: InterruptStatus {irq:#x} has bits other than 0 and 1")
    if state["irq_level"] != (irq != 0):
        raise ValueError(f"virtio state: irq_level {state['irq_level']} does not match "
                         f"InterruptStatus {irq:#x}")
    live = []
    for i, q in enumerate(state["queues"]):
        if not q["ready"]:
            if q["last_avail_idx"] or q["used_idx"]:
                raise ValueError(f"virtio state: queue {i} is not ready but has ring indices")
            live.append(None)
            continue
        if not 1 <= q["num"] <= queue_num_max:
            raise ValueError(f"virtio state: queue {i} QueueNum {q['num']} is not in 1..{queue_num_max}")
        try:
            vq = VirtQueue(mem, q["num"], q["desc"], q["driver"], q["device"])
        except VirtqueueError as e:
            raise ValueError(f"virtio state: queue {i}: {e}") from None
        taken = (q["last_avail_idx"] - q["used_idx"]) & 0xFFFF
        if taken > (1 if status & DEVICE_NEEDS_RESET else 0):
            raise ValueError(f"virtio state: queue {i} took {taken} chains it never returned "
                             f"(last_avail_idx {q['last_avail_idx']}, used_idx {q['used_idx']})")
        vq.last_avail_idx, vq.used_idx = q["last_avail_idx"], q["used_idx"]
        live.append(vq)
    return live


@runtime_checkable
class VirtioDevice(Protocol):
    """What the transport needs from a device model."""

    device_id: int          # DeviceID (virtio 1.2 section 5: 2 = block)
    device_features: int    # the 64 feature bits offered
    num_queues: int
    queue_num_max: int      # QueueNumMax of every queue
    config_size: int        # bytes of device-specific configuration space

    def read_config(self, offset: int, size: int) -> int: ...

    def write_config(self, offset: int, size: int, value: int) -> None: ...

    def notify(self, queue_index: int, queue: VirtQueue) -> None:
        """Process available buffers of ``queue``; may raise VirtqueueError."""

    def reset(self) -> None: ...


@dataclass
class QueueRegisters:
    """The per-queue registers as the driver wrote them, and the live queue if ready."""

    num: int
    desc: int = 0
    driver: int = 0
    device: int = 0
    live: VirtQueue | None = None

    @property
    def ready(self) -> bool:
        return self.live is not None


class OverCore:
    """What every transport answers from its ``core`` (a VirtioCore) the same way: host-side
    queue notifications (the disk timer's, the network thread's, vsock's host side: what a
    guest's notify does), and whether the device is live and why not."""

    core: "VirtioCore"

    def notify_queue(self, index: int) -> None:
        self.core.notify(index)

    @property
    def live(self) -> bool:
        """FEATURES_OK and DRIVER_OK set, DEVICE_NEEDS_RESET and FAILED clear."""
        return self.core.live

    @property
    def last_error(self) -> str | None:
        return self.core.last_error


class VirtioCore:
    """The transport-independent half of a virtio transport (see the module docstring).

    ``deliver(kind, queue_index)``, if given, is asked first for every interrupt
    (``kind``: VIRTIO_MMIO_INT_VRING with the queue's index, or VIRTIO_MMIO_INT_CONFIG
    with None); it returns True if it delivered it some other way (MSI-X).
    """

    def __init__(self, device: VirtioDevice, mem: GuestMemory, trigger: Trigger | None = None,
                 deliver: Callable[[int, int | None], bool] | None = None):
        self.device = device
        self.mem = mem
        self.trigger = trigger if trigger is not None else NullTrigger()
        self.deliver = deliver
        self._level = False
        self.last_error: str | None = None
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.queues = [QueueRegisters(num=device.queue_num_max) for _ in range(device.num_queues)]

    # --- state -----------------------------------------------------------------
    @property
    def irq_level(self) -> bool:
        """The level last driven on the interrupt line."""
        return self._level

    @property
    def live(self) -> bool:
        """FEATURES_OK and DRIVER_OK set, DEVICE_NEEDS_RESET and FAILED clear."""
        want = FEATURES_OK | DRIVER_OK
        return self.status & (want | DEVICE_NEEDS_RESET | FAILED) == want

    def state(self) -> dict:
        """Every register and queue index, for snapshots and debugging."""
        return {**self.save_state(), "device_id": self.device.device_id,
                "device_features": self.device.device_features, "config_generation": 0,
                "last_error": self.last_error}

    def save_state(self) -> dict:
        """The registers and ring indices as a JSON-able dict (keys: STATE_FIELDS).

        I/O is synchronous (a notification is fully served before the write returns),
        so there are never requests in flight inside the device at a save point.
        The disk's identity (path, readonly, capacity) is not included.
        """
        return {
            "status": self.status,
            "device_features_sel": self.device_features_sel,
            "driver_features_sel": self.driver_features_sel,
            "driver_features": self.driver_features,
            "queue_sel": self.queue_sel,
            "interrupt_status": self.interrupt_status,
            "irq_level": self._level,
            "queues": [{
                "num": q.num, "ready": q.ready, "desc": q.desc, "driver": q.driver,
                "device": q.device,
                "last_avail_idx": q.live.last_avail_idx if q.live else 0,
                "used_idx": q.live.used_idx if q.live else 0,
            } for q in self.queues],
        }

    def load_state(self, state: dict) -> None:
        """Restore :meth:`save_state` output; ValueError (changing nothing) if it is not
        a state this transport could reach (see :func:`check_state`).

        The interrupt level is recorded, not driven: the interrupt controller's
        state is restored separately and already has the line at that level.
        """
        live = check_state(state, self.device.device_features, len(self.queues),
                           self.device.queue_num_max, self.mem)
        self.status = state["status"]
        self.device_features_sel = state["device_features_sel"]
        self.driver_features_sel = state["driver_features_sel"]
        self.driver_features = state["driver_features"]
        self.queue_sel = state["queue_sel"]
        self.interrupt_status = state["interrupt_status"]
        self._level = state["irq_level"]
        self.last_error = RESTORED_ERROR if self.status & DEVICE_NEEDS_RESET else None
        self.queues = [QueueRegisters(num=q["num"], desc=q["desc"], driver=q["driver"],
                                      device=q["device"], live=vq)
                       for q, vq in zip(state["queues"], live)]
        restored = getattr(self.device, "restored", None)   # what the model keeps unsaved goes
        if restored is not None:
            restored()

    def reset(self) -> None:
        """What writing 0 to the status does: back to the power-on state."""
        self.status = 0
        self.device_features_sel = self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.last_error = None
        self.queues = [QueueRegisters(num=self.device.queue_num_max) for _ in self.queues]
        self.interrupt_status = 0
        self.device.reset()
        self.update_irq()

    # --- what the transports call -------------------------------------------------
    def selected(self) -> QueueRegisters | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def device_feature_word(self) -> int:
        return self._feature_word(self.device.device_features, self.device_features_sel)

    def driver_feature_word(self) -> int:
        return self._feature_word(self.driver_features, self.driver_features_sel)

    @staticmethod
    def _feature_word(features: int, sel: int) -> int:
        return (features >> (32 * sel)) & _U32 if sel < 2 else 0

    def write_driver_features(self, value: int) -> None:
        if self.status & FEATURES_OK or self.driver_features_sel >= 2:
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(_U32 << shift)) | ((value & _U32) << shift)

    def write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        new = value & 0xFF & ~DEVICE_NEEDS_RESET
        if new & FEATURES_OK and not self.status & FEATURES_OK and not self._features_acceptable():
            new &= ~FEATURES_OK
        self.status |= new

    def _features_acceptable(self) -> bool:
        feats = self.driver_features
        return not feats & ~self.device.device_features and bool(feats >> VIRTIO_F_VERSION_1 & 1)

    def set_queue_ready(self, ready: bool) -> None:
        """Enable (checking the registers) or drop the selected queue."""
        q = self.selected()
        if q is None:
            return
        if not ready:
            q.live = None
        elif not q.ready:
            self._enable(q)

    def set_queue_field(self, name: str, value: int, shift: int = 0, bits: int = 64) -> None:
        """Write ``bits`` bits at ``shift`` of the selected queue's ``num``/``desc``/``driver``/
        ``device`` register; ignored while the queue is enabled."""
        q = self.selected()
        if q is None or q.ready:
            return                            # the driver MUST NOT touch these while ready
        mask = ((1 << bits) - 1) << shift
        setattr(q, name, (getattr(q, name) & ~mask) | ((value << shift) & mask))

    def _enable(self, q: QueueRegisters) -> None:
        if not 1 <= q.num <= self.device.queue_num_max:
            self.device_error(f"QueueNum {q.num} is not in 1..{self.device.queue_num_max}")
            return
        try:
            q.live = VirtQueue(self.mem, q.num, q.desc, q.driver, q.device)
        except VirtqueueError as e:
            self.device_error(str(e))

    def notify(self, index: int) -> None:
        """The driver notified queue ``index``: run the device on it, then interrupt if due."""
        if not self.live or index >= len(self.queues):
            return
        vq = self.queues[index].live
        if vq is None:
            return
        before = vq.used_count
        try:
            self.device.notify(index, vq)
        except VirtqueueError as e:
            self.device_error(str(e))
        if vq.used_count != before and not vq.interrupts_suppressed():
            self.interrupt(VIRTIO_MMIO_INT_VRING, index)

    def device_error(self, reason: str) -> None:
        if self.status & DEVICE_NEEDS_RESET:
            return
        self.last_error = reason
        self.status |= DEVICE_NEEDS_RESET
        if self.status & DRIVER_OK:
            self.interrupt(VIRTIO_MMIO_INT_CONFIG, None)

    def interrupt(self, kind: int, queue: int | None) -> None:
        if self.deliver is not None and self.deliver(kind, queue):
            return
        self.interrupt_status |= kind
        self.update_irq()

    def acknowledge(self, bits: int) -> None:
        """Clear ``bits`` of the interrupt status (InterruptACK; reading virtio-pci's ISR)."""
        self.interrupt_status &= ~bits
        self.update_irq()

    def _config_fits(self, offset: int, size: int) -> bool:
        """[offset, offset+size) inside the configuration space; written as the C twin
        must write it (virtio_blk.c reg_read), where offset + size could wrap past 2^64."""
        limit = self.device.config_size
        return size <= limit and offset <= limit - size

    def read_config(self, offset: int, size: int) -> int:
        if size not in _CONFIG_WIDTHS or not self._config_fits(offset, size):
            return 0
        return self.device.read_config(offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        if size not in _CONFIG_WIDTHS or not self._config_fits(offset, size):
            return
        self.device.write_config(offset, size, value & ((1 << (8 * size)) - 1))

    def update_irq(self) -> None:
        level = self.interrupt_status != 0
        if level != self._level:
            self._level = level
            self.trigger.set_level(level)
