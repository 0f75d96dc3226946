"""The virtio devices of a platform: each one built on its transport (virtio-mmio in the next
window of layout.py, or a virtio-pci function behind the PCI host bridge), with its backend,
its lock and, for rate-limited ones, the disk timer's hook. ``Platform.add_disk`` and the
others call these; what they build is ordinary ``Slot`` s (slots.py).
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from ..devices.ratelimit import Limits
from ..errors import DeviceError
from ..x86 import layout
from .native import NativeVirtioBlk
from .slots import Disk, Locked, PythonPending, Slot, Vsock

if TYPE_CHECKING:
    from .platform import Platform


def add_pci_host(p: Platform) -> None:
    """The PCI host bridge (devices/pci/): 0xcf8, 0xcfc-0xcff, the ECAM window and the MMIO
    window of the BARs, all four doors behind one lock; saved as "pci_host"."""
    from ..devices.pci import PciHost
    from .msi import MsiRoutes
    p.pci = host = PciHost(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE)
    p.pci_lock = lock = threading.Lock()
    p.msi = MsiRoutes(p.vm) if p.irqchip else None
    p.attach(Slot("pci-host", "pio", layout.PCI_CONFIG_ADDRESS_PORT, 1, host, saved_as="pci_host"),
                Locked(host.cf8, lock))
    p.attach(Slot("pci-config-data", "pio", layout.PCI_CONFIG_DATA_PORT, layout.PCI_CONFIG_DATA_PORT_COUNT,
                     host.cfc), Locked(host.cfc, lock))
    p.attach(Slot("pci-ecam", "mmio", layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE, host.ecam),
                Locked(host.ecam, lock))
    p.attach(Slot("pci-mmio", "mmio", layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE, host.window),
                Locked(host.window, lock))


def _add_virtio_pci(p: Platform, name: str, model, memory, saved_as: str, **slot) -> tuple[Slot, Locked]:
    """``model`` (a VirtioDevice) as a virtio-pci function in the next PCI slot, INTA# on its
    own GSI, MSI-X through KVM's routing; the slot's ``base`` is its PCI device number."""
    from ..devices.pci.msix import NullMsiSink
    from ..devices.virtio.pci import VirtioPciFunction
    n = len(p.pci.devices)                     # device 0 is the host bridge
    if n > layout.MAX_PCI_DEVICES:
        raise DeviceError(f"at most {layout.MAX_PCI_DEVICES} virtio devices behind PCI")
    gsi = layout.PCI_INTX_GSIS[n - 1]
    sink = p.msi.sink(model.num_queues + 1) if p.msi else NullMsiSink()
    fn = VirtioPciFunction(model, memory, p.trigger(gsi), sink)
    dev = p.pci.add(fn)
    s = Slot(name, "pci", dev, 1, fn, gsi, saved_as, **slot)
    p.slots.append(s)
    return s, Locked(fn, p.pci_lock)


def add_disk(p: Platform, disk: Disk, memory) -> Slot:
    """virtio-blk over virtio-mmio in the next free slot of the virtio window (layout.py), or
    over virtio-pci in the next PCI slot. With ``native``, C serves the requests either way:
    the whole device behind virtio-mmio (vmm/native.py), the request queue alone behind the
    Python virtio-pci transport (vmm/native_blk.py) unless the disk is rate-limited."""
    i = len(p.disks)
    if p.virtio == "pci":
        return _add_pci_disk(p, i, disk, memory)
    base, gsi = _virtio_window(p)
    from ..devices.virtio.blk import VIRTIO_ID_BLOCK, VirtioBlk     # loaded for machines with disks only
    from ..devices.virtio.mmio import VirtioMmioTransport
    try:
        if p.native:         # C transport, queue and I/O; thread-safe by its own mutex
            model = NativeVirtioBlk(disk.path, memory, readonly=disk.readonly, limits=disk.limits,
                                    vm_fd=p.vm.fd if p.irqchip else -1, gsi=gsi if p.irqchip else -1)
            device, fast, blk, pending = model, "virtio-mmio", model, model
        else:
            blk = VirtioBlk(disk.path, readonly=disk.readonly, limits=disk.limits)
            model = VirtioMmioTransport(blk, memory, p.trigger(gsi))
            device, fast = Locked(model, threading.Lock()), None
            pending = PythonPending(device, blk)
    except DeviceError as e:
        raise DeviceError(f"disk {i} ({disk.path}): {e}") from None
    identity = {"path": os.path.abspath(disk.path), "readonly": disk.readonly, "size": blk.file_size}
    if disk.limits and p.timer is not None:
        p.timer.watch(pending)
    return p.attach(Slot(f"virtio-blk{i}", "mmio", base, layout.VIRTIO_MMIO_SIZE, model, gsi, "disks",
                            fast, disk, identity, blk, pending if p.timer is not None else None,
                            virtio=VIRTIO_ID_BLOCK), device)


def _add_pci_disk(p: Platform, i: int, disk: Disk, memory) -> Slot:
    from ..devices.virtio.blk import VIRTIO_ID_BLOCK, VirtioBlk
    try:
        blk = VirtioBlk(disk.path, readonly=disk.readonly, limits=disk.limits)
    except DeviceError as e:
        raise DeviceError(f"disk {i} ({disk.path}): {e}") from None
    if p.native and blk.limiter is None:
        from .native_blk import NativeBlkQueue
        blk.engine = NativeBlkQueue(blk, memory)
    identity = {"path": os.path.abspath(disk.path), "readonly": disk.readonly, "size": blk.file_size}
    try:
        s, locked = _add_virtio_pci(p, f"virtio-blk{i}", blk, memory, "disks", disk=disk, identity=identity,
                                         backend=blk, virtio=VIRTIO_ID_BLOCK)
    except BaseException:
        blk.close()
        raise
    if p.timer is not None:
        s.pending = PythonPending(locked, blk)
        if disk.limits:
            p.timer.watch(s.pending)
    return s


def add_rng(p: Platform, memory, limits: Limits | bool = True) -> Slot:
    """virtio-rng (``Machine(rng=...)``) in the next free slot of the virtio window, after
    the disks: the Python model only (not a hot path), rate-limited by ``limits`` (True:
    the device's DEFAULT_LIMITS); saved as "virtio_rng"."""
    from ..devices.virtio.mmio import VirtioMmioTransport
    from ..devices.virtio.rng import DEFAULT_LIMITS, VirtioRng
    rng = VirtioRng(DEFAULT_LIMITS if limits is True else limits or None)
    if p.virtio == "pci":
        s, locked = _add_virtio_pci(p, "virtio-rng", rng, memory, "virtio_rng", backend=rng, virtio=rng.device_id)
        if p.timer is not None:
            s.pending = PythonPending(locked, rng)
            if rng.limiter is not None:
                p.timer.watch(s.pending)
        return s
    base, gsi = _virtio_window(p)
    model = VirtioMmioTransport(rng, memory, p.trigger(gsi))
    device = Locked(model, threading.Lock())
    pending = PythonPending(device, rng) if p.timer is not None else None
    if rng.limiter is not None and pending is not None:
        p.timer.watch(pending)
    return p.attach(Slot("virtio-rng", "mmio", base, layout.VIRTIO_MMIO_SIZE, model, gsi, "virtio_rng",
                            backend=rng, pending=pending, virtio=rng.device_id), device)


def add_net(p: Platform, net, memory) -> Slot:
    """virtio-net (``Machine(net=...)``) in the next free slot of the virtio window, or in the
    next PCI slot (``net_virtio``), over the backend ``net`` (a kvmpy.net.Net) opens, with its
    network thread (vmm/netpump.py); with ``native`` the queue work runs in C
    (vmm/native_net.py), the transport in Python. Behind virtio-mmio the guest's queue
    notifications signal eventfds (KVM_IOEVENTFD) the network threads serve, instead of
    exiting to a vCPU thread (NetPump.notify_by_eventfd). Saved as "virtio_net" (the backend
    is re-made on restore)."""
    from ..devices.virtio.mmio import VirtioMmioTransport
    from ..devices.virtio.net import VirtioNet
    from .netpump import NetPump
    pci = p.net_virtio == "pci"
    base, gsi = (0, 0) if pci else _virtio_window(p)
    backend = net.open()
    try:
        dev = VirtioNet(backend, mac=net.mac_bytes)
        if p.native:         # the queue work in C (csrc/virtio_net.c); the transport stays Python
            from .native_net import NativeNetQueues
            dev.engine = NativeNetQueues(dev, memory)
        if pci:
            s, device = _add_virtio_pci(p, "virtio-net", dev, memory, "virtio_net", virtio=dev.device_id)
        else:
            model = VirtioMmioTransport(dev, memory, p.trigger(gsi))
            device = Locked(model, threading.Lock())
        pump = NetPump(backend, dev, device, p.gate)
    except BaseException:
        backend.close()
        raise
    if pci:
        s.backend = pump
        return s
    try:                     # the queue notifications go to the network threads (KVM_IOEVENTFD)
        from ..devices.virtio.mmio import QueueNotify
        pump.notify_by_eventfd(p.vm, base + QueueNotify)
    except BaseException:
        pump.close()
        raise
    return p.attach(Slot("virtio-net", "mmio", base, layout.VIRTIO_MMIO_SIZE, model, gsi, "virtio_net",
                            backend=pump, virtio=dev.device_id), device)


def add_vsock(p: Platform, memory, vsock: Vsock) -> Slot:
    """virtio-vsock in the next free slot of the virtio window (after the disks, the rng and the
    network), or in the next PCI slot (``net_virtio``), with its host side on ``vsock.path``
    (vmm/vsock.py); saved as "virtio_vsock"."""
    from ..devices.virtio.mmio import VirtioMmioTransport
    from ..devices.virtio.vsock import VirtioVsock
    from .vsock import VsockHost, VsockState
    dev = VirtioVsock(vsock.cid)
    if p.net_virtio == "pci":
        s, device = _add_virtio_pci(p, "virtio-vsock", dev, memory, "virtio_vsock", virtio=dev.device_id)
        s.model = VsockState(device.device, dev, device.lock)   # the PCI lock: the host thread serves under it
        s.backend = VsockHost(vsock.path, dev, device.lock, _running_notify(p, device)) if vsock.path else None
        return s
    base, gsi = _virtio_window(p)
    model = VirtioMmioTransport(dev, memory, p.trigger(gsi))
    device = Locked(model, threading.Lock())
    host = VsockHost(vsock.path, dev, device.lock, _running_notify(p, device)) if vsock.path else None
    return p.attach(Slot("virtio-vsock", "mmio", base, layout.VIRTIO_MMIO_SIZE,
                            VsockState(model, dev, device.lock),
                            gsi, "virtio_vsock", backend=host, virtio=dev.device_id), device)


def _running_notify(p: Platform, device: Locked):
    """A host thread's notification of ``device``'s queue (``notify_queue`` under its lock, on
    either transport) that happens only while the machine runs (not paused, stopping or
    between runs: RAM and rings stay as a snapshot, a checkpoint or a migration saw them);
    False when held back. As NetPump waits for the network."""
    gate = p.gate

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


def _virtio_window(p: Platform) -> tuple[int, int]:
    """(base, GSI) of the next free virtio-mmio window (layout.py)."""
    i = len(p.virtio_mmio)
    if i >= layout.MAX_VIRTIO_DEVICES:
        raise DeviceError(f"at most {layout.MAX_VIRTIO_DEVICES} virtio devices")
    return layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_MMIO_IRQS[i]
