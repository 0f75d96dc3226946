"""Machine: the one place that wires memory, vCPUs, devices and a loaded image together.

A Machine is a small PC-like computer: RAM from address 0, a 16550 UART at COM1,
QEMU's isa-debug-exit at port 0xf4, an i8042 whose reset line ends the run, and
buses on which a user can attach devices written in Python. This module builds it;
``run()`` and the run loops live in vcpu_loop.py (the ``RunLoop`` mixin).

    with Machine(mem_size=64 << 20) as m:
        m.load("hello.elf")
        result = m.run(timeout=5)
"""
from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from typing import BinaryIO

from ..kvm.abi import Cap
from ..devices import Bus, DebugExit, FwCfg, I8042, NullTrigger, Serial16550
from ..devices.virtio.blk import VirtioBlk
from ..devices.virtio.mmio import VirtioMmioTransport
from ..errors import DeviceError, GuestMemoryError, KvmpyError, LoaderError
from ..kvm import Kvm, Vcpu, Vm
from .. import loader
from ..loader import LoadedImage
from .native import NativeUart, NativeVirtioBlk
from .pause import _Pause
from .vcpu_loop import RunLoop, RunResult, _Stop
from .stats import Stats
from ..x86 import cpuid, layout, modes, mptable, msrs
from ..x86.inspect import report as inspect_report

PAGE = 4096

__all__ = ["Machine", "Disk", "RunResult"]


@dataclass(frozen=True)
class Disk:
    """A disk for the guest: a host file (or block device) exposed as virtio-blk.

    ``Disk.parse("PATH[,ro]")`` reads the CLI form. The file is never created,
    truncated or grown; ``readonly`` opens it O_RDONLY and offers VIRTIO_BLK_F_RO.
    """

    path: str
    readonly: bool = False

    @classmethod
    def parse(cls, spec: str) -> "Disk":
        path, _, opts = spec.partition(",")
        flags = {o.strip() for o in opts.split(",") if o.strip()}
        unknown = flags - {"ro", "rw"}
        if not path or unknown:
            raise ValueError(f"bad disk {spec!r}: expected PATH or PATH,ro"
                             + (f" (unknown option {', '.join(sorted(unknown))})" if unknown else ""))
        return cls(path, readonly="ro" in flags)


class _IrqLine:
    """A device's interrupt line wired to a GSI of the in-kernel irqchip."""

    def __init__(self, vm: Vm, gsi: int):
        self.vm, self.gsi = vm, gsi

    def set_level(self, level: bool) -> None:
        self.vm.irq_line(self.gsi, 1 if level else 0)


class _Locked:
    """A device whose accesses are serialised with host-side input (the UART's FIFO)."""

    def __init__(self, device, lock: threading.Lock):
        self.device, self.lock = device, lock

    def read(self, offset: int, size: int) -> int:
        with self.lock:
            return self.device.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.device.write(offset, size, value)


class Machine(RunLoop):
    """A virtual machine with RAM, vCPUs, a serial port and the legacy bits guests need.

    ``serial`` is a binary file-like for the guest's COM1 output; by default it is
    collected in memory and readable as ``machine.serial_output``. By default the
    machine is PC-like: the in-kernel PIC/IOAPIC/LAPIC and PIT (``irqchip=True``),
    CPUID from KVM's supported list and MSRs as firmware leaves them. With the
    irqchip, HLT waits for an interrupt inside KVM instead of exiting to the VMM,
    so teaching guests that want to see raw HLT exits pass ``irqchip=False``. ``native`` runs the
    vCPUs in the C loop with the C UART (the fast path); ``native=False`` keeps every
    exit and the UART in Python, for teaching and differential tests.
    """

    def __init__(self, mem_size: int = 64 << 20, cpus: int = 1, serial: BinaryIO | None = None,
                 irqchip: bool = True, kvm: str | Kvm = "/dev/kvm", native: bool = True,
                 disks: list[str | Disk] = (), fw_cfg: dict[str, bytes | str | os.PathLike] | None = None,
                 _ram_files: dict[int, str] | None = None):
        if mem_size < 64 * 1024 or mem_size % PAGE:
            raise ValueError(f"mem_size must be a multiple of 4 KiB and at least 64 KiB, got {mem_size:#x}")
        if not 1 <= cpus <= 255:
            raise ValueError(f"cpus must be between 1 and 255, got {cpus}")
        if cpus > 1 and not irqchip:
            raise ValueError("several vCPUs need irqchip=True: application processors wait in the "
                             "in-kernel local APIC for the INIT/SIPI that starts them")
        if len(disks) > layout.MAX_VIRTIO_DEVICES:
            raise ValueError(f"at most {layout.MAX_VIRTIO_DEVICES} disks, got {len(disks)}")
        self.mem_size = mem_size
        self.native = native
        self.disks: list = []
        self.disk_specs: list[Disk] = []
        self.virtio_devices: list = []      # each disk's transport: save_state()/load_state()
        self.stats = Stats()
        self.image: LoadedImage | None = None
        self._own_kvm = not isinstance(kvm, Kvm)
        self.kvm = Kvm(kvm) if self._own_kvm else kvm
        self.vm: Vm | None = None
        try:
            self.vm = self.kvm.create_vm()
            self._add_ram(mem_size, _ram_files or {})   # before the irqchip: a slot added after it costs ~7 ms here
            self._create_platform(irqchip)
            self.vcpus: list[Vcpu] = [self._create_vcpu(i, cpus) for i in range(cpus)]
            if cpus > 1:            # tell guests that look where the other CPUs are (MP spec 1.4)
                for gpa, blob in mptable.mp_table(cpus):
                    self.memory.write(gpa, blob)
            self._create_devices(serial, irqchip)
            self._create_fw_cfg(mem_size, cpus, fw_cfg or {})
            for d in disks:
                self._add_disk(d if isinstance(d, Disk) else Disk.parse(d))
        except BaseException:
            self.close()
            raise
        self._stop = _Stop()
        self._pause = _Pause()
        self._migrating = threading.Lock()     # one live migration at a time (migration.py)
        self._run_active, self._run_idle = threading.Event(), threading.Event()
        self._run_idle.set()
        self._serial_error: BaseException | None = None

    # --- construction ----------------------------------------------------------------
    def _create_platform(self, irqchip: bool) -> None:
        vm = self.vm
        if vm.check_extension(Cap.SET_TSS_ADDR):
            vm.set_tss_addr(layout.KVM_TSS_ADDR)
        if vm.check_extension(Cap.SET_IDENTITY_MAP_ADDR):
            vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self.irqchip = irqchip
        if irqchip:
            vm.create_irqchip()
            vm.create_pit2()

    @staticmethod
    def ram_layout(size: int) -> list[tuple[int, int]]:
        """(gpa, size) of each RAM region: from 0; beyond 3 GiB RAM continues at 4 GiB,
        leaving the hole below 4 GiB for MMIO."""
        low = min(size, 3 * layout.GiB)
        return [(0, low)] + ([(4 * layout.GiB, size - low)] if size > low else [])

    def _add_ram(self, size: int, files: dict[int, str]) -> None:
        """RAM as ram_layout() says; ``files`` maps a region's gpa to a snapshot's RAM file
        to map copy-on-write instead of fresh memory."""
        for gpa, n in self.ram_layout(size):
            self.vm.add_memory(gpa, n, backing=files.get(gpa))

    def _create_vcpu(self, i: int, n: int) -> Vcpu:
        vcpu = self.vm.create_vcpu(i)
        vcpu.set_cpuid2(cpuid.guest_cpuid(self._supported_cpuid(), i, n))
        wanted = msrs.boot_msrs()
        supported = self._supported_msrs()
        vcpu.set_msrs({k: v for k, v in wanted.items() if k in supported})
        return vcpu

    def _supported_msrs(self) -> set[int]:
        if not hasattr(self, "_msr_cache"):
            self._msr_cache = set(self.kvm.msr_index_list()) | set(self.kvm.feature_msr_index_list())
        return self._msr_cache

    def _supported_cpuid(self):
        if not hasattr(self, "_cpuid_cache"):
            self._cpuid_cache = self.kvm.supported_cpuid()
        return self._cpuid_cache

    def _create_devices(self, serial: BinaryIO | None, irqchip: bool) -> None:
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self._serial_buffer = io.BytesIO() if serial is None else None
        self.serial_out = serial if serial is not None else self._serial_buffer
        self._serial_lock = threading.Lock()
        if self.native:
            # The C UART: thread-safe by its own mutex; output is drained to serial_out.
            self.serial = NativeUart(vm_fd=self.vm.fd if irqchip else -1,
                                     gsi=layout.COM1_IRQ if irqchip else -1)
            self.serial.on_full = self._drain_serial
            com1 = self.serial
        else:
            trigger = _IrqLine(self.vm, layout.COM1_IRQ) if irqchip else NullTrigger()
            self.serial = Serial16550(output=self.serial_out, trigger=trigger)
            com1 = _Locked(self.serial, self._serial_lock)
        self.pio.attach(layout.COM1_PORT, layout.COM_PORT_COUNT, com1, "com1")
        self.pio.attach(layout.DEBUG_EXIT_PORT, layout.DEBUG_EXIT_PORT_COUNT,
                        DebugExit(on_exit=self._on_debug_exit), "isa-debug-exit")
        self.pio.attach(layout.I8042_PORT, layout.I8042_PORT_COUNT, I8042(on_reset=self._on_reset), "i8042")

    def _create_fw_cfg(self, mem_size: int, cpus: int, files: dict) -> None:
        """QEMU's fw_cfg at 0x510: RAM size, CPU count, the command line and named files."""
        self.fw_cfg = FwCfg(mem_size, cpus)
        for name, content in files.items():
            if not isinstance(content, (bytes, bytearray)):
                try:
                    with open(content, "rb") as f:
                        content = f.read()
                except OSError as e:
                    raise DeviceError(f"fw_cfg file {name!r}: cannot read {os.fspath(content)!r}: "
                                      f"{e.strerror}") from None
            self.fw_cfg.add_file(name, bytes(content))
        self.pio.attach(layout.FW_CFG_PORT, layout.FW_CFG_PORT_COUNT, self.fw_cfg, "fw_cfg")

    def _add_disk(self, disk: Disk) -> None:
        """virtio-blk over virtio-mmio in the next free slot of the virtio window (layout.py)."""
        i = len(self.disks)
        base = layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SIZE
        irq = layout.VIRTIO_MMIO_IRQS[i]
        name = f"virtio-blk{i}"
        try:
            if self.native:         # C transport, queue and I/O; thread-safe by its own mutex
                dev = NativeVirtioBlk(disk.path, self.memory, readonly=disk.readonly,
                                      vm_fd=self.vm.fd if self.irqchip else -1, gsi=irq if self.irqchip else -1)
                self.disks.append(dev)
                self.virtio_devices.append(dev)
            else:
                blk = VirtioBlk(disk.path, readonly=disk.readonly)
                self.disks.append(blk)
                trigger = _IrqLine(self.vm, irq) if self.irqchip else NullTrigger()
                transport = VirtioMmioTransport(blk, self.memory, trigger)
                self.virtio_devices.append(transport)
                dev = _Locked(transport, threading.Lock())
        except DeviceError as e:
            raise DeviceError(f"disk {i} ({disk.path}): {e}") from None
        self.disk_specs.append(disk)
        self.mmio.attach(base, layout.VIRTIO_MMIO_SIZE, dev, name)

    def snapshot(self, path) -> None:
        """Save this machine to directory ``path`` (docs/snapshots.md has the format).
        A running machine is paused while its state and RAM are written, then goes on."""
        from ..lifecycle.snapshot import save
        save(self, path)

    @classmethod
    def restore(cls, path, verify: bool = True, disks=None, **host_options) -> "Machine":
        """A new Machine that continues the snapshot at ``path``. ``host_options`` are the
        host-side arguments (``serial=``, ``native=``, ``kvm=``); ``disks`` replaces the
        saved disk paths; ``verify=False`` skips the RAM checksums (RAM is mapped lazily)."""
        from ..lifecycle.snapshot import restore
        return restore(path, verify=verify, disks=disks, **host_options)

    def clone(self, **host_options) -> "Machine":
        """A new Machine continuing this one's current state, sharing unchanged RAM pages
        copy-on-write; this machine goes on (paused for the copy if it is running)."""
        from ..lifecycle.snapshot import clone
        return clone(self, 1, **host_options)[0]

    def virtio_mmio_cmdline(self) -> str:
        """How a Linux guest learns about the disks: ``virtio_mmio.device=SIZE@ADDR:IRQ`` each."""
        return " ".join(
            f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE // 1024}K@{layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SIZE:#x}:"
            f"{layout.VIRTIO_MMIO_IRQS[i]}" for i in range(len(self.disks)))

    @property
    def memory(self):
        """Guest RAM (``kvmpy.kvm.memory.GuestMemory``): bounds-checked read/write by physical address."""
        return self.vm.memory

    @property
    def serial_output(self) -> bytes:
        """Everything the guest wrote to COM1, when no ``serial`` stream was given."""
        if self._serial_buffer is None:
            raise AttributeError("serial output went to the stream given as serial=")
        return self._serial_buffer.getvalue()

    def feed_serial(self, data: bytes) -> int:
        """Give bytes to the guest's COM1 receiver; returns how many fit in its FIFO."""
        with self._serial_lock:
            return self.serial.feed(data)

    def _drain_serial(self) -> bool:
        """Write the native UART's collected output to serial_out, in one write, and flush.

        If the stream fails (a closed pipe, a full disk) the run stops with that error,
        which run() raises; returns False then.
        """
        if not self.native:
            return True
        with self._serial_lock:
            try:
                data = self.serial.take_output()
                if data:
                    self.serial_out.write(data)
                    flush = getattr(self.serial_out, "flush", None)
                    if flush is not None:
                        flush()
            except (OSError, ValueError) as e:
                self._serial_error = self._serial_error or e
                if self._stop.set("error", error=e):
                    for v in self.vcpus:
                        v.kick()
                return False
        return True

    def inspect(self, vcpu: int | None = None) -> str:
        """A readable report of a vCPU: CPU mode, registers, segments, GDT and IDT, the page
        walks of RIP and RSP, the stack and the code at RIP (``kvmpy.x86.inspect.report``).

        ``vcpu`` defaults to the one that stopped the last run. Call it while the machine
        is not running (before or between runs, after ``run()`` returned) or is paused.
        """
        if self._run_active.is_set() and not self.paused:
            raise KvmpyError("inspect() needs a stopped or paused machine: pause() it or wait for run()")
        n = vcpu if vcpu is not None else (self._stop.vcpu or 0)
        if not 0 <= n < len(self.vcpus):
            raise ValueError(f"no vCPU {n}: the machine has {len(self.vcpus)}")
        v = self.vcpus[n]
        return inspect_report(v.get_regs(), v.get_sregs(), self.memory, title=f"vCPU {n}")

    # --- loading ---------------------------------------------------------------------
    def load(self, image, format: str = "auto", *, entry: int | None = None, mode: str | None = None,
             load_addr: int | None = None, user: bool = False, cmdline: str = "",
             modules=(), initrd=None) -> LoadedImage:
        """Load a guest image (path or bytes) and point vCPU 0 at its entry.

        ``kvmpy.loader.load`` places the image (its docstring has the formats and the
        options); Linux also gets a ``virtio_mmio.device=`` entry per disk. The command
        line goes to fw_cfg as well. ``user`` starts a long-mode guest in ring 3.
        """
        img = loader.load(self.memory, image, format, cmdline=cmdline, initrd=initrd, modules=modules,
                          load_addr=load_addr, entry=entry, mode=mode,
                          linux_cmdline_extra=self.virtio_mmio_cmdline())
        self.fw_cfg.set_cmdline(img.cmdline)
        vcpu = self.vcpus[0]
        setup = modes.setup(img.mode, img.entry, vcpu.get_sregs(), self.memory.end, user=user)
        try:
            for gpa, blob in setup.writes:
                self.memory.write(gpa, blob)
        except GuestMemoryError:
            raise LoaderError(f"{self.mem_size:#x} bytes of RAM is too small for the {img.mode}-mode "
                              "boot tables (they live in the first 1 MiB)") from None
        for name, value in img.registers:          # what the boot protocol passes in registers
            setattr(setup.regs, name, value)
        vcpu.set_sregs(setup.sregs)
        vcpu.set_regs(setup.regs)
        self.image = img
        return img

    # --- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        """Release the vCPUs, the VM, guest memory, disks and (if ours) /dev/kvm. Idempotent.

        A run in progress (in another thread) is stopped and waited for first: the C loop
        and the devices hold pointers into the memory this frees.
        """
        self._wait_for_run_to_end()
        for blk in getattr(self, "disks", ()):
            blk.close()
        if getattr(self, "vm", None) is not None:
            self.vm.close()
            self.vm = None
        if getattr(self, "_own_kvm", False) and getattr(self, "kvm", None) is not None:
            self.kvm.close()
            self.kvm = None

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
