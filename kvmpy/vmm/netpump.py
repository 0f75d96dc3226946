"""The network thread: frames from a virtio-net backend into the guest's receive queue.

Host-side input never runs on a vCPU thread (a vCPU only transmits, inside the guest's
QueueNotify, and the backend's ``send`` never blocks). One thread per network device
waits with poll(2) on the backend's fd and a wake-up pipe. When frames arrive it reads
them (``backend.receive()``, bounded per call) into ``pending`` without holding the
device's lock, then hands them to the device (``VirtioNet.receive_some``: a bounded
backlog) BATCH at a time, each batch under the device's lock followed by a host-side
QueueNotify of the receive queue through the transport (``notify_queue``: virtio-mmio and
virtio-pci alike), exactly as the guest's own notify would run: the frames go into the
chains the driver offered and the interrupt is raised by the transport. Between batches
the lock is free, so the guest's own accesses to the device (its interrupt
acknowledgements, its transmissions) wait for one batch at most. It also flushes a
stream backend's held-back bytes when its socket can take them.

Read-ahead and flow control: while the device is full (the guest offers no buffers) the
thread keeps reading, up to PENDING_MAX bytes ahead, and only then leaves frames in the
backend until the device says the guest made room (``VirtioNet.on_room``, through the
wake-up pipe). Reading ahead matters for passt: it drops the frames its socket cannot
take at once (a full socket is not back-pressure to it), and its TCP recovers those
slowly (going back to the first lost segment, or after a timeout of seconds); a guest's
TCP window is what bounds how much it sends ahead, and that fits in PENDING_MAX.

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
#: Bytes of frames read from the backend ahead of the device at most: past this the thread
#: stops reading until the device took some (and frames wait in the socket). passt drops
#: what its socket cannot take, and its TCP recovers slowly (by going back to the lost
#: segment, or after seconds), so this is several TCP windows: a guest's receive window
#: is at most 6 MiB under Linux's default tcp_rmem.
PENDING_MAX = 8 << 20
#: Frames handed to the device per hold of its lock: the guest's own accesses to the
#: device (its interrupt status, its notifications) wait for one batch at most.
BATCH = 64


class NetPump:
    """The thread between ``backend`` and the virtio-net ``net`` behind ``locked`` (a Locked
    transport); ``gate`` is the machine's PauseGate (None: move frames whenever they come)."""

    def __init__(self, backend, net, locked, gate=None):
        self.backend, self.net, self.locked, self.gate = backend, net, locked, gate
        self.error: str | None = None
        self.turns = 0                  # times frames were handed to the device
        self.pending: deque[bytes] = deque()    # read from the backend, no room in the device yet
        self.pending_bytes = 0
        self.waits = 0                  # times the device was full and frames waited in pending
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
            reading = self.pending_bytes < PENDING_MAX
            poller.register(fd, (select.POLLIN if reading else 0)       # 0: only errors, while full
                            | (select.POLLOUT if self.backend.wants_write() else 0))
            events = dict(poller.poll(0 if self.pending and self.net.has_room() else POLL_MS))
            if self._closed:
                return
            if events.get(self._wake_r):
                self._drain_wake()
            try:
                if events.get(fd) and (reading or events[fd] & (select.POLLHUP | select.POLLERR)):
                    got = self.backend.receive()            # outside the device's lock
                    self.pending.extend(got)
                    self.pending_bytes += sum(map(len, got))
                if self.pending or events.get(fd):
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
        """Under the device's lock: flush, hand the device at most BATCH frames of what it has
        room for, and notify the receive queue; when it is full, ask to be woken up once the
        guest made room."""
        with self.locked.lock:
            self.backend.flush()
            pending, net = self.pending, self.net
            moved, nbytes = net.receive_some(pending, BATCH) if pending else (0, 0)
            self.pending_bytes -= nbytes
            if pending and not net.has_room():  # full: wake up when the guest made room
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
