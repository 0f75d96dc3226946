"""The gate every vCPU thread passes between two KVM_RUN calls: stops, pauses, run state.

A run has one ``Stop`` token: the first request to end it wins (the guest's exit, a
timeout, Ctrl-C, an error) and every vCPU loop checks it between exits. The
``PauseGate`` keeps the token of the current run, counts the vCPU threads that run,
and parks them on request: ``pause()`` asks, kicks every vCPU out of KVM_RUN and waits
until all are parked; each vCPU thread, back in Python, completes the exit it was
serving (its loop's ``settle``: see vcpu_loop.py) and waits at ``park()`` until every
pause has had its ``resume()`` or the run stops. Pauses nest, so a snapshot taken while
someone else holds the machine paused does not let it go when it is done.

A kick is asked for again until it is answered: ``pause()`` kicks the vCPUs that have not
parked every ``REKICK_S``, and so does the run's watchdog (run.py) from the stop until
every vCPU loop has ended. One kick is enough when it lands; a vCPU that missed one (halted
in the kernel's local APIC, where only a signal reaches it) costs ``REKICK_S``, not the run.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

REKICK_S = 0.01             # seconds between kicks of vCPUs that have not answered the last one


class Stop:
    """Why a run ends. The first ``set()`` wins; later ones are ignored (and say False).
    ``wait()`` blocks until it is set (the run's watchdog does)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reason: str | None = None
        self.status: int | None = None
        self.vcpu: int | None = None
        self.exit = None
        self.error: BaseException | None = None
        self.event = threading.Event()

    def set(self, reason, status=None, vcpu=None, exit=None, error=None) -> bool:
        with self.lock:
            if self.reason is not None:
                return False
            self.reason, self.status, self.vcpu, self.exit, self.error = reason, status, vcpu, exit, error
        self.event.set()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """True once the stop is set; False if ``timeout`` seconds passed first."""
        return self.event.wait(timeout)


class PauseGate:
    """One machine's run state: the current ``stop`` token, whether a run is active, and
    the pause requests with the vCPU threads parked at them.

    ``kick`` (given by the Machine) makes every vCPU leave KVM_RUN. ``requested`` counts
    pauses not yet resumed, ``active`` the vCPU threads of the current run, ``parked``
    those waiting here: the pause is complete when all active threads are parked.
    """

    def __init__(self, kick: Callable[[], None]):
        self.kick = kick
        self.cond = threading.Condition()
        self.stop = Stop()
        self.requested = 0
        self.active = 0
        self.parked = 0
        self.run_active = threading.Event()
        self.run_idle = threading.Event()
        self.run_idle.set()

    # --- a run's beginning and end ---------------------------------------------------
    def begin(self, vcpus: int) -> Stop:
        """A run of ``vcpus`` threads begins; its stop token exists before it shows as active,
        so a stop asked for from now on counts. RuntimeError if a run is under way."""
        with self.cond:
            if self.run_active.is_set():
                raise RuntimeError("this Machine is already running")
            self.requested, self.active, self.parked = 0, vcpus, 0
            self.stop = Stop()
            self.run_active.set()
            self.run_idle.clear()
            return self.stop

    def end(self) -> None:
        with self.cond:
            self.run_active.clear()
            self.run_idle.set()
            self.cond.notify_all()

    def vcpu_done(self) -> None:
        """A vCPU thread of the run has ended: a pause waits for running ones only."""
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def request_stop(self, reason: str) -> None:
        """End the run (a paused one too) from any thread."""
        self.stop.set(reason)
        self.wake_all()

    def wake_all(self) -> None:
        """Kick every vCPU out of KVM_RUN and wake the parked ones, so each looks at the gate."""
        self.kick()
        with self.cond:
            self.cond.notify_all()

    @property
    def running(self) -> bool:
        return self.run_active.is_set()

    @property
    def paused(self) -> bool:
        with self.cond:
            return (self.run_active.is_set() and self.stop.reason is None and self.requested > 0
                    and 0 < self.active <= self.parked)

    def _ended(self) -> bool:
        return not self.run_active.is_set() or self.stop.reason is not None

    # --- pausing -----------------------------------------------------------------------
    def pause(self, timeout: float) -> bool:
        """Ask every vCPU to park and wait until all have; see ``Machine.pause``. The vCPUs
        are kicked again every REKICK_S until all have parked."""
        deadline = time.monotonic() + timeout
        with self.cond:
            if self._ended():
                return False
            self.requested += 1
            self.kick()
            while not (self.parked >= self.active or self._ended()):
                left = deadline - time.monotonic()
                if left <= 0:
                    self.requested -= 1
                    self.cond.notify_all()
                    raise TimeoutError(f"the vCPUs did not pause within {timeout} s")
                if not self.cond.wait(min(REKICK_S, left)):
                    self.kick()
            if self._ended() or self.active == 0:      # the run ended instead: nothing is paused
                self.requested -= 1
                self.cond.notify_all()
                return False
            return True

    def resume(self) -> None:
        """Release one pause; the vCPUs go on when every pause is released."""
        with self.cond:
            if self.requested:
                self.requested -= 1
            self.cond.notify_all()

    def park(self, vcpu, settle: Callable[[], None]) -> None:
        """In a vCPU thread, when a pause is requested: complete the exit just served
        (``settle``), then wait here while a pause is held and the run not stopped."""
        if not self.requested:
            return
        settle()
        with self.cond:
            if not self.requested:
                return
            self.parked += 1
            self.cond.notify_all()
            while self.requested and self.stop.reason is None:
                self.cond.wait()
            self.parked -= 1
            vcpu.immediate_exit = self.stop.reason is not None
