"""The machine's watchdog thread (kvmpy/vmm/run.py): one thread for every run of a
machine, a timeout that stops the run, a stop delivered until the run is taken back, and
nothing of one run (a timeout, a kick) reaching the next."""
import threading
import time

from kvmpy.vmm.pause import REKICK_S, Stop
from kvmpy.vmm.run import Watchdog


class FakeGate:
    def __init__(self):
        self.stop = Stop()
        self.kicks = 0
        self.lock = threading.Lock()

    def wake_all(self):
        with self.lock:
            self.kicks += 1

    def request_stop(self, reason):
        self.stop.set(reason)
        self.wake_all()


class FakeConsole:
    def __init__(self):
        self.drains = 0

    def drain(self):
        self.drains += 1
        return True


def watchdog_threads():
    return [t for t in threading.enumerate() if t.name == "vcpu-watchdog"]


def test_a_timeout_stops_the_run_and_the_stop_is_delivered_until_disarmed():
    gate, console = FakeGate(), FakeConsole()
    w = Watchdog(gate, console)
    try:
        t0 = time.monotonic()
        w.arm(gate.stop, 0.05, flush=False)
        assert gate.stop.wait(2.0) and gate.stop.reason == "timeout"
        assert 0.04 <= time.monotonic() - t0 < 1.0
        time.sleep(5 * REKICK_S)                # nobody answers: kicked again and again
        assert gate.kicks >= 3
        w.disarm()
        kicks = gate.kicks
        time.sleep(5 * REKICK_S)
        assert gate.kicks == kicks, "a kick reached past disarm()"
        assert console.drains == 0
    finally:
        w.close()


def test_one_thread_serves_every_run_and_close_ends_it():
    gate, console = FakeGate(), FakeConsole()
    w = Watchdog(gate, console)
    for _ in range(50):                         # short runs: no timeout, no kick
        gate.stop = Stop()
        w.arm(gate.stop, 5.0, flush=False)
        gate.stop.set("exit")
        w.disarm()
    first = w.thread
    for _ in range(50):
        gate.stop = Stop()
        w.arm(gate.stop, 5.0, flush=False)
        gate.stop.set("exit")
        w.disarm()
    assert w.thread is first and first.is_alive() and first.name == "vcpu-watchdog"
    assert gate.stop.reason == "exit"
    before = len(watchdog_threads())                # other machines' watchdogs may live in this process
    w.close()
    assert not first.is_alive()
    assert len(watchdog_threads()) == before - 1


def test_a_stop_without_a_timeout_is_still_delivered_and_the_console_flushed():
    gate, console = FakeGate(), FakeConsole()
    w = Watchdog(gate, console)
    try:
        w.arm(gate.stop, None, flush=True)
        time.sleep(0.1)
        assert gate.kicks == 0 and console.drains >= 2     # flushed while it runs (every 20 ms)
        gate.stop.set("interrupted")            # set by another thread, without a kick
        deadline = time.monotonic() + 2.0
        while gate.kicks == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert gate.kicks >= 1
    finally:
        w.disarm()
        w.close()


def test_a_timeout_of_an_old_run_never_stops_the_next():
    gate, console = FakeGate(), FakeConsole()
    w = Watchdog(gate, console)
    try:
        first = gate.stop
        w.arm(first, 0.03, flush=False)
        w.disarm()                              # the run ended before its timeout
        gate.stop = Stop()
        w.arm(gate.stop, None, flush=False)
        time.sleep(0.1)
        assert first.reason is None and gate.stop.reason is None and gate.kicks == 0
        w.disarm()
    finally:
        w.close()
