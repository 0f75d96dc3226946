"""Warm sandboxes for many threads: ``SandboxPool(image, size=N).call(name, *args)``.

The pool builds ``size`` sandboxes up front (each boots its guest to the ready point
and checkpoints it) and keeps the idle ones in a queue. A call takes one (waiting while
all are busy), calls, and puts it back: a sandbox resets itself after every call, crash
or timeout, so it goes back as good as new. One that fails in a way a reset may not have
repaired (an error outside the call ABI: a KVM ioctl, an exception from a host function)
is closed and replaced by a fresh one. Calls from N threads run on N machines at once:
each vCPU runs with the GIL released.
"""
from __future__ import annotations

import queue
import threading

from .abi import GuestFunctionError, SandboxCrash, SandboxError, SandboxProtocolError, SandboxTimeout
from .sandbox import Sandbox

#: what a call may raise that leaves its sandbox as the checkpoint had it
_SANDBOX_FINE = (GuestFunctionError, SandboxCrash, SandboxProtocolError, SandboxTimeout, TypeError,
                 ValueError, OverflowError)


def take_idle(idle: queue.Queue, wait: float | None, size: int, closed: bool):
    """The next idle member of a pool's queue, waiting up to ``wait`` seconds (None: for ever);
    SandboxError when none comes or the pool is closed (``close()`` puts None in the queue)."""
    if closed:
        raise SandboxError("the pool is closed")
    try:
        member = idle.get(timeout=wait)
    except queue.Empty:
        raise SandboxError(f"no sandbox became idle within {wait:g} s ({size} in the pool)") from None
    if member is None:                      # close() woke us: wake the next waiter too
        idle.put(None)
        raise SandboxError("the pool is closed")
    return member


class SandboxPool:
    """``size`` warm ``Sandbox(image, **options)``; safe to call from any number of threads."""

    def __init__(self, image="sandbox-demo", size: int = 2, **options):
        if size < 1:
            raise ValueError(f"a pool needs at least one sandbox, not {size}")
        self.image, self.size, self.options = image, size, options
        self._idle: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._all: list[Sandbox] = []
        self._closed = False
        self.replaced = 0
        try:
            for _ in range(size):
                self._add(Sandbox(image, **options))
        except BaseException:
            self.close()
            raise

    def _add(self, sb: Sandbox) -> None:
        with self._lock:
            self._all.append(sb)
        self._idle.put(sb)

    def call(self, name: str, *args, timeout: float | None = None, wait: float | None = None):
        """``Sandbox.call`` on an idle sandbox; ``wait`` bounds the wait for one (seconds)."""
        sb = take_idle(self._idle, wait, self.size, self._closed)
        keep = True
        try:
            return sb.call(name, *args, timeout=timeout)
        except _SANDBOX_FINE:
            raise
        except BaseException:
            keep = False
            raise
        finally:
            self._give_back(sb, keep)

    def _give_back(self, sb: Sandbox, keep: bool) -> None:
        if self._closed:
            sb.close()
            return
        if keep:
            self._idle.put(sb)
            return
        sb.close()
        with self._lock:
            self._all.remove(sb)
            self.replaced += 1
        try:
            self._add(Sandbox(self.image, **self.options))
        except Exception:                   # noqa: BLE001 - the call's own error is the one to raise
            with self._lock:
                self.size -= 1
                empty = not self._all
            if empty:                       # nobody left to serve the waiting callers
                self._closed = True
                self._idle.put(None)

    def register(self, name: str, fn, signature: str) -> None:
        """Register a host function in every sandbox of the pool (and the ones it makes later)."""
        self.options.setdefault("host_functions", {})[name] = (fn, signature)
        with self._lock:
            for sb in self._all:
                sb.register(name, fn, signature)

    def close(self) -> None:
        """Close the idle sandboxes now and the busy ones when their calls return."""
        self._closed = True
        with self._lock:
            every = list(self._all)
        for sb in every:
            sb.close()                      # waits for a call in progress (the sandbox's lock)
        self._idle.put(None)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
