"""Pausing a running Machine, and runs in the background.

A pause parks every vCPU thread in Python, between two KVM_RUN calls, after one more
KVM_RUN with ``immediate_exit`` set has completed the exit it was serving (``_settle``):
only then is the vCPU's state whole, so a paused machine can be inspected, saved or
migrated exactly. Pauses nest. ``Pausing`` is a mixin of ``RunLoop`` (runloop.py), whose
run loops call ``_park`` when a pause is requested.
"""
from __future__ import annotations

import errno
import threading

from ..errors import KvmError, KvmpyError
from ..kvm import Vcpu


class _Pause:
    """A pause request and the vCPU threads parked at it.

    ``pause()`` adds one to ``requested`` and kicks every vCPU; each vCPU thread, back
    in Python after KVM_RUN returns, parks here until every pause has had its
    ``resume()`` (or the run stops). Pauses nest, so a snapshot taken while someone else
    holds the machine paused does not let it go when it is done. The parked vCPU's last
    exit is completed first (``_settle``), so a parked machine can be saved exactly.
    ``active`` counts the vCPU threads of the current run: the pause is complete when
    all of them are parked.
    """

    def __init__(self):
        self.cond = threading.Condition()
        self.requested = 0          # pauses not yet resumed
        self.active = 0
        self.parked = 0


class Pausing:
    """Mixin for RunLoop: ``pause()``, ``resume()``, ``running``, ``paused``, ``start()``, ``wait()``."""

    def pause(self, timeout: float = 10.0) -> bool:
        """Stop every vCPU where it is and keep it there until ``resume()``.

        Call it from another thread while ``run()`` (or ``start()``) runs the machine.
        Returns True once all vCPUs are parked, False if no run is in progress or it
        ended meanwhile (a stopped machine needs no pausing). Pauses nest: each True
        needs its ``resume()``. A paused machine can be inspected, snapshotted or
        migrated; ``request_stop()`` ends a paused run too.
        """
        if self._current_vcpu() is not None:
            raise RuntimeError("pause() from inside a vCPU thread (a device callback?) would wait for itself")
        p = self._pause
        with p.cond:
            if not self._run_active.is_set() or self._stop.reason is not None:
                return False
            p.requested += 1
            for v in self.vcpus:
                v.kick()
            ended = lambda: not self._run_active.is_set() or self._stop.reason is not None  # noqa: E731
            if not p.cond.wait_for(lambda: p.parked >= p.active or ended(), timeout):
                p.requested -= 1
                p.cond.notify_all()
                raise KvmpyError(f"the vCPUs did not pause within {timeout} s")
            if ended() or p.active == 0:        # the run ended instead: nothing is paused
                p.requested -= 1
                p.cond.notify_all()
                return False
            return True

    def resume(self) -> None:
        """Release one ``pause()``; the vCPUs go on when every pause is released
        (nothing happens if none is held)."""
        with self._pause.cond:
            if self._pause.requested:
                self._pause.requested -= 1
            self._pause.cond.notify_all()

    @property
    def running(self) -> bool:
        """True while a run is in progress (paused or not)."""
        return self._run_active.is_set()

    @property
    def paused(self) -> bool:
        """True while a run is in progress and all its vCPUs are parked by ``pause()``."""
        p = self._pause
        with p.cond:
            return (self._run_active.is_set() and self._stop.reason is None and p.requested > 0
                    and 0 < p.active <= p.parked)

    def _settle(self, vcpu: Vcpu) -> None:
        """Finish the exit just served, so the vCPU's state is whole.

        KVM completes an IN or MMIO read (the data into the guest's register) and moves
        RIP past an IN/OUT only on the next KVM_RUN; with ``immediate_exit`` set, that
        KVM_RUN does just this and returns EINTR (KVM API, "immediate_exit"). Without it a
        snapshot would lose the IN, or replay the OUT. A completion can itself need one
        more exit (an MMIO access split in two): that one is served too.
        """
        for _ in range(8):
            vcpu.immediate_exit = True
            rc = vcpu.enter()
            if rc == -errno.EINTR or rc == -errno.EAGAIN:
                return
            if rc < 0:
                raise KvmError(-rc, "KVM_RUN")
            self._dispatch(vcpu, vcpu.exit_value(rc))

    def _park(self, vcpu: Vcpu) -> None:
        """In a vCPU thread: wait here while a pause is requested (and the run not stopped),
        with the last exit completed (``_settle``) so that a snapshot taken now is exact."""
        p, stop = self._pause, self._stop
        if not p.requested:
            return
        self._settle(vcpu)
        with p.cond:
            if not p.requested:
                return
            p.parked += 1
            p.cond.notify_all()
            while p.requested and stop.reason is None:
                p.cond.wait()
            p.parked -= 1
            vcpu.immediate_exit = stop.reason is not None

    def start(self, timeout: float | None = None, trace=None) -> None:
        """``run()`` in a background thread; ``wait()`` returns its RunResult. When this
        returns the run is in progress, so ``pause()`` and ``request_stop()`` apply to it."""
        if self._run_active.is_set():
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
        while t.is_alive() and not self._run_active.wait(0.005):
            pass

    def wait(self, timeout: float | None = None):
        """The RunResult of the run ``start()`` began (raises what run() raised);
        TimeoutError if it has not ended within ``timeout`` seconds."""
        background = getattr(self, "_background", None)
        if background is None:
            raise RuntimeError("wait() needs a run begun with start()")
        t, box = background
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"the run has not ended within {timeout} s")
        self._background = None
        if "error" in box:
            raise box["error"]
        return box["result"]
