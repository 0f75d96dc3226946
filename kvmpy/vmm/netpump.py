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

Flow control: frames the device has no room for (its backlog is full because the guest
offers no buffers) stay here, and the thread stops reading the backend until the
device says the guest made room (``VirtioNet.on_room``, through the wake-up pipe). The
frames then wait in the socket, and the peer (passt, and the TCP sender behind it) is
slowed down rather than losing frames, which a TCP sender pays for with retransmission
timeouts (QEMU's network queue stops polling its backend the same way).

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
from collections import deque

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
        self.pending: deque[bytes] = deque()    # read from the backend, no room in the device yet
        self.waits = 0                  # times the device was full and the backend left unread
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
            mask = (0 if self.pending else select.POLLIN) | (select.POLLOUT if self.backend.wants_write() else 0)
            poller.register(fd, mask)           # 0: only errors, while the device is full
            events = dict(poller.poll(POLL_MS))
            if self._closed:
                return
            if events.get(self._wake_r):
                self._drain_wake()
            if events.get(fd) or self.pending:
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
        """Under the device's lock: flush, read the backend if nothing is held back, hand
        the device what it has room for, and notify the receive queue."""
        with self.locked.lock:
            self.backend.flush()
            pending, net = self.pending, self.net
            if not pending:
                pending.extend(self.backend.receive())
            moved = 0
            while pending and net.has_room():
                net.receive(pending.popleft())
                moved += 1
            if pending:                         # full: wake up when the guest made room
                self.waits += 1
                net.on_room = self._wake
            if moved:
                self.turns += 1
                self.locked.device.notify_queue(RECEIVEQ)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"r")
        except OSError:
            pass                                # already awake (a byte waits), or closing

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        """Stop the thread, then close the backend (a passt child ends). Idempotent."""
        if not self._closed:
            self._closed = True
            with self.locked.lock:
                self.net.on_room = None         # no wake-ups into a closed pipe
            os.write(self._wake_w, b"x")
            if self.thread is not threading.current_thread():
                self.thread.join()
            os.close(self._wake_r)
            os.close(self._wake_w)
        self.backend.close()
