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
in ``Machine.__init__`` (or a new small builder here if it needs wiring; the virtio
devices' builders are in virtio_slots.py, the slot types and device specs in slots.py).
"""
from __future__ import annotations

import threading

from ..devices import (Bus, DebugExit, FwCfg, I8042, NullTrigger, PcTestdev, ResetControl, Rtc, Serial16550,
                       SystemControlA, testdev)
from ..devices.ratelimit import Limits
from ..x86 import layout
from . import virtio_slots
from .console import Console
from .native import FastPath, NativeUart
from .slots import DeviceStateError, Disk, IrqLine, Locked, Slot, Vsock  # noqa: F401 - re-exported
from .throttle import DiskTimer

# Devices whose state joined version 2 of the saved state later: a state without them
# (an older snapshot or migration peer) leaves them in their power-on state.
LATER_DEVICES = frozenset({"i8042", "rtc", "port92", "reset_control", "pc_testdev", "virtio_rng", "virtio_net",
                           "virtio_vsock", "pci_host"})
CLOSED_BACKENDS = ("disks", "virtio_net", "virtio_vsock")   # slots whose ``backend`` close() closes, in order
VIRTIO_TRANSPORTS = ("mmio", "pci")



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
            virtio_slots.add_pci_host(self)

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

    # --- the virtio devices (virtio_slots.py builds them) --------------------------------
    def add_disk(self, disk: Disk, memory) -> Slot:
        """virtio-blk over virtio-mmio in the next free window, or over virtio-pci."""
        return virtio_slots.add_disk(self, disk, memory)

    def add_rng(self, memory, limits: Limits | bool = True) -> Slot:
        """virtio-rng after the disks (``Machine(rng=...)``), rate-limited by ``limits``."""
        return virtio_slots.add_rng(self, memory, limits)

    def add_net(self, net, memory) -> Slot:
        """virtio-net (``Machine(net=...)``) over the backend ``net`` opens."""
        return virtio_slots.add_net(self, net, memory)

    def add_vsock(self, memory, vsock: Vsock) -> Slot:
        """virtio-vsock with its host side on ``vsock.path``."""
        return virtio_slots.add_vsock(self, memory, vsock)


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
