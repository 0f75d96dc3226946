"""The disk timer: serves the requests a rate limit left in a virtio-blk ring (and in the
virtio-rng's, which is limited the same way and watched the same way).

A rate-limited disk (devices/ratelimit.py) that runs out of tokens leaves the request
in the ring, untouched, and notes when its tokens will be there (``throttled_until``,
CLOCK_MONOTONIC ns). The guest usually waits for an interrupt and does not notify
again, so someone must come back then: this timer, one thread per Machine that has
such disks (or a restored ring to look at), owned by the Platform. The C loop never
calls back into Python, so the timer asks the devices (a C call that reads a word)
rather than being told: it sleeps until the earliest deadline, or ``POLL_S`` when none
is known, then calls each due disk's ``serve_pending()``, a host-side QueueNotify that
serves what the buckets allow (at most QueueNum chains, like any notify) and raises
the interrupt.

It serves only while a run is active and neither pausing nor stopping, and holds the
pause gate's lock while it does: a pause (a snapshot, a migration) then either waits
for the serve to end or is seen first, so no request completes in guest RAM behind a
paused machine's back. Between runs the requests wait for the next run.
"""
from __future__ import annotations

import threading
import time

POLL_S = 0.01               # how often a throttled disk with no known deadline is looked at


class DiskTimer:
    """The timer of one Machine's disks; ``gate`` is its PauseGate."""

    def __init__(self, gate):
        self.gate = gate
        self.watched: list = []         # rate-limited disks: throttled_until(), serve_pending()
        self.due: list = []             # disks to serve once at the next run (a restored ring)
        self.cond = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None

    def watch(self, disk) -> None:
        """Serve ``disk`` whenever its limiter says a request may go."""
        with self.cond:
            self.watched.append(disk)
            self._start()

    def kick(self, disk) -> None:
        """Serve ``disk`` once early in the next run (its ring may hold requests)."""
        with self.cond:
            if disk not in self.due:
                self.due.append(disk)
            self._start()
            self.cond.notify_all()

    def _start(self) -> None:
        if self.thread is None and not self.closed:
            self.thread = threading.Thread(target=self._run, daemon=True, name="disk-timer")
            self.thread.start()

    def _run(self) -> None:
        while True:
            with self.cond:
                if self.closed or not (self.watched or self.due):
                    self.thread = None
                    return
            if not self.gate.run_active.wait(0.1):
                continue
            now = time.monotonic_ns()
            ready, wait = self._ready(now)
            if ready and self._serve(ready):
                continue
            with self.cond:
                self.cond.wait(POLL_S if ready else wait)

    def _ready(self, now: int) -> tuple[list, float]:
        """The disks to serve now, and the seconds until the next deadline otherwise."""
        with self.cond:
            ready, wait = list(self.due), POLL_S
            for d in self.watched:
                t = d.throttled_until()
                if t and t <= now:
                    ready.append(d)
                elif t:
                    wait = min(wait, (t - now) / 1e9)
        return ready, wait

    def _serve(self, ready: list) -> bool:
        """Serve ``ready`` under the gate's lock if the run is on; False if it is not."""
        gate = self.gate
        with gate.cond:
            if not gate.run_active.is_set() or gate.requested or gate.stop.reason is not None:
                return False
            for d in ready:
                d.serve_pending()
        with self.cond:
            self.due = [d for d in self.due if d not in ready]
        return True

    def close(self) -> None:
        """End the thread (after a serve in progress); idempotent."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join()
