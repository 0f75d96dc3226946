"""The GDB stub, driven by the real gdb in batch mode and by a raw protocol client."""
import atexit
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.kvm.abi import GuestDebug
from kvmpy.kvm.system import backend_modules
from kvmpy.debug.gdbstub import GdbStub
from . import lab

HELLO = guests.get("hello-long")
needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


def symbols(path) -> dict[str, int]:
    out = subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout
    return {name: int(addr, 16) for addr, _, name in (line.split() for line in out.splitlines())}


def elf_bytes(path, addr: int, n: int) -> bytes:
    """``n`` bytes at virtual address ``addr`` in an ELF64's PT_LOAD segments."""
    data = path.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        ptype, _, off, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if ptype == 1 and vaddr <= addr and addr + n <= vaddr + filesz:
            return data[off + addr - vaddr:off + addr - vaddr + n]
    raise ValueError(hex(addr))


def data_breakpoints_fire() -> bool:
    """Does this host's KVM report data breakpoints (DR7 R/W=01) at all? kvm_pvm does not."""
    slot = symbols(HELLO.path)["__stack_top"] - 8
    with kvmpy.Machine() as m:
        m.load(HELLO.path)
        m.vcpus[0].set_guest_debug(GuestDebug.ENABLE | GuestDebug.USE_HW_BP,
                                   [slot, 0, 0, 0, 0, 0, 0, 1 | (0b01 << 16) | (0b10 << 18)])
        return m.run(timeout=10).reason == "debug"


def execution_breakpoints_fire() -> bool:
    """Does a hardware execution breakpoint (DR7 R/W=00) at ``puts`` end a run with a debug exit?
    Every KVM does; L2 in the nested testbed does not: QEMU 7.2's TCG loads the guest's DR7
    on VMRUN without arming its breakpoints (docs/host-notes.md)."""
    with kvmpy.Machine() as m:
        m.load(HELLO.path)
        m.vcpus[0].set_guest_debug(GuestDebug.ENABLE | GuestDebug.USE_HW_BP,
                                   [symbols(HELLO.path)["puts"], 0, 0, 0, 0, 0, 0, 1])
        return m.run(timeout=10).reason == "debug"


def needs_execution_breakpoints():
    if not execution_breakpoints_fire():
        if "kvm_amd" not in backend_modules():
            pytest.fail("a hardware execution breakpoint never fired on this host")
        pytest.skip("this KVM never reports hardware execution breakpoints (QEMU TCG's nested SVM; "
                    "docs/host-notes.md)")


def sock_path() -> str:
    """A fresh path for a socket: short (pytest's tmp_path can exceed AF_UNIX's 108
    bytes) and in a world-searchable directory, so another user meets the file's mode."""
    global SOCK_DIR
    if SOCK_DIR is None:
        SOCK_DIR = tempfile.mkdtemp(prefix="kvmpy-gdb-", dir="/tmp")
        os.chmod(SOCK_DIR, 0o755)
        atexit.register(shutil.rmtree, SOCK_DIR, ignore_errors=True)
    return tempfile.mktemp(suffix=".sock", dir=SOCK_DIR)    # noqa: S306 - the stub creates it


SOCK_DIR = None


class Served:
    """A Machine with a GdbStub serving in a thread; ``result``/``error`` once it ends.
    ``listen``: a socket path (default: a fresh one) or a TCP port."""

    def __init__(self, machine, listen=None, timeout=30):
        self.stub = GdbStub(machine, sock_path() if listen is None else listen)
        self.timeout = timeout
        self.result = self.error = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            self.result = self.stub.serve(timeout=self.timeout)
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def join(self):
        self.thread.join(30)
        assert not self.thread.is_alive()


def gdb(address: str, *commands: str) -> str:
    args = ["gdb", "-batch", "-nx", "-ex", "set architecture i386:x86-64",
            "-ex", f"target remote {address}"]
    for c in commands:
        args += ["-ex", c]
    p = subprocess.run(args + [str(HELLO.path)], capture_output=True, text=True, timeout=120)
    return p.stdout + p.stderr


def rip_values(out: str) -> list[int]:
    return [int(v, 16) for v in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)]


@needs_gdb
def test_gdb_hbreak_stepi_memory_and_exit():
    needs_execution_breakpoints()
    sym = symbols(HELLO.path)
    puts = sym["puts"]
    with kvmpy.Machine() as m:
        m.load(HELLO.path)
        s = Served(m)
        out = gdb(s.stub.address, "info registers rip", "x/2i $pc", f"hbreak *{puts:#x}", "continue",
                  "info registers rip", "stepi", "info registers rip", f"x/4xb {puts:#x}", "continue")
        s.join()
    assert s.error is None, out
    rips = rip_values(out)
    assert rips[0] == sym["_start"] == 0x100000, out
    assert "mov    $0x105000,%esp" in out
    assert "Breakpoint 1, " in out and rips[1] == puts, out
    assert rips[2] == puts + 3, out                     # movzbl (%rdi),%esi is 3 bytes
    shown = re.search(rf"{puts:#x} <puts>:\s+((?:0x[0-9a-f]{{2}}\s*){{4}})", out).group(1).split()
    assert bytes(int(b, 16) for b in shown) == elf_bytes(HELLO.path, puts, 4)
    status = HELLO.expect_status & 0xFF
    assert f"exited with code 0{status:o}" in out, out   # gdb prints the code in octal: 0125
    assert s.result.reason == "exit" and s.result.status == HELLO.expect_status


@needs_gdb
def test_gdb_watchpoint_on_the_return_address():
    if not data_breakpoints_fire():
        pytest.skip("this host's KVM never reports data breakpoints (no VMX/SVM, see docs/host-notes.md)")
    sym = symbols(HELLO.path)
    slot = sym["__stack_top"] - 8                      # where `call main` pushes its return address
    with kvmpy.Machine() as m:
        m.load(HELLO.path)
        s = Served(m)
        out = gdb(s.stub.address, f"watch *(long *){slot:#x}", "continue", "info registers rip",
                  "delete", "continue")
        s.join()
    assert s.error is None, out
    assert "Hardware watchpoint 1" in out, out
    assert re.search(r"New value = 1048605", out), out  # 0x10001d, after `call main`
    assert rip_values(out) == [sym["main"]], out
    assert "exited with code" in out


class Client:
    """A raw GDB remote protocol client: enough to test what gdb's batch mode cannot."""

    def __init__(self, address):
        if isinstance(address, int):
            self.sock = socket.create_connection(("127.0.0.1", address), timeout=20)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(20)
            self.sock.connect(address)
        self.buf = b""

    def send(self, payload: str) -> None:
        data = payload.encode()
        self.sock.sendall(b"$%s#%02x" % (data, sum(data) & 0xFF))

    def reply(self) -> str:
        while not re.search(rb"\$([^#]*)#..", self.buf):
            chunk = self.sock.recv(4096)
            assert chunk, "the stub closed the connection"
            self.buf += chunk
        match = re.search(rb"\$([^#]*)#(..)", self.buf)
        self.buf = self.buf[match.end():]
        payload = match.group(1)
        assert int(match.group(2), 16) == sum(payload) & 0xFF
        try:
            self.sock.sendall(b"+")
        except BrokenPipeError:     # after the last reply (D, W) the stub may be gone
            pass
        return payload.decode()

    def ask(self, payload: str) -> str:
        self.send(payload)
        return self.reply()


def test_ctrl_c_breakpoint_slots_memory_errors_and_kill():
    with kvmpy.Machine(mem_size=1 << 20) as m:
        m.load(guests.path("spin"), format="raw", mode="real")
        s = Served(m)
        c = Client(s.stub.address)
        assert c.ask("qSupported:multiprocess+").startswith("PacketSize=")
        assert c.ask("?") == "T05thread:1;"
        assert c.ask("qfThreadInfo") == "m1" and c.ask("qsThreadInfo") == "l"
        assert len(c.ask("g")) == 2 * 536                    # gdb's default amd64 'g' size
        assert c.ask("m7ffffff0,4") == "E14"                 # beyond RAM
        for i in range(4):                                   # Z0 uses a free debug register
            assert c.ask(f"Z0,{0x5000 + i:x},1") == "OK"
        assert c.ask("Z0,6000,1") == "E01"                   # none left: refuse, no int3
        assert c.ask("Z2,7001,4") == "E01"                   # unaligned watchpoint
        assert c.ask("z0,5003,1") == "OK" and c.ask("Z2,7000,4") == "OK"   # DR3: write, 4 bytes
        assert s.stub.debugregs()[3] == 0x7000
        assert s.stub.debugregs()[7] >> 28 == 0b1101 and s.stub.debugregs()[7] & 0xFF == 0x55
        assert c.ask("z2,7000,4") == "OK" and c.ask("Z0,5003,1") == "OK"
        for i in range(4):
            assert c.ask(f"z0,{0x5000 + i:x},1") == "OK"
        c.send("c")
        time.sleep(0.3)
        c.sock.sendall(b"\x03")
        assert c.reply() == "T02thread:1;"
        assert c.ask("p10") != "E01"                         # rip
        c.send("k")
        s.join()
    assert s.error is None
    assert s.result.reason == "interrupted"


def test_threads_are_vcpus():
    with kvmpy.Machine(cpus=2, irqchip=True) as m:
        m.load(HELLO.path)
        s = Served(m)
        c = Client(s.stub.address)
        assert c.ask("qfThreadInfo") == "m1,2"
        assert c.ask("T2") == "OK" and c.ask("T3") == "E01"
        assert c.ask("Hg2") == "OK" and c.ask("qC") == "QC2"
        assert c.ask("Hg1") == "OK"
        assert int.from_bytes(bytes.fromhex(c.ask("p10")), "little") == 0x100000
        c.send("D")
        assert c.reply() == "OK"
        s.join()
    assert s.error is None and s.result is None


def kvmpy_cmd(*args) -> subprocess.Popen:
    """``python -m kvmpy ARGS`` from this checkout, in its own session (so a test's SIGINT
    reaches only it), with stderr piped."""
    import sys
    env = lab.CHILD_ENV
    return subprocess.Popen([sys.executable, "-m", "kvmpy", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd="/", start_new_session=True)


@needs_gdb
def test_cli_gdb_option_serves_a_real_gdb():
    """kvmpy demo hello-long --gdb SOCK waits for gdb, which can break, step and let the guest finish."""
    needs_execution_breakpoints()
    path = sock_path()
    vmm = kvmpy_cmd("demo", "hello-long", "--gdb", path)
    try:
        line = vmm.stderr.readline()
        assert b"waiting for gdb on " + path.encode() in line
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        out = gdb(path, "hbreak *puts", "continue", "info registers rip", "continue")
        out_vmm, _ = vmm.communicate(timeout=60)
    finally:
        if vmm.poll() is None:
            vmm.kill()
    assert re.search(r"rip\s+0x100050", out), out
    assert "exited with code 0125" in out
    assert out_vmm == HELLO.expect_output and vmm.returncode == 0    # it kept its promise
    assert not os.path.exists(path)                                  # the socket file is gone


@needs_gdb
def test_cli_gdb_over_loopback_tcp():
    """--gdb tcp:PORT keeps TCP for those who need it, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    vmm = kvmpy_cmd("demo", "hello-long", "--gdb", f"tcp:{port}")
    try:
        assert f"waiting for gdb on 127.0.0.1:{port}".encode() in vmm.stderr.readline()
        out = gdb(f"127.0.0.1:{port}", "continue")
        vmm.communicate(timeout=60)
    finally:
        if vmm.poll() is None:
            vmm.kill()
    assert "exited with code 0125" in out and vmm.returncode == 0
