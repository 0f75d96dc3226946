"""Machine: the one place that wires memory, vCPUs, devices and a loaded image together.

A Machine is a small PC-like computer: RAM from address 0, a 16550 UART at COM1,
QEMU's isa-debug-exit at port 0xf4, an i8042 whose reset line ends the run, and
buses on which a user can attach devices written in Python. ``run()`` drives the
vCPUs: each exit is decoded once (``kvmpy.exits``) and dispatched in one ``match``.

    with Machine(mem_size=64 << 20) as m:
        m.load("hello.elf")
        result = m.run(timeout=5)
"""
from __future__ import annotations

import errno
import io
import os
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO

from . import exits
from .abi import Cap, SystemEventType
from .devices import Bus, DebugExit, FwCfg, I8042, NullTrigger, Serial16550
from .disasm import disassemble
from .devices.virtio.blk import VirtioBlk
from .devices.virtio.mmio import VirtioMmioTransport
from .errors import DeviceError, GuestError, GuestMemoryError, KvmError, LoaderError
from .kvm import Kvm, Vcpu, Vm
from .loader import LoadedImage, load
from .loader.elf import ELFMAG
from .loader.multiboot import is_multiboot, load_multiboot, module_string
from .native import RUN_DRAIN, RUN_EXIT, NativeLoop, NativeUart, NativeVirtioBlk
from .stats import Stats
from .x86 import cpuid, layout, modes, mptable, msrs, paging
from .x86.regs import CR0_PG, Regs, Sregs

PAGE = 4096


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


@dataclass(frozen=True)
class RunResult:
    """Why a run stopped.

    ``reason`` is one of "exit" (isa-debug-exit), "halt", "reset", "timeout",
    "interrupted" or "debug"; ``status`` is the guest's exit status ((v << 1) | 1
    for isa-debug-exit, 0 for a halt) or None; ``regs`` are the stopping vCPU's.
    """

    reason: str
    status: int | None
    regs: Regs
    vcpu: int = 0
    exit: object = None


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


class _Stop:
    """The first stop request of a run wins; later ones are ignored."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reason: str | None = None
        self.status: int | None = None
        self.vcpu: int | None = None
        self.exit = None
        self.error: BaseException | None = None

    def set(self, reason, status=None, vcpu=None, exit=None, error=None) -> bool:
        with self.lock:
            if self.reason is not None:
                return False
            self.reason, self.status, self.vcpu, self.exit, self.error = reason, status, vcpu, exit, error
            return True


class Machine:
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
                 disks: list[str | Disk] = (), fw_cfg: dict[str, bytes | str | os.PathLike] | None = None):
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
        self.stats = Stats()
        self.image: LoadedImage | None = None
        self._own_kvm = not isinstance(kvm, Kvm)
        self.kvm = Kvm(kvm) if self._own_kvm else kvm
        self.vm: Vm | None = None
        try:
            self.vm = self.kvm.create_vm()
            self._create_platform(irqchip)
            self._add_ram(mem_size)
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

    def _add_ram(self, size: int) -> None:
        """RAM from 0; beyond 3 GiB it continues at 4 GiB, leaving the hole below 4 GiB for MMIO."""
        low = min(size, 3 * layout.GiB)
        self.vm.add_memory(0, low)
        if size > low:
            self.vm.add_memory(4 * layout.GiB, size - low)

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
            else:
                blk = VirtioBlk(disk.path, readonly=disk.readonly)
                self.disks.append(blk)
                trigger = _IrqLine(self.vm, irq) if self.irqchip else NullTrigger()
                dev = _Locked(VirtioMmioTransport(blk, self.memory, trigger), threading.Lock())
        except DeviceError as e:
            raise DeviceError(f"disk {i} ({disk.path}): {e}") from None
        self.mmio.attach(base, layout.VIRTIO_MMIO_SIZE, dev, name)

    def virtio_mmio_cmdline(self) -> str:
        """How a Linux guest learns about the disks: ``virtio_mmio.device=SIZE@ADDR:IRQ`` each."""
        return " ".join(
            f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE // 1024}K@{layout.VIRTIO_MMIO_BASE + i * layout.VIRTIO_MMIO_SIZE:#x}:"
            f"{layout.VIRTIO_MMIO_IRQS[i]}" for i in range(len(self.disks)))

    @property
    def memory(self):
        """Guest RAM (``kvmpy.memory.GuestMemory``): bounds-checked read/write by physical address."""
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

    def _drain_serial(self) -> None:
        """Write the native UART's collected output to serial_out, in one write."""
        if self.native:
            with self._serial_lock:
                data = self.serial.take_output()
                if data:
                    self.serial_out.write(data)

    # --- loading ---------------------------------------------------------------------
    def load(self, image, format: str = "auto", *, entry: int | None = None, mode: str | None = None,
             load_addr: int | None = None, user: bool = False, cmdline: str = "",
             modules=(), initrd=None) -> LoadedImage:
        """Load a guest image (path or bytes) and point vCPU 0 at its entry.

        ``format``: "auto" (multiboot if the image has a multiboot header, as QEMU's
        -kernel decides; else ELF by magic; else raw), "multiboot", "elf" or "raw".
        Raw images take ``load_addr``, ``entry`` and ``mode`` ("real", "protected",
        "long"); ELF32 enters in protected mode, ELF64 in long mode. ``user`` starts a
        long-mode guest in ring 3. ``cmdline`` goes to multiboot kernels and to fw_cfg;
        ``modules`` are multiboot modules: paths, or (path, args) pairs.
        """
        data, name = self._read_image(image)
        reserved = [layout.LOW_RESERVED]
        try:
            if format == "multiboot" or (format == "auto" and is_multiboot(data)):
                img = load_multiboot(self.memory, data, cmdline=cmdline, reserved=reserved,
                                     modules=self._read_modules(modules), image_name=name)
            else:
                is_elf = format == "elf" or (format == "auto" and data[:4] == ELFMAG)
                if not is_elf and (mode or "real") == "real":
                    reserved = []                   # a boot sector lives in the first MiB
                img = load(self.memory, data, format, load_addr=load_addr, entry=entry, mode=mode,
                           reserved=reserved)
        except LoaderError as e:
            raise LoaderError(f"{name}: {e}") from None
        self.fw_cfg.set_cmdline(cmdline)
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

    @staticmethod
    def _read_image(image) -> tuple[bytes, str]:
        if isinstance(image, (bytes, bytearray, memoryview)):
            return bytes(image), "image"
        name = os.fspath(image)
        try:
            with open(name, "rb") as f:
                return f.read(), name
        except OSError as e:
            raise LoaderError(f"cannot read image {name!r}: {e.strerror or e}") from None

    @staticmethod
    def _read_modules(modules) -> list[tuple[bytes, str]]:
        """Multiboot modules as (bytes, string): the string is "FILE ARGS", as QEMU passes it."""
        out = []
        for m in modules:
            path, args = (m, "") if isinstance(m, (str, os.PathLike)) else m
            try:
                with open(path, "rb") as f:
                    out.append((f.read(), module_string(os.fspath(path), args)))
            except OSError as e:
                raise LoaderError(f"cannot read module {os.fspath(path)!r}: {e.strerror or e}") from None
        return out

    # --- running ---------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> RunResult:
        """Run the guest until it stops; see RunResult. Failures raise GuestError.

        With several vCPUs, vCPU 0 runs in this thread and the others in their own
        threads; the first vCPU to stop the machine stops them all.
        """
        self._stop = _Stop()
        for v in self.vcpus:
            v.immediate_exit = False
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, self.request_stop, args=("timeout",))
            timer.daemon = True
            timer.start()
        threads = [threading.Thread(target=self._vcpu_thread, args=(v,), daemon=True,
                                    name=f"vcpu{v.id}") for v in self.vcpus[1:]]
        running = threading.Event()
        if self.native:
            self._loops = {v.id: self._native_loop(v) for v in self.vcpus}
            threads.append(threading.Thread(target=self._flusher, args=(running,), daemon=True,
                                            name="serial-flush"))
        try:
            for t in threads:
                t.start()
            self._vcpu_thread(self.vcpus[0])
        finally:
            if timer is not None:
                timer.cancel()
            self.request_stop("stopped")        # wake the other vCPUs if vCPU 0 ended first
            running.set()
            for t in threads:
                t.join()
            self._drain_serial()
            self._flush_serial()
        stop = self._stop
        if stop.error is not None:
            raise stop.error
        vcpu = self.vcpus[stop.vcpu if stop.vcpu is not None else 0]
        return RunResult(stop.reason, stop.status, vcpu.get_regs(), vcpu.id, stop.exit)

    def request_stop(self, reason: str = "interrupted") -> None:
        """Stop a run from any thread (timeout, Ctrl-C, a controlling program)."""
        self._stop.set(reason)
        for v in self.vcpus:
            v.kick()

    def _on_debug_exit(self, status: int) -> None:
        self._stop.set("exit", status, self._current_vcpu())

    def _on_reset(self) -> None:
        self._stop.set("reset", None, self._current_vcpu())

    def _current_vcpu(self) -> int | None:
        return getattr(self._tls, "vcpu", None)

    _tls = threading.local()

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        self._tls.vcpu = vcpu.id
        vcpu.set_thread(threading.get_ident())
        try:
            if self.native:
                self._run_native(vcpu)
            else:
                self._loop(vcpu)
        except GuestError as e:
            self._stop.set(e.reason, vcpu=vcpu.id, exit=e.exit, error=e)
        except BaseException as e:          # a bug or KvmError: stop everyone and re-raise in run()
            self._stop.set("error", vcpu=vcpu.id, error=e)
        finally:
            vcpu.set_thread(None)
            for v in self.vcpus:
                if v is not vcpu:
                    v.kick()

    def _loop(self, vcpu: Vcpu) -> None:
        """The Python run loop: KVM_RUN, decode, dispatch, repeat until a stop is requested."""
        stats, stop = self.stats, self._stop
        clock = time.perf_counter_ns
        t_out = clock()
        kvm_ns = vmm_ns = 0
        enter, exit_value, dispatch = vcpu.enter, vcpu.exit_value, self._dispatch
        try:
            while stop.reason is None:
                t_in = clock()
                vmm_ns += t_in - t_out
                rc = enter()
                t_out = clock()
                kvm_ns += t_out - t_in
                dispatch(vcpu, exit_value(rc))
        finally:
            stats.kvm_ns += kvm_ns
            stats.vmm_ns += vmm_ns

    def _native_loop(self, vcpu: Vcpu) -> NativeLoop:
        loop = NativeLoop(vcpu, self.serial, layout.COM1_PORT)
        claims = [(a.base, a.length) for a in self.pio.devices if a.name != "com1"]
        native = [a for a in self.mmio.devices if isinstance(a.device, NativeVirtioBlk)]
        self._native_mmio_names = [a.name for a in native]
        loop.set_tables(claims, range(layout.COM1_PORT, layout.COM1_PORT + layout.COM_PORT_COUNT),
                        [(a.base, a.length) for a in self.mmio.devices if a not in native],
                        [(a.base, a.length, a.device) for a in native])
        return loop

    def _run_native(self, vcpu: Vcpu) -> None:
        """The native loop: C serves the fast-path exits; Python dispatches the rest.

        C counts the exits it serves and all the time (its own and Python's share);
        the counters are added to ``stats`` when this vCPU's run ends.
        """
        loop, stop = self._loops[vcpu.id], self._stop
        try:
            while stop.reason is None:
                rc = loop.run()                             # GIL released inside
                if rc == RUN_EXIT:
                    self._dispatch(vcpu, vcpu.exit_value())
                elif rc == RUN_DRAIN:
                    self._drain_serial()
                elif rc == -errno.EINTR or rc == -errno.EAGAIN:
                    self._dispatch(vcpu, exits.Interrupted())
                else:
                    raise KvmError(-rc, "KVM_RUN")
        finally:
            self._add_counters(loop.take_counters())

    def _add_counters(self, c: dict[str, int]) -> None:
        s = self.stats
        for key, name in (("io_out", "io-out"), ("io_in", "io-in"), ("mmio_read", "mmio-read"),
                          ("mmio_write", "mmio-write")):
            if c[key]:
                s.exits[name] += c[key]
        for key, name in (("uart", "com1"), ("unclaimed_pio", "unclaimed-pio"),
                          ("unclaimed_mmio", "unclaimed-mmio")):
            if c[key]:
                s.devices[name] += c[key]
        for name, n in zip(self._native_mmio_names, c["native_mmio"]):
            if n:
                s.devices[name] += n
        s.unclaimed_writes += c["unclaimed_writes"]
        s.kvm_ns += c["kvm_ns"]
        s.vmm_ns += c["vmm_ns"]

    def _flusher(self, done: threading.Event) -> None:
        """While the guest runs, write out its serial output at least every 20 ms."""
        while not done.wait(0.02):
            self._drain_serial()
            self._flush_serial()

    def _dispatch(self, vcpu: Vcpu, ex) -> None:
        """Handle one exit: the single ``match`` over exit values."""
        stats, stop = self.stats, self._stop
        match ex:                       # the hot exits are NamedTuples: unpack, don't getattr
            case exits.IoOut():
                stats.exits["io-out"] += 1
                self._pio_out(*ex)
            case exits.IoIn():
                stats.exits["io-in"] += 1
                port, size, count, _ = ex
                vcpu.complete_io_in(ex, self._pio_in(port, size, count))
            case exits.MmioWrite():
                stats.exits["mmio-write"] += 1
                addr, size, data = ex
                self._mmio(addr, size, int.from_bytes(data, "little"))
            case exits.MmioRead():
                stats.exits["mmio-read"] += 1
                addr, size = ex
                vcpu.complete_mmio_read(self._mmio(addr, size).to_bytes(size, "little"))
            case exits.Interrupted():
                stats.exits["interrupted"] += 1
                vcpu.immediate_exit = stop.reason is not None
            case exits.Hlt():
                stats.exits["hlt"] += 1
                stop.set("halt", 0, vcpu.id, ex)
            case exits.Debug():
                stats.exits["debug"] += 1
                stop.set("debug", None, vcpu.id, ex)
            case exits.SystemEvent(type=t) if t == SystemEventType.RESET:
                stats.exits["system-event"] += 1
                stop.set("reset", None, vcpu.id, ex)
            case exits.Shutdown():
                stats.exits["shutdown"] += 1
                raise self._guest_error(vcpu, ex, "triple-fault", "the guest triple-faulted (KVM_EXIT_SHUTDOWN)")
            case exits.FailEntry(hardware_entry_failure_reason=hw):
                stats.exits["fail-entry"] += 1
                raise self._guest_error(vcpu, ex, "entry-failure",
                                        f"KVM could not enter the guest (hardware reason {hw:#x}): invalid CPU state")
            case exits.InternalError():
                stats.exits["internal-error"] += 1
                raise self._guest_error(vcpu, ex, "internal-error",
                                        f"KVM internal error ({ex.kind}); on hosts without hardware "
                                        "virtualisation int3/int $n at CPL0 are not emulated (HOST-NOTES)")
            case _:
                stats.exits["other"] += 1
                raise self._guest_error(vcpu, ex, "unsupported-exit", f"unsupported exit: {ex}")

    # --- dispatch --------------------------------------------------------------------
    def _pio_out(self, port: int, size: int, count: int, data: bytes) -> None:
        hit = self.pio.lookup(port)
        if hit is None:
            self.stats.devices["unclaimed-pio"] += count
            self.stats.unclaimed_writes += count
            return
        dev, off, name = hit
        self.stats.devices[name] += count
        native_uart = dev is self.serial and self.native
        for i in range(0, size * count, size):              # string I/O: `rep outs` sends count items
            if native_uart and not self.serial.tx_space:
                self._drain_serial()                        # the C loop left a burst too big for its buffer
            dev.write(off, size, int.from_bytes(data[i:i + size], "little"))

    def _pio_in(self, port: int, size: int, count: int) -> bytes:
        hit = self.pio.lookup(port)
        if hit is None:
            self.stats.devices["unclaimed-pio"] += count
            return b"\xff" * (size * count)                # an empty ISA bus floats high
        dev, off, name = hit
        self.stats.devices[name] += count
        mask = (1 << (8 * size)) - 1
        return b"".join((dev.read(off, size) & mask).to_bytes(size, "little") for _ in range(count))

    def _mmio(self, addr: int, size: int, value: int | None = None) -> int:
        hit = self.mmio.lookup(addr)
        if hit is None:
            self.stats.devices["unclaimed-mmio"] += 1
            if value is not None:
                self.stats.unclaimed_writes += 1
            return 0
        dev, off, name = hit
        self.stats.devices[name] += 1
        if value is not None:
            dev.write(off, size, value)
            return 0
        return dev.read(off, size) & ((1 << (8 * size)) - 1)

    def _flush_serial(self) -> None:
        flush = getattr(self.serial_out, "flush", None)
        if flush is not None:
            try:
                flush()
            except (OSError, ValueError):
                pass

    # --- failure reports -------------------------------------------------------------
    def _guest_error(self, vcpu: Vcpu, ex, reason: str, message: str) -> GuestError:
        regs = sregs = None
        code = ""
        try:
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
            code = self.disassemble_at(regs, sregs)
        except Exception as e:          # the report must not hide the original failure
            code = f"(cannot read guest code: {e})"
        err = GuestError(f"vCPU {vcpu.id}: {message}", exit=ex, regs=regs, sregs=sregs, disassembly=code)
        err.reason = reason
        return err

    def guest_physical(self, sregs: Sregs, vaddr: int) -> int:
        """Translate a guest-virtual (linear) address with the guest's page tables."""
        if not sregs.cr0 & CR0_PG:
            return vaddr
        if not sregs.cr4 & (1 << 5):
            raise ValueError("32-bit non-PAE paging is not walked")
        gpa, _ = paging.translate(self.memory.read_u64, sregs.cr3, vaddr)
        return gpa

    def disassemble_at(self, regs: Regs, sregs: Sregs, count: int = 6) -> str:
        """The instructions at the vCPU's RIP, decoded in its current mode."""
        bits = modes.code_bits(sregs)
        linear = regs.rip if bits == 64 else (sregs.cs.base + regs.rip) & 0xFFFFFFFF
        gpa = self.guest_physical(sregs, linear)
        region = self.memory.region_for(gpa)
        code = self.memory.read(gpa, min(16 * count, region.end - gpa))
        return disassemble(code, regs.rip, bits, count)

    # --- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        """Release the vCPUs, the VM, guest memory, disks and (if ours) /dev/kvm. Idempotent."""
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
