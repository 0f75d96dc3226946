"""Machine: buses with Python devices, unclaimed accesses, stop reasons, stats, no leaks."""
import gc
import os
import threading
import time

import pytest

import kvmpy
from kvmpy import guests
from .lab import open_fds


class Scratch:
    """A Python device: remembers the last value written, returns it plus one."""

    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return (self.writes[-1] + 1) if self.writes else 0

    def write(self, offset, size, value):
        self.writes.append(value)


def real(m, hexcode: str):
    return m.load(bytes.fromhex(hexcode), format="raw", mode="real")


def test_python_device_on_the_pio_bus():
    """A device attached to m.pio sees the guest's OUT and answers its IN."""
    with kvmpy.Machine(mem_size=1 << 20) as m:
        dev = Scratch()
        m.pio.attach(0x500, 4, dev, "scratch")
        # mov dx,0x502; mov al,0x41; out dx,al; in al,dx; out 0xf4,al
        real(m, "ba 0205 b0 41 ee ec e6 f4")
        result = m.run(timeout=10)
    assert dev.writes == [0x41]
    assert result.reason == "exit" and result.status == (0x42 << 1) | 1
    assert m.stats.devices["scratch"] == 2


def test_python_device_on_the_mmio_bus_and_unclaimed_mmio():
    """A device on m.mmio handles loads and stores; unclaimed MMIO reads return zero."""
    with kvmpy.Machine(mem_size=4 << 20, irqchip=False) as m:     # HLT exits without the irqchip
        dev = Scratch()
        m.mmio.attach(0xD000_0000, 0x1000, dev, "mmio-scratch")
        code = ("b8 000000d0"            # mov eax,0xd0000000
                "c7 40 08 34120000"      # mov dword [eax+8],0x1234
                "8b 18"                  # mov ebx,[eax]
                "8b 88 00100000"         # mov ecx,[eax+0x1000]  (unclaimed)
                "f4")
        m.load(bytes.fromhex(code.replace(" ", "")), format="raw", mode="protected")
        result = m.run(timeout=10)
    assert result.reason == "halt" and result.status == 0
    assert dev.writes == [0x1234]
    assert result.regs.rbx == 0x1235
    assert result.regs.rcx == 0
    assert m.stats.devices["unclaimed-mmio"] == 1


def test_unclaimed_port_reads_all_ones_and_writes_are_counted():
    """IN from a port nobody claims returns 0xff..; OUT to one is counted and dropped."""
    with kvmpy.Machine(mem_size=1 << 20) as m:
        # mov dx,0x1234; in ax,dx; out dx,al; hlt
        real(m, "ba 3412 ed ee f4")
        result = m.run(timeout=10)
    assert result.regs.rax & 0xFFFF == 0xFFFF
    assert m.stats.unclaimed_writes == 1


def test_i8042_reset_ends_the_run_as_reset(small_machine):
    """Writing 0xFE to port 0x64 ends the run with reason 'reset' (conftest's small_machine:
    1 MiB, each loop, reset in place per test)."""
    real(small_machine, "b0 fe e6 64 eb fe")    # mov al,0xfe; out 0x64,al; jmp $
    assert small_machine.run(timeout=10).reason == "reset"


def test_debug_exit_status_follows_qemu(small_machine):
    """A write of v to port 0xf4 ends the run with status (v << 1) | 1."""
    real(small_machine, "b0 07 e6 f4 eb fe")
    assert small_machine.run(timeout=10).status == 15


def test_request_stop_from_another_thread():
    """request_stop() from another thread stops a spinning guest promptly."""
    g = guests.get("spin")
    with kvmpy.Machine(mem_size=1 << 20) as m:
        m.load(g.path, g.format, mode=g.mode, load_addr=g.load_addr, entry=g.entry)
        threading.Timer(0.2, m.request_stop, args=("interrupted",)).start()
        t0 = time.monotonic()
        result = m.run(timeout=30)
    assert result.reason == "interrupted"
    assert time.monotonic() - t0 < 5


def test_serial_input_reaches_the_guest_and_output_streams(tmp_path):
    """feed_serial() bytes are echoed by the echo guest; output goes to the serial= stream."""
    g = guests.get("echo")
    path = tmp_path / "console.txt"
    with open(path, "wb") as console, kvmpy.Machine(serial=console) as m:
        m.load(g.path)
        m.feed_serial(b"kvmpy\nquit\n")
        result = m.run(timeout=20)
    assert result.status == g.expect_status
    assert path.read_bytes() == b"echo: type lines, 'quit' ends\nkvmpy\nquit\nbye\n"


def test_serial_fifo_is_bounded():
    """feed_serial() accepts only what fits in the UART's receive FIFO."""
    with kvmpy.Machine(mem_size=1 << 20) as m:
        accepted = m.feed_serial(b"x" * 100_000)
    assert 0 < accepted < 100_000


def test_stats_count_exits_and_split_time():
    """Stats count exits by reason and device and split time between KVM_RUN and the VMM."""
    g = guests.get("hello-long")
    with kvmpy.Machine() as m:
        m.load(g.path)
        m.run(timeout=10)
    s = m.stats
    assert s.exits["io-out"] >= len(g.expect_output)
    assert s.devices["com1"] >= len(g.expect_output)
    assert s.kvm_ns > 0 and s.vmm_ns > 0
    assert "com1" in str(s)


def test_several_vcpus_need_the_irqchip_and_aps_wait():
    """With cpus=2 the APs wait for INIT/SIPI, so a single-CPU guest runs unchanged on vCPU 0."""
    with pytest.raises(ValueError, match="irqchip"):
        kvmpy.Machine(cpus=2, irqchip=False)
    g = guests.get("hello-long")
    with kvmpy.Machine(cpus=2, irqchip=True) as m:
        m.load(g.path)
        result = m.run(timeout=20)
    assert (result.reason, result.vcpu, result.status) == ("exit", 0, g.expect_status)


def test_a_closed_machine_says_so_when_run():
    m = kvmpy.Machine(mem_size=1 << 20)
    m.load(bytes.fromhex("b007e6f4"), format="raw")         # mov al, 7; out 0xf4, al
    assert m.run(timeout=10).status == 15
    m.close()
    with pytest.raises(kvmpy.KvmpyError, match="this Machine is closed"):
        m.run(timeout=1)


def test_loader_errors_are_clear():
    """Images that are garbage, too big, or in the PC's legacy hole (where the MP table goes) give a
    LoaderError naming the problem; one where the boot tables would go loads, and they move."""
    with kvmpy.Machine(mem_size=2 << 20) as m:
        with pytest.raises(kvmpy.LoaderError, match="ELF"):
            m.load(b"\x7fELF" + b"\x00" * 10)
        with pytest.raises(kvmpy.LoaderError):
            m.load(b"\x90" * (3 << 20), format="raw", mode="long")
        with pytest.raises(kvmpy.LoaderError, match="overlaps the reserved range 0x9fc00..0x100000"):
            m.load(b"\x90" * 16, format="raw", mode="long", load_addr=0xA0000)
        assert m.load(b"\x90" * 16, format="raw", mode="long", load_addr=0x1000).tables.gdt == 0x2000


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_a_thousand_machines_leak_no_fds_or_memory():
    """Creating, running and closing 1,000 Machines keeps the open-fd count and RSS flat."""
    code = bytes.fromhex("b0 07 e6 f4")
    def one():
        with kvmpy.Machine(mem_size=1 << 20) as m:
            m.load(code, format="raw")
            assert m.run(timeout=10).status == 15
    for _ in range(50):                  # warm caches, imports and allocator pools
        one()
    gc.collect()
    fds, rss = open_fds(), _rss_kib()
    for _ in range(1000):
        one()
    gc.collect()
    assert open_fds() <= fds, open_fds() - fds
    assert _rss_kib() - rss < 16 * 1024, f"RSS grew by {_rss_kib() - rss} KiB"


def test_pc_platform_by_default():
    """A default Machine has the in-kernel irqchip and PIT, and MSRs as firmware leaves them."""
    from kvmpy.x86 import msrs
    with kvmpy.Machine(mem_size=1 << 20) as m:
        assert m.irqchip
        assert len(m.vm.get_pit2()) > 0                       # KVM_GET_PIT2 needs the PIT
        assert len(m.vcpus[0].get_lapic()) == 1024            # KVM_GET_LAPIC needs the irqchip
        got = m.vcpus[0].get_msrs([msrs.IA32_MISC_ENABLE])
    assert got[msrs.IA32_MISC_ENABLE] & msrs.MISC_ENABLE_FAST_STRING


@pytest.mark.parametrize("ncpus", [2, 4, 8])
def test_application_processors_come_up(ncpus):
    """The smp guest finds every CPU in the MP table, starts each AP with INIT/SIPI, and each prints."""
    g = guests.get("smp")
    with kvmpy.Machine(cpus=ncpus) as m:
        m.load(g.path)
        result = m.run(timeout=60)
    out = m.serial_output.decode()
    assert (result.reason, result.vcpu, result.status) == ("exit", 0, g.expect_status)
    assert f"smp: MP table lists {ncpus} CPUs" in out and f"smp: {ncpus} CPUs up" in out
    assert [line for line in out.splitlines() if line.startswith("AP ")] == [f"AP {i} up" for i in range(1, ncpus)]


def test_stopping_many_vcpus_repeatedly_is_safe():
    """Ending runs with many vCPU threads never signals a thread that has gone (no crash, clean stop)."""
    g = guests.get("smp")
    for _ in range(10):
        with kvmpy.Machine(cpus=7) as m:
            m.load(g.path)
            assert m.run(timeout=60).status == g.expect_status


def test_library_trace_with_filters():
    """A Tracer passed to run() sees every exit that passes its filters, with the instruction that caused it."""
    from kvmpy.debug.trace import Tracer
    seen = []
    g = guests.get("hello-long")
    with kvmpy.Machine() as m:                      # native by default: tracing takes the Python loop
        m.load(g.path)
        result = m.run(timeout=20, trace=Tracer(seen.append, kinds={"io-out"}, ports=(0x3F8, 0x3F8)))
    assert result.status == g.expect_status
    assert bytes(int(e.data, 16) for e in seen) == g.expect_output
    assert all(e.kind == "io-out" and e.addr == 0x3F8 and e.insn.startswith("out") for e in seen)
    assert m.serial_output == g.expect_output      # the guest's output is unchanged by tracing


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_close_during_a_run_stops_it_first(native):
    """close() from another thread while a guest runs stops the run and waits for it (no crash)."""
    g = guests.get("pio-loop")
    m = kvmpy.Machine(mem_size=2 << 20, native=native)
    m.load(g.path, g.format, mode=g.mode, load_addr=g.load_addr, entry=g.entry)
    results = []
    t = threading.Thread(target=lambda: results.append(m.run(timeout=30)))
    t.start()
    time.sleep(0.3)
    m.close()
    t.join(timeout=10)
    assert not t.is_alive()
    assert results and results[0].reason == "closed"
    m.close()


def test_a_failing_serial_stream_stops_the_run_with_its_error():
    """If the serial output stream fails, run() raises that error instead of losing output silently."""
    class Broken:
        def write(self, data):
            raise BrokenPipeError("reader went away")

        def flush(self):
            pass
    g = guests.get("hello-long")
    with kvmpy.Machine(serial=Broken()) as m:
        m.load(g.path)
        with pytest.raises(BrokenPipeError):
            m.run(timeout=20)


@pytest.mark.parametrize("name,mode", [("hello-real", "real mode (16-bit)"),
                                       ("hello-protected", "protected mode (32-bit code), CPL 0, paging off"),
                                       ("hello-user", "long mode (64-bit), CPL 3, paging on (4-level)")])
def test_inspect_names_the_mode_and_walks_rip(name, mode):
    """Machine.inspect() after a run reports the guest's mode and where RIP is in RAM."""
    g = guests.get(name)
    with kvmpy.Machine(mem_size=64 << 20) as m:
        m.load(g.path, format=g.format, mode=g.mode, load_addr=g.load_addr, entry=g.entry, user=g.user)
        r = m.run(timeout=30)
        text = m.inspect()
    assert text.startswith("=== vCPU 0 ===") and mode in text
    assert "RIP linear" in text and "== code at " in text and "cannot read" not in text
    assert f"rip={r.regs.rip:016x}" in text
