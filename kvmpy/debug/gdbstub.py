"""A GDB remote stub: debug a kvmpy guest with ``gdb -ex "target remote /path/to/sock"``.

Who may connect
---------------
By default the stub listens on a Unix socket created with mode 0600, and it checks each
connection's peer credentials (SO_PEERCRED): only the VM's owner gets a session, since a
debugger reads and writes all of the guest. TCP is there for those who need it, on the
loopback interface only, and the connecting socket's owner (from /proc/net/tcp) must be
us too (kvmpy/localsock.py, shared with the control socket). Another user's connection
is closed unanswered and the stub goes on waiting. ``serve(timeout)`` waits at most
``timeout`` seconds for gdb, and ``request_stop()`` (Ctrl-C) ends the wait or the session.

The GDB Remote Serial Protocol, as far as this stub speaks it
-------------------------------------------------------------
gdb sends packets ``$payload#cs`` (``cs``: the payload's byte sum modulo 256, two hex
digits) and the receiver acknowledges each one with ``+`` (or ``-``: send it again).
A lone byte 0x03 (outside any packet) is Ctrl-C: stop the running target. Replies are
packets too; an empty reply means "not supported". Numbers are hex; ``E nn`` is an error.

A peer is not trusted to be gdb. Payloads are at most PACKET_SIZE bytes (advertised in
``qSupported``): a longer packet is skipped and answered ``E01``, and a peer that sends
more than MAX_JUNK bytes of anything but good packets in a row, or MAX_NAKS packets
with a bad checksum, is disconnected. ``m``
and ``M`` move at most MAX_MEMORY bytes, ``G`` at most gdb's 536; numbers are 64-bit hex
(no sign), and any packet the stub cannot parse or serve gets ``E01``, never an exception.

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

import os
import re
import select
import socket
import threading
import time

from ..kvm.abi import GuestDebug
from ..errors import GuestMemoryError, KvmpyError
from ..localsock import LOOPBACK, listen_private, peer_uid
from ..x86.pagewalk import PAGE, LinearMemory, TranslationError

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
# gdb register number -> size, for st0-7 (24-31), fctrl..fop (32-39), xmm0-15 (40-55), mxcsr (56)
UNAVAILABLE = {**{n: 10 for n in range(24, 32)}, **{n: 4 for n in range(32, 40)},
               **{n: 16 for n in range(40, 56)}, 56: 4, 57: 8}     # 57: orig_rax
FS_BASE, GS_BASE = 58, 59
G_SIZE = 8 * 17 + 4 * 7 + sum(UNAVAILABLE[n] for n in range(24, 57))    # 536 bytes: gdb's amd64 'g'
SIGINT, SIGTRAP, SIGABRT = 2, 5, 6
# Z type -> (DR7 R/W bits, stop-reply keyword); 0 and 1 are execution breakpoints
ZTYPES = {0: (0b00, None), 1: (0b00, None), 2: (0b01, "watch"), 3: (0b11, "rwatch"), 4: (0b11, "awatch")}
DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}

#: the largest payload accepted, advertised in qSupported; gdb sizes its m/M/G packets by it
PACKET_SIZE = 0x4000
#: the most bytes one m or M moves (an m reply is two hex digits a byte)
MAX_MEMORY = PACKET_SIZE // 2
#: bytes outside good packets (acks, noise, bad checksums, oversized packets) a peer may
#: send in a row before the connection is dropped: gdb sends a few acks at most
MAX_JUNK = 4 * PACKET_SIZE
#: bad checksums in a row before the connection is dropped (gdb gives up after 3 tries)
MAX_NAKS = 16
#: while the guest runs gdb sends only Ctrl-C; more than this unread means a runaway peer
MAX_PENDING = PACKET_SIZE + 4096
POLL = 0.1                          # seconds between looks at stop requests and deadlines
SEND_TIMEOUT = 30.0                 # a peer that stops reading is gone
LINGER = 2.0                        # at the end, how long gdb may take to ack and hang up
HEX = re.compile(r"[0-9a-fA-F]{1,16}")
HEXBYTES = re.compile(r"(?:[0-9a-fA-F]{2})*")
BAD = (ValueError, IndexError, KeyError, OverflowError, OSError, KvmpyError)   # -> an E reply


class GdbStubError(KvmpyError):
    """The gdb stub cannot listen where it was asked to."""


def checksum(payload: bytes) -> bytes:
    return b"%02x" % (sum(payload) & 0xFF)


def hexnum(text: str) -> int:
    """A 64-bit number as gdb writes it (1-16 hex digits, no sign); ValueError otherwise."""
    if not HEX.fullmatch(text):
        raise ValueError(f"not a 64-bit hex number: {text[:20]!r}")
    return int(text, 16)


def hexbytes(text: str) -> bytes:
    """Bytes as pairs of hex digits; ValueError otherwise (no spaces, no odd digit)."""
    if not HEXBYTES.fullmatch(text):
        raise ValueError("not hex bytes")
    return bytes.fromhex(text)


class GdbStub:
    """Serve one gdb connection for ``machine``. ``listen`` is a path (a Unix socket, mode
    0600) or a TCP port on the loopback ``host`` (0: any free one). Either way only our
    own user may connect: SO_PEERCRED, or the peer socket's owner in /proc/net/tcp."""

    def __init__(self, machine, listen: str | os.PathLike | int, host: str = "127.0.0.1"):
        self.machine = machine
        self.path = self.port = None
        if isinstance(listen, int):
            if host not in LOOPBACK:
                raise GdbStubError(f"the gdb stub listens on loopback only ({', '.join(LOOPBACK)}), not {host}")
            try:
                self.listener = socket.create_server((host, listen))
            except OSError as e:
                raise GdbStubError(f"gdb stub on {host}:{listen}: {e.strerror or e}") from None
            self.port = self.listener.getsockname()[1]
            self.address = f"{host}:{self.port}"
        else:
            self.path = self.address = os.fspath(listen)
            self.listener = listen_private(self.path, "gdb socket", GdbStubError, backlog=1)
            st = os.lstat(self.path)
            self._ident = (st.st_dev, st.st_ino)
        self.conn: socket.socket | None = None
        self.buf = bytearray()
        self.junk = 0                               # bytes outside good packets, in a row
        self.naks = 0                               # packets with a bad checksum, in a row
        self.skipping = False                       # inside a packet longer than PACKET_SIZE
        self.gone = False                           # the peer closed, reset or stopped reading
        self.last_sent = b""
        self.g_cpu = self.c_cpu = 0                 # vCPU index for registers/memory, for c/s
        self.slots: list[tuple[int, int, int] | None] = [None] * 4    # (Z type, addr, length)
        self.last_stop = "T%02xthread:1;" % SIGTRAP
        self.result = None
        self.error: BaseException | None = None
        self.done = False
        self.stopping: str | None = None            # request_stop()'s reason
        self.stopped_waiting: str | None = None     # "timeout" or the stop reason, if no gdb came
        self.refused = 0                            # connections from other users

    # --- session -----------------------------------------------------------------------
    def serve(self, timeout: float | None = None):
        """Wait up to ``timeout`` seconds (None: forever) for gdb, then serve it until it
        detaches or kills, the guest's run ends or ``request_stop()`` is called. Returns
        the last RunResult (None if gdb never connected or never resumed the guest: then
        ``stopped_waiting`` says why, "timeout" or the stop's reason); re-raises a guest error."""
        try:
            conn = self.accept(timeout)
        finally:
            self.close()
        if conn is None:
            return None
        self.conn = conn
        conn.settimeout(SEND_TIMEOUT)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while not self.done:
                pkt = self.read_packet()
                if pkt is None:                     # gdb went away (or was sent away): a detach
                    break
                reply = self.handle(pkt)
                if reply is not None:
                    self.send(reply)
        finally:
            self._linger()
            conn.close()
            for v in self.machine.vcpus:
                v.set_guest_debug(0)
        if self.error is not None:
            raise self.error
        return self.result

    def accept(self, timeout: float | None) -> socket.socket | None:
        """The first connection from our own user, or None once ``timeout`` has passed or
        a stop was requested. Other users' connections are closed unanswered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.stopping is None:
            left = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            if left <= 0:
                self.stopped_waiting = "timeout"
                return None
            if not select.select([self.listener], [], [], left)[0]:
                continue
            conn, _ = self.listener.accept()
            if peer_uid(conn) == os.getuid():
                return conn
            self.refused += 1
            conn.close()
        self.stopped_waiting = self.stopping
        return None

    def _linger(self) -> None:
        """Let gdb ack our last reply before the socket closes (writing to a closed Unix
        socket fails at once, and gdb reports that instead of the reply): shut our side,
        then read to its EOF, for LINGER seconds at most."""
        if self.gone:
            return
        try:
            self.conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER
            while (left := deadline - time.monotonic()) > 0:
                if select.select([self.conn], [], [], left)[0] and not self.conn.recv(4096):
                    return
        except OSError:
            pass

    def close(self) -> None:
        """Stop listening; the socket file goes too (if it is still ours)."""
        self.listener.close()
        if self.path is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(self.path)
            except OSError:
                pass

    def request_stop(self, reason: str = "interrupted") -> None:
        """End the session from any thread (Ctrl-C, a timeout): the wait for gdb, a
        running guest (gdb gets its stop reply first) and an idle session alike."""
        self.stopping = reason
        self.machine.request_stop(reason)

    def _recv(self) -> bool:
        """Append what the peer sent to ``buf``; False at EOF or when the peer is gone."""
        try:
            data = self.conn.recv(4096)
        except OSError:
            data = b""
        self.buf += data
        self.gone = self.gone or not data
        return bool(data)

    def _write(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            self.conn.sendall(data)
        except OSError:                             # reset, closed, or not reading for 30 s
            self.gone = True

    def read_packet(self) -> str | None:
        """The next good packet's payload; None when the peer is gone, has sent more than
        MAX_JUNK bytes of anything else or MAX_NAKS bad packets in a row, or a stop was
        requested."""
        while not self.gone and self.stopping is None:
            pkt = self._take_packet()
            if pkt is not None:
                return pkt
            if self.junk > MAX_JUNK or self.naks > MAX_NAKS:
                self.gone = True                # dropped: no lingering for its acks either
                return None
            if select.select([self.conn], [], [], POLL)[0]:
                self._recv()
        return None

    def _take_packet(self) -> str | None:
        """Take one packet out of ``buf`` (acking it), or None if more bytes are needed.
        Acks, noise and packets with a bad checksum count as junk; ``-`` resends our last
        reply. A packet longer than PACKET_SIZE is skipped to its end and answered E01."""
        while self.buf and not self.gone:
            if self.skipping:
                end = self.buf.find(b"#")
                drop = len(self.buf) if end < 0 else min(end + 3, len(self.buf))
                self.junk += drop
                del self.buf[:drop]
                if end >= 0 and drop == end + 3:
                    self.skipping = False
                    self._write(b"+")
                    self.send("E01")            # too long for the PacketSize we advertised
                continue
            start = self.buf.find(b"$")
            noise = self.buf if start < 0 else self.buf[:start]
            if b"-" in noise and self.last_sent:
                self._write(self.last_sent)
            self.junk += len(noise)
            del self.buf[:len(noise)]
            if not self.buf:
                return None
            end = self.buf.find(b"#", 1, PACKET_SIZE + 2)
            if end < 0:
                if len(self.buf) > PACKET_SIZE + 1:
                    self.skipping = True
                    continue
                return None
            if len(self.buf) < end + 3:
                return None
            payload, cs = bytes(self.buf[1:end]), bytes(self.buf[end + 1:end + 3])
            del self.buf[:end + 3]
            if cs.lower() != checksum(payload):
                self.junk += len(payload) + 4
                self.naks += 1
                if self.naks <= MAX_NAKS:
                    self._write(b"-")
                continue
            self.junk = self.naks = 0
            self._write(b"+")
            return payload.decode("latin-1")
        return None

    def send(self, payload: str) -> None:
        data = payload.encode("latin-1")
        self.last_sent = b"$" + data + b"#" + checksum(data)
        self._write(self.last_sent)

    # --- packets -----------------------------------------------------------------------
    def handle(self, pkt: str) -> str | None:
        """The reply to one packet (None: none is sent). Bad input gets ``E01``."""
        cmd, arg = pkt[:1], pkt[1:]
        try:
            if cmd == "q":
                return self.query(pkt)
            if cmd in "gGpPmM" and cmd:
                return self.data_packet(cmd, arg)
            if cmd in "cs" and cmd:
                if arg:                             # c ADDR / s ADDR: resume at ADDR
                    self.write_register(16, hexnum(arg), self.c_cpu)
                return self.resume(step=cmd == "s")
            if cmd in "Zz" and cmd:
                t, addr, kind = (hexnum(x) for x in arg.split(",")[:3])
                return self.insert(t, addr, kind) if cmd == "Z" else self.remove(t, addr, kind)
            if cmd == "H":
                return self.choose_thread(arg[:1], arg[1:])
            if cmd == "T":
                return "OK" if 1 <= hexnum(arg) <= len(self.machine.vcpus) else "E01"
            if cmd == "?":
                return self.last_stop
            if cmd in "Dk" and cmd:
                self.done = True
                return "OK" if cmd == "D" else None
        except BAD:
            return "E01"
        return ""

    def data_packet(self, cmd: str, arg: str) -> str:
        """g G p P m M: registers and memory, every number and length checked."""
        if cmd == "g":
            return self.read_registers()
        if cmd == "G":
            if len(arg) > 2 * G_SIZE:
                return "E01"
            return self.write_registers(hexbytes(arg.replace("x", "0")))
        if cmd == "p":
            return self.read_register(hexnum(arg))
        if cmd == "P":
            n, value = arg.split("=")
            data = hexbytes(value)
            if not 0 < len(data) <= 8:
                return "E01"
            return self.write_register(hexnum(n), int.from_bytes(data, "little"))
        if cmd == "m":
            addr, length = (hexnum(x) for x in arg.split(","))
            return self.read_memory(addr, length) if length <= MAX_MEMORY else "E01"
        where, hexdata = arg.split(":")
        addr, length = (hexnum(x) for x in where.split(","))
        if length > MAX_MEMORY or len(hexdata) != 2 * length:
            return "E01"
        return self.write_memory(addr, hexbytes(hexdata))

    def choose_thread(self, op: str, tid: str) -> str:
        """``Hg``/``Hc``: thread 0 or -1 means any (keep the current vCPU)."""
        if op not in ("g", "c"):
            return "E01"
        n = 0 if tid in ("0", "-1") else hexnum(tid)
        if n > len(self.machine.vcpus):
            return "E01"
        if n > 0:
            setattr(self, "g_cpu" if op == "g" else "c_cpu", n - 1)
        return "OK"

    def query(self, pkt: str) -> str:
        ncpu = len(self.machine.vcpus)
        if pkt.startswith("qSupported"):
            return "PacketSize=%x" % PACKET_SIZE
        if pkt == "qAttached":
            return "1"
        if pkt == "qC":
            return "QC%x" % (self.g_cpu + 1)
        if pkt == "qfThreadInfo":
            return "m" + ",".join("%x" % (i + 1) for i in range(ncpu))
        if pkt == "qsThreadInfo":
            return "l"
        if pkt.startswith("qThreadExtraInfo,"):
            tid = hexnum(pkt.split(",", 1)[1])
            return ("vCPU %d" % (tid - 1)).encode().hex() if 1 <= tid <= ncpu else "E01"
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
                if len(self.buf) > MAX_PENDING:     # a peer that floods while the guest runs
                    self.buf.clear()
                    interrupt, self.done, self.gone = True, True, True
            if interrupt or self.stopping:      # repeated: a request before run() began is lost
                m.request_stop(self.stopping or "interrupted")
            thread.join(0)
        thread.join()
        self.done = self.done or self.stopping is not None
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
