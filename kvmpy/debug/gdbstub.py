"""A GDB remote stub: debug a kvmpy guest with ``gdb -ex "target remote HOST:PORT"``.

The GDB Remote Serial Protocol, as far as this stub speaks it
-------------------------------------------------------------
gdb sends packets ``$payload#cs`` (``cs``: the payload's byte sum modulo 256, two hex
digits) and the receiver acknowledges each one with ``+`` (or ``-``: send it again).
A lone byte 0x03 (outside any packet) is Ctrl-C: stop the running target. Replies are
packets too; an empty reply means "not supported". Numbers are hex; ``E nn`` is an error.

=================  ======================================================================
``?``              why the target last stopped (a stop reply, below)
``g`` / ``G``      read / write all registers (layout below)
``p n`` / ``P n=v``  read / write one register (gdb's number ``n``)
``m a,l`` / ``M a,l:hex``  read / write ``l`` bytes at linear address ``a`` through the
                   guest's page tables in its current mode; ``E14`` (EFAULT) when unmapped
``c`` / ``s``      continue / single-step (the thread chosen with ``Hc``)
``Z t,a,k`` / ``z``  insert / remove a breakpoint (t=0 soft, 1 hard) or watchpoint (t=2
                   write, 3 read, 4 access; k = length 1/2/4/8)
``H g|c id``       choose the thread (= vCPU id + 1) for ``g``/``p``/``m`` or for ``c``/``s``
``qSupported``, ``qAttached``, ``qC``, ``qfThreadInfo``/``qsThreadInfo``, ``T id``,
``qThreadExtraInfo``  session and thread queries; ``vCont?`` is answered empty, so gdb
                   uses ``Hc`` + ``c``/``s``
``D`` / ``k``      detach / kill: the session ends (the machine is left as it is)
=================  ======================================================================

Stop replies: ``T05thread:N;`` (SIGTRAP: step, breakpoint; ``watch:``/``rwatch:``/
``awatch:ADDR;`` for a watchpoint), ``T02thread:N;`` (SIGINT after Ctrl-C), ``W xx``
(the guest exited; ``xx`` = RunResult.status & 0xff, the same number kvmpy exits with)
and ``X 06`` (the run ended otherwise: reset, or a guest error, which serve() re-raises).

Registers: gdb's default amd64 layout (no target.xml): rax rbx rcx rdx rsi rdi rbp rsp
r8-r15 rip (8 bytes each), eflags and the selectors cs ss ds es fs gs (4 bytes each),
then st0-7, the x87 control registers, xmm0-15 and mxcsr, which this stub reports as
unavailable (``xx`` bytes). ``p`` also serves fs_base/gs_base (gdb's remote numbers
58/59). Writes change GPRs, rip and eflags only (selectors need descriptors).

Breakpoints all live in the 4 debug registers (``KVM_GUESTDBG_USE_HW_BP``, DR7 built
here). ``Z0`` (software) is served with a free debug register too, because on hosts
without VMX/SVM ``int3`` at CPL0 is a KVM internal error and ``KVM_GUESTDBG_USE_SW_BP``
does not work (docs/host-notes.md); with no register free the reply is ``E``, so gdb reports
that it cannot insert the breakpoint instead of patching an ``int3`` into the guest.
x86 has no read-only watchpoint: ``Z3`` uses a read/write one.
On the kvm_pvm development hosts execution breakpoints fire but data breakpoints
(watchpoints) are never reported by KVM; they work where KVM has VMX/SVM.

Execution: ``c``/``s`` set the guest-debug state of every vCPU and call
``machine.run()`` in a thread; meanwhile the stub watches the socket for 0x03 and then
calls ``machine.request_stop("interrupted")``. With several vCPUs, ``s`` single-steps
the chosen one while the others run until it has stepped (minimal all-stop).
"""
from __future__ import annotations

import select
import socket
import threading

from ..kvm.abi import GuestDebug
from ..errors import GuestMemoryError
from ..x86.pagewalk import PAGE, LinearMemory, TranslationError

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
# gdb register number -> size, for st0-7 (24-31), fctrl..fop (32-39), xmm0-15 (40-55), mxcsr (56)
UNAVAILABLE = {**{n: 10 for n in range(24, 32)}, **{n: 4 for n in range(32, 40)},
               **{n: 16 for n in range(40, 56)}, 56: 4, 57: 8}     # 57: orig_rax
FS_BASE, GS_BASE = 58, 59
SIGINT, SIGTRAP, SIGABRT = 2, 5, 6
# Z type -> (DR7 R/W bits, stop-reply keyword); 0 and 1 are execution breakpoints
ZTYPES = {0: (0b00, None), 1: (0b00, None), 2: (0b01, "watch"), 3: (0b11, "rwatch"), 4: (0b11, "awatch")}
DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}


def checksum(payload: bytes) -> bytes:
    return b"%02x" % (sum(payload) & 0xFF)


class GdbStub:
    """Serve one gdb connection for ``machine`` on ``host:port`` (port 0: any free one)."""

    def __init__(self, machine, port: int = 0, host: str = "127.0.0.1"):
        self.machine = machine
        self.listener = socket.create_server((host, port))
        self.port = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.buf = bytearray()
        self.last_sent = b""
        self.g_cpu = self.c_cpu = 0                 # vCPU index for registers/memory, for c/s
        self.slots: list[tuple[int, int, int] | None] = [None] * 4    # (Z type, addr, length)
        self.last_stop = "T%02xthread:1;" % SIGTRAP
        self.result = None
        self.error: BaseException | None = None
        self.done = False

    # --- session -----------------------------------------------------------------------
    def serve(self, timeout: float | None = None):
        """Wait up to ``timeout`` seconds (None: forever) for gdb, then serve it until it
        detaches or kills, or the guest's run ends. Returns the last RunResult (None if
        gdb never connected or never resumed the guest); re-raises a guest error."""
        self.listener.settimeout(timeout)
        try:
            conn, _ = self.listener.accept()
        except socket.timeout:
            return None
        finally:
            self.listener.close()
        self.conn = conn
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while not self.done:
                pkt = self.read_packet()
                if pkt is None:                     # gdb went away: like a detach
                    break
                reply = self.handle(pkt)
                if reply is not None:
                    self.send(reply)
        finally:
            conn.close()
            for v in self.machine.vcpus:
                v.set_guest_debug(0)
        if self.error is not None:
            raise self.error
        return self.result

    def _recv(self) -> bool:
        data = self.conn.recv(65536)
        self.buf += data
        return bool(data)

    def read_packet(self) -> str | None:
        """The next packet's payload (acks and stray Ctrl-C dropped); None at EOF."""
        while True:
            start = self.buf.find(b"$")
            if start >= 0:
                if b"-" in self.buf[:start] and self.last_sent:
                    self.conn.sendall(self.last_sent)
                end = self.buf.find(b"#", start)
                if end >= 0 and len(self.buf) >= end + 3:
                    payload, cs = bytes(self.buf[start + 1:end]), bytes(self.buf[end + 1:end + 3])
                    del self.buf[:end + 3]
                    if cs.lower() != checksum(payload):
                        self.conn.sendall(b"-")
                        continue
                    self.conn.sendall(b"+")
                    return payload.decode("latin-1")
            elif self.buf:
                if b"-" in self.buf and self.last_sent:
                    self.conn.sendall(self.last_sent)
                self.buf.clear()
            try:
                if not self._recv():
                    return None
            except OSError:
                return None

    def send(self, payload: str) -> None:
        data = payload.encode("latin-1")
        self.last_sent = b"$" + data + b"#" + checksum(data)
        self.conn.sendall(self.last_sent)

    # --- packets -----------------------------------------------------------------------
    def handle(self, pkt: str) -> str | None:
        cmd, arg = pkt[:1], pkt[1:]
        ncpu = len(self.machine.vcpus)
        try:
            if cmd == "?":
                return self.last_stop
            if cmd == "g":
                return self.read_registers()
            if cmd == "G":
                return self.write_registers(bytes.fromhex(arg.replace("x", "0")))
            if cmd == "p":
                return self.read_register(int(arg, 16))
            if cmd == "P":
                n, value = arg.split("=")
                return self.write_register(int(n, 16), int.from_bytes(bytes.fromhex(value), "little"))
            if cmd == "m":
                addr, length = (int(x, 16) for x in arg.split(","))
                return self.read_memory(addr, length)
            if cmd == "M":
                where, data = arg.split(":")
                addr, _ = (int(x, 16) for x in where.split(","))
                return self.write_memory(addr, bytes.fromhex(data))
            if cmd in "cs" and cmd:
                if arg:                             # c ADDR / s ADDR: resume at ADDR
                    self.write_register(16, int(arg, 16), self.c_cpu)
                return self.resume(step=cmd == "s")
            if cmd in "Zz" and cmd:
                t, addr, kind = (int(x, 16) for x in arg.split(",")[:3])
                return self.insert(t, addr, kind) if cmd == "Z" else self.remove(t, addr, kind)
            if cmd == "H":
                tid = int(arg[1:], 16) if arg[1:] not in ("", "-1") else 0
                if tid > ncpu:
                    return "E01"
                if tid > 0:
                    setattr(self, "g_cpu" if arg[0] == "g" else "c_cpu", tid - 1)
                return "OK"
            if cmd == "T":
                return "OK" if 1 <= int(arg, 16) <= ncpu else "E01"
            if cmd == "D":
                self.done = True
                return "OK"
            if cmd == "k":
                self.done = True
                return None
            if pkt.startswith("qSupported"):
                return "PacketSize=4000"
            if pkt == "qAttached":
                return "1"
            if pkt == "qC":
                return "QC%x" % (self.g_cpu + 1)
            if pkt == "qfThreadInfo":
                return "m" + ",".join("%x" % (i + 1) for i in range(ncpu))
            if pkt == "qsThreadInfo":
                return "l"
            if pkt.startswith("qThreadExtraInfo,"):
                return ("vCPU %d" % (int(pkt.split(",")[1], 16) - 1)).encode().hex()
        except (ValueError, IndexError):
            return "E01"
        return ""

    # --- registers ---------------------------------------------------------------------
    def vcpu(self, index: int | None = None):
        return self.machine.vcpus[self.g_cpu if index is None else index]

    def read_registers(self) -> str:
        v = self.vcpu()
        regs, sregs = v.get_regs(), v.get_sregs()
        out = b"".join(getattr(regs, n).to_bytes(8, "little") for n in GPRS)
        out += regs.rip.to_bytes(8, "little") + (regs.rflags & 0xFFFFFFFF).to_bytes(4, "little")
        out += b"".join(getattr(sregs, s).selector.to_bytes(4, "little") for s in SEGS)
        return out.hex() + "xx" * sum(UNAVAILABLE[n] for n in range(24, 57))

    def write_registers(self, data: bytes) -> str:
        v = self.vcpu()
        regs = v.get_regs()
        for i, n in enumerate(GPRS + ("rip",)):
            if len(data) >= 8 * i + 8:
                setattr(regs, n, int.from_bytes(data[8 * i:8 * i + 8], "little"))
        if len(data) >= 140:
            regs.rflags = int.from_bytes(data[136:140], "little")
        v.set_regs(regs)
        return "OK"

    def read_register(self, n: int) -> str:
        v = self.vcpu()
        if n < 18:
            regs = v.get_regs()
            value = getattr(regs, (GPRS + ("rip",))[n]) if n < 17 else regs.rflags & 0xFFFFFFFF
            return value.to_bytes(8 if n < 17 else 4, "little").hex()
        if n < 24:
            return getattr(v.get_sregs(), SEGS[n - 18]).selector.to_bytes(4, "little").hex()
        if n in UNAVAILABLE:
            return "xx" * UNAVAILABLE[n]
        if n in (FS_BASE, GS_BASE):
            sregs = v.get_sregs()
            return (sregs.fs if n == FS_BASE else sregs.gs).base.to_bytes(8, "little").hex()
        return "E01"

    def write_register(self, n: int, value: int, index: int | None = None) -> str:
        if n > 17:
            return "E01"
        v = self.vcpu(index)
        regs = v.get_regs()
        setattr(regs, (GPRS + ("rip", "rflags"))[n], value)
        v.set_regs(regs)
        return "OK"

    # --- memory ------------------------------------------------------------------------
    def read_memory(self, addr: int, length: int) -> str:
        try:
            return LinearMemory(self.machine.memory, self.vcpu().get_sregs()).read(addr, length).hex()
        except (TranslationError, GuestMemoryError):
            return "E14"

    def write_memory(self, addr: int, data: bytes) -> str:
        lm = LinearMemory(self.machine.memory, self.vcpu().get_sregs())
        try:
            done = 0
            while done < len(data):
                linear = (addr + done) & lm.mask
                chunk = min(len(data) - done, PAGE - (linear & (PAGE - 1)))
                self.machine.memory.write(lm.phys(linear), data[done:done + chunk])
                done += chunk
        except (TranslationError, GuestMemoryError):
            return "E14"
        return "OK"

    # --- breakpoints and watchpoints ---------------------------------------------------
    def insert(self, t: int, addr: int, kind: int) -> str:
        if t not in ZTYPES:
            return ""
        length = 1 if t < 2 else kind
        if t >= 2 and (length not in DR7_LEN or addr % length):
            return "E01"                            # x86 watches 1/2/4/8 aligned bytes
        if (t, addr, length) in self.slots:
            return "OK"
        if None not in self.slots:
            return "E01"                            # all 4 debug registers are in use
        self.slots[self.slots.index(None)] = (t, addr, length)
        return "OK"

    def remove(self, t: int, addr: int, kind: int) -> str:
        key = (t, addr, 1 if t < 2 else kind)
        if key in self.slots:
            self.slots[self.slots.index(key)] = None
        return "OK"

    def debugregs(self) -> list[int]:
        """DR0-3 and DR7 (as KVM_SET_GUEST_DEBUG's debugreg[0..7]) from the slots."""
        db = [0] * 8
        for i, slot in enumerate(self.slots):
            if slot is not None:
                t, addr, length = slot
                db[i] = addr
                db[7] |= (1 << (2 * i)) | (ZTYPES[t][0] << (16 + 4 * i))
                if t >= 2:
                    db[7] |= DR7_LEN[length] << (18 + 4 * i)
        return db

    # --- running -----------------------------------------------------------------------
    def resume(self, step: bool) -> str:
        m, db = self.machine, self.debugregs()
        base = GuestDebug.ENABLE | (GuestDebug.USE_HW_BP if db[7] else 0)
        for v in m.vcpus:
            v.set_guest_debug(base | (GuestDebug.SINGLESTEP if step and v is m.vcpus[self.c_cpu] else 0), db)
        box: dict = {}

        def run():
            try:
                box["result"] = m.run()
            except BaseException as e:      # noqa: BLE001 - reported to gdb, re-raised by serve()
                box["error"] = e

        thread = threading.Thread(target=run, daemon=True, name="gdbstub-run")
        thread.start()
        interrupt = False
        while thread.is_alive():
            if select.select([self.conn], [], [], 0.05)[0]:
                if not self._recv():            # gdb is gone: stop the guest, end the session
                    interrupt, self.done = True, True
                elif b"\x03" in self.buf:
                    interrupt = True
                    self.buf[:] = self.buf.replace(b"\x03", b"")
            if interrupt:                       # repeated: a request before run() began is lost
                m.request_stop("interrupted")
            thread.join(0)
        thread.join()
        if "error" in box:
            self.error, self.done = box["error"], True
            return "X%02x" % SIGABRT
        self.result = r = box["result"]
        if r.reason in ("debug", "interrupted", "timeout"):
            self.g_cpu = self.c_cpu = r.vcpu
            signal = SIGTRAP if r.reason == "debug" else SIGINT
            self.last_stop = "T%02xthread:%x;%s" % (signal, r.vcpu + 1, self.watch_hit(r))
            return self.last_stop
        self.done = True
        if r.reason in ("exit", "halt"):
            return "W%02x" % ((r.status or 0) & 0xFF)
        return "X%02x" % SIGABRT

    def watch_hit(self, r) -> str:
        """``watch:ADDR;`` (or rwatch/awatch) when DR6 names a watchpoint slot."""
        dr6 = getattr(r.exit, "dr6", 0) or 0
        for i, slot in enumerate(self.slots):
            if slot is not None and slot[0] >= 2 and dr6 & (1 << i):
                return "%s:%x;" % (ZTYPES[slot[0]][1], slot[1])
        return ""
