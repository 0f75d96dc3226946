"""The running half of Machine: vCPU threads, the Python and native run loops, exit dispatch.

``Machine`` (machine.py) builds the computer; this mixin runs it. Each vCPU runs in its
own thread (vCPU 0 in the caller's). On the native path C serves the fast-path exits
(csrc/runloop.c) and returns the rest; on the Python path every exit comes here. Either
way an exit is decoded once into a value (``kvmpy.kvm.exits``) and handled in one ``match``.
"""
from __future__ import annotations

import copy
import errno
import os
import threading
import time
from dataclasses import dataclass

from ..kvm import exits
from ..kvm.abi import SystemEventType
from ..debug.disasm import decode
from ..errors import GuestError, GuestMemoryError, KvmError
from ..kvm import Vcpu
from ..debug.trace import KINDS, Replayer, exiting_instruction
from .native import RUN_DRAIN, RUN_EXIT, NativeLoop, NativeVirtioBlk
from .pause import Pausing
from ..x86 import inspect, layout, modes
from ..kvm.regs import Regs, Sregs


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


_CLK_TCK = os.sysconf("SC_CLK_TCK")


class RunLoop(Pausing):
    """Mixin for Machine: ``run()``, ``request_stop()`` and everything they drive
    (pausing, and runs in the background, come from ``Pausing``: pausing.py)."""

    # --- running ---------------------------------------------------------------------
    def run(self, timeout: float | None = None, trace=None) -> RunResult:
        """Run the guest until it stops; see RunResult. Failures raise GuestError.

        With several vCPUs, vCPU 0 runs in this thread and the others in their own
        threads; the first vCPU to stop the machine stops them all. ``trace`` (a
        ``kvmpy.debug.trace.Tracer``) sees every exit; a traced run takes the Python loop.
        """
        pause = self._pause
        with pause.cond:
            if self._run_active.is_set():
                raise RuntimeError("this Machine is already running")
            pause.requested, pause.active, pause.parked = 0, len(self.vcpus), 0
            self._stop = _Stop()            # before the run shows as active: a stop from now on counts
            self._run_active.set()
            self._run_idle.clear()
        try:
            return self._run(timeout, trace)
        finally:
            with pause.cond:
                self._run_active.clear()
                self._run_idle.set()
                pause.cond.notify_all()

    def _wait_for_run_to_end(self) -> None:
        """For close(): stop a run going on in another thread and wait until it has ended."""
        active = getattr(self, "_run_active", None)
        if active is None or not active.is_set():
            return
        if getattr(self._tls, "vcpu", None) is not None:
            raise RuntimeError("close() called from inside run() (a device callback?)")
        self.request_stop("closed")
        self._run_idle.wait()

    def _run(self, timeout, trace) -> RunResult:
        self._tracer = trace
        stepping = trace is not None and trace.steps
        if stepping:
            for v in self.vcpus:
                trace.start_steps(v.id, v.get_regs())
                v.single_step(True)
        try:
            return self._run_vcpus(timeout)
        finally:
            if stepping:
                for v in self.vcpus:
                    v.single_step(False)

    def _run_vcpus(self, timeout) -> RunResult:
        with self._pause.cond:                  # a pause() already asked for keeps its kick
            for v in self.vcpus:
                v.immediate_exit = bool(self._pause.requested) or self._stop.reason is not None
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, self.request_stop, args=("timeout",))
            timer.daemon = True
            timer.start()
        threads = [threading.Thread(target=self._vcpu_thread, args=(v,), daemon=True,
                                    name=f"vcpu{v.id}") for v in self.vcpus[1:]]
        running = threading.Event()
        if self.native:
            key = (self.pio.generation, self.mmio.generation)
            if getattr(self, "_loops_key", None) != key:    # fast-path tables follow the buses
                self._loops = {v.id: self._native_loop(v) for v in self.vcpus}
                self._loops_key = key
            threads.append(threading.Thread(target=self._flusher, args=(running,), daemon=True,
                                            name="serial-flush"))
        try:
            for t in threads:
                t.start()
            self._vcpu_thread(self.vcpus[0])
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()                    # a callback already under way must finish first
            self.request_stop("stopped")        # wake the other vCPUs if vCPU 0 ended first
            running.set()
            for t in threads:
                t.join()
            self._drain_serial()
            self._flush_serial()
        stop = self._stop
        if stop.error is not None:
            self._serial_error = None
            raise stop.error
        if self._serial_error is not None:      # the output stream failed after the guest stopped
            err, self._serial_error = self._serial_error, None
            raise err
        vcpu = self.vcpus[stop.vcpu if stop.vcpu is not None else 0]
        return RunResult(stop.reason, stop.status, vcpu.get_regs(), vcpu.id, stop.exit)

    def request_stop(self, reason: str = "interrupted") -> None:
        """Stop a run from any thread (timeout, Ctrl-C, a controlling program); a paused run too."""
        self._stop.set(reason)
        for v in self.vcpus:
            v.kick()
        with self._pause.cond:
            self._pause.cond.notify_all()

    def _on_debug_exit(self, status: int) -> None:
        self._stop.set("exit", status, self._current_vcpu())

    def _on_reset(self) -> None:
        self._stop.set("reset", None, self._current_vcpu())

    def _current_vcpu(self) -> int | None:
        return getattr(self._tls, "vcpu", None)

    _tls = threading.local()

    @staticmethod
    def _guest_ticks() -> int:
        """This thread's guest_time (clock ticks) from /proc, or 0 if unavailable."""
        try:
            with open(f"/proc/self/task/{threading.get_native_id()}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[40])
        except (OSError, IndexError, ValueError):
            return 0

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        self._tls.vcpu = vcpu.id
        vcpu.set_thread(threading.get_ident())
        ticks = self._guest_ticks()
        try:
            if self.native and self._tracer is None:
                self._run_native(vcpu)
            else:
                self._loop(vcpu)
            self._settle(vcpu)              # a stopped machine's state is whole too (snapshots)
        except GuestError as e:
            self._stop.set(e.reason, vcpu=vcpu.id, exit=e.exit, error=e)
        except BaseException as e:          # a bug or KvmError: stop everyone and re-raise in run()
            self._stop.set("error", vcpu=vcpu.id, error=e)
        finally:
            self.stats.guest_ns += (self._guest_ticks() - ticks) * 1_000_000_000 // _CLK_TCK
            with self._pause.cond:              # a pause waits for running vCPUs only
                self._pause.active -= 1
                self._pause.cond.notify_all()
            self._tls.vcpu = None
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
        if self._tracer is not None:
            dispatch = self._traced_dispatch
        pause = self._pause
        try:
            while stop.reason is None:
                t_in = clock()
                vmm_ns += t_in - t_out
                rc = enter()
                t_out = clock()
                kvm_ns += t_out - t_in
                dispatch(vcpu, exit_value(rc))
                if pause.requested:
                    self._park(vcpu)
                    t_out = clock()             # parked time is nobody's work
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
        loop, stop, pause = self._loops[vcpu.id], self._stop, self._pause
        loop.restart_clock()                                # not from the last run's last exit
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
                if pause.requested:
                    self._park(vcpu)
                    loop.restart_clock()                    # parked time is nobody's work
        finally:
            self._add_counters(loop.take_counters())

    def live_stats(self):
        """``stats`` including a run in progress: the C loop's counters are added to
        ``stats`` when a run ends; this adds what they hold so far to a copy."""
        s = copy.deepcopy(self.stats)
        if self.running and self.native:
            for loop in getattr(self, "_loops", {}).values():
                self._add_counters(loop.peek_counters(), s)
        return s

    def _add_counters(self, c: dict[str, int], s=None) -> None:
        s = self.stats if s is None else s
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
            if not self._drain_serial():
                return

    def _traced_dispatch(self, vcpu: Vcpu, ex) -> None:
        """_dispatch, then tell the tracer (after, so an IN shows what the guest got).
        When single-stepping, a debug exit is a step: report it and carry on."""
        tracer = self._tracer
        if tracer.steps and isinstance(ex, exits.Debug):
            if tracer.vcpus is None or vcpu.id in tracer.vcpus:
                tracer.emit(tracer.step_event(vcpu.id, vcpu.get_regs(), self._insn_reader(vcpu)))
            return
        wanted = tracer.wants(vcpu.id, ex)
        if isinstance(tracer, Replayer) and wanted:
            self._replay(vcpu, ex, tracer.next_event(vcpu.id, ex))
            return
        try:
            self._dispatch(vcpu, ex)
        finally:
            if wanted:
                try:
                    tracer.emit(self._trace_event(vcpu, ex))
                except Exception:           # a trace must never hide the guest's own error
                    if not isinstance(ex, (exits.Shutdown, exits.InternalError, exits.FailEntry)):
                        raise

    def _replay(self, vcpu: Vcpu, ex, ev: dict) -> None:
        """Inputs come from the recording; outputs go to the devices as usual."""
        if isinstance(ex, exits.IoIn):
            self.stats.exits["io-in"] += 1
            vcpu.complete_io_in(ex, bytes.fromhex(ev["data"]))
        elif isinstance(ex, exits.MmioRead):
            self.stats.exits["mmio-read"] += 1
            vcpu.complete_mmio_read(bytes.fromhex(ev["data"]).ljust(ex.size, b"\0"))
        else:
            self._dispatch(vcpu, ex)

    def _insn_reader(self, vcpu: Vcpu):
        """insn_at(rip) -> the instruction text at rip in the vCPU's current mode."""
        decode_at = self._decoder(vcpu.get_sregs())
        return lambda rip: (decode_at(rip) or [(0, 0, "")])[0][2]

    def _decoder(self, sregs: Sregs):
        bits = modes.code_bits(sregs)

        def decode_at(rip: int):
            try:
                linear = rip if bits == 64 else (sregs.cs.base + rip) & 0xFFFFFFFF
                gpa = self.guest_physical(sregs, linear)
                code = self.memory.read(gpa, min(16, self.memory.region_for(gpa).end - gpa))
            except (ValueError, GuestMemoryError):
                return []
            return decode(code, rip, bits)
        return decode_at

    def _trace_event(self, vcpu: Vcpu, ex):
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        decode_at = self._decoder(sregs)
        data_in = None
        if isinstance(ex, exits.IoIn):
            data_in = vcpu.io_data(ex)
        elif isinstance(ex, exits.MmioRead):
            data_in = vcpu.mmio_data(ex.size)
        kind = KINDS.get(type(ex), "other")
        return self._tracer.event(vcpu.id, ex, data_in, regs.rip, exiting_instruction(decode_at, regs.rip, kind))

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
        for i in range(0, size * count, size):              # string I/O: `rep outs` sends count items
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
        """Translate a guest-virtual (linear) address with the guest's page tables, in any
        paging mode; raises inspect.TranslationError (a ValueError) when it does not map."""
        return inspect.translate(self.memory.read_u64, sregs, vaddr).phys

    def disassemble_at(self, regs: Regs, sregs: Sregs, count: int = 6) -> str:
        """The instructions at the vCPU's RIP, decoded in its current mode (read through
        the page tables, across page boundaries)."""
        return inspect.code_at(regs, sregs, self.memory, count)

