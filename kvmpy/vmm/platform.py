"""The platform: every device the Machine attaches, where it lives, and who serves it.

One ``Slot`` per attached device says which bus and range it claims, which interrupt
line it drives, which object keeps its state, and which of its accesses the C loop
serves (``fast``). This is the one seam between Python and C: the native vCPU loop's
tables (csrc/runloop.c) are built from the slots by ``fast_path()``, and the choice
between a device's C twin and its Python model is made here, once per device kind,
from ``native``. Devices a user attaches to ``pio``/``mmio`` directly are Python
devices: C returns their accesses to Python.

Adding a device: write its model in ``kvmpy/devices/`` (and, if it has one, its C twin
behind the same read/write/save_state/load_state interface), then one ``add_*`` call
in ``Machine.__init__`` (or a new small builder here if it needs wiring).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from ..devices import (Bus, DebugExit, FwCfg, I8042, NullTrigger, PcTestdev, ResetControl, Rtc, Serial16550,
                       SystemControlA, testdev)
from ..devices.ratelimit import Limits, parse_amount
from ..errors import DeviceError
from ..x86 import layout
from .console import Console
from .native import FastPath, NativeUart, NativeVirtioBlk
from .throttle import DiskTimer

_LIMITS = ("iops", "bps", "fps", "iops_burst", "bps_burst")
# Devices whose state joined version 2 of the saved state later: a state without them
# (an older snapshot or migration peer) leaves them in their power-on state.
LATER_DEVICES = frozenset({"i8042", "rtc", "port92", "reset_control", "pc_testdev", "virtio_rng", "virtio_net",
                           "virtio_vsock", "pci_host"})
CLOSED_BACKENDS = ("disks", "virtio_net", "virtio_vsock")   # slots whose ``backend`` close() closes, in order
VIRTIO_TRANSPORTS = ("mmio", "pci")


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


class Platform:
    """The buses and the slots on them, for one VM.

    ``native`` picks the C twins of the UART and virtio-blk (and with them the C loop);
    ``irqchip`` says whether interrupt lines reach an in-kernel irqchip or nothing;
    ``virtio`` puts the disks and the rng behind virtio-mmio ("mmio") or virtio-pci ("pci"), and
    ``net_virtio`` the network and vsock (None: where ``virtio`` says; "mmio" behind "pci" is how
    machines were built before those two could sit behind PCI, kept for their snapshots).
    """

    def __init__(self, vm, native: bool, irqchip: bool, gate=None, virtio: str = "mmio",
                 net_virtio: str | None = None):
        net_virtio = virtio if net_virtio is None else net_virtio
        for t in (virtio, net_virtio):
            if t not in VIRTIO_TRANSPORTS:
                raise ValueError(f"virtio transport must be one of {', '.join(VIRTIO_TRANSPORTS)}, not {t!r}")
        if net_virtio == "pci" and virtio != "pci":
            raise ValueError("the network and vsock go behind virtio-pci only with the disks and the rng")
        self.vm, self.native, self.irqchip, self.virtio, self.net_virtio = vm, native, irqchip, virtio, net_virtio
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.slots: list[Slot] = []
        self.gate = gate
        self.timer = DiskTimer(gate) if gate is not None else None    # rate-limited disks
        self.pci = self.msi = None
        if virtio == "pci":
            self._add_pci_host()

    def attach(self, slot: Slot, device=None) -> Slot:
        """Claim the slot's range on its bus for ``device`` (default: the model)."""
        bus = self.pio if slot.bus == "pio" else self.mmio
        bus.attach(slot.base, slot.length, device if device is not None else slot.model, slot.name)
        self.slots.append(slot)
        return slot

    def trigger(self, gsi: int):
        return IrqLine(self.vm, gsi) if self.irqchip else NullTrigger()

    # --- the devices of a kvmpy machine ----------------------------------------------
    def add_console_uart(self, console: Console) -> Slot:
        """The 16550A at COM1, carrying the console."""
        gsi = layout.COM1_IRQ
        if self.native:             # thread-safe by its own mutex; output drained by the console
            uart = NativeUart(vm_fd=self.vm.fd if self.irqchip else -1, gsi=gsi if self.irqchip else -1)
            device, fast = uart, "uart"
        else:
            uart = Serial16550(output=console, trigger=self.trigger(gsi))   # console.write never blocks
            device, fast = Locked(uart, console.lock), None
        console.attach(uart)
        slot = Slot("com1", "pio", layout.COM1_PORT, layout.COM_PORT_COUNT, uart, gsi, "com1", fast)
        return self.attach(slot, device)

    def add_debug_exit(self, on_exit) -> Slot:
        """QEMU's isa-debug-exit: a write of v ends the run with status (v << 1) | 1."""
        return self.attach(Slot("isa-debug-exit", "pio", layout.DEBUG_EXIT_PORT, layout.DEBUG_EXIT_PORT_COUNT,
                                DebugExit(on_exit=on_exit)))

    def add_i8042(self, on_reset) -> Slot:
        """The keyboard controller: its reset line and the answers Linux probes for."""
        kbd = I8042(on_reset=on_reset)
        return self.attach(Slot("i8042", "pio", layout.I8042_PORT, layout.I8042_PORT_COUNT, kbd,
                                saved_as="i8042"), Locked(kbd, threading.Lock()))

    def add_rtc(self, clock=None) -> Slot:
        """The CMOS real-time clock at 0x70, reading the host's clock (``clock``: for tests)."""
        rtc = Rtc(clock) if clock is not None else Rtc()
        return self.attach(Slot("rtc", "pio", layout.RTC_PORT, layout.RTC_PORT_COUNT, rtc, saved_as="rtc"),
                           Locked(rtc, threading.Lock()))

    def add_reset_lines(self, on_reset) -> tuple[Slot, Slot]:
        """System Control Port A (0x92, bit 0) and the Reset Control Register (0xcf9, one byte),
        each serialised by its own lock (a read-modify-write from two vCPUs)."""
        a92, rcr = SystemControlA(on_reset), ResetControl(on_reset)
        return (self.attach(Slot("port92", "pio", layout.SYS_CTRL_A_PORT, layout.SYS_CTRL_A_PORT_COUNT,
                                 a92, saved_as="port92"), Locked(a92, threading.Lock())),
                self.attach(Slot("reset-control", "pio", layout.RESET_CONTROL_PORT, layout.RESET_CONTROL_PORT_COUNT,
                                 rcr, saved_as="reset_control"), Locked(rcr, threading.Lock())))

    def add_testdev(self, memory) -> Slot:
        """QEMU's pc-testdev (``Machine(test_devices=True)``): ports 0xe0-0xeb, the 24 IRQ-line
        ports at 0x2000 and the window at 0xff000000, one lock for the three; saved as "pc_testdev"."""
        dev = PcTestdev(memory.flush_page, [self.trigger(n) for n in range(testdev.IRQ_LINES)])
        lock = threading.Lock()
        slot = self.attach(Slot("pc-testdev", "pio", testdev.PORT_BASE, testdev.PORT_COUNT, dev,
                                saved_as="pc_testdev"), Locked(dev.ports, lock))
        self.attach(Slot("pc-testdev-irq", "pio", testdev.IRQ_PORT_BASE, testdev.IRQ_LINES, dev.irq),
                    Locked(dev.irq, lock))
        self.attach(Slot("pc-testdev-iomem", "mmio", testdev.IOMEM_BASE, testdev.IOMEM_SIZE, dev.window),
                    Locked(dev.window, lock))
        return slot

    def add_fw_cfg(self, fw_cfg: FwCfg) -> Slot:
        """QEMU's fw_cfg at 0x510."""
        return self.attach(Slot("fw_cfg", "pio", layout.FW_CFG_PORT, layout.FW_CFG_PORT_COUNT, fw_cfg,
                                saved_as="fw_cfg"))

    def _add_pci_host(self) -> None:
        """The PCI host bridge (devices/pci/): 0xcf8, 0xcfc-0xcff, the ECAM window and the MMIO
        window of the BARs, all four doors behind one lock; saved as "pci_host"."""
        from ..devices.pci import PciHost
        from .msi import MsiRoutes
        self.pci = host = PciHost(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE)
        self.pci_lock = lock = threading.Lock()
        self.msi = MsiRoutes(self.vm) if self.irqchip else None
        self.attach(Slot("pci-host", "pio", layout.PCI_CONFIG_ADDRESS_PORT, 1, host, saved_as="pci_host"),
                    Locked(host.cf8, lock))
        self.attach(Slot("pci-config-data", "pio", layout.PCI_CONFIG_DATA_PORT, layout.PCI_CONFIG_DATA_PORT_COUNT,
                         host.cfc), Locked(host.cfc, lock))
        self.attach(Slot("pci-ecam", "mmio", layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE, host.ecam),
                    Locked(host.ecam, lock))
        self.attach(Slot("pci-mmio", "mmio", layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE, host.window),
                    Locked(host.window, lock))

    def _add_virtio_pci(self, name: str, model, memory, saved_as: str, **slot) -> tuple[Slot, Locked]:
        """``model`` (a VirtioDevice) as a virtio-pci function in the next PCI slot, INTA# on its
        own GSI, MSI-X through KVM's routing; the slot's ``base`` is its PCI device number."""
        from ..devices.pci.msix import NullMsiSink
        from ..devices.virtio.pci import VirtioPciFunction
        n = len(self.pci.devices)                     # device 0 is the host bridge
        if n > layout.MAX_PCI_DEVICES:
            raise DeviceError(f"at most {layout.MAX_PCI_DEVICES} virtio devices behind PCI")
        gsi = layout.PCI_INTX_GSIS[n - 1]
        sink = self.msi.sink(model.num_queues + 1) if self.msi else NullMsiSink()
        fn = VirtioPciFunction(model, memory, self.trigger(gsi), sink)
        dev = self.pci.add(fn)
        s = Slot(name, "pci", dev, 1, fn, gsi, saved_as, **slot)
        self.slots.append(s)
        return s, Locked(fn, self.pci_lock)

    def add_disk(self, disk: Disk, memory) -> Slot:
        """virtio-blk over virtio-mmio in the next free slot of the virtio window (layout.py), or
        over virtio-pci in the next PCI slot (the Python model: no C twin behind PCI yet)."""
        i = len(self.disks)
        if self.virtio == "pci":
            return self._add_pci_disk(i, disk, memory)
        base, gsi = self._virtio_window()
        from ..devices.virtio.blk import VIRTIO_ID_BLOCK, VirtioBlk     # loaded for machines with disks only
        from ..devices.virtio.mmio import VirtioMmioTransport
        try:
            if self.native:         # C transport, queue and I/O; thread-safe by its own mutex
                model = NativeVirtioBlk(disk.path, memory, readonly=disk.readonly, limits=disk.limits,
                                        vm_fd=self.vm.fd if self.irqchip else -1, gsi=gsi if self.irqchip else -1)
                device, fast, blk, pending = model, "virtio-mmio", model, model
            else:
                blk = VirtioBlk(disk.path, readonly=disk.readonly, limits=disk.limits)
                model = VirtioMmioTransport(blk, memory, self.trigger(gsi))
                device, fast = Locked(model, threading.Lock()), None
                pending = PythonPending(device, blk)
        except DeviceError as e:
            raise DeviceError(f"disk {i} ({disk.path}): {e}") from None
        identity = {"path": os.path.abspath(disk.path), "readonly": disk.readonly, "size": blk.file_size}
        if disk.limits and self.timer is not None:
            self.timer.watch(pending)
        return self.attach(Slot(f"virtio-blk{i}", "mmio", base, layout.VIRTIO_MMIO_SIZE, model, gsi, "disks",
                                fast, disk, identity, blk, pending if self.timer is not None else None,
                                virtio=VIRTIO_ID_BLOCK), device)

    def _add_pci_disk(self, i: int, disk: Disk, memory) -> Slot:
        from ..devices.virtio.blk import VIRTIO_ID_BLOCK, VirtioBlk
        try:
            blk = VirtioBlk(disk.path, readonly=disk.readonly, limits=disk.limits)
        except DeviceError as e:
            raise DeviceError(f"disk {i} ({disk.path}): {e}") from None
        identity = {"path": os.path.abspath(disk.path), "readonly": disk.readonly, "size": blk.file_size}
        try:
            s, locked = self._add_virtio_pci(f"virtio-blk{i}", blk, memory, "disks", disk=disk, identity=identity,
                                             backend=blk, virtio=VIRTIO_ID_BLOCK)
        except BaseException:
            blk.close()
            raise
        if self.timer is not None:
            s.pending = PythonPending(locked, blk)
            if disk.limits:
                self.timer.watch(s.pending)
        return s

    def add_rng(self, memory, limits: Limits | bool = True) -> Slot:
        """virtio-rng (``Machine(rng=...)``) in the next free slot of the virtio window, after
        the disks: the Python model only (not a hot path), rate-limited by ``limits`` (True:
        the device's DEFAULT_LIMITS); saved as "virtio_rng"."""
        from ..devices.virtio.mmio import VirtioMmioTransport
        from ..devices.virtio.rng import DEFAULT_LIMITS, VirtioRng
        rng = VirtioRng(DEFAULT_LIMITS if limits is True else limits or None)
        if self.virtio == "pci":
            s, locked = self._add_virtio_pci("virtio-rng", rng, memory, "virtio_rng", backend=rng, virtio=rng.device_id)
            if self.timer is not None:
                s.pending = PythonPending(locked, rng)
                if rng.limiter is not None:
                    self.timer.watch(s.pending)
            return s
        base, gsi = self._virtio_window()
        model = VirtioMmioTransport(rng, memory, self.trigger(gsi))
        device = Locked(model, threading.Lock())
        pending = PythonPending(device, rng) if self.timer is not None else None
        if rng.limiter is not None and pending is not None:
            self.timer.watch(pending)
        return self.attach(Slot("virtio-rng", "mmio", base, layout.VIRTIO_MMIO_SIZE, model, gsi, "virtio_rng",
                                backend=rng, pending=pending, virtio=rng.device_id), device)

    def add_net(self, net, memory) -> Slot:
        """virtio-net (``Machine(net=...)``) in the next free slot of the virtio window, or in the
        next PCI slot (``net_virtio``), over the backend ``net`` (a kvmpy.net.Net) opens, with its
        network thread (vmm/netpump.py); with ``native`` the queue work runs in C
        (vmm/native_net.py), the transport in Python; saved as "virtio_net" (the backend is
        re-made on restore)."""
        from ..devices.virtio.mmio import VirtioMmioTransport
        from ..devices.virtio.net import VirtioNet
        from .netpump import NetPump
        pci = self.net_virtio == "pci"
        base, gsi = (0, 0) if pci else self._virtio_window()
        backend = net.open()
        try:
            dev = VirtioNet(backend, mac=net.mac_bytes)
            if self.native:         # the queue work in C (csrc/virtio_net.c); the transport stays Python
                from .native_net import NativeNetQueues
                dev.engine = NativeNetQueues(dev, memory)
            if pci:
                s, device = self._add_virtio_pci("virtio-net", dev, memory, "virtio_net", virtio=dev.device_id)
            else:
                model = VirtioMmioTransport(dev, memory, self.trigger(gsi))
                device = Locked(model, threading.Lock())
            pump = NetPump(backend, dev, device, self.gate)
        except BaseException:
            backend.close()
            raise
        if pci:
            s.backend = pump
            return s
        return self.attach(Slot("virtio-net", "mmio", base, layout.VIRTIO_MMIO_SIZE, model, gsi, "virtio_net",
                                backend=pump, virtio=dev.device_id), device)

    def add_vsock(self, memory, vsock: Vsock) -> Slot:
        """virtio-vsock in the next free slot of the virtio window (after the disks, the rng and the
        network), or in the next PCI slot (``net_virtio``), with its host side on ``vsock.path``
        (vmm/vsock.py); saved as "virtio_vsock"."""
        from ..devices.virtio.mmio import VirtioMmioTransport
        from ..devices.virtio.vsock import VirtioVsock
        from .vsock import VsockHost, VsockState
        dev = VirtioVsock(vsock.cid)
        if self.net_virtio == "pci":
            s, device = self._add_virtio_pci("virtio-vsock", dev, memory, "virtio_vsock", virtio=dev.device_id)
            s.model = VsockState(device.device, dev, device.lock)   # the PCI lock: the host thread serves under it
            s.backend = VsockHost(vsock.path, dev, device.lock, self._running_notify(device)) if vsock.path else None
            return s
        base, gsi = self._virtio_window()
        model = VirtioMmioTransport(dev, memory, self.trigger(gsi))
        device = Locked(model, threading.Lock())
        host = VsockHost(vsock.path, dev, device.lock, self._running_notify(device)) if vsock.path else None
        return self.attach(Slot("virtio-vsock", "mmio", base, layout.VIRTIO_MMIO_SIZE,
                                VsockState(model, dev, device.lock),
                                gsi, "virtio_vsock", backend=host, virtio=dev.device_id), device)

    def _running_notify(self, device: Locked):
        """A host thread's notification of ``device``'s queue (``notify_queue`` under its lock, on
        either transport) that happens only while the machine runs (not paused, stopping or
        between runs: RAM and rings stay as a snapshot, a checkpoint or a migration saw them);
        False when held back. As NetPump waits for the network."""
        gate = self.gate

        def notify_now(queue: int) -> None:
            with device.lock:
                device.device.notify_queue(queue)

        def notify(queue: int) -> bool:
            if gate is None:
                notify_now(queue)
                return True
            with gate.cond:
                if not gate.run_active.is_set() or gate.requested or gate.stop.reason is not None:
                    return False
                notify_now(queue)
                return True
        return notify

    def _virtio_window(self) -> tuple[int, int]:
        """(base, GSI) of the next free virtio-mmio window (layout.py)."""
        i = len(self.virtio_mmio)
        if i >= layout.MAX_VIRTIO_DEVICES:
            raise DeviceError(f"at most {layout.MAX_VIRTIO_DEVICES} virtio devices")
        return layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_MMIO_IRQS[i]

    # --- what others ask of the platform ---------------------------------------------
    @property
    def disks(self) -> list[Slot]:
        return [s for s in self.slots if s.disk is not None]

    @property
    def virtio_mmio(self) -> list[Slot]:
        """Every virtio-mmio device (the disks, then the rng), by window: each slot's ``base``,
        ``length``, ``irq`` and ``virtio`` (device ID). The one list of them, from which the
        kernel command line (``Machine.virtio_mmio_cmdline``) and firmware tables are made."""
        return sorted((s for s in self.slots if s.virtio and s.bus == "mmio"), key=lambda s: s.base)

    @property
    def virtio_pci(self) -> list[Slot]:
        """Every virtio-pci function (the disks, the rng, the network, vsock): ``base`` is its PCI device number,
        ``irq`` the GSI of its INTA#."""
        return sorted((s for s in self.slots if s.virtio and s.bus == "pci"), key=lambda s: s.base)

    @property
    def vsocks(self) -> list[Slot]:
        return [s for s in self.slots if s.saved_as == "virtio_vsock"]

    def slot(self, name: str) -> Slot:
        return next(s for s in self.slots if s.name == name)

    def fast_path(self) -> FastPath:
        """The native loop's tables, from the slots and whatever else is on the buses."""
        fast = {(s.bus, s.base): s for s in self.slots if s.fast}
        uart = next((s for s in self.slots if s.fast == "uart"), None)
        table = FastPath(uart=uart.model if uart else None, uart_name=uart.name if uart else "",
                         uart_base=uart.base if uart else 0,
                         uart_ports=range(uart.base, uart.base + uart.length) if uart else range(0))
        for a in self.pio.devices:
            if ("pio", a.base) not in fast:
                table.pio_claims.append((a.base, a.length))
        for a in self.mmio.devices:
            s = fast.get(("mmio", a.base))
            if s is None:
                table.mmio_claims.append((a.base, a.length))
            else:
                table.native_mmio.append((a.base, a.length, s.model, s.name))
        return table

    def save_state(self) -> dict:
        """Each stateful slot's state under its ``saved_as`` name (the disks as a list)."""
        out: dict = {}
        for s in self.slots:
            if s.saved_as == "disks":
                out.setdefault("disks", []).append(s.save_state())
            elif s.saved_as:
                out[s.saved_as] = s.save_state()
        out.setdefault("disks", [])
        return out

    def load_state(self, saved: dict) -> None:
        """The inverse of ``save_state()``; a bad device state raises ValueError naming it."""
        disks = self.disks
        if len(saved["disks"]) != len(disks):
            raise ValueError(f"the state has {len(saved['disks'])} disks, the machine {len(disks)}")
        for s in self.slots:
            if s.saved_as in LATER_DEVICES and s.saved_as not in saved:
                continue                # a version-2 state from before it had state: power-on
            if s.saved_as and s.saved_as != "disks":
                try:
                    s.load_state(saved[s.saved_as])
                except ValueError as e:
                    if not s.virtio:
                        raise
                    raise DeviceStateError(f"{s.name}: bad virtio state: {e}") from None
                if s.pending is not None:   # the rng: a chain its limit held back may be in its ring
                    self.timer.kick(s.pending)
        for i, (s, d) in enumerate(zip(disks, saved["disks"])):
            try:
                s.load_state(d)
            except ValueError as e:
                raise DeviceStateError(f"disk {i}: bad virtio state: {e}") from None
            if s.pending is not None:       # a request a rate limit held back may be in its ring
                self.timer.kick(s.pending)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.close()          # first: it serves the disks
        for b in self.backends_to_close():
            b.close()       # a disk's file; the network thread, then its backend; vsock's sockets; MSI's eventfds

    def backends_to_close(self) -> list:
        """What close() closes (and a Machine's finalizer, without the Machine): each disk's file,
        the network's thread and backend (a passt child ends), vsock's host side, then the MSI-X vectors' eventfds."""
        return [s.backend for kind in CLOSED_BACKENDS for s in self.slots
                if s.saved_as == kind and s.backend is not None] + ([self.msi] if self.msi is not None else [])
