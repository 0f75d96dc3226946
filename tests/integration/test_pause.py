"""Pause and resume, background runs (start/wait): what a controlling program relies on.

A paused machine stands still (every vCPU parked, application processors waiting for
SIPI included), goes on exactly where it stopped, and can still be stopped, timed out
or inspected; parking never loses or repeats a guest exit.
"""
import shutil
import threading
import time

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.debug.trace import Tracer
from kvmpy.errors import GuestError, KvmpyError

from .lab import wait_until

NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
COUNTER_EXIT = guests.get("counter").expect_status         # 0x87


def load_raw(m, name):
    g = guests.get(name)
    m.load(g.path, g.format, mode=g.mode, load_addr=g.load_addr, entry=g.entry)


def load_counter(m, n, pages=64):
    m.load(guests.get("counter").path, "elf", mode="long", cmdline=f"n={n} pages={pages}")




def settled_output(m):
    """The serial output once the native UART's buffer has been drained (the flusher
    writes it out every 20 ms, paused or not)."""
    m.console.drain()
    return m.serial_output


@NATIVE
@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_a_paused_machine_stands_still_and_resume_goes_on(native, cpus):
    """pause() parks every vCPU (the APs waiting for SIPI too): no register of any vCPU
    changes while paused; after resume() the guest's registers move again."""
    with kvmpy.Machine(mem_size=2 << 20, cpus=cpus, native=native) as m:
        load_raw(m, "pio-loop")
        m.start(timeout=30)
        try:
            time.sleep(0.05)
            assert m.pause(timeout=5) is True
            assert m.paused and m.running
            before = [v.get_regs() for v in m.vcpus]
            exits_before = sum(m.stats.exits.values())
            time.sleep(0.15)
            assert [v.get_regs() for v in m.vcpus] == before
            assert sum(m.stats.exits.values()) == exits_before     # Python path counts live; both: no exits
            assert m.paused                                         # still paused: nothing woke a vCPU
            m.resume()
            assert not m.paused and m.running
            wait_until(lambda: m.vcpus[0].get_regs().rax != before[0].rax, 5, "the guest to go on")
            # pause again: it works more than once and the APs park again too
            assert m.pause(timeout=5) is True
            m.resume()
        finally:
            m.request_stop("interrupted")
            result = m.wait(10)
    assert result.reason == "interrupted"
    assert not m.running and not m.paused


@NATIVE
@pytest.mark.parametrize("cpus", [1, 2])
def test_output_stops_while_paused_and_the_run_ends_normally(native, cpus):
    """The counter guest's output stops growing while paused and grows again after
    resume(); the run then ends with the uninterrupted run's output and exit status."""
    n = 150
    with kvmpy.Machine(cpus=cpus, native=native) as m:
        load_counter(m, n)
        m.start(timeout=60)
        wait_until(lambda: b"count 3 " in settled_output(m), 10, "the first lines")
        assert m.pause(timeout=5) is True
        paused_out = settled_output(m)
        assert b"counter: done" not in paused_out              # it really was paused mid-run
        time.sleep(0.2)
        assert settled_output(m) == paused_out
        m.resume()
        wait_until(lambda: len(settled_output(m)) > len(paused_out), 10, "output after resume")
        result = m.wait(30)
    assert (result.reason, result.status) == ("exit", COUNTER_EXIT)
    assert m.serial_output == guests.counter_output(n, 64)


def test_pause_on_a_stopped_machine_returns_false():
    """Before any run and after a run has ended there is nothing to pause."""
    with kvmpy.Machine(mem_size=2 << 20) as m:
        load_raw(m, "hello-real")
        assert m.pause() is False
        assert not m.paused and not m.running
        assert m.run(timeout=10).reason == "exit"
        assert m.pause() is False
        assert not m.paused and not m.running
        m.resume()                                  # harmless: nothing is paused


@NATIVE
@pytest.mark.parametrize("cpus", [1, 2])
def test_request_stop_ends_a_paused_run(native, cpus):
    with kvmpy.Machine(mem_size=2 << 20, cpus=cpus, native=native) as m:
        load_raw(m, "pio-loop")
        m.start(timeout=30)
        assert m.pause(timeout=5) is True
        t0 = time.monotonic()
        m.request_stop("interrupted")
        result = m.wait(5)
        assert time.monotonic() - t0 < 2
    assert result.reason == "interrupted"


@NATIVE
def test_a_timeout_expiring_while_paused_ends_the_run(native):
    with kvmpy.Machine(mem_size=2 << 20, native=native) as m:
        load_raw(m, "pio-loop")
        t0 = time.monotonic()
        m.start(timeout=0.5)
        assert m.pause(timeout=5) is True
        result = m.wait(5)                          # never resumed
        elapsed = time.monotonic() - t0
    assert result.reason == "timeout"
    assert 0.4 < elapsed < 3


class PausingDevice:
    """A Python device whose write handler (running in a vCPU thread) calls pause()."""

    def __init__(self, machine):
        self.machine, self.errors = machine, []

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        try:
            self.machine.pause(timeout=1)
        except Exception as e:          # noqa: BLE001 - the test looks at what it was
            self.errors.append(e)


@NATIVE
def test_pause_from_inside_a_vcpu_thread_raises(native):
    """A device callback calling pause() would wait for its own vCPU: RuntimeError, at
    once, and the run carries on to its normal end."""
    with kvmpy.Machine(mem_size=1 << 20, native=native) as m:
        dev = PausingDevice(m)
        m.pio.attach(0x500, 1, dev, "pauser")
        # mov dx,0x500; mov al,0x41; out dx,al; out 0xf4,al
        m.load(bytes.fromhex("ba0005b041eee6f4"), format="raw", mode="real")
        t0 = time.monotonic()
        result = m.run(timeout=10)
    assert time.monotonic() - t0 < 0.9             # did not sit in pause(timeout=1)
    assert len(dev.errors) == 1 and isinstance(dev.errors[0], RuntimeError)
    assert "vCPU thread" in str(dev.errors[0])
    assert (result.reason, result.status) == ("exit", (0x41 << 1) | 1)


@NATIVE
def test_start_and_wait_return_the_run_result(native):
    g = guests.get("hello-long")
    with kvmpy.Machine(native=native) as m:
        m.load(g.path)
        held = threading.Event()            # the guest's first OUT waits here: the run cannot end yet
        m.start(timeout=20, trace=Tracer(lambda ev: held.wait(20), kinds={"io-out"}))
        with pytest.raises(RuntimeError, match="already running"):
            m.start()
        with pytest.raises(RuntimeError, match="already running"):
            m.run()
        held.set()
        result = m.wait(20)
        assert not m.running
        with pytest.raises(RuntimeError, match="start"):
            m.wait()                                # the result was handed out already
    assert (result.reason, result.status, result.regs.rax) == ("exit", g.expect_status, g.expect_rax)
    assert m.serial_output == g.expect_output


@NATIVE
def test_wait_reraises_the_guest_error(native):
    g = guests.get("triple-fault")
    with kvmpy.Machine(native=native) as m:
        m.load(g.path)
        m.start(timeout=20)
        with pytest.raises(GuestError) as info:
            m.wait(20)
    assert info.value.reason == "triple-fault"
    assert m.serial_output == g.expect_output


def test_wait_without_start_raises():
    with kvmpy.Machine(mem_size=1 << 20) as m:
        with pytest.raises(RuntimeError, match="start"):
            m.wait()
        load_raw(m, "hello-real")
        m.run(timeout=10)                           # a foreground run is not waitable either
        with pytest.raises(RuntimeError, match="start"):
            m.wait()


def test_wait_with_a_timeout_on_a_run_that_goes_on():
    with kvmpy.Machine(mem_size=2 << 20) as m:
        load_raw(m, "spin")
        m.start(timeout=30)
        with pytest.raises(TimeoutError):
            m.wait(0.1)
        assert m.running                            # a wait that timed out leaves the run alone
        m.request_stop("interrupted")
        assert m.wait(5).reason == "interrupted"


@NATIVE
def test_inspect_works_while_paused_and_refuses_while_running(native):
    with kvmpy.Machine(mem_size=2 << 20, cpus=2, native=native) as m:
        load_raw(m, "pio-loop")
        m.start(timeout=30)
        try:
            with pytest.raises(KvmpyError, match="paused"):
                m.inspect()
            assert m.pause(timeout=5)
            regs = m.vcpus[0].get_regs()
            report = m.inspect()
            assert "real mode" in report
            assert f"rip={regs.rip:016x}" in report and f"rax={regs.rax:016x}" in report
            assert "vCPU 1" in m.inspect(1)
            with pytest.raises(ValueError, match="no vCPU 2"):
                m.inspect(2)
            m.resume()
            with pytest.raises(KvmpyError, match="paused"):
                m.inspect()
        finally:
            m.request_stop("interrupted")
            m.wait(10)
        assert "real mode" in m.inspect()           # and after the run


@NATIVE
@pytest.mark.parametrize("cpus", [1, 2])
def test_many_pauses_lose_or_repeat_no_exit(native, cpus):
    """~200 pause/resume cycles during a counter run: the output and exit status are
    exactly the uninterrupted run's (an exit served twice or dropped would show)."""
    n = 400
    with kvmpy.Machine(cpus=cpus, native=native) as m:
        load_counter(m, n)
        m.start(timeout=60)
        paused = 0
        for i in range(200):
            if not m.pause(timeout=5):
                break                               # the guest has finished
            paused += 1
            if i % 10 == 0:                         # now and then stay paused a while
                time.sleep(0.002)
            m.resume()
            time.sleep(0.0005 * (i % 4))
        result = m.wait(60)
    assert paused >= 100, f"only {paused} pauses happened during the run"
    assert (result.reason, result.status) == ("exit", COUNTER_EXIT)
    assert m.serial_output == guests.counter_output(n, 64)


def test_pause_from_several_threads_at_once():
    """Concurrent pause() callers all see the pause complete; pauses nest, so the guest
    goes on only when each has been released by its resume()."""
    with kvmpy.Machine(mem_size=2 << 20, cpus=2) as m:
        load_raw(m, "pio-loop")
        m.start(timeout=30)
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(m.pause(timeout=5))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert answers == [True] * 4 and m.paused
        rax = m.vcpus[0].get_regs().rax
        for _ in range(3):
            m.resume()
            time.sleep(0.05)
            assert m.paused and m.vcpus[0].get_regs().rax == rax     # one pause is still held
        m.resume()
        wait_until(lambda: m.vcpus[0].get_regs().rax != rax, 5, "the guest to go on")
        m.request_stop("interrupted")
        assert m.wait(10).reason == "interrupted"


class Sequence:
    """Port 0x500 reads 1, 2, 3, ... (mod 256), slowly, so a pause or stop lands while a
    read is being served; port 0x501 records what the guest writes."""

    def __init__(self, first=1):
        self.next, self.outs = first, []

    def read(self, offset, size):
        time.sleep(0.001)
        value = self.next & 0xFF
        self.next += 1
        return value

    def write(self, offset, size, value):
        self.outs.append(value)


# mov dx,0x500; 1: in al,dx; inc dx; out dx,al; dec dx; jmp 1b
SEQUENCE_GUEST = bytes.fromhex("ba0005ec42ee4aebfa")


def gaps(values):
    return [(a, b) for a, b in zip(values, values[1:]) if (b - a) & 0xFF != 1]


def saved_and_continued(tmp_path, native, stop_by):
    """Run the sequence guest, pause it (or let a timeout stop it), snapshot, restore in a new
    Machine whose device carries on the sequence: every value the guest wrote, in order."""
    snap = str(tmp_path / "snap")
    with kvmpy.Machine(mem_size=1 << 20, native=native) as a:
        dev = Sequence()
        a.pio.attach(0x500, 2, dev, "seq")
        a.load(SEQUENCE_GUEST, format="raw", mode="real")
        if stop_by == "pause":
            a.start(timeout=30)
            time.sleep(0.05)
            assert a.pause(timeout=5)
            a.snapshot(snap)
            a.request_stop("interrupted")
            a.wait(10)
        else:
            assert a.run(timeout=0.05).reason == "timeout"
            a.snapshot(snap)
    with kvmpy.Machine.restore(snap, native=native) as b:
        dev_b = Sequence(dev.next)
        b.pio.attach(0x500, 2, dev_b, "seq")
        b.run(timeout=0.05)
    return dev.outs + dev_b.outs


@NATIVE
@pytest.mark.parametrize("stop_by", ["pause", "timeout"])
def test_a_snapshot_never_loses_an_in_being_served(tmp_path, native, stop_by):
    """An IN served by a Python device just before the pause (or stop) reaches the guest
    in the saved state: the restored guest goes on with the next value, none is lost."""
    for _ in range(3):
        values = saved_and_continued(tmp_path, native, stop_by)
        assert len(values) > 10
        assert gaps(values) == []
        shutil.rmtree(tmp_path / "snap")


def test_a_stop_right_after_start_is_never_lost():
    """start() returns with the run under way: a request_stop() at once always ends it."""
    with kvmpy.Machine(mem_size=2 << 20) as m:
        load_raw(m, "pio-loop")
        for _ in range(200):
            m.start()
            m.request_stop("interrupted")
            assert m.wait(5).reason == "interrupted"


def test_concurrent_snapshots_each_hold_the_pause_until_done(tmp_path, monkeypatch):
    """Two snapshots of a running guest at once (two control clients, say): pauses nest, so
    neither lets the guest go while the other still writes RAM."""
    from kvmpy import snapshot
    from .lab import counter, fresh_disk
    written_while_running = []
    write_ram = snapshot._write_ram

    def checked(path, mm):
        digest = write_ram(path, mm)
        if not m.paused:
            written_while_running.append(path)
        return digest

    monkeypatch.setattr(snapshot, "_write_ram", checked)
    with counter(fresh_disk(tmp_path / "d.img"), "n=100000 pages=64") as m:
        m.start(timeout=60)
        for i in range(10):
            barrier = threading.Barrier(2)

            def one(k):
                barrier.wait()
                snapshot.save(m, tmp_path / f"s{i}-{k}")

            threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        assert not m.paused and m.running
        m.request_stop("interrupted")
        m.wait(10)
    assert written_while_running == []
