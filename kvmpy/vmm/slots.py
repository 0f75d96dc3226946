"""What a slot of the platform is: the user's device specs (``Disk``, ``Vsock``), and the
small wrappers every builder uses: an interrupt line on a GSI, a device behind a lock, the
held-back requests of a rate-limited Python device, and the ``Slot`` itself."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..devices.ratelimit import Limits, parse_amount

_LIMITS = ("iops", "bps", "fps", "iops_burst", "bps_burst")


@dataclass(frozen=True)
class Disk:
    """A disk for the guest: a host file (or block device) exposed as virtio-blk.

    ``Disk.parse("PATH[,ro][,iops=N][,bps=N][,fps=N]")`` reads the CLI form. The file is
    never created, truncated or grown; ``readonly`` opens it O_RDONLY and offers
    VIRTIO_BLK_F_RO. ``iops``, ``bps`` and ``fps`` limit requests, data bytes and
    flushes per second (token buckets holding one second's worth, full at the start;
    ``iops_burst``/``bps_burst`` add one-time extra tokens); amounts may be ints or
    strings with K, M, G suffixes (binary). docs/virtio.md, "Rate limits".
    """

    path: str
    readonly: bool = False
    iops: int | str | None = None
    bps: int | str | None = None
    fps: int | str | None = None
    iops_burst: int | str = 0
    bps_burst: int | str = 0

    def __post_init__(self):
        for name in _LIMITS:
            v = getattr(self, name)
            if isinstance(v, str):
                object.__setattr__(self, name, parse_amount(v))
        self.limits                     # noqa: B018 - checks the values (ValueError)

    @property
    def limits(self) -> Limits | None:
        """The rate limits, or None for an unlimited disk."""
        limits = Limits(**{n: getattr(self, n) for n in _LIMITS})
        return limits if limits else None

    @classmethod
    def parse(cls, spec: str) -> "Disk":
        path, _, opts = spec.partition(",")
        flags, values = set(), {}
        for o in (o.strip() for o in opts.split(",")):
            key, eq, value = o.partition("=")
            if eq and key in _LIMITS:
                values[key] = value
            elif o:
                flags.add(o)
        unknown = flags - {"ro", "rw"}
        if not path or unknown:
            raise ValueError(f"bad disk {spec!r}: expected PATH[,ro][,iops=N][,bps=N][,fps=N]"
                             + (f" (unknown option {', '.join(sorted(unknown))})" if unknown else ""))
        try:
            return cls(path, readonly="ro" in flags, **values)
        except ValueError as e:
            raise ValueError(f"bad disk {spec!r}: {e}") from None



@dataclass(frozen=True)
class Vsock:
    """A virtio-vsock device: the guest's CID (3..2**32-2, default 3) and the host's UNIX
    socket ``path`` (None: no host side; guest connections are refused). ``Vsock.parse(
    "PATH[,cid=N]")`` reads the CLI form. docs/vsock.md."""

    path: str | None
    cid: int = 3

    def __post_init__(self):
        from ..devices.virtio.vsock import check_cid
        check_cid(self.cid)

    @classmethod
    def parse(cls, spec: str) -> "Vsock":
        path, _, opts = spec.partition(",")
        cid = 3
        for o in filter(None, (o.strip() for o in opts.split(","))):
            key, eq, value = o.partition("=")
            if key != "cid" or not eq or not value.isdigit():
                raise ValueError(f"bad vsock {spec!r}: expected PATH[,cid=N] (unknown option {o!r})")
            cid = int(value)
        if not path:
            raise ValueError(f"bad vsock {spec!r}: expected PATH[,cid=N]")
        try:
            return cls(path, cid)
        except ValueError as e:
            raise ValueError(f"bad vsock {spec!r}: {e}") from None


class DeviceStateError(ValueError):
    """A saved device state this platform's device refuses (the message names the device)."""

class IrqLine:
    """A device's interrupt line wired to a GSI of the in-kernel irqchip (KVM_IRQ_LINE)."""

    def __init__(self, vm, gsi: int):
        self.vm, self.gsi = vm, gsi

    def set_level(self, level: bool) -> None:
        self.vm.irq_line(self.gsi, 1 if level else 0)


class Locked:
    """A Python device whose accesses are serialised by ``lock`` (with host-side input,
    or with another vCPU: the C twins carry their own mutex)."""

    def __init__(self, device, lock: threading.Lock):
        self.device, self.lock = device, lock

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            return self.device.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.device.write(offset, size, value)


class PythonPending:
    """What the disk timer needs of a Python virtio-blk or virtio-rng (NativeVirtioBlk has the same):
    when a throttled request may go, and a host-side notification of its queue under the device's
    lock (``notify_queue(0)``, which a virtio-mmio window and a virtio-pci function both have)."""

    def __init__(self, device: Locked, blk):
        self.device, self.blk = device, blk

    def throttled_until(self) -> int:
        return self.blk.limiter.throttled_until if self.blk.limiter is not None else 0

    def serve_pending(self) -> None:
        with self.device.lock:
            if self.blk.limiter is not None:
                self.blk.limiter.clear()    # not live: nothing to serve, and nothing waits
            self.device.device.notify_queue(0)


@dataclass(eq=False)
class Slot:
    """One attached device.

    ``model`` keeps the device's state (``save_state()``/``load_state()``), ``saved_as``
    names it in a saved machine's "devices" (None: stateless), ``fast`` says which of its
    accesses C serves ("uart", "virtio-mmio"; None: every access returns to Python),
    ``disk`` is the Disk a virtio-blk slot serves, ``virtio`` the virtio device ID of a
    virtio-mmio slot (0: not one).
    """

    name: str
    bus: str
    base: int
    length: int
    model: object
    irq: int | None = None
    saved_as: str | None = None
    fast: str | None = None
    disk: Disk | None = None
    identity: dict = field(default_factory=dict)    # what a restore checks before loading state
    backend: object = None                          # a disk's VirtioBlk (its file)
    pending: object = None                          # a disk's throttled_until()/serve_pending()
    virtio: int = 0                                 # virtio device ID of a virtio-mmio window

    def save_state(self) -> dict:
        state = self.model.save_state()
        return {**self.identity, "state": state} if self.identity else state

    def load_state(self, saved: dict) -> None:
        self.model.load_state(saved["state"] if self.identity else saved)
