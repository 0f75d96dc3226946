"""Token buckets (kvmpy/devices/ratelimit.py), the rate-limited Python virtio-blk, Disk's
limit options and the console's serial limit: no KVM, a fake clock."""
import io
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices.ratelimit import NS, Limits, RateLimiter, TokenBucket, parse_amount


def test_a_bucket_starts_full_and_refills_at_its_rate():
    b = TokenBucket(10, NS, now=0)
    assert b.missing(10) == 0
    b.take(10)
    assert b.missing(1) == 1 and b.wait_ns(1) == NS // 10
    b.refill(NS // 2)
    assert b.tokens == 5
    b.refill(10 * NS)                       # never beyond its size
    assert b.tokens == 10 and b.frac == 0


def test_fractional_rates_lose_nothing_to_rounding():
    b = TokenBucket(3, NS, now=0)           # one token every 333 333 333.3 ns
    b.take(3)
    for t in range(1, 301):
        b.refill(t * NS // 100)             # 300 refills of 10 ms each
    assert b.tokens == 3                    # 9 tokens earned, capped at 3
    slow = TokenBucket(1, 2 * NS, now=0)    # half a token per second
    slow.take(1)
    slow.refill(NS)
    assert slow.tokens == 0 and slow.frac == NS   # half a token, kept
    assert slow.wait_ns(1) == NS
    slow.refill(2 * NS)
    assert slow.tokens == 1


def test_the_one_time_burst_is_spent_first_and_never_refilled():
    b = TokenBucket(2, NS, burst=5, now=0)
    assert b.missing(7) == 0                # size 2 + burst 5
    b.take(6)
    assert (b.burst, b.tokens) == (0, 1)
    b.refill(10 * NS)
    assert (b.burst, b.tokens) == (0, 2)


def test_a_request_larger_than_the_bucket_waits_for_a_full_one_and_leaves_a_debt():
    b = TokenBucket(4, NS, now=0)
    b.take(1)
    assert b.missing(100) == 1              # needs min(100, size) = 4
    b.refill(NS // 4)
    assert b.missing(100) == 0
    b.take(100)
    assert b.tokens == -96
    assert b.wait_ns(b.missing(1)) == 97 * NS // 4     # the debt is paid first


def test_a_clock_going_back_adds_nothing():
    b = TokenBucket(10, NS, now=NS)
    b.take(10)
    b.refill(0)
    assert b.tokens == 0 and b.last_ns == NS


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1, 10_000), costs=st.lists(st.integers(1, 50), min_size=1, max_size=200))
def test_a_limiter_admits_no_more_than_its_rate_allows(rate, costs):
    """Serving as fast as admitted, T seconds move at most size + rate * T + one request."""
    now = [0]
    lim = RateLimiter(Limits(iops=rate), clock=lambda: now[0])
    taken = 0
    for c in costs:
        while not lim.admit(c, 0, 0):
            assert lim.throttled_until > now[0]
            now[0] = lim.throttled_until
        taken += c
    assert taken <= rate + rate * now[0] / NS + max(costs)


def test_a_refused_request_takes_nothing_from_any_bucket():
    now = [0]
    lim = RateLimiter(Limits(iops=100, bps=1000), clock=lambda: now[0])
    assert lim.admit(1, 1000, 0)
    ops = lim.ops.tokens
    assert not lim.admit(1, 1, 0)
    assert lim.ops.tokens == ops and lim.throttled == 1
    assert lim.throttled_until == NS // 1000


@pytest.mark.parametrize("text, value", [("100", 100), ("4K", 4096), ("1m", 1 << 20), ("2G", 2 << 30),
                                         ("3MiB", 3 << 20)])
def test_amounts_take_binary_suffixes(text, value):
    assert parse_amount(text) == value


@pytest.mark.parametrize("bad", [Limits, lambda: Limits(iops=0), lambda: Limits(bps=-1), lambda: Limits(iops=1.5),
                                 lambda: Limits(iops=True), lambda: Limits(iops=1, iops_burst=-1)])
def test_bad_limits_are_refused_or_empty(bad):
    try:
        assert not bad()
    except ValueError:
        pass


def test_disk_parse_reads_limits():
    from kvmpy.vmm.platform import Disk
    d = Disk.parse("img,ro,iops=100,bps=1M,fps=5,bps_burst=4K")
    assert (d.path, d.readonly, d.iops, d.bps, d.fps, d.bps_burst) == ("img", True, 100, 1 << 20, 5, 4096)
    assert d.limits == Limits(iops=100, bps=1 << 20, fps=5, bps_burst=4096)
    assert Disk.parse("img").limits is None
    assert Disk("img", bps="64K").bps == 65536
    for bad in ("img,iops=0", "img,iops=x", "img,bps=", "img,speed=1", ",iops=1"):
        with pytest.raises(ValueError, match="bad disk"):
            Disk.parse(bad)


# --- the Python virtio-blk with a limit -------------------------------------------------

def test_the_python_device_leaves_over_budget_requests_in_the_ring(tmp_path):
    import struct
    from kvmpy.devices.virtio import mmio as R
    from tests.unit.test_virtio_blk import BUF, disk_file, rig
    now = [0]
    path = disk_file(str(tmp_path), bytes(4096))
    drv, blk, _ = rig(path, limits=Limits(iops=2), clock=lambda: now[0])
    drv.init()
    drv.mem.write(BUF, struct.pack("<IIQ", 0, 0, 1))          # IN, sector 1
    chain = [(BUF, 16, False), (BUF + 0x1000, 512, True), (BUF + 0x2000, 1, True)]
    for _ in range(3):
        drv.submit(chain, notify=False)
    drv.wr(R.QueueNotify, 0)
    assert len(drv.used()) == 2                        # the bucket held two operations
    assert blk.limiter.throttled_until == NS // 2
    drv.wr(R.QueueNotify, 0)
    assert drv.used() == []                            # no time passed: it still waits, untouched
    now[0] = NS // 2
    drv.wr(R.QueueNotify, 0)
    assert drv.used() == [(0, 513)] and blk.limiter.throttled_until == 0


# --- serial output per second ---------------------------------------------------------------

class SlowSink(io.RawIOBase):
    def __init__(self):
        self.chunks, self.event = [], threading.Event()

    def writable(self):
        return True

    def write(self, b):
        self.chunks.append(bytes(b))
        self.event.set()
        return len(b)


def test_the_console_writer_waits_for_tokens_and_never_the_caller():
    from kvmpy.vmm.console import Console
    now = [0]
    sink = SlowSink()
    c = Console(sink, bps=4, clock=lambda: now[0])
    assert c.write(b"0123456789") == 10                # queued at once
    assert sink.event.wait(2)
    assert b"".join(sink.chunks) == b"0123"            # one second's bucket
    sink.event.clear()
    now[0] = NS // 2                                   # two more tokens
    with c._cond:
        c._cond.notify_all()
    assert sink.event.wait(2)
    assert b"".join(sink.chunks) == b"012345"
    c.close(0.05)
    c._writer.join(2)
    assert c.dropped == 4                              # what was still queued at close
    with pytest.raises(ValueError):
        Console(sink, bps=0)
