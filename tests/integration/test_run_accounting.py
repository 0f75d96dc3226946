"""Where a run's time went (``Machine.stats.kvm_ns`` / ``vmm_ns``) adds up to the run.

Each vCPU thread's loop splits its own time between KVM_RUN and the VMM, so over a run
the two together are close to the run's wall time for every vCPU thread, and never
more: not the time between runs, not the time a vCPU sat parked by ``pause()``. The
benchmarks (`kvmpy bench exits`) and ``--stats`` build on this. Not a timing test:
the bounds are generous, only a double count (a whole extra run or pause) fails.
"""
import time

import pytest

import kvmpy
from kvmpy import guests

LOOPS = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
CPUS = pytest.mark.parametrize("cpus", [1, 2])
SLACK_NS = 20_000_000            # clock reads and thread start-up at the edges of a run


def pio_loop(native: bool, cpus: int):
    g = guests.get("pio-loop")
    m = kvmpy.Machine(mem_size=2 << 20, cpus=cpus, native=native)
    m.load(g.path, g.format, mode=g.mode, load_addr=g.load_addr, entry=g.entry)
    return m


def accounted(m) -> int:
    return m.stats.kvm_ns + m.stats.vmm_ns


@LOOPS
@CPUS
def test_run_time_adds_up_run_after_run(native, cpus):
    """Three runs with idle gaps between them: each run accounts at most cpus x its wall
    time (the gaps belong to no run), and most of it (the loops account all the time
    they run)."""
    with pio_loop(native, cpus) as m:
        for _ in range(3):
            before = accounted(m)
            t0 = time.perf_counter_ns()
            assert m.run(timeout=0.15).reason == "timeout"
            wall = time.perf_counter_ns() - t0
            got = accounted(m) - before
            assert got <= cpus * wall + SLACK_NS, (got, wall)
            assert got >= 0.5 * cpus * wall - SLACK_NS, (got, wall)
            assert m.stats.kvm_ns > 0 and m.stats.vmm_ns > 0
            time.sleep(0.2)                             # idle: nobody's time


@LOOPS
@CPUS
def test_parked_time_is_not_accounted(native, cpus):
    """A run paused for 0.4 s of its ~0.6 s accounts no more than the time it ran."""
    with pio_loop(native, cpus) as m:
        before = accounted(m)
        t0 = time.perf_counter_ns()
        m.start(timeout=30)
        time.sleep(0.1)
        assert m.pause(timeout=5)
        p0 = time.perf_counter_ns()
        time.sleep(0.4)
        parked = time.perf_counter_ns() - p0
        m.resume()
        time.sleep(0.1)
        m.request_stop("interrupted")
        assert m.wait(10).reason == "interrupted"
        wall = time.perf_counter_ns() - t0
        got = accounted(m) - before
        assert got <= cpus * (wall - parked) + SLACK_NS, (got, wall, parked)
        assert got > 0


def test_live_stats_never_run_ahead_of_the_clock():
    """``live_stats()`` during a native run (the C counters so far) stays within the run's time."""
    with pio_loop(True, 1) as m:
        t0 = time.perf_counter_ns()
        m.start(timeout=30)
        try:
            time.sleep(0.2)
            s = m.live_stats()
            wall = time.perf_counter_ns() - t0
            assert 0 < s.kvm_ns + s.vmm_ns <= wall + SLACK_NS
        finally:
            m.request_stop("interrupted")
            m.wait(10)
