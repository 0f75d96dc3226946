"""One run of a machine: every vCPU's loop in its own thread, until the first stop.

vCPU 0 runs in the caller's thread, the others in theirs. The machine's ``Watchdog``, one
thread kept from run to run, asks for the "timeout" stop, delivers every stop and, with the
C UART, writes the guest's output out at least every 20 ms. When vCPU 0's loop ends the
rest are stopped and joined, the console drained, and the outcome read from the run's stop
token: a ``RunResult``, or the error that stopped it raised here.

The watchdog delivers a stop until it is answered: while a run is under way it looks at
the stop token every ``REKICK_S``, and from the moment the token is set (by a device, a
vCPU's failure, the timeout or ``request_stop()``) until every vCPU loop has ended it kicks
every vCPU and wakes the parked ones at each look. The kick of whoever set the stop is then
never the only one: a vCPU that missed it (an application processor halted inside
KVM_RUN by the in-kernel local APIC, which nothing but a signal wakes) is kicked again
instead of being joined forever.

Why a kept thread: a fuzz case or a sandbox call is a run of a few hundred microseconds,
and starting a thread (and joining it) cost about 100 µs of it here. A run hands the
watchdog its stop token under a lock and takes it back under the same lock, so nothing
of one run (a timeout, a kick) can reach the next; a run shorter than REKICK_S never
wakes the watchdog at all.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..kvm.regs import Regs
from .pause import REKICK_S

FLUSH_EVERY = 0.02          # seconds between writes of buffered guest output


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


def run_loops(loops: list, gate, console, timeout: float | None, flush: bool,
              watchdog: "Watchdog") -> RunResult:
    """Run each ``VcpuLoop`` of ``loops`` (one per vCPU, vCPU 0 first) to the run's stop.

    ``gate.begin()`` has been called; the caller calls ``gate.end()``. ``flush``: the
    watchdog drains the console while the guest runs (the C UART buffers).
    """
    stop = gate.stop
    for loop in loops:                  # a pause already asked for keeps its kick
        with gate.cond:
            loop.vcpu.immediate_exit = bool(gate.requested) or stop.reason is not None
    threads = [threading.Thread(target=loop.run, daemon=True, name=f"vcpu{loop.vcpu.id}") for loop in loops[1:]]
    watchdog.arm(stop, timeout, flush)
    try:
        for t in threads:
            t.start()
        loops[0].run()
    finally:
        gate.request_stop("stopped")    # wake the other vCPUs if vCPU 0 ended first
        for t in threads:
            t.join()                    # the watchdog kicks a vCPU that missed the stop again
        watchdog.disarm()               # no timeout or kick of this run may reach the next one
        console.drain()
        console.flush()                 # up to SETTLE_S for the stream; a stalled one is left behind
    if stop.error is not None:
        console.take_error()
        raise stop.error
    err = console.take_error()          # the output stream failed after the guest stopped
    if err is not None:
        raise err
    vcpu = loops[stop.vcpu if stop.vcpu is not None else 0].vcpu
    return RunResult(stop.reason, stop.status, vcpu.get_regs(), vcpu.id, stop.exit)


class Watchdog:
    """One machine's watchdog thread, started by its first run and kept until ``close()``.

    ``arm()`` hands it a run (the stop token, the timeout, whether to flush the console);
    ``disarm()`` takes the run back once every vCPU loop has ended. It holds ``gate`` and
    ``console``, never the Machine, so a machine nobody closed can still be collected
    (its finalizer closes the watchdog).
    """

    def __init__(self, gate, console):
        self.gate, self.console = gate, console
        self.lock = threading.Lock()
        self.armed = threading.Event()      # set by arm() and close(): wakes the idle thread
        self.run = None                     # (stop, deadline or None, flush) of the run under way
        self.closed = False
        self.thread: threading.Thread | None = None

    def arm(self, stop, timeout: float | None, flush: bool) -> None:
        with self.lock:
            if self.closed:
                raise RuntimeError("the machine's watchdog is closed")
            if self.thread is None:         # the first run: its timeout counts from after this
                self.thread = threading.Thread(target=self._serve, daemon=True, name="vcpu-watchdog")
                self.thread.start()
            self.run = (stop, None if timeout is None else time.monotonic() + timeout, flush)
        self.armed.set()

    def disarm(self) -> None:
        with self.lock:                     # waits for a kick under way: none comes after this
            self.run = None

    def close(self) -> None:
        with self.lock:
            self.closed, self.run = True, None
        self.armed.set()
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join()

    def _serve(self) -> None:
        next_flush = 0.0
        while True:
            self.armed.wait()
            with self.lock:
                if self.closed:
                    return
                if self.run is None:        # idle: sleep until the next arm()
                    self.armed.clear()
                    continue
                stop, deadline, flush = self.run
                now = time.monotonic()
                if stop.reason is not None:
                    self.gate.wake_all()    # the stop's delivery, again at each look
                elif deadline is not None and now >= deadline:
                    self.gate.request_stop("timeout")
            if flush and now >= next_flush:
                next_flush = now + FLUSH_EVERY
                self.console.drain()
            wait = REKICK_S if deadline is None else max(0.0, min(REKICK_S, deadline - now))
            time.sleep(wait)
