"""One run of a machine: every vCPU's loop in its own thread, until the first stop.

vCPU 0 runs in the caller's thread, the others in theirs; a watchdog thread asks for the
"timeout" stop and delivers every stop, and with the C UART a flusher thread writes the
guest's output out at least every 20 ms. When vCPU 0's loop ends the rest are stopped and
joined, the console drained, and the outcome read from the run's stop token: a
``RunResult``, or the error that stopped it raised here.

The watchdog delivers a stop until it is answered: from the moment the stop token is set
(by a device, a vCPU's failure, the timeout or ``request_stop()``) until every vCPU loop has
ended, it kicks every vCPU and wakes the parked ones every ``REKICK_S``. The kick of whoever
set the stop is then never the only one: a vCPU that missed it (an application processor
halted inside KVM_RUN by the in-kernel local APIC, which nothing but a signal wakes) is
kicked again instead of being joined forever.
"""
from __future__ import annotations

import threading
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


def run_loops(loops: list, gate, console, timeout: float | None, flush: bool) -> RunResult:
    """Run each ``VcpuLoop`` of ``loops`` (one per vCPU, vCPU 0 first) to the run's stop.

    ``gate.begin()`` has been called; the caller calls ``gate.end()``. ``flush`` starts
    the thread that drains the console while the guest runs (the C UART buffers).
    """
    stop = gate.stop
    for loop in loops:                  # a pause already asked for keeps its kick
        with gate.cond:
            loop.vcpu.immediate_exit = bool(gate.requested) or stop.reason is not None
    ended = threading.Event()           # every vCPU loop has ended: the watchdog's work is done
    watchdog = threading.Thread(target=_watchdog, args=(gate, stop, timeout, ended), daemon=True,
                                name="vcpu-watchdog")
    watchdog.start()
    threads = [threading.Thread(target=loop.run, daemon=True, name=f"vcpu{loop.vcpu.id}") for loop in loops[1:]]
    done = threading.Event()
    if flush:
        threads.append(threading.Thread(target=_flusher, args=(console, done), daemon=True, name="serial-flush"))
    try:
        for t in threads:
            t.start()
        loops[0].run()
    finally:
        gate.request_stop("stopped")    # wake the other vCPUs if vCPU 0 ended first
        done.set()
        for t in threads:
            t.join()                    # the watchdog kicks a vCPU that missed the stop again
        ended.set()
        watchdog.join()                 # no timeout or kick of this run may reach the next one
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


def _watchdog(gate, stop, timeout: float | None, ended: threading.Event) -> None:
    """The run's timeout, then its stop's delivery: until every vCPU loop has ended, kick
    every vCPU and wake the parked ones, at once and then every REKICK_S."""
    if not stop.wait(timeout):
        gate.request_stop("timeout")
    while True:
        gate.wake_all()
        if ended.wait(REKICK_S):
            return


def _flusher(console, done: threading.Event) -> None:
    """While the guest runs, write out its serial output at least every FLUSH_EVERY seconds."""
    while not done.wait(FLUSH_EVERY):
        if not console.drain():
            return
