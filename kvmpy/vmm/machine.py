"""Machine: the one place that wires memory, vCPUs, devices and a loaded image together.

A Machine is a small PC-like computer: RAM from address 0, a 16550 UART at COM1,
QEMU's isa-debug-exit at port 0xf4, an i8042 whose reset line ends the run, QEMU's
fw_cfg, virtio-blk disks, and buses on which a user can attach devices written in
Python. It owns its parts and delegates to them:

* ``platform`` (platform.py): every attached device, its place, its IRQ, and which of
  its accesses the C loop serves; ``console`` (console.py): COM1's host side;
* one ``VcpuLoop`` per vCPU for each run (vcpu_loop.py; run.py runs them all);
* ``gate`` (pause.py): the current run's stop token, pausing and parking;
* ``vmm.state``: the whole machine's state, gathered from each part's own.

    with Machine(mem_size=64 << 20) as m:
        m.load("hello.elf")
        result = m.run(timeout=5)
"""
from __future__ import annotations

import copy
import os
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, BinaryIO

from ..devices import FwCfg
from ..devices.ratelimit import Limits
from ..errors import DeviceError, GuestMemoryError, KvmpyError, LoaderError, read_file
from .. import loader
from ..kvm import Kvm
from ..kvm.abi import Cap
from ..kvm.memory import PAGE_SIZE
from ..kvm.regs import Regs, Sregs
from ..loader import LoadedImage
from ..x86 import cpuid, layout, mce, modes, mptable, msrs
from . import firmware
from .console import Console
from .native import NativeLoop
from .pause import PauseGate
from .platform import Disk, Platform, Vsock
from .run import RunResult, Watchdog, run_loops
from .stats import Stats
from .vcpu_loop import VcpuLoop, current_vcpu

if TYPE_CHECKING:
    from ..net import Net


__all__ = ["Machine", "Disk", "RunResult", "Vsock"]


class Machine:
    """A virtual machine with RAM, vCPUs, a serial port and the legacy bits guests need.

    ``serial`` is a binary file-like for the guest's COM1 output; by default it is
    collected in memory and readable as ``machine.serial_output``. By default the
    machine is PC-like: the in-kernel PIC/IOAPIC/LAPIC and PIT (``irqchip=True``),
    CPUID from KVM's supported list and MSRs as firmware leaves them. With the
    irqchip, HLT waits for an interrupt inside KVM instead of exiting to the VMM,
    so teaching guests that want to see raw HLT exits pass ``irqchip=False``. ``native`` runs the
    vCPUs in the C loop with the C UART (the fast path); ``native=False`` keeps every
    exit and the UART in Python, for teaching and differential tests. ``ram_files`` maps
    a RAM region's address to a file mapped copy-on-write as that region (how a restore
    shares a snapshot's RAM); each file must have the region's size (``ram_layout``).
    ``serial_bps`` limits the bytes per second written to ``serial`` (the console's writer
    thread waits, never a vCPU); a disk's limits are its ``Disk``'s (``iops=``, ``bps=``).
    ``test_devices`` adds QEMU's pc-testdev (ports 0xe0-0xeb and 0x2000-0x2017, MMIO at
    0xff000000), which kernels written for ``qemu -device pc-testdev`` (kvm-unit-tests) use.
    ``rng`` adds a virtio-rng entropy device fed from the host's getrandom, after the disks:
    True with ``devices.virtio.rng.DEFAULT_LIMITS``, or a ``Limits`` (docs/virtio.md, "virtio-rng").
    ``net`` adds a virtio-net network device after the rng: ``"passt"`` (kvmpy starts passt: DHCP,
    NAT, the gateway address reaches the host's loopback), ``"passt:SOCKET"``, ``"tap:NAME"``, or
    a ``kvmpy.net.Net`` (docs/net.md).
    ``acpi`` gives a Linux kernel ACPI tables (CPUs, interrupt controllers, devices; see
    ``kvmpy.x86.acpi``) instead of ``virtio_mmio.device=`` on its command line; the default
    is on with the irqchip the tables describe, ``acpi=False`` turns it off.
    ``vsock`` adds a virtio-vsock device after the rng: a UNIX socket path for its host side
    (guest CID 3) or a ``Vsock(path, cid)`` (docs/vsock.md).
    ``virtio_transport`` puts the disks and the rng behind virtio-mmio ("mmio", the default) or
    behind virtio-pci ("pci": a PCI host bridge with one function per device, MSI-X through
    KVM's irqfds; docs/virtio.md, "virtio-pci"), and with them the network and vsock.
    ``net_transport`` says where the network and vsock go instead: "mmio" keeps them on
    virtio-mmio behind a "pci" machine (how kvmpy built such machines before they could sit
    behind PCI, and how their snapshots restore); None follows ``virtio_transport``.
    """

    def __init__(self, mem_size: int = 64 << 20, cpus: int = 1, serial: BinaryIO | None = None,
                 irqchip: bool = True, kvm: str | Kvm = "/dev/kvm", native: bool = True,
                 disks: list[str | Disk] = (), fw_cfg: dict[str, bytes | str | os.PathLike] | None = None,
                 ram_files: dict[int, str] | None = None, serial_bps: int | None = None,
                 test_devices: bool = False, rng: bool | Limits = False, acpi: bool | None = None,
                 net: str | Net | None = None, vsock: str | os.PathLike | Vsock | None = None,
                 virtio_transport: str = "mmio", net_transport: str | None = None):
        self.rng = rng is not False and rng is not None
        self.net = _net_spec(net)
        self.vsock = vsock if isinstance(vsock, Vsock) or vsock is None else Vsock(os.fspath(vsock))
        self.virtio_transport = virtio_transport
        self.net_transport = virtio_transport if net_transport is None else net_transport
        check_shape(mem_size, cpus, irqchip, len(disks) + self.rng, virtio_transport,
                    (self.net is not None) + (self.vsock is not None), self.net_transport)
        if acpi and not irqchip:
            raise ValueError("acpi=True needs irqchip=True: the ACPI tables describe the in-kernel "
                             "IOAPIC and local APICs")
        self.acpi = irqchip if acpi is None else bool(acpi)
        self.mem_size, self.native, self.irqchip = mem_size, native, irqchip
        self.test_devices = bool(test_devices)
        self.stats = Stats()
        self.image: LoadedImage | None = None
        self.console = Console(serial, bps=serial_bps)
        me = weakref.proxy(self)      # the parts' callbacks must not keep the Machine alive (a cycle)
        self.gate = PauseGate(_kicker(me))
        self.watchdog = Watchdog(self.gate, self.console)     # its thread starts with the first run
        self.migration_lock = threading.Lock()     # one live migration at a time (lifecycle/migration.py)
        self.vcpus: list = []
        self._own_kvm = not isinstance(kvm, Kvm)
        self.kvm = Kvm(kvm) if self._own_kvm else kvm
        self.vm = self.platform = None
        self._loops_for: tuple | None = None       # the bus generations the native loops were built for
        self._native_loops: dict = {}
        self._background = None
        self.reset_point = None                    # Machine.checkpoint()'s (lifecycle/reset.py)
        try:
            self.vm = self.kvm.create_vm()
            for gpa, n in self.ram_layout(mem_size):   # before the irqchip: a slot added after it costs ~7 ms on kvm_pvm
                self.vm.add_memory(gpa, n, backing=(ram_files or {}).get(gpa))
            self._create_platform(irqchip)
            self.vcpus = [self._create_vcpu(i, cpus) for i in range(cpus)]
            if cpus > 1:            # tell guests that look where the other CPUs are (MP spec 1.4)
                for gpa, blob in mptable.mp_table(cpus):
                    self.memory.write(gpa, blob)
            self._create_devices(cpus, fw_cfg or {})
            self._add_virtio_devices(disks, rng)
        except BaseException:
            self.close()
            raise
        gate = self.gate                # a failing output stream stops the run with its error
        self.console.on_error = lambda e: gate.stop.set("error", error=e) and gate.kick()
        # a slow output stream throttles a vCPU until a stop or pause
        self.console.throttle = lambda: current_vcpu() is not None and not gate.requested \
            and gate.stop.reason is None
        # A machine nobody closed is finalized when its last reference goes: what close() releases,
        # held without the Machine (no user device), in close()'s order; never at exit, under a run.
        self._finalizer = weakref.finalize(self, _finalize, f"(mem_size={mem_size:#x}, cpus={cpus})",
                                           [self.watchdog, *self.platform.backends_to_close()], self.vm,
                                           self.kvm if self._own_kvm else None)
        self._finalizer.atexit = False

    # --- construction ----------------------------------------------------------------
    def _create_platform(self, irqchip: bool) -> None:
        vm = self.vm
        if vm.check_extension(Cap.SET_TSS_ADDR):
            vm.set_tss_addr(layout.KVM_TSS_ADDR)
        if vm.check_extension(Cap.SET_IDENTITY_MAP_ADDR):
            vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        if irqchip:
            vm.create_irqchip()
            vm.create_pit2()
        self.platform = Platform(vm, self.native, irqchip, self.gate, self.virtio_transport, self.net_transport)

    @staticmethod
    def ram_layout(size: int) -> list[tuple[int, int]]:
        """(gpa, size) of each RAM region: from 0; beyond 3 GiB RAM continues at 4 GiB,
        leaving the hole below 4 GiB for MMIO."""
        low = min(size, 3 * layout.GiB)
        return [(0, low)] + ([(4 * layout.GiB, size - low)] if size > low else [])

    def _create_vcpu(self, i: int, n: int):
        vcpu = self.vm.create_vcpu(i)
        vcpu.set_cpuid2(cpuid.guest_cpuid(self._supported_cpuid(), i, n, tsc_deadline=self._tsc_deadline()))
        if self._mcg_cap():                        # machine-check banks, as QEMU (x86/mce.py)
            vcpu.setup_mce(self._mcg_cap())
        supported = self.supported_msrs()
        vcpu.set_msrs({k: v for k, v in msrs.boot_msrs().items() if k in supported})
        return vcpu

    def supported_msrs(self) -> set[int]:
        """The MSRs KVM lets a VMM read and write (its index list and feature MSRs)."""
        if not hasattr(self, "_msr_cache"):
            self._msr_cache = set(self.kvm.msr_index_list()) | set(self.kvm.feature_msr_index_list())
        return self._msr_cache

    def _tsc_deadline(self) -> bool:
        """KVM's LAPIC emulates the TSC-deadline timer (QEMU offers it the same way)."""
        if not hasattr(self, "_tsc_deadline_cache"):
            self._tsc_deadline_cache = self.irqchip and bool(self.kvm.check_extension(Cap.TSC_DEADLINE_TIMER))
        return self._tsc_deadline_cache

    def _mcg_cap(self) -> int:
        """IA32_MCG_CAP for every vCPU, or 0 if KVM (KVM_CAP_MCE) or the CPUID has no MCA."""
        if not hasattr(self, "_mcg_cap_cache"):
            banks = self.kvm.check_extension(Cap.MCE)
            use = banks > 0 and mce.has_mca(self._supported_cpuid())
            self._mcg_cap_cache = mce.mcg_cap(self.kvm.mce_cap_supported(), banks) if use else 0
        return self._mcg_cap_cache

    def _supported_cpuid(self):
        if not hasattr(self, "_cpuid_cache"):
            self._cpuid_cache = self.kvm.supported_cpuid()
        return self._cpuid_cache

    def _add_virtio_devices(self, disks, rng) -> None:
        """The disks, then the rng, the network and vsock, in that order (their windows or PCI slots)."""
        for d in disks:
            self.platform.add_disk(d if isinstance(d, Disk) else Disk.parse(d), self.memory)
        if self.rng:
            self.platform.add_rng(self.memory, rng)
        if self.net is not None:
            self.platform.add_net(self.net, self.memory)
        if self.vsock is not None:
            self.platform.add_vsock(self.memory, self.vsock)

    def _create_devices(self, cpus: int, files: dict) -> None:
        p, gate = self.platform, self.gate
        p.add_console_uart(self.console)
        p.add_debug_exit(lambda status: gate.stop.set("exit", status, current_vcpu()))
        p.add_i8042(lambda: gate.stop.set("reset", None, current_vcpu()))
        p.add_rtc()
        p.add_reset_lines(lambda: gate.stop.set("reset", None, current_vcpu()))
        self.fw_cfg = FwCfg(self.mem_size, cpus)
        for name, content in files.items():
            self.fw_cfg.add_file(name, read_file(content, f"fw_cfg file {name!r}", error=DeviceError))
        p.add_fw_cfg(self.fw_cfg)
        if self.test_devices:
            p.add_testdev(self.memory)

    # --- the parts, and sugar over them ----------------------------------------------
    @property
    def memory(self):
        """Guest RAM (``kvmpy.kvm.memory.GuestMemory``): bounds-checked read/write by physical address."""
        return self.vm.memory

    @property
    def pio(self):
        """The port-I/O bus: ``m.pio.attach(port, length, device, name)`` adds a Python device."""
        return self.platform.pio

    @property
    def mmio(self):
        """The MMIO bus (see ``pio``)."""
        return self.platform.mmio

    @property
    def serial(self):
        """COM1's UART model (Python or C)."""
        return self.console.uart

    @property
    def serial_output(self) -> bytes:
        """Everything the guest wrote to COM1, when no ``serial`` stream was given."""
        return self.console.output

    def feed_serial(self, data: bytes) -> int:
        """Give bytes to the guest's COM1 receiver; returns how many fit in its FIFO."""
        return self.console.feed(data)

    @property
    def disks(self) -> list[Disk]:
        """The disks, in the order the guest sees them."""
        return [s.disk for s in self.platform.disks]

    def shape(self) -> dict:
        """What a Machine() continuing this one is built with (snapshots, migration)."""
        shape = {"mem_size": self.mem_size, "cpus": len(self.vcpus), "irqchip": self.irqchip}
        optional = {"test_devices": self.test_devices, "rng": self.rng}     # only when on: older peers
        shape.update({k: True for k, on in optional.items() if on})
        if self.virtio_transport != "mmio":
            shape["virtio_transport"] = self.virtio_transport
        if self.net_transport != "mmio" and (self.net is not None or self.vsock is not None):
            shape["net_transport"] = self.net_transport     # absent: on virtio-mmio, as before
        if self.net is not None:
            shape["net"] = self.net.spec        # the backend is re-made (a restore may name another)
        if self.vsock is not None:
            shape["vsock_cid"] = self.vsock.cid
        return shape

    def virtio_mmio_cmdline(self) -> str:
        """``virtio_mmio.device=SIZE@ADDR:IRQ`` for each disk and the rng: how a Linux kernel without
        ACPI (the machine's ``acpi=False``) learns about them, if built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES."""
        return " ".join(f"virtio_mmio.device={s.length // 1024}K@{s.base:#x}:{s.irq}" for s in self.platform.virtio_mmio)

    def inspect(self, vcpu: int | None = None) -> str:
        """A readable report of a vCPU: CPU mode, registers, segments, GDT and IDT, the page
        walks of RIP and RSP, the stack and the code at RIP (``kvmpy.x86.inspect.report``).

        ``vcpu`` defaults to the one that stopped the last run. Call it while the machine
        is not running (before or between runs, after ``run()`` returned) or is paused.
        """
        if self.running and not self.paused:
            raise KvmpyError("inspect() needs a stopped or paused machine: pause() it or wait for run()")
        n = vcpu if vcpu is not None else (self.gate.stop.vcpu or 0)
        if not 0 <= n < len(self.vcpus):
            raise ValueError(f"no vCPU {n}: the machine has {len(self.vcpus)}")
        v = self.vcpus[n]
        from ..x86 import inspect           # page walks and descriptors: loaded when asked for
        return inspect.report(v.get_regs(), v.get_sregs(), self.memory, title=f"vCPU {n}")

    def guest_physical(self, sregs: Sregs, vaddr: int) -> int:
        """Translate a guest-virtual (linear) address with the guest's page tables, in any
        paging mode; raises inspect.TranslationError (a ValueError) when it does not map."""
        from ..x86 import inspect
        return inspect.translate(self.memory.read_u64, sregs, vaddr).phys

    def disassemble_at(self, regs: Regs, sregs: Sregs, count: int = 6) -> str:
        """The instructions at the vCPU's RIP, decoded in its current mode (read through
        the page tables, across page boundaries)."""
        from ..x86 import inspect
        return inspect.code_at(regs, sregs, self.memory, count)

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

    # --- reset in place (lifecycle/reset.py, docs/reset.md) ------------------------------
    def checkpoint(self, clear_dirty_log: bool = False, sync_regs: bool | None = None,
                   hot_pages: int = 0) -> None:
        """Keep this stopped machine's whole state in memory (RAM, vCPUs, irqchip, PIT, clock,
        devices, disk contents) for ``reset()``; replaces an earlier checkpoint. Call it after
        ``run()`` returned, typically where the guest is ready for a case. ``clear_dirty_log``
        reads KVM's dirty log with KVM_CLEAR_DIRTY_LOG (manual protection: the VM keeps it);
        ``sync_regs`` puts regs, sregs and events back through the kvm_run page (None: if KVM can);
        ``hot_pages``: up to that many pages per RAM region that cases write again and again stay
        writable and are copied back at every reset (docs/reset.md); it needs KVM_CLEAR_DIRTY_LOG,
        so it turns ``clear_dirty_log`` on where KVM has it (elsewhere every page stays tracked)."""
        from ..lifecycle.reset import Checkpoint
        if hot_pages and not clear_dirty_log:
            clear_dirty_log = bool(self.vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2))
        self.drop_checkpoint()
        self.reset_point = Checkpoint(self, manual_protect=clear_dirty_log, sync_regs=sync_regs, hot_pages=hot_pages)

    def reset(self, times: dict | None = None) -> int:
        """Put the stopped machine back to its ``checkpoint()``, in place; returns the RAM pages
        copied back. ``times``: a dict that gets each part's nanoseconds added (benchmarks)."""
        if self.reset_point is None:
            raise KvmpyError("reset() needs a checkpoint(): take one after run() returned")
        return self.reset_point.reset(times)

    @property
    def checkpointed(self) -> bool:
        """True while a ``checkpoint()`` is held."""
        return self.reset_point is not None

    def drop_checkpoint(self) -> None:
        """Reset to the checkpoint once more, send the disks back to their files (which hold
        its contents) and forget it; nothing happens without one."""
        cp, self.reset_point = self.reset_point, None
        if cp is not None:
            try:
                cp.reset()
                cp.release()
            finally:
                cp.close()

    # --- loading ---------------------------------------------------------------------
    def load(self, image, format: str = "auto", *, entry: int | None = None, mode: str | None = None,
             load_addr: int | None = None, user: bool = False, cmdline: str = "",
             modules=(), initrd=None) -> LoadedImage:
        """Load a guest image (path or bytes) and point vCPU 0 at its entry.

        ``kvmpy.loader.load`` places the image (its docstring has the formats and the
        options); Linux also gets the ACPI tables (``acpi``), or else a ``virtio_mmio.device=``
        entry per disk, and a BIOS reset entry (``x86.bios``). The command line goes to fw_cfg
        as well. ``user`` starts a long-mode guest in ring 3.
        """
        tables = (lambda: firmware.acpi_tables(self.platform, len(self.vcpus))) if self.acpi else None
        img = loader.load(self.memory, image, format, cmdline=cmdline, initrd=initrd, modules=modules,
                          load_addr=load_addr, entry=entry, mode=mode, acpi=tables,
                          linux_cmdline_extra="" if self.acpi else self.virtio_mmio_cmdline())
        if img.format in ("bzimage", "pvh"):        # where Linux jumps to reboot "through the BIOS"
            self.memory.write(*firmware.reset_entry(self.platform))
            if self.irqchip:                        # and the 8259 pair as firmware leaves it
                firmware.mask_pic(self.vm)
        self.fw_cfg.set_cmdline(img.cmdline)
        vcpu = self.vcpus[0]
        setup = modes.setup(img.mode, img.entry, vcpu.get_sregs(), self.memory.end, user=user,
                            control=img.control_registers, tables=img.tables)
        try:
            for gpa, blob in setup.writes:
                self.memory.write(gpa, blob)
        except GuestMemoryError:
            raise LoaderError(f"{self.mem_size:#x} bytes of RAM is too small for the {img.mode}-mode "
                              "boot tables") from None
        for name, value in img.registers:          # what the boot protocol passes in registers
            setattr(setup.regs, name, value)
        vcpu.set_sregs(setup.sregs)
        vcpu.set_regs(setup.regs)
        self.image = img
        return img

    # --- running -----------------------------------------------------------------------
    def run(self, timeout: float | None = None, trace=None) -> RunResult:
        """Run the guest until it stops; see RunResult. Failures raise GuestError.

        With several vCPUs, vCPU 0 runs in this thread and the others in their own
        threads; the first vCPU to stop the machine stops them all. ``trace`` (a
        ``kvmpy.debug.trace.Tracer``) sees every exit; a traced run takes the Python loop.
        """
        if self.vm is None:
            raise KvmpyError("this Machine is closed: build a new one (or restore a snapshot) to run again")
        self.gate.begin(len(self.vcpus))
        try:
            loops = self._loops(trace)
            stepping = trace is not None and trace.steps
            for v in self.vcpus if stepping else ():
                trace.start_steps(v.id, v.get_regs())
                v.single_step(True)
            try:
                return run_loops(loops, self.gate, self.console, timeout,
                                 any(loop.native is not None for loop in loops), self.watchdog)
            finally:
                self.stats.serial_dropped = self.console.dropped + getattr(self.console.uart, "dropped", 0)
                for v in self.vcpus if stepping else ():
                    v.single_step(False)
        finally:
            self.gate.end()

    def _loops(self, trace) -> list[VcpuLoop]:
        """A VcpuLoop per vCPU: native (C) unless the machine is Python-only or traced."""
        p = self.platform
        native = self.native and trace is None
        if native and self._loops_for != (p.pio.generation, p.mmio.generation):
            table = p.fast_path()               # the C tables follow the buses
            self._native_loops = {v.id: NativeLoop(v, table) for v in self.vcpus}
            self._loops_for = (p.pio.generation, p.mmio.generation)
        loops = []
        for v in self.vcpus:
            loop = VcpuLoop(v, p.pio, p.mmio, self.stats, self.gate, self.memory, self.console.drain,
                            self._native_loops[v.id] if native else None)
            if trace is not None:
                loop.handle = trace.wrap(loop)
            loops.append(loop)
        return loops

    def kick(self) -> None:
        """Make every vCPU leave KVM_RUN (a blocked one with EINTR) and look at the gate."""
        for v in self.vcpus:
            v.kick()

    def request_stop(self, reason: str = "interrupted") -> None:
        """Stop a run from any thread (timeout, Ctrl-C, a controlling program); a paused run too."""
        self.gate.request_stop(reason)

    def pause(self, timeout: float = 10.0) -> bool:
        """Stop every vCPU where it is and keep it there until ``resume()``.

        Call it from another thread while ``run()`` (or ``start()``) runs the machine.
        Returns True once all vCPUs are parked, False if no run is in progress or it
        ended meanwhile (a stopped machine needs no pausing). Pauses nest: each True
        needs its ``resume()``. A paused machine can be inspected, snapshotted or
        migrated; ``request_stop()`` ends a paused run too.
        """
        if current_vcpu() is not None:
            raise RuntimeError("pause() from inside a vCPU thread (a device callback?) would wait for itself")
        try:
            return self.gate.pause(timeout)
        except TimeoutError as e:
            raise KvmpyError(str(e)) from None

    def resume(self) -> None:
        """Release one ``pause()``; the vCPUs go on when every pause is released
        (nothing happens if none is held)."""
        self.gate.resume()

    @property
    def running(self) -> bool:
        """True while a run is in progress (paused or not)."""
        return self.gate.running

    @property
    def paused(self) -> bool:
        """True while a run is in progress and all its vCPUs are parked by ``pause()``."""
        return self.gate.paused

    def start(self, timeout: float | None = None, trace=None) -> None:
        """``run()`` in a background thread; ``wait()`` returns its RunResult. When this
        returns the run is in progress, so ``pause()`` and ``request_stop()`` apply to it."""
        if self.running:
            raise RuntimeError("this Machine is already running")
        box: dict = {}

        def body():
            try:
                box["result"] = self.run(timeout, trace)
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=body, daemon=True, name="machine-run")
        self._background = (t, box)
        t.start()
        while t.is_alive() and not self.gate.run_active.wait(0.005):
            pass

    def wait(self, timeout: float | None = None) -> RunResult:
        """The RunResult of the run ``start()`` began (raises what run() raised);
        TimeoutError if it has not ended within ``timeout`` seconds."""
        if self._background is None:
            raise RuntimeError("wait() needs a run begun with start()")
        t, box = self._background
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"the run has not ended within {timeout} s")
        self._background = None
        if "error" in box:
            raise box["error"]
        return box["result"]

    def live_stats(self) -> Stats:
        """``stats`` including a run in progress: the C loop's counters are added to
        ``stats`` when a run ends; this adds what they hold so far to a copy."""
        s = copy.deepcopy(self.stats)
        if self.running:
            for loop in self._native_loops.values():
                loop.add_counters(s, take=False)
        return s

    # --- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        """Release the vCPUs, the VM, guest memory, disks and (if ours) /dev/kvm. Idempotent.

        A run in progress (in another thread) is stopped and waited for first: the C loop
        and the devices hold pointers into the memory this frees.
        """
        if self.gate.running:
            if current_vcpu() is not None:
                raise RuntimeError("close() called from inside run() (a device callback?)")
            self.request_stop("closed")
            self.gate.run_idle.wait()
        self.watchdog.close()
        self.console.close()
        if self.platform is not None:
            self.platform.close()
        if self.reset_point is not None:
            self.reset_point.close()
            self.reset_point = None
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self._own_kvm and self.kvm is not None:
            self.kvm.close()
            self.kvm = None
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer.detach()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _finalize(shape: str, backends: list, vm, kvm) -> None:
    """close() for a Machine that was dropped unclosed: the devices' backends (Platform.backends_to_close),
    then the vCPUs, VM and RAM, then /dev/kvm."""
    warnings.warn(f"unclosed kvmpy.Machine {shape}: close() it or use 'with'", ResourceWarning)
    for b in backends:
        b.close()
    vm.close()
    if kvm is not None:
        kvm.close()


def _net_spec(net) -> "Net | None":
    """``net=`` as a Net (kvmpy/net, loaded for machines with a network only); ValueError if bad."""
    if net is None:
        return None
    from ..net import Net
    return Net.parse(net)


def check_shape(mem_size: int, cpus: int, irqchip: bool, disks: int, virtio_transport: str = "mmio",
                net_devices: int = 0, net_transport: str | None = None) -> None:
    """ValueError unless a Machine of this shape can be built. ``disks`` counts the disks and the
    rng (on ``virtio_transport``), ``net_devices`` the network and vsock (on ``net_transport``,
    None: the same)."""
    if mem_size < 64 * 1024 or mem_size % PAGE_SIZE:
        raise ValueError(f"mem_size must be a multiple of 4 KiB and at least 64 KiB, got {mem_size:#x}")
    if not 1 <= cpus <= 255:
        raise ValueError(f"cpus must be between 1 and 255, got {cpus}")
    if cpus > 1 and not irqchip:
        raise ValueError("several vCPUs need irqchip=True: application processors wait in the "
                         "in-kernel local APIC for the INIT/SIPI that starts them")
    if virtio_transport not in ("mmio", "pci"):
        raise ValueError(f"virtio_transport must be 'mmio' or 'pci', got {virtio_transport!r}")
    net_transport = virtio_transport if net_transport is None else net_transport
    if net_transport not in ("mmio", "pci"):
        raise ValueError(f"net_transport must be 'mmio' or 'pci', got {net_transport!r}")
    if net_transport == "pci" and virtio_transport != "pci":
        raise ValueError("net_transport='pci' needs virtio_transport='pci' (the PCI host bridge)")
    pci = (disks if virtio_transport == "pci" else 0) + (net_devices if net_transport == "pci" else 0)
    if pci > layout.MAX_PCI_DEVICES:
        raise ValueError(f"at most {layout.MAX_PCI_DEVICES} virtio-pci devices (disks, the rng, the network "
                         f"and vsock), got {pci}")
    mmio = (disks if virtio_transport == "mmio" else 0) + (net_devices if net_transport == "mmio" else 0)
    if mmio > layout.MAX_VIRTIO_DEVICES:
        raise ValueError(f"at most {layout.MAX_VIRTIO_DEVICES} virtio devices (disks, the rng, the network "
                         f"and vsock), got {mmio}")


def _kicker(machine):
    """``machine.kick`` through a weak proxy: a late caller (the console's writer thread
    failing after the machine is gone) finds no vCPU to kick, not a ReferenceError."""
    def kick() -> None:
        try:
            machine.kick()
        except ReferenceError:
            pass
    return kick
