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
slowly (going back to the first lost segment, or after a timeout of seconds). Reading
further ahead only adds latency: see PENDING_MAX.

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

from ..devices.virtio.net import RECEIVEQ, TRANSMITQ
from ..net import NetBackendError

POLL_MS = 100
#: Bytes of frames read from the backend ahead of the device at most: past this the thread
#: stops reading until the device took some (and frames wait in the socket). passt drops
#: what its socket cannot take, and its TCP recovers slowly (by going back to the lost
#: segment, or after seconds), so some read-ahead spares it losses; but every byte held
#: here is latency for the frames behind it (a TCP ACK behind a burst of data), so it is
#: kept to about what a slow guest takes in a quarter of a second. 8 MiB measured worse:
#: transfers of 5 s and more collapsed after ~3 s (benchmarks/README.md, "linux").
PENDING_MAX = 1 << 20
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
        self.kicks: dict[int, int] = {}         # queue -> eventfd the guest's QueueNotify signals
        self._kicked: set[int] = set()          # queues notified, not yet served (a pause came)
        self._ioeventfds: list[tuple] = []
        self._tx_thread: threading.Thread | None = None
        self.kicks_served = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="virtio-net")
        self.thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        fd, watched = self.backend.fileno(), set()
        while not self._closed:
            if self.gate is not None and not self.gate.run_active.is_set():
                watched.clear()                 # between runs (a restore, a reset may come)
                self.gate.run_active.wait(POLL_MS / 1000)
                continue
            kicks = self.kicks
            for queue, kick in kicks.items():
                if kick not in watched:         # new, or a new run: serve the queue once
                    poller.register(kick, select.POLLIN)
                    watched.add(kick)
                    self._kicked.add(queue)
            reading = self.pending_bytes < PENDING_MAX
            poller.register(fd, (select.POLLIN if reading else 0)       # 0: only errors, while full
                            | (select.POLLOUT if self.backend.wants_write() else 0))
            busy = self._kicked or (self.pending and self.net.has_room())
            events = dict(poller.poll(0 if busy else POLL_MS))
            if self._closed:
                return
            if events.get(self._wake_r):
                self._drain_wake()
            for queue, kick in kicks.items():
                if events.get(kick):
                    _drain(kick)
                    self._kicked.add(queue)
            try:
                if events.get(fd) and (reading or events[fd] & (select.POLLHUP | select.POLLERR)):
                    got = self.backend.receive()            # outside the device's lock
                    self.pending.extend(got)
                    self.pending_bytes += sum(map(len, got))
                if self.pending or self._kicked or events.get(fd):
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
        """Under the device's lock: serve the guest's notifications that came by eventfd (as its
        QueueNotify would have), flush, hand the device at most BATCH frames of what it has
        room for, and notify the receive queue; when it is full, ask to be woken up once the
        guest made room."""
        with self.locked.lock:
            while self._kicked:
                self.kicks_served += 1
                self.locked.device.notify_queue(self._kicked.pop())
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

    def notify_by_eventfd(self, vm, addr: int) -> None:
        """Let the guest's QueueNotify writes at ``addr`` (virtio-mmio's register: 4 bytes, the
        queue's index) signal eventfds (KVM_IOEVENTFD on ``vm``) instead of exiting to a vCPU
        thread's Python: the queue is served here as the write would have served it, and the
        vCPU goes on running the guest meanwhile. The receive queue's (buffers the guest
        added) on this thread; the transmit queue's on a thread of its own ("virtio-net-tx"),
        so transmitting never keeps this one from reading the backend. Call before the
        machine runs."""
        kicks = {}
        for queue in (RECEIVEQ, TRANSMITQ):
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                vm.ioeventfd(kick, addr, 4, datamatch=queue)
            except OSError:
                os.close(kick)
                raise
            self._ioeventfds.append((vm, kick, addr, queue))
            kicks[queue] = kick
        self.kicks = {RECEIVEQ: kicks[RECEIVEQ]}    # whole, for the thread to pick up
        self._tx_thread = threading.Thread(target=self._tx_run, args=(kicks[TRANSMITQ],), daemon=True,
                                           name="virtio-net-tx")
        self._tx_thread.start()
        self._wake()

    def _tx_run(self, kick: int) -> None:
        """The transmit queue's thread: each signal of ``kick`` (and the start of each run: a
        restore or reset may have left chains unserved) serves the queue once."""
        poller = select.poll()
        poller.register(kick, select.POLLIN)
        due = True
        while not self._closed:
            if self.gate is not None and not self.gate.run_active.is_set():
                due = True
                self.gate.run_active.wait(POLL_MS / 1000)
                continue
            if not due:
                if not poller.poll(POLL_MS) or self._closed:
                    continue
                _drain(kick)
            due = not self._under_gate(lambda: self.locked.device.notify_queue(TRANSMITQ))

    def _under_gate(self, work) -> bool:
        """``work()`` under the pause gate and the device's lock; False (not done) while paused
        or ending."""
        gate = self.gate
        if gate is None:
            with self.locked.lock:
                work()
            return True
        with gate.cond:
            if not gate.run_active.is_set() or gate.requested or gate.stop.reason is not None:
                gate.cond.wait(POLL_MS / 1000)      # paused or ending: the work waits
                return False
            with self.locked.lock:
                work()
            return True

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
            for vm, kick, addr, queue in self._ioeventfds:
                os.eventfd_write(kick, 1)           # the transmit thread wakes up too
            for thread in (self.thread, self._tx_thread):
                if thread is not None and thread is not threading.current_thread():
                    thread.join()
            os.close(self._wake_r)
            os.close(self._wake_w)
            for vm, kick, addr, queue in self._ioeventfds:
                try:
                    vm.ioeventfd(kick, addr, 4, datamatch=queue, deassign=True)
                except OSError:
                    pass                        # the VM is gone already
                os.close(kick)
        self.backend.close()


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass
