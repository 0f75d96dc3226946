"""The vCPU loop on its own: scripted exits from a fake vCPU, real buses and devices, no KVM.

``VcpuLoop`` is handed its vCPU, buses, statistics and pause gate, so a test can give it a
vCPU whose KVM_RUN returns exits from a list and check what the devices saw, what the
guest was handed back, and why the run stopped. (The loop imports the exit values, which
import the compiled extension's ABI view; /dev/kvm is not needed.)
"""
import errno
import threading

import pytest

from kvmpy.devices import Bus
from kvmpy.errors import GuestError
from kvmpy.kvm import exits
from kvmpy.kvm.abi import SystemEventType
from kvmpy.kvm.regs import Regs
from kvmpy.vmm.pause import PauseGate
from kvmpy.vmm.stats import Stats
from kvmpy.vmm.vcpu_loop import VcpuLoop


class FakeVcpu:
    """KVM_RUN returns the scripted exits in order, then EINTR; with ``immediate_exit`` set it
    returns EINTR at once, as KVM does (after completing the exit before it)."""

    def __init__(self, script):
        self.id = 0
        self.script = list(script)
        self.current = None
        self.immediate_exit = False
        self.handed_in = []           # what the loop completed INs and MMIO reads with
        self.entries = 0

    def enter(self) -> int:
        self.entries += 1
        if self.immediate_exit or not self.script:
            return -errno.EINTR
        self.current = self.script.pop(0)
        return 0

    def exit_value(self, rc: int = 0):
        return self.current

    def complete_io_in(self, ex, data: bytes) -> None:
        self.handed_in.append(("io", ex.port, data))

    def complete_mmio_read(self, data: bytes) -> None:
        self.handed_in.append(("mmio", data))

    def set_thread(self, ident) -> None:
        pass

    def kick(self) -> None:
        pass

    def get_regs(self) -> Regs:
        return Regs(rip=0x1234)

    def get_sregs(self):
        raise AttributeError("no segments in a fake vCPU")


class Register:
    """A device that remembers every access and answers reads with ``value``."""

    def __init__(self, value=0):
        self.value, self.log = value, []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.value

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def run_script(script, pio=(), mmio=()):
    """Run ``script`` through a Python VcpuLoop; returns (stop token, vcpu, stats)."""
    vcpu, stats = FakeVcpu(script), Stats()
    gate = PauseGate(kick=lambda: None)
    gate.begin(1)
    buses = {"pio": Bus("pio"), "mmio": Bus("mmio")}
    for name, items in (("pio", pio), ("mmio", mmio)):
        for base, length, dev in items:
            buses[name].attach(base, length, dev, f"dev@{base:#x}")
    loop = VcpuLoop(vcpu, buses["pio"], buses["mmio"], stats, gate, memory=None)
    loop.run()
    gate.end()
    return gate.stop, vcpu, stats


def test_port_writes_reach_the_device_at_its_offset_and_hlt_stops_the_run():
    dev = Register()
    stop, vcpu, stats = run_script([exits.IoOut(0x502, 1, 1, b"\x2a"), exits.Hlt()], pio=[(0x500, 4, dev)])
    assert dev.log == [("w", 2, 1, 0x2a)]
    assert (stop.reason, stop.status, stop.vcpu) == ("halt", 0, 0)
    assert stats.exits == {"io-out": 1, "hlt": 1} and stats.devices["dev@0x500"] == 1
    assert vcpu.entries == 3               # two exits, then the settle run (EINTR)


def test_string_io_sends_each_item_and_reads_answer_each():
    dev = Register(value=0x1122_3344)
    stop, vcpu, _ = run_script([exits.IoOut(0x500, 2, 3, bytes.fromhex("010002000300")),
                                exits.IoIn(0x500, 2, 2, 0), exits.Hlt()], pio=[(0x500, 4, dev)])
    assert dev.log[:3] == [("w", 0, 2, 1), ("w", 0, 2, 2), ("w", 0, 2, 3)]
    assert vcpu.handed_in == [("io", 0x500, bytes.fromhex("44334433"))]     # masked to the access size


def test_unclaimed_ports_float_high_and_unclaimed_mmio_reads_zero():
    stop, vcpu, stats = run_script([exits.IoIn(0x80, 1, 1, 0), exits.MmioRead(0xd000_0000, 4),
                                    exits.MmioWrite(0xd000_0000, 4, b"\1\0\0\0"), exits.Hlt()])
    assert vcpu.handed_in == [("io", 0x80, b"\xff"), ("mmio", b"\0\0\0\0")]
    assert stats.devices["unclaimed-pio"] == 1 and stats.devices["unclaimed-mmio"] == 2
    assert stats.unclaimed_writes == 1


def test_mmio_reaches_the_device_and_its_answer_reaches_the_guest():
    dev = Register(value=0xABCD)
    _, vcpu, _ = run_script([exits.MmioWrite(0x1000_0008, 4, (7).to_bytes(4, "little")),
                             exits.MmioRead(0x1000_0004, 2), exits.Hlt()], mmio=[(0x1000_0000, 0x100, dev)])
    assert dev.log == [("w", 8, 4, 7), ("r", 4, 2)]
    assert vcpu.handed_in == [("mmio", (0xABCD).to_bytes(2, "little"))]


def test_a_device_can_stop_the_run_and_later_exits_are_not_served():
    class Stopper(Register):
        def write(self, offset, size, value):
            super().write(offset, size, value)
            gate.stop.set("exit", (value << 1) | 1, 0)
    gate = None

    def go():
        nonlocal gate
        vcpu, stats = FakeVcpu([exits.IoOut(0xf4, 1, 1, b"\x05"), exits.IoOut(0xf4, 1, 1, b"\x06")]), Stats()
        gate = PauseGate(kick=lambda: None)
        gate.begin(1)
        pio = Bus("pio")
        dev = Stopper()
        pio.attach(0xf4, 1, dev, "isa-debug-exit")
        VcpuLoop(vcpu, pio, Bus("mmio"), stats, gate, memory=None).run()
        return dev, vcpu
    dev, vcpu = go()
    assert (gate.stop.reason, gate.stop.status) == ("exit", 11)
    assert dev.log == [("w", 0, 1, 5)]


def test_a_triple_fault_becomes_a_guest_error_on_the_stop_token():
    stop, _, stats = run_script([exits.Shutdown()])
    assert stop.reason == "triple-fault" and isinstance(stop.error, GuestError)
    assert "triple-faulted" in str(stop.error) and stats.exits["shutdown"] == 1


def test_a_triple_fault_reported_after_kvm_reset_the_vcpu_says_the_state_is_lost(monkeypatch):
    """kvm_amd INITs a vCPU before it reports KVM_EXIT_SHUTDOWN: registers at the reset vector
    are not the faulting state, so the error says so instead of disassembling 0xffff0."""
    from kvmpy.kvm import system
    from kvmpy.kvm.regs import Segment, Sregs
    monkeypatch.setattr(system, "backend_modules", lambda: ["kvm_amd"])

    class ResetVcpu(FakeVcpu):
        def get_regs(self):
            return Regs(rip=0xFFF0, rflags=2)

        def get_sregs(self):
            return Sregs(cs=Segment(base=0xFFFF_0000, selector=0xF000), cr0=0x6000_0010)
    vcpu, stats = ResetVcpu([exits.Shutdown()]), Stats()
    gate = PauseGate(kick=lambda: None)
    gate.begin(1)
    VcpuLoop(vcpu, Bus("pio"), Bus("mmio"), stats, gate, memory=None).run()
    err = gate.stop.error
    assert gate.stop.reason == "triple-fault" and err.state_lost
    assert "registers at the fault are lost" in str(err) and "kvm_amd" in str(err)
    assert err.regs is None and err.disassembly == "" and "rip=" not in str(err)


def test_a_bug_in_a_device_stops_the_run_with_that_error():
    class Broken(Register):
        def write(self, offset, size, value):
            raise ZeroDivisionError("device bug")
    stop, _, _ = run_script([exits.IoOut(0x500, 1, 1, b"\0"), exits.Hlt()], pio=[(0x500, 1, Broken())])
    assert stop.reason == "error" and isinstance(stop.error, ZeroDivisionError)


def test_a_pause_parks_the_loop_after_settling_and_resume_lets_it_finish():
    dev = Register()
    script = [exits.IoOut(0x500, 1, 1, bytes([i])) for i in range(200)] + [exits.Hlt()]
    vcpu, stats = FakeVcpu(script), Stats()
    gate = PauseGate(kick=lambda: None)
    gate.begin(1)
    pio = Bus("pio")
    pio.attach(0x500, 1, dev, "dev")
    seen = threading.Event()
    orig_write = dev.write

    def write(offset, size, value):             # pause from the device on the 10th write
        orig_write(offset, size, value)
        if value == 10:
            gate.requested += 1                 # what pause() does, without waiting for the park
            seen.set()
    dev.write = write
    t = threading.Thread(target=VcpuLoop(vcpu, pio, Bus("mmio"), stats, gate, memory=None).run)
    t.start()
    assert seen.wait(5)
    with gate.cond:
        assert gate.cond.wait_for(lambda: gate.parked == 1, 5)
    assert len(dev.log) == 11                   # parked after the 10th write; settling served no more
    gate.resume()
    t.join(5)
    assert not t.is_alive() and gate.stop.reason == "halt" and len(dev.log) == 200


@pytest.mark.parametrize("ex", [exits.Debug(1, 0x1000, 0, 0), exits.SystemEvent(SystemEventType.RESET, ())])
def test_debug_and_reset_exits_stop_with_their_reason(ex):
    stop, _, _ = run_script([ex])
    assert stop.reason == ("debug" if isinstance(ex, exits.Debug) else "reset")
