"""The Python loop's fast path (one-item port I/O, vmm/vcpu_loop.py) has the effects ``dispatch``
gives the same exits: the same device calls, the same bytes back to the guest, the same stats.

A fake vCPU plays a script of exits through a real ``struct kvm_run`` layout in a bytearray
(encoded with cffi, decoded by the loop): no /dev/kvm, but the built extension's ffi.
"""
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices.bus import Bus
from kvmpy.kvm import exits
from kvmpy.kvm.abi import IO_IN, IO_OUT, ExitReason, ffi
from kvmpy.vmm.pause import PauseGate
from kvmpy.vmm.stats import Stats
from kvmpy.vmm.vcpu_loop import VcpuLoop

RUN_SIZE = 2 * 4096
DATA = 4096                         # where KVM puts port I/O data: the page after kvm_run


class Recorder:
    """A port device that logs every access; reads answer from a counter, so order shows."""

    def __init__(self, name, log):
        self.name, self.log, self.n = name, log, 0

    def read(self, offset, size):
        self.n += 1
        self.log.append((self.name, "read", offset, size))
        return (0x1234_5678_9ABC * self.n + offset) & 0xFFFF_FFFF_FFFF

    def write(self, offset, size, value):
        self.log.append((self.name, "write", offset, size, value))


class FakeVcpu:
    """Plays ``script`` (a list of ("io", direction, port, size, count, data) or ("hlt",))
    through a kvm_run page; enter() puts the next exit there. Records what INs left behind."""

    id = 0

    def __init__(self, script, stop):
        self.script, self.stop = list(script), stop
        self.run_buffer = bytearray(RUN_SIZE)
        self.run = ffi.cast("struct kvm_run *", ffi.from_buffer(self.run_buffer))
        self.ins = []                       # the bytes each IN left in the page, in order
        self.last_in = None
        self.immediate_exit = False

    def enter(self):
        self._collect_in()
        if not self.script:
            self.stop.set("done")
            return -4                       # -EINTR: the loop sees Interrupted and stops
        step = self.script.pop(0)
        r = self.run
        if step[0] == "hlt":
            r.exit_reason = int(ExitReason.HLT)
            return 0
        _, direction, port, size, count, data = step
        r.exit_reason = int(ExitReason.IO)
        r.io.direction, r.io.port, r.io.size, r.io.count, r.io.data_offset = direction, port, size, count, DATA
        n = size * count
        self.run_buffer[DATA:DATA + n] = data[:n].ljust(n, b"\0") if direction == IO_OUT else b"\xee" * n
        self.last_in = n if direction == IO_IN else None
        return 0

    def _collect_in(self):
        if self.last_in is not None:
            self.ins.append(bytes(self.run_buffer[DATA:DATA + self.last_in]))
            self.last_in = None

    def exit_value(self, rc=0):
        if rc < 0:
            return exits.Interrupted()
        return exits.decode(self.run, RUN_SIZE, self.run_buffer)

    def complete_io_in(self, ex, data):
        self.run_buffer[ex.data_offset:ex.data_offset + len(data)] = data


def play(script, fast: bool):
    log = []
    pio = Bus("pio")
    pio.attach(0x3F8, 8, Recorder("uart", log), "com1")
    pio.attach(0x70, 2, Recorder("rtc", log), "rtc")
    stats, gate = Stats(), PauseGate(kick=lambda: None)
    gate.begin(1)
    vcpu = FakeVcpu(script, gate.stop)
    loop = VcpuLoop(vcpu, pio, Bus("mmio"), stats, gate, memory=None)
    if not fast:                            # a wrapped handle: the loop takes no fast path
        loop.handle = lambda v, ex: loop.dispatch(v, ex)
    loop.python_loop()
    gate.end()
    stats.kvm_ns = stats.vmm_ns = 0         # time differs; everything else must not
    return log, vcpu.ins, stats, gate.stop.reason


PORTS = st.sampled_from([0x3F8, 0x3F9, 0x3FF, 0x70, 0x71, 0x80, 0x400])
IO = st.tuples(st.just("io"), st.sampled_from([IO_IN, IO_OUT]), PORTS, st.sampled_from([1, 2, 4]),
               st.sampled_from([1, 1, 1, 2, 3]), st.binary(min_size=0, max_size=12))


@settings(max_examples=300, deadline=None)
@given(script=st.lists(IO, max_size=40))
def test_fast_path_does_what_dispatch_does(script):
    assert play(script, fast=True) == play(script, fast=False)


def test_a_slow_exit_still_stops_the_run_and_counts_are_folded():
    script = [("io", IO_OUT, 0x80, 1, 1, b"\x01"), ("io", IO_IN, 0x3F8 + 5, 1, 1, b""), ("hlt",),
              ("io", IO_OUT, 0x80, 1, 1, b"\x02")]
    log, ins, stats, reason = play(script, fast=True)
    assert reason == "halt"
    assert stats.exits == {"io-out": 1, "io-in": 1, "hlt": 1}
    assert stats.devices == {"unclaimed-pio": 1, "com1": 1}
    assert stats.unclaimed_writes == 1
    assert log == [("uart", "read", 5, 1)] and len(ins) == 1
