"""One vCPU's thread: KVM_RUN, the exit decoded once into a value, one ``match`` to handle it.

A ``VcpuLoop`` is handed what it needs and nothing more: the vCPU, the port and MMIO
buses, the run's statistics, the pause gate (whose ``stop`` token ends the run), the
console's ``drain`` and, for the native loop, the C loop's table. It has two loops:

* ``python_loop``: every exit comes to Python (teaching, differential tests, traces);
* ``native_loop``: ``kvmpy_run()`` in C (GIL released) serves the fast-path exits
  (csrc/runloop.c) and returns the rest, which go through the same ``dispatch``.

Between exits the loop checks the stop token and parks at the pause gate when asked,
after ``settle()`` has completed the exit it was serving. A test can drive a loop with
a fake vCPU whose ``enter()``/``exit_value()`` return scripted exits.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import threading
import time
from collections import defaultdict

from .._native import lib
from ..errors import GuestError, KvmError
from ..kvm import exits
from ..kvm.abi import SystemEventType
from .native import RUN_DRAIN, RUN_EXIT

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_TICK_S = 1 / _CLK_TCK
_KIND = exits.KIND
_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: (1 << 64) - 1}     # by access size
_UNCLAIMED = (None, 0, "unclaimed-pio")
FOLD_NS = 20_000_000        # the Python loop adds its counts to the run's stats at least this often
_tls = threading.local()

INTERNAL_ERROR_HINT = ("on hosts without hardware virtualisation (kvm_pvm) ring-0 code is emulated and some "
                       "instructions cannot be (int3, int $n, lock cmpxchg16b, xrstor, xgetbv, clac, ...): "
                       "run a 64-bit guest in ring 3 (--user) or see docs/host-notes.md in kvmpy's source")
# The first line of x86.disasm.disassemble(): "=> ADDR: BYTES  MNEMONIC OPERANDS", BYTES being
# two-digit hex pairs, each followed by a space (no x86 mnemonic is two hex digits).
_FIRST_INSN = re.compile(r"=> (0x[0-9a-f]+): ((?:[0-9a-f]{2} )+)\s*(\S.*)")


def current_vcpu() -> int | None:
    """The id of the vCPU this thread runs, or None outside a vCPU thread."""
    return getattr(_tls, "vcpu", None)


class GuestClock:
    """This thread's guest time (``guest_time`` in /proc, clock ticks), counted since its last look.

    One per thread (``guest_clock()``), its /proc file kept open for the thread's life. The
    kernel counts guest time in ticks (10 ms at 100 Hz), so a run shorter than a tick learns
    nothing from it: a run looks (``take()``) only when it lasted a tick or more, and guest
    time of the shorter runs before it counts then. Reading the file costs ~8 µs here, which
    was a tenth of a fuzz case.
    """

    def __init__(self):
        try:
            self.fd = os.open(f"/proc/self/task/{threading.get_native_id()}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = -1
        self.seen = self.read()

    def read(self) -> int:
        try:
            return int(os.pread(self.fd, 4096, 0).rsplit(b")", 1)[1].split()[40])
        except (OSError, IndexError, ValueError):
            return 0

    def take(self) -> int:
        """Ticks since the last look."""
        now = self.read()
        ticks, self.seen = max(0, now - self.seen), now
        return ticks

    def __del__(self):
        if self.fd >= 0:
            os.close(self.fd)


def guest_clock() -> GuestClock:
    """This thread's GuestClock."""
    clock = getattr(_tls, "guest_clock", None)
    if clock is None:
        clock = _tls.guest_clock = GuestClock()
    return clock


class VcpuLoop:
    """The loops and the exit dispatch of one vCPU.

    ``memory`` is read only to describe a guest failure (the code at RIP). ``native``
    is the vCPU's ``NativeLoop`` (None: the Python loop). ``dispatch`` may be wrapped
    (a tracer does: ``kvmpy.debug.traced``); ``settle`` and the loops use the wrapper.
    """

    def __init__(self, vcpu, pio, mmio, stats, gate, memory, drain=lambda: True, native=None):
        self.vcpu, self.pio, self.mmio, self.stats = vcpu, pio, mmio, stats
        self.gate, self.memory, self.drain, self.native = gate, memory, drain, native
        self.handle = self.dispatch

    # --- the thread --------------------------------------------------------------------
    def run(self) -> None:
        """The vCPU thread's body: a loop until the run's stop, then settle. A guest failure
        or a bug stops every vCPU; run() re-raises it. The kick signal is unblocked in this
        thread while it runs the vCPU (see ``unblock_kick_signal``)."""
        vcpu, stop = self.vcpu, self.gate.stop
        _tls.vcpu = vcpu.id
        blocked = unblock_kick_signal()
        vcpu.set_thread(threading.get_ident())
        clock, began = guest_clock(), time.monotonic()
        try:
            if self.native is not None:
                self.native_loop()
            else:
                self.python_loop()
            self.settle()                   # a stopped machine's state is whole too (snapshots)
        except GuestError as e:
            stop.set(e.reason, vcpu=vcpu.id, exit=e.exit, error=e)
        except BaseException as e:          # a bug or KvmError: stop everyone and re-raise in run()
            stop.set("error", vcpu=vcpu.id, error=e)
        finally:
            if time.monotonic() - began >= _TICK_S:
                self.stats.guest_ns += clock.take() * 1_000_000_000 // _CLK_TCK
            _tls.vcpu = None
            vcpu.set_thread(None)
            if blocked is not None:         # vCPU 0 runs in the caller's thread: give its mask back
                signal.pthread_sigmask(signal.SIG_BLOCK, {blocked})
            self.gate.vcpu_done()
            self.gate.kick()                # the first vCPU to stop stops them all

    def python_loop(self) -> None:
        """KVM_RUN, decode, dispatch, repeat until the stop token is set.

        The fast path: one-item port I/O (IoOut or IoIn with count 1), the exit a guest makes
        most, is served right here as ``dispatch`` serves it (same device calls, same counts),
        with fewer Python operations: the header read in one unpack, no exit value built, no
        method between the loop and the device, counts kept in locals and added to ``stats``
        every FOLD_NS, at a pause and at the end (``fold``). Every other exit, and each exit of
        a traced run (the tracer must see every value), goes through ``handle``.
        tests/native/test_vcpu_loop_fast_path.py holds the two paths to the same effects.
        """
        vcpu, stop, gate = self.vcpu, self.gate.stop, self.gate
        clock = time.perf_counter_ns
        enter, exit_value, handle = vcpu.enter, vcpu.exit_value, self.handle
        page = getattr(vcpu, "run_buffer", None) if handle == self.dispatch else None
        header, io, miss, mask = exits.IO_EXIT.unpack_from, exits.ExitReason.IO, object(), _MASK
        memo, lookup, limit = self.pio.memo.get, self.pio.lookup, len(page) if page is not None else 0
        named = defaultdict(int)                # fast-path counts by device name, and the rest:
        outs = ins = dropped = kvm_ns = vmm_ns = 0
        t_out = clock()
        fold_at = t_out + FOLD_NS
        try:
            while stop.reason is None:
                t_in = clock()
                vmm_ns += t_in - t_out
                rc = enter()
                t_out = clock()
                kvm_ns += t_out - t_in
                if page is not None and rc == 0:                    # the fast path
                    reason, out, size, port, count, off = header(page)
                    if reason == io and count == 1 and size in mask and off + size <= limit:
                        hit = memo(port, miss)
                        dev, o, name = (lookup(port) if hit is miss else hit) or _UNCLAIMED
                        named[name] += 1
                        if out:
                            outs += 1
                            if dev is None:
                                dropped += 1
                            else:
                                dev.write(o, size, int.from_bytes(page[off:off + size], "little"))
                        else:
                            ins += 1
                            value = mask[size] if dev is None else dev.read(o, size) & mask[size]
                            page[off:off + size] = value.to_bytes(size, "little")
                        rc = None
                if rc is not None:
                    handle(vcpu, exit_value(rc))
                if gate.requested or t_out > fold_at:
                    self.fold(named, outs, ins, dropped, kvm_ns, vmm_ns)
                    outs = ins = dropped = kvm_ns = vmm_ns = 0
                    if gate.requested:
                        gate.park(vcpu, self.settle)
                        t_out = clock()         # parked time is nobody's work
                    fold_at = t_out + FOLD_NS
        finally:
            self.fold(named, outs, ins, dropped, kvm_ns, vmm_ns)

    def fold(self, named: dict, outs: int, ins: int, dropped: int, kvm_ns: int, vmm_ns: int) -> None:
        """Add the Python loop's local counts to ``stats`` (and clear ``named``). Counts of
        zero add no key: ``stats`` lists what happened."""
        s = self.stats
        for key, n in ((_KIND[exits.IoOut], outs), (_KIND[exits.IoIn], ins)):
            if n:
                s.exits[key] += n
        for name, n in named.items():
            s.devices[name] += n
        named.clear()
        s.unclaimed_writes += dropped
        s.kvm_ns += kvm_ns
        s.vmm_ns += vmm_ns

    def native_loop(self) -> None:
        """C serves the fast-path exits; the rest come back here. C counts the exits it
        serves and all the time; the counters go to ``stats`` when the run ends."""
        vcpu, loop, stop, gate = self.vcpu, self.native, self.gate.stop, self.gate
        loop.restart_clock()                    # not from the last run's last exit
        try:
            while stop.reason is None:
                rc = loop.run()                 # GIL released inside
                if rc == RUN_EXIT:              # an exit for Python
                    self.handle(vcpu, vcpu.exit_value())
                elif rc == RUN_DRAIN:           # the C UART's output buffer is nearly full
                    self.drain()
                elif rc == -errno.EINTR or rc == -errno.EAGAIN:
                    self.handle(vcpu, exits.Interrupted())
                else:
                    raise KvmError(-rc, "KVM_RUN")
                if gate.requested:
                    gate.park(vcpu, self.settle)
                    loop.restart_clock()        # parked time is nobody's work
        finally:
            loop.add_counters(self.stats)

    def settle(self) -> None:
        """Finish the exit just served, so the vCPU's state is whole.

        KVM completes an IN or MMIO read (the data into the guest's register) and moves
        RIP past an IN/OUT only on the next KVM_RUN; with ``immediate_exit`` set, that
        KVM_RUN does just this and returns EINTR (KVM API, "immediate_exit"). Without it a
        snapshot would lose the IN, or replay the OUT. A completion can itself need one
        more exit (an MMIO access split in two): that one is served too.
        """
        vcpu = self.vcpu
        for _ in range(8):
            vcpu.immediate_exit = True
            rc = vcpu.enter()
            if rc == -errno.EINTR or rc == -errno.EAGAIN:
                return
            if rc < 0:
                raise KvmError(-rc, "KVM_RUN")
            self.handle(vcpu, vcpu.exit_value(rc))

    # --- one exit ----------------------------------------------------------------------
    def dispatch(self, vcpu, ex) -> None:
        """Handle one exit: counted under its kind's name (``exits.KIND``), then the single
        ``match`` over exit values."""
        stop = self.gate.stop
        self.stats.exits[_KIND.get(type(ex), "other")] += 1
        match ex:                       # the hot exits are NamedTuples: unpack, don't getattr
            case exits.IoOut():
                self.pio_out(*ex)
            case exits.IoIn():
                port, size, count, _ = ex
                vcpu.complete_io_in(ex, self.pio_in(port, size, count))
            case exits.MmioWrite():
                addr, size, data = ex
                self.mmio_access(addr, size, int.from_bytes(data, "little"))
            case exits.MmioRead():
                addr, size = ex
                vcpu.complete_mmio_read(self.mmio_access(addr, size).to_bytes(size, "little"))
            case exits.Interrupted():
                vcpu.immediate_exit = stop.reason is not None
            case exits.Hlt():
                stop.set("halt", 0, vcpu.id, ex)
            case exits.Debug():
                stop.set("debug", None, vcpu.id, ex)
            case exits.SystemEvent(type=t) if t == SystemEventType.RESET:
                stop.set("reset", None, vcpu.id, ex)
            case _:
                self.fail(vcpu, ex)

    def fail(self, vcpu, ex) -> None:
        """The exits that end a run with a GuestError (or an unknown exit)."""
        match ex:
            case exits.Shutdown():
                reason, message = "triple-fault", "the guest triple-faulted (KVM_EXIT_SHUTDOWN)"
            case exits.FailEntry(hardware_entry_failure_reason=hw):
                reason = "entry-failure"
                message = f"KVM could not enter the guest (hardware reason {hw:#x}): invalid CPU state"
            case exits.InternalError():
                reason, message = "internal-error", lambda code: internal_error_message(ex, code)
            case _:
                reason, message = "unsupported-exit", f"unsupported exit: {ex}"
        raise guest_error(vcpu, self.memory, ex, reason, message)

    def pio_out(self, port: int, size: int, count: int, data: bytes) -> None:
        hit = self.pio.lookup(port)
        if hit is None:
            self.stats.devices["unclaimed-pio"] += count
            self.stats.unclaimed_writes += count
            return
        dev, off, name = hit
        self.stats.devices[name] += count
        for i in range(0, size * count, size):              # string I/O: `rep outs` sends count items
            dev.write(off, size, int.from_bytes(data[i:i + size], "little"))

    def pio_in(self, port: int, size: int, count: int) -> bytes:
        hit = self.pio.lookup(port)
        if hit is None:
            self.stats.devices["unclaimed-pio"] += count
            return b"\xff" * (size * count)                # an empty ISA bus floats high
        dev, off, name = hit
        self.stats.devices[name] += count
        mask = (1 << (8 * size)) - 1
        return b"".join((dev.read(off, size) & mask).to_bytes(size, "little") for _ in range(count))

    def mmio_access(self, addr: int, size: int, value: int | None = None) -> int:
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


def unblock_kick_signal() -> int | None:
    """Make sure the kick signal can reach this thread: install its (empty) handler, then
    unblock it. Returns the signal if it was blocked here (the caller blocks it again when
    its vCPU is done), else None.

    A kick only ends a KVM_RUN that is under way through its signal: ``immediate_exit``
    is read once, on entry. A thread inherits its creator's signal mask, and a process
    its parent's across exec, so a program (or a test runner, or the service that starts
    it) that blocks the real-time signals hands that to every vCPU thread. Each kick then
    stays pending while the vCPU is halted in the kernel's local APIC, waiting in KVM_RUN
    for an interrupt that never comes: an application processor that has done its work
    and executed HLT is never kicked out, however often it is kicked, and the run never
    ends. The handler goes in first: a kick already pending here must find it, not the
    default action, which ends the process.
    """
    sig = lib.kvmpy_kick_signal()
    if sig <= 0:
        return None
    old = signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    return sig if sig in old else None


def internal_error_message(ex, code: str) -> str:
    """What KVM_EXIT_INTERNAL_ERROR means, naming the instruction at RIP when ``code``
    (the disassembly there) decodes; the host-specific advice follows as advice."""
    m = _FIRST_INSN.match(code.splitlines()[0] if code else "")
    if m is None:
        insn = None
    elif m[3].startswith("("):              # capstone cannot decode it: show its bytes
        insn = f"the instruction at {m[1]} (bytes {m[2].strip()})"
    else:
        insn = f"`{m[3]}` at {m[1]}"
    if ex.kind == "emulation":
        what = f"KVM could not emulate {insn or 'the instruction at RIP'} (internal error, emulation failure)"
    else:
        what = f"KVM internal error ({ex.kind})" + (f" on {insn}" if insn else "")
    return f"{what}; {INTERNAL_ERROR_HINT}"


def guest_error(vcpu, memory, ex, reason: str, message) -> GuestError:
    """A GuestError with the vCPU's registers and the code at RIP, disassembled.
    ``message`` is a string, or a function of that disassembly giving one."""
    regs = sregs = None
    code = ""
    state_lost = False
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        from ..x86 import inspect           # page walks and capstone: only when a guest fails
        if isinstance(ex, exits.Shutdown) and inspect.at_reset_vector(regs, sregs):
            state_lost, regs, sregs = True, None, None
        else:
            code = inspect.code_at(regs, sregs, memory, 6)
    except Exception as e:              # the report must not hide the original failure
        code = f"(cannot read guest code: {e})"
    if callable(message):
        message = message(code)
    if state_lost:                      # what the registers would show is the reset state: say so
        from ..kvm.system import backend_modules
        backend = ", ".join(backend_modules()) or "this host's KVM"
        message += (f"; the registers at the fault are lost: {backend} reset the vCPU before reporting "
                    "the shutdown (AMD SVM does, Intel VMX keeps them), so no faulting instruction can be shown")
    err = GuestError(f"vCPU {vcpu.id}: {message}", exit=ex, regs=regs, sregs=sregs, disassembly=code)
    err.reason = reason
    err.state_lost = state_lost
    return err
