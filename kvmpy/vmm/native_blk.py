"""virtio-blk's request queue in C (``kvmpy_blk_serve`` in csrc/virtio_blk.c) behind the
Python model's interface, for a transport that lives in Python (virtio-pci).

``NativeBlkQueue(blk, mem)`` has the one method of :class:`VirtioBlk` that touches the
ring, ``notify(queue_index, queue)``, with the same results (the differential tests in
tests/native/test_virtio_differential.py hold it to the Python model); a ``VirtioBlk``
whose ``engine`` is one of these serves its requests in C. C walks the chains, moves the
data between the file and guest RAM with preadv/pwritev, writes the status bytes and the
used ring; Python keeps the queue's indices (synced into a ``struct kvmpy_vq_state`` for
each call and back) and raises the interrupt, as its transport always does.

The disk's file descriptor and a reset overlay's bitmap are read from the ``VirtioBlk`` at
every call, so ``use_overlay`` and ``close`` work as they do without C. Rate-limited disks
stay in Python: their limiter is a Python object the C loop cannot consult per request.
"""
from __future__ import annotations

from .._native import ffi, lib
from ..devices.virtio.queue import VirtQueue, VirtqueueError
from .native import guest_mem_table, vq_state_in, vq_state_out


class NativeBlkQueue:
    """The C twin of ``VirtioBlk.notify`` for the disk ``blk`` over ``mem``."""

    def __init__(self, blk, mem):
        if blk.limiter is not None:
            raise ValueError("a rate-limited virtio-blk serves its queue in Python")
        self.blk = blk
        self.mem = guest_mem_table(mem)
        self._scratch = ffi.new("uint8_t[]", lib.kvmpy_blk_scratch_size())     # one chain and its iovecs
        self.scratch = ffi.cast("struct kvmpy_blk_scratch *", self._scratch)
        self.q = ffi.new("struct kvmpy_vq_state *")
        self.d = ffi.new("struct kvmpy_blk_disk *")
        self.d.readonly = int(blk.readonly)
        self.d.capacity = blk.capacity
        ffi.memmove(self.d.id, blk.serial_id, len(blk.serial_id))
        self.why = ffi.new("char **")
        self._bitmap, self._bitmap_c = None, ffi.NULL

    def notify(self, queue_index: int, queue: VirtQueue) -> None:
        d = self.d
        d.fd = self.blk.fd
        d.written = self._written(self.blk.written)
        vq_state_in(self.q, queue)
        served = lib.kvmpy_blk_serve(self.q, self.mem, d, queue.size, self.scratch, self.why)
        vq_state_out(self.q, queue)
        if served < 0:
            raise VirtqueueError(ffi.string(self.why[0]).decode())

    def _written(self, bitmap):
        """The C pointer to a reset overlay's bitmap, or NULL. Its owner keeps it mapped until
        after ``use_overlay(None)``; holding the buffer here would keep it from closing."""
        if bitmap is None:
            self._bitmap, self._bitmap_c = None, ffi.NULL
        elif bitmap is not self._bitmap:
            self._bitmap, self._bitmap_c = bitmap, ffi.cast("uint64_t *", ffi.from_buffer(bitmap))
        return self._bitmap_c
