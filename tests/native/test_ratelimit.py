"""The C token buckets (csrc/ratelimit.c) and the rate-limited C virtio-blk behave exactly
like their Python twins (kvmpy/devices/ratelimit.py, devices/virtio/blk.py), under one
fake clock: the same integers in every bucket, the same requests left in the ring, the
same guest RAM, registers and interrupt level after every step."""
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmpy._native import ffi, lib
from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.ratelimit import NS, Limits, TokenBucket
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio.blk import VirtioBlk
from kvmpy.kvm.memory import GuestMemory
from kvmpy.vmm.native import NativeVirtioBlk

from .test_virtio_differential import DISK, OPS, RAM, REQUESTS, Side, comparable

T0 = 5 * NS
FIELDS = ("size", "refill_ns", "burst", "tokens", "frac", "last_ns")


def c_state(b):
    return {k: getattr(b, k) for k in FIELDS}


SIZES = st.one_of(st.sampled_from([1, 3, 7, 1000, 1 << 20, 1 << 62]), st.integers(1, 1 << 40))
REFILLS = st.one_of(st.sampled_from([1, 3, NS, 2 * NS, 333_333_333, 1 << 62]), st.integers(1, 1 << 40))
STEPS = st.lists(st.tuples(st.one_of(st.integers(0, 10 * NS), st.sampled_from([0, 1, 1 << 62])),
                           st.one_of(st.integers(0, 1 << 32), st.sampled_from([0, 1, 512, 4096])),
                           st.booleans()), max_size=30)


@settings(max_examples=400, deadline=None)
@given(size=SIZES, refill=REFILLS, burst=st.one_of(st.just(0), st.integers(0, 1 << 33)), steps=STEPS)
def test_c_buckets_compute_the_python_buckets_integers(size, refill, burst, steps):
    py = TokenBucket(size, refill, burst, T0)
    c = ffi.new("struct kvmpy_bucket *")
    assert lib.kvmpy_bucket_init(c, size, refill, burst, T0) == 0
    now = T0
    for dt, cost, back in steps:
        now = max(0, now - dt) if back else min(now + dt, 1 << 63)     # a clock may even go back
        py.refill(now)
        lib.kvmpy_bucket_refill(c, now)
        missing = py.missing(cost)
        assert lib.kvmpy_bucket_missing(c, cost) == missing
        assert lib.kvmpy_bucket_wait_ns(c, missing) == py.wait_ns(missing)
        if not missing:
            py.take(cost)
            lib.kvmpy_bucket_take(c, cost)
        assert c_state(c) == py.state()


def test_c_buckets_refuse_what_python_refuses():
    c = ffi.new("struct kvmpy_bucket *")
    for args in ((0, NS, 0), (1, 0, 0), ((1 << 62) + 1, NS, 0), (1, (1 << 62) + 1, 0), (1, NS, (1 << 62) + 1)):
        assert lib.kvmpy_bucket_init(c, *args, 0) == -22
        try:
            TokenBucket(*args)
        except ValueError:
            continue
        raise AssertionError(args)


# --- the device, both twins, one fake clock ------------------------------------------------

LIMITS = st.one_of(
    st.builds(Limits, iops=st.sampled_from([1, 2, 5]), bps=st.sampled_from([None, 512, 1000, 4096]),
              fps=st.sampled_from([None, 1]), iops_burst=st.sampled_from([0, 0, 3])),
    st.builds(Limits, bps=st.sampled_from([512, 1000, 4096]), fps=st.sampled_from([None, 1]),
              bps_burst=st.sampled_from([0, 0, 2048])))


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now


def sides(paths, limits):
    clock = Clock()
    py = Side.__new__(Side)
    py.mem, py.avail_idx = GuestMemory.anonymous(RAM), 0
    py.blk = VirtioBlk(paths[0], limits=limits, clock=clock)
    py.trig = RecordingTrigger()
    py.dev = R.VirtioMmioTransport(py.blk, py.mem, py.trig)
    py.level = lambda: py.trig.level
    c = Side.__new__(Side)
    c.mem, c.avail_idx = GuestMemory.anonymous(RAM), 0
    c.dev = NativeVirtioBlk(paths[1], c.mem, limits=limits, clock_ns=T0)
    c.level = lambda: c.dev.irq_level
    return clock, py, c


def py_limiter_state(blk):
    lim = blk.limiter
    out = {"throttled_until": lim.throttled_until, "throttled": lim.throttled}
    for name in ("ops", "bytes", "flushes"):
        b = getattr(lim, name)
        out[name] = None if b is None else b.state()
    return out


def step(op, clock, py, c):
    if op[0] == "tick":
        clock.now += op[1]
        c.dev.set_clock(clock.now)
        return None, None
    if op[0] == "pending":              # what the disk timer does (vmm/slots.py PythonPending)
        py.blk.limiter.clear()
        py.dev.write(R.QueueNotify, 4, 0)
        c.dev.serve_pending()
        return None, None
    return c.apply(op), py.apply(op)


TIMED = st.lists(st.one_of(REQUESTS, REQUESTS, REQUESTS, REQUESTS, REQUESTS, st.tuples(st.just("tick"), st.sampled_from([1, 10**6, 10**8, NS // 3, NS])),
                           st.tuples(st.just("pending")), st.tuples(st.just("notify"), st.just(0))),
                 min_size=4, max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=LIMITS, ops=st.one_of(TIMED, TIMED, TIMED, OPS))
def test_rate_limited_twins_defer_and_serve_the_same_requests(tmp_path_factory, limits, ops):
    d = tmp_path_factory.mktemp("rl")
    paths = [d / "py.img", d / "c.img"]
    for p in paths:
        p.write_bytes(bytes(range(256)) * (DISK // 256))
    clock, py, c = sides(paths, limits)
    try:
        for op in [("init", True)] + ops:
            got_c, got_py = step(op, clock, py, c)
            assert got_c == got_py, op
            assert comparable(c.dev.state()) == comparable(py.dev.state()), op
            assert c.level() == py.level(), op
            assert c.mem.read(0, RAM) == py.mem.read(0, RAM), op
            assert c.dev.limiter_state() == py_limiter_state(py.blk), op
        event(f"requests deferred: {min(py.blk.limiter.throttled, 2)}")
    finally:
        py.close()
        c.close()
    assert paths[1].read_bytes() == paths[0].read_bytes()
