"""The network thread's flow control (kvmpy/vmm/netpump.py): while the guest offers no receive
buffers and the device's backlog is full, frames stay in the backend, none is dropped, and
they all arrive in order once the guest makes room."""
import os
import threading
import time
from collections import deque

from kvmpy.devices.virtio.net import RECEIVEQ, RX_BACKLOG, VirtioNet
from kvmpy.vmm import netpump
from kvmpy.vmm.netpump import BATCH, NetPump

PER_TURN = 64


class Backend:
    """Frames waiting to be read, ``PER_TURN`` per receive(); its fd is readable while any wait."""

    def __init__(self, frames):
        self.frames = deque(frames)
        self.r, self.w = os.pipe()
        os.write(self.w, b"x")
        self.error = None
        self.reads = 0

    def fileno(self):
        return self.r

    def receive(self):
        self.reads += 1
        out = [self.frames.popleft() for _ in range(min(PER_TURN, len(self.frames)))]
        if not self.frames:
            os.read(self.r, 1)
        return out

    def wants_write(self):
        return False

    def flush(self):
        pass

    def close(self):
        for fd in (self.r, self.w):
            os.close(fd)


class Guest:
    """The receive side of a driver: takes up to ``buffers`` frames from the backlog per notify."""

    def __init__(self, net):
        self.net, self.buffers, self.got = net, 0, []

    def fill_rx(self, queue):
        while self.buffers and self.net.backlog:
            self.got.append(self.net.backlog.popleft())
            self.buffers -= 1


class Locked:
    def __init__(self, net):
        self.lock, self.device = threading.RLock(), self
        self.net = net

    def notify_queue(self, index):
        self.net.notify(index, None)


def wait_for(predicate, what):
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_a_full_device_leaves_frames_in_the_backend_and_loses_none(monkeypatch):
    frames = [i.to_bytes(4, "big") * 16 for i in range(1000)]
    ahead = 256                                         # frames the pump reads ahead of the device
    monkeypatch.setattr(netpump, "PENDING_MAX", ahead * 64)
    net = VirtioNet()
    guest = Guest(net)
    net.engine = guest
    backend = Backend(frames)
    locked = Locked(net)
    pump = NetPump(backend, net, locked)
    try:
        wait_for(lambda: pump.waits > 0 and len(pump.pending) >= ahead,
                 "the pump to find the device full and read ahead")
        reads = backend.reads
        time.sleep(0.3)                                 # full: the backend is not read meanwhile
        with locked.lock:
            assert len(net.backlog) == RX_BACKLOG and len(pump.pending) < ahead + PER_TURN
            assert pump.pending_bytes == 64 * len(pump.pending)
            assert len(backend.frames) > 1000 - RX_BACKLOG - ahead - PER_TURN and backend.reads == reads
        with locked.lock:                               # the guest posts buffers and notifies
            guest.buffers = 10_000
            net.notify(RECEIVEQ, None)
        wait_for(lambda: len(guest.got) == 1000, "every frame to reach the guest")
        assert guest.got == frames and net.counters["rx_dropped"] == 0
    finally:
        pump.close()


class CountingLock:
    """A lock that remembers the most frames the device got while it was held once."""

    def __init__(self, net):
        self.inner, self.net, self.most, self.at = threading.RLock(), net, 0, 0

    def __enter__(self):
        self.inner.acquire()
        self.at = len(self.net.backlog) + self.net.counters["rx_dropped"]

    def __exit__(self, *exc):
        self.most = max(self.most, len(self.net.backlog) + self.net.counters["rx_dropped"] - self.at)
        self.inner.release()


def test_the_device_lock_is_held_for_one_batch_of_frames_at_most():
    frames = [i.to_bytes(4, "big") * 16 for i in range(1000)]
    net = VirtioNet()
    net.engine = Guest(net)                             # offers no buffers
    backend = Backend(frames)
    locked = Locked(net)
    locked.lock = CountingLock(net)
    pump = NetPump(backend, net, locked)
    try:
        wait_for(lambda: len(net.backlog) == RX_BACKLOG, "the backlog to fill")
        assert 0 < locked.lock.most <= BATCH
    finally:
        pump.close()
