"""virtio-rng, the entropy device (virtio 1.2, section 5.4), fed from the host's getrandom.

Device ID 4, one queue (``requestq``), no configuration space and no feature bits but
VIRTIO_F_VERSION_1. The driver offers device-writable buffers; the device fills them
with random bytes from ``os.getrandom`` (the host kernel's CRNG, the same source as
``/dev/urandom``) and returns each chain with ``used.len`` = the bytes written.

Decisions where the spec leaves room (docs/virtio.md, "virtio-rng", has the table):

- **At most MAX_REQUEST_BYTES (64 KiB) per chain.** The device "MAY use less than the
  entire buffer length" (5.4.6.2): a chain's writable buffers are filled in order up to
  ``min(writable length, 64 KiB)`` and the rest is left untouched. Linux asks for 64
  bytes at a time; the bound keeps one notify (at most QueueNum chains, like
  virtio-blk's) at 16 MiB of getrandom.
- **A device-readable buffer is a device error.** "The driver MUST NOT place
  driver-readable buffers into the queue" (5.4.6.1): the chain is a driver violation,
  so it raises VirtqueueError and the transport sets DEVICE_NEEDS_RESET (no used
  entry), as virtio-blk does for a chain with nowhere to put its status byte. Every
  check of the chain itself (loops, indices, RAM bounds, 2^32 totals, INDIRECT) is
  the queue's (queue.py), shared with virtio-blk.
- **A chain of zero writable bytes** (only zero-length descriptors) is returned with
  ``used.len`` 0: there is nowhere to put a byte, and nothing to refuse.
- **Rate limits** (``limits=``, kvmpy/devices/ratelimit.py, the disks' token buckets):
  a chain costs one operation and its fill length in bytes. One whose tokens are not
  there is put back in the ring as if never popped and the notify ends; the Machine's
  timer (vmm/throttle.py) or the guest's next QueueNotify serves it when they are
  (``limiter.throttled_until``). ``DEFAULT_LIMITS`` is what ``Machine(rng=True)`` uses.
  So a guest can neither make the VMM spin in getrandom nor, on old host kernels whose
  pool is counted, drain the host's entropy.
- **Nothing to save** beyond the transport's registers: requests complete
  synchronously, the limiter is host policy (a restored device gets full buckets).

Pure Python and only Python: entropy is not a hot path (Linux's hwrng thread asks for
a few bytes now and then), so there is no C twin; the native run loop sends this
device's MMIO exits to Python.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from ...kvm.memory import GuestMemory
from ..ratelimit import Limits, RateLimiter
from .core import VIRTIO_F_VERSION_1
from .queue import DescriptorChain, VirtQueue, VirtqueueError

VIRTIO_ID_ENTROPY = 4
QUEUE_NUM_MAX = 256
MAX_REQUEST_BYTES = 64 << 10         # bytes written into one chain at most
#: ``Machine(rng=True)``'s limits: 1 MiB and 4096 requests per second (buckets of one
#: second's worth, full at the start). Linux's 64-byte reads get 256 KiB/s.
DEFAULT_LIMITS = Limits(iops=4096, bps=1 << 20)


class VirtioRng:
    """A virtio entropy device (see the module docstring). ``source(n)`` returns up to
    ``n`` random bytes (default ``os.getrandom``); ``clock`` is the limiter's."""

    device_id = VIRTIO_ID_ENTROPY
    device_features = 1 << VIRTIO_F_VERSION_1
    num_queues = 1
    queue_num_max = QUEUE_NUM_MAX
    config_size = 0

    def __init__(self, limits: Limits | None = None, source: Callable[[int], bytes] = os.getrandom,
                 clock: Callable[[], int] = time.monotonic_ns):
        self.source = source
        self.limiter = RateLimiter(limits, clock) if limits else None
        self.requests = 0               # chains returned to the driver
        self.bytes_served = 0           # random bytes written into guest RAM

    # --- VirtioDevice ------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        return 0                        # no configuration space (the transport never asks)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """No configuration space: ignored."""

    def reset(self) -> None:
        """Nothing is in flight; a throttled chain's ring is gone (the buckets keep their tokens)."""
        if self.limiter is not None:
            self.limiter.clear()

    def notify(self, queue_index: int, queue: VirtQueue) -> None:
        """Fill the available chains of ``queue`` in ring order, at most ``queue.size`` of
        them (a device-writable buffer may overlap the available ring and republish
        itself: the bound keeps one QueueNotify finite, as virtio-blk's does)."""
        for chain in queue.one_notify(self.limiter):
            if chain.readable:
                raise VirtqueueError(f"virtio-rng chain at descriptor {chain.head} has "
                                     f"{chain.readable_len} device-readable bytes")
            n = min(chain.writable_len, MAX_REQUEST_BYTES)
            if self.limiter is not None and not self.limiter.admit(1, n, 0):
                queue.last_avail_idx = (queue.last_avail_idx - 1) & 0xFFFF   # back, untouched
                return
            queue.push_used(chain.head, self.handle(queue.mem, chain))

    # --- requests ------------------------------------------------------------------

    def handle(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        """Fill the chain's writable buffers, in order, with at most MAX_REQUEST_BYTES
        random bytes; returns how many were written (``used.len``)."""
        left = min(chain.writable_len, MAX_REQUEST_BYTES)
        written = 0
        for addr, length in chain.writable:
            want = min(length, left)
            if not want:
                break
            data = self._random(want)
            mem.write(addr, data)
            written += len(data)
            left -= len(data)
            if len(data) < want:
                break                   # the source ran dry: return what we have
        self.requests += 1
        self.bytes_served += written
        return written

    def _random(self, n: int) -> bytes:
        """``n`` bytes from the source (getrandom may return fewer: a signal, such as a
        vCPU kick, interrupts a large one), fewer only if it returns nothing."""
        out = b""
        while len(out) < n:
            chunk = self.source(n - len(out))
            if not chunk:
                break
            out += chunk[:n - len(out)]
        return out

    def state(self) -> dict:
        """Counters and limits, for debugging (not saved: see the module docstring)."""
        return {"requests": self.requests, "bytes_served": self.bytes_served,
                "limits": self.limiter.limits if self.limiter is not None else None,
                "throttled": self.limiter.throttled if self.limiter is not None else 0}

    def __repr__(self) -> str:
        return f"VirtioRng({self.requests} requests, {self.bytes_served} bytes)"
