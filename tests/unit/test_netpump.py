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


class FakeVm:
    """Records KVM_IOEVENTFD calls; ``kick(queue)`` writes the queue's eventfd as KVM would."""

    def __init__(self):
        self.assigned = {}

    def ioeventfd(self, fd, addr, length, datamatch=None, pio=False, deassign=False):
        assert (addr, length, pio) == (0xD0000050, 4, False)
        if deassign:
            assert self.assigned.pop(datamatch) == fd
        else:
            self.assigned[datamatch] = fd

    def kick(self, queue):
        os.eventfd_write(self.assigned[queue], 1)


class Notified(Locked):
    def __init__(self, net):
        super().__init__(net)
        self.queues, self.threads = [], {}

    def notify_queue(self, index):
        assert self.lock._is_owned()
        self.queues.append(index)
        self.threads.setdefault(index, set()).add(threading.current_thread().name)


def test_the_guests_notifications_by_eventfd_are_served_on_the_network_thread():
    net, vm = VirtioNet(), FakeVm()
    locked = Notified(net)
    pump = NetPump(Backend([]), net, locked)
    try:
        pump.notify_by_eventfd(vm, 0xD0000050)
        assert set(vm.assigned) == {RECEIVEQ, 1}
        wait_for(lambda: sorted(locked.queues) == [RECEIVEQ, 1], "a first pass over both queues")
        vm.kick(1)
        vm.kick(1)                                      # two writes before the thread looks: one pass
        wait_for(lambda: len(locked.queues) >= 3, "the transmit notification")
        time.sleep(0.05)
        assert locked.queues[2:] in ([1], [1, 1]) and locked.threads[1] == {"virtio-net-tx"}
        vm.kick(RECEIVEQ)
        wait_for(lambda: locked.queues[-1] == RECEIVEQ, "the receive notification")
        assert locked.threads[RECEIVEQ] == {"virtio-net"}
    finally:
        pump.close()
    assert vm.assigned == {}                            # deassigned on close
