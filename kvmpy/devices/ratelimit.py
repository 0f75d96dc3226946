"""Token-bucket rate limiters, after Firecracker's: the Python twin of csrc/ratelimit.c.

A ``TokenBucket`` holds up to ``size`` tokens and refills from empty to full in
``refill_ns`` nanoseconds (so its rate is ``size / refill_ns`` per ns: 3 tokens per
second, or 1 per 2 s, are exact); it starts full, and may carry a one-time ``burst``
of extra tokens that are spent first and never refilled. Whole tokens are ``tokens``,
the partial one ``frac / refill_ns`` of a token, so no refill is ever lost to rounding
and C (csrc/ratelimit.c, 128-bit products) and Python (unbounded ints) compute the same
integers. A request of ``cost`` tokens is admitted when the bucket holds at least
``min(cost, size)``: a request larger than the bucket waits for a full one and leaves
a debt (``tokens`` below zero) that the refill pays off, so the long-run rate holds.

A ``RateLimiter`` is up to three buckets (operations, bytes, flushes) and a clock
(``time.monotonic_ns``, the C side's CLOCK_MONOTONIC; injectable for tests). A request
takes its tokens from every bucket or from none; when it cannot, ``throttled_until``
says when it could (the clock time at which the last missing token arrives), and the
device leaves the request for then. docs/virtio.md, "Rate limits", has the device side.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

NS = 1_000_000_000
MAX_SIZE = 1 << 62            # tokens a bucket may hold (C: int64 with room for a debt)
MAX_REFILL_NS = 1 << 62
MAX_WAIT_NS = 1 << 62         # a wait is at most this (a huge debt on a tiny bucket: ~146 years)
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class TokenBucket:
    """One bucket; every method takes ``now`` (ns) so the clock stays outside."""

    def __init__(self, size: int, refill_ns: int = NS, burst: int = 0, now: int = 0):
        for name, v, hi in (("size", size, MAX_SIZE), ("refill_ns", refill_ns, MAX_REFILL_NS),
                            ("burst", burst, MAX_SIZE)):
            if not isinstance(v, int) or isinstance(v, bool) or not (name == "burst" or v >= 1) \
                    or not 0 <= v <= hi:
                raise ValueError(f"token bucket: bad {name} {v!r}")
        self.size, self.refill_ns, self.burst = size, refill_ns, burst
        self.tokens, self.frac, self.last_ns = size, 0, now

    def refill(self, now: int) -> None:
        """Add what ``now - last_ns`` earned; a clock that went back adds nothing."""
        if now <= self.last_ns:
            return
        elapsed, self.last_ns = now - self.last_ns, now
        if self.tokens >= self.size:
            self.frac = 0
            return
        whole, self.frac = divmod(elapsed * self.size + self.frac, self.refill_ns)
        if whole >= self.size - self.tokens:
            self.tokens, self.frac = self.size, 0
        else:
            self.tokens += whole

    def missing(self, cost: int) -> int:
        """Tokens still missing before a request of ``cost`` may go (0: it may)."""
        return max(0, min(cost, self.size) - self.tokens - self.burst)

    def take(self, cost: int) -> None:
        """Spend ``cost`` tokens, the one-time burst first; may leave a debt."""
        from_burst = min(self.burst, cost)
        self.burst -= from_burst
        self.tokens -= cost - from_burst

    def wait_ns(self, missing: int) -> int:
        """Nanoseconds until ``missing`` more tokens have arrived (rounded up, at most
        MAX_WAIT_NS)."""
        if missing <= 0:
            return 0
        return min(-(-(missing * self.refill_ns - self.frac) // self.size), MAX_WAIT_NS)

    def state(self) -> dict:
        return {"size": self.size, "refill_ns": self.refill_ns, "burst": self.burst,
                "tokens": self.tokens, "frac": self.frac, "last_ns": self.last_ns}


@dataclass(frozen=True)
class Limits:
    """What a disk may do per second: operations, bytes, flushes (None: unlimited), and
    one-time bursts on top of the first second. A bucket holds one second of its rate."""

    iops: int | None = None
    bps: int | None = None
    fps: int | None = None
    iops_burst: int = 0
    bps_burst: int = 0

    def __post_init__(self):
        for name in ("iops", "bps", "fps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SIZE):
                raise ValueError(f"{name} must be a whole number of at least 1 per second, not {v!r}")
        for name in ("iops_burst", "bps_burst"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_SIZE:
                raise ValueError(f"{name} must be a whole number >= 0, not {v!r}")

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.iops, self.bps, self.fps))

    def buckets(self, now: int) -> tuple:
        """(ops, bytes, flushes) buckets, None where unlimited."""
        def make(rate, burst=0):
            return None if rate is None else TokenBucket(rate, NS, burst, now)
        return make(self.iops, self.iops_burst), make(self.bps, self.bps_burst), make(self.fps)


class RateLimiter:
    """The buckets of one device and its clock; see the module docstring."""

    def __init__(self, limits: Limits, clock: Callable[[], int] = time.monotonic_ns):
        self.limits, self.clock = limits, clock
        self.ops, self.bytes, self.flushes = limits.buckets(clock())
        self.throttled_until = 0         # clock time a refused request may go; 0: not throttled
        self.throttled = 0               # requests refused (each was left in the ring)

    def admit(self, ops: int, nbytes: int, flushes: int) -> bool:
        """Take the request's tokens from every bucket, or from none and note when."""
        now = self.clock()
        want = [(b, c) for b, c in ((self.ops, ops), (self.bytes, nbytes), (self.flushes, flushes))
                if b is not None and c]
        wait = 0
        for b, c in want:
            b.refill(now)
            wait = max(wait, b.wait_ns(b.missing(c)))
        if wait:
            self.throttled_until = now + wait
            self.throttled += 1
            return False
        for b, c in want:
            b.take(c)
        self.throttled_until = 0
        return True

    def clear(self) -> None:
        """Nothing waits any more (the queue is empty, or gone)."""
        self.throttled_until = 0


def parse_amount(text: str) -> int:
    """``"100"``, ``"4K"``, ``"1M"``, ``"2G"`` (binary multiples) -> int; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad amount {text!r}: expected a whole number with an optional K, M, G or T")
    return int(m.group(1)) * _SUFFIX[m.group(2).upper()]
