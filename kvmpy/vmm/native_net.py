"""virtio-net's queue work in C (csrc/virtio_net.c) behind the Python model's interface.

``NativeNetQueues(net, mem)`` has the two methods of :class:`VirtioNet` that touch the
rings, ``transmit(queue)`` and ``fill_rx(queue)``, with the same results (the
differential tests in tests/native/test_net_differential.py hold them to it); a
``VirtioNet`` whose ``engine`` is one of these runs its queues in C. The transport and
the backend stay in Python: C walks the chains, copies the frames and writes the used
ring; Python hands the transmitted frames to the backend and keeps the counters, the
backlog and the queue's indices (synced into a ``struct kvmpy_vq_state`` for each call
and back). Everything C uses is allocated here once: the chain scratch space and a
1 MiB buffer the transmitted frames come back in (at least 15 frames of the largest
size per call; one notify still serves at most QueueNum chains).
"""
from __future__ import annotations

from itertools import islice

from .._native import ffi, lib
from ..devices.virtio.net import COUNTERS, RX_HDR
from ..devices.virtio.queue import VirtQueue, VirtqueueError
from .native import guest_mem_table, vq_state_in, vq_state_out

TX_BUFFER = 1 << 20
RX_BATCH = 256              # frames handed to C per call (a queue holds at most 256 chains)
_C_COUNTERS = ("rx_frames", "rx_bytes", "rx_too_big", "rx_bad_chain", "tx_bad_chain", "tx_bad_length")


class NativeNetQueues:
    """The C twin of ``VirtioNet.transmit``/``fill_rx`` for the device ``net`` over ``mem``."""

    def __init__(self, net, mem):
        self.net = net
        self.mem = guest_mem_table(mem)
        self.chain = ffi.new("uint8_t[]", lib.kvmpy_net_chain_size())
        self.chain_p = ffi.cast("struct kvmpy_vq_chain *", self.chain)
        self.out = ffi.new("uint8_t[]", TX_BUFFER)
        self.out_len = ffi.new("uint64_t *")
        self.q = ffi.new("struct kvmpy_vq_state *")
        self.c = ffi.new("struct kvmpy_net_counters *")
        self.why = ffi.new("char **")
        self.budget = ffi.new("uint32_t *")
        self.consumed = ffi.new("uint32_t *")
        self.lens = ffi.new("uint32_t[]", RX_BATCH)
        self.hdr = ffi.new("uint8_t[]", RX_HDR)
        assert set(_C_COUNTERS) <= set(COUNTERS)

    # --- the two queue methods of VirtioNet ------------------------------------------

    def transmit(self, queue: VirtQueue) -> None:
        left = queue.size
        while left:
            self._load(queue)
            served = lib.kvmpy_net_tx(self.q, self.mem, left, self.out, TX_BUFFER, self.out_len, self.c,
                                      self.chain_p, self.why)
            frames = served - self.c.tx_bad_chain - self.c.tx_bad_length if served > 0 else 0
            self._store(queue)
            self._send(ffi.buffer(self.out, self.out_len[0]), frames)     # the frames before an error go too
            if served < 0:
                raise VirtqueueError(ffi.string(self.why[0]).decode())
            if served == 0 or self.out_len[0] + 4 + 12 + 65550 <= TX_BUFFER:
                return                          # the ring is empty (C stopped for no other reason)
            left -= served

    def fill_rx(self, queue: VirtQueue) -> None:
        backlog = self.net.backlog
        if not backlog:
            return
        self.budget[0] = queue.size
        self._load(queue)                       # C keeps the indices in self.q between frames
        try:
            while backlog and self.budget[0]:
                batch = list(islice(backlog, min(self.budget[0], RX_BATCH)))
                self.lens[0:len(batch)] = [len(f) for f in batch]
                r = lib.kvmpy_net_rx_many(self.q, self.mem, self.hdr, b"".join(batch), self.lens, len(batch),
                                          self.consumed, self.budget, self.c, self.chain_p, self.why)
                for _ in range(self.consumed[0]):
                    backlog.popleft()           # delivered, or too big for its chain
                if r < 0:
                    raise VirtqueueError(ffi.string(self.why[0]).decode())
                if self.consumed[0] < len(batch):
                    return                      # no chain left
        finally:
            self._store(queue)

    # --- between the Python queue and C -----------------------------------------------

    def _load(self, queue: VirtQueue) -> None:
        vq_state_in(self.q, queue)
        ffi.memmove(self.c, bytes(ffi.sizeof("struct kvmpy_net_counters")), ffi.sizeof("struct kvmpy_net_counters"))

    def _store(self, queue: VirtQueue) -> None:
        counters = self.net.counters
        vq_state_out(self.q, queue)
        for name in _C_COUNTERS:
            counters[name] += getattr(self.c, name)

    def _send(self, records, frames: int) -> None:
        """Hand the ``frames`` frames C copied out to the backend, counting as VirtioNet.transmit
        does: in one piece to a stream backend that takes them all, else one by one."""
        counters, backend = self.net.counters, self.net.backend
        if frames > 0 and hasattr(backend, "send_records") and backend.send_records(records):
            counters["tx_frames"] += frames
            counters["tx_bytes"] += len(records) - 4 * frames
            return
        data, pos = bytes(records), 0
        while pos < len(data):
            n = int.from_bytes(data[pos:pos + 4], "big")
            frame = data[pos + 4:pos + 4 + n]
            pos += 4 + n
            if backend is not None and backend.send(frame):
                counters["tx_frames"] += 1
                counters["tx_bytes"] += n
            else:
                counters["tx_dropped"] += 1
