"""The network thread: frames from a virtio-net backend into the guest's receive queue.

Host-side input never runs on a vCPU thread (a vCPU only transmits, inside the guest's
QueueNotify, and the backend's ``send`` never blocks). One thread per network device
waits with poll(2) on the backend's fd and a wake-up pipe, and when frames arrive
takes them (``backend.receive()``, bounded per turn), hands each to the device
(``VirtioNet.receive``: a bounded backlog) and makes a host-side QueueNotify of the
receive queue through the transport (``notify_queue``: virtio-mmio and virtio-pci alike),
under the device's lock, exactly as the guest's
own notify would run: the frames go into the chains the driver offered and the
interrupt is raised by the transport. It also flushes a stream backend's held-back
bytes when its socket can take them.

It moves frames only while a run is on and no pause is asked for, holding the pause
gate's lock while it does (as the disk timer does, vmm/throttle.py): a snapshot or
migration never sees a frame land in guest RAM behind its back. Between runs frames
wait in the backend (the socket's or the TAP's queue). If the backend fails (passt
exited, the peer broke the stream) the thread records ``error`` and ends: the guest
sees a cable pulled out, not a crash.
"""
from __future__ import annotations

import os
import select
import threading

from ..devices.virtio.net import RECEIVEQ
from ..net import NetBackendError

POLL_MS = 100


class NetPump:
    """The thread between ``backend`` and the virtio-net ``net`` behind ``locked`` (a Locked
    transport); ``gate`` is the machine's PauseGate (None: move frames whenever they come)."""

    def __init__(self, backend, net, locked, gate=None):
        self.backend, self.net, self.locked, self.gate = backend, net, locked, gate
        self.error: str | None = None
        self.turns = 0                  # times frames were handed to the device
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="virtio-net")
        self.thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        fd = self.backend.fileno()
        while not self._closed:
            if self.gate is not None and not self.gate.run_active.wait(POLL_MS / 1000):
                continue
            poller.register(fd, select.POLLIN | (select.POLLOUT if self.backend.wants_write() else 0))
            events = dict(poller.poll(POLL_MS))
            if self._closed:
                return
            if events.get(fd):
                try:
                    self._serve()
                except NetBackendError as e:
                    self.error = str(e)
                    return
            if self.backend.error is not None:
                self.error = self.backend.error
                return

    def _serve(self) -> None:
        gate = self.gate
        if gate is None:
            self._move()
            return
        with gate.cond:
            if not gate.run_active.is_set() or gate.requested or gate.stop.reason is not None:
                gate.cond.wait(POLL_MS / 1000)      # paused or ending: the frames wait
                return
            self._move()

    def _move(self) -> None:
        with self.locked.lock:
            self.backend.flush()
            frames = self.backend.receive()
            for f in frames:
                self.net.receive(f)
            if frames:
                self.turns += 1
                self.locked.device.notify_queue(RECEIVEQ)

    def close(self) -> None:
        """Stop the thread, then close the backend (a passt child ends). Idempotent."""
        if not self._closed:
            self._closed = True
            os.write(self._wake_w, b"x")
            if self.thread is not threading.current_thread():
                self.thread.join()
            os.close(self._wake_r)
            os.close(self._wake_w)
        self.backend.close()
