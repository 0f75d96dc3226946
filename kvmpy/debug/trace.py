"""Exit traces: one line (or one JSON object) per VM exit, with the guest instruction.

A ``Tracer`` is handed to ``Machine.run(trace=...)``; the run loop calls it after it has
handled each exit, so an IN or an MMIO read shows the value the guest received. While
tracing, every exit goes through Python (the C fast path would serve UART and disk
exits without the tracer seeing them), so a traced run is slower but complete.

Each event names the instruction that caused the exit, disassembled with capstone in
the guest's current mode. KVM leaves RIP *after* an OUT it has handed to user space,
but *at* an IN or an MMIO access (it finishes those on re-entry), so for OUT the tracer
finds the instruction that ends at RIP.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Callable, TextIO

from ..errors import GuestMemoryError, KvmpyError
from ..kvm import exits
from ..x86 import inspect, modes
from ..x86.disasm import decode
from ..kvm.regs import REGS_FIELDS as REG_NAMES

KINDS = exits.KIND               # an event's kind is the exit's one name


@dataclass(frozen=True)
class TraceEvent:
    """One exit as a tracer sees it. ``addr`` is the port for I/O, the address for MMIO."""

    t: float                 # seconds since the run started
    vcpu: int
    kind: str
    addr: int | None
    size: int | None
    count: int | None
    data: str | None         # hex of the bytes written or read
    rip: int
    insn: str                # "mnemonic operands", or "" if the code could not be read
    changed: tuple = ()      # single steps: (register, old, new) for each register the step changed

    def text(self) -> str:
        if self.kind == "step":
            regs = "  ".join(f"{n}={old:#x}->{new:#x}" for n, old, new in self.changed)
            return f"{self.t:10.6f} cpu{self.vcpu} step  {self.rip:#x}: {self.insn:<32} {regs}".rstrip()
        where = ""
        if self.addr is not None:
            where = f" {'port' if self.kind.startswith('io') else 'addr'}={self.addr:#x} size={self.size}"
            if self.count and self.count > 1:
                where += f" count={self.count}"
        data = f" data={self.data}" if self.data else ""
        return f"{self.t:10.6f} cpu{self.vcpu} {self.kind:<12}{where}{data}  rip={self.rip:#x}  {self.insn}"


def parse_filter(spec: str | None) -> tuple[int, int] | None:
    """'0x3f8-0x3ff' or '0x3f8' -> inclusive (lo, hi)."""
    if not spec:
        return None
    lo, _, hi = spec.partition("-")
    return int(lo, 0), int(hi or lo, 0)


class Tracer:
    """Collects exits that pass the filters and hands them to ``sink`` (a callable).

    Filters: ``kinds`` (e.g. {"io-out", "mmio-write"}), ``ports`` / ``addrs`` inclusive
    ranges, ``vcpus``. ``Tracer.to_stream(f, json_lines=...)`` writes text or JSON lines.
    """

    def __init__(self, sink: Callable[[TraceEvent], None], kinds=None, ports=None, addrs=None, vcpus=None,
                 steps: bool = False):
        self.sink, self.kinds, self.ports, self.addrs = sink, set(kinds) if kinds else None, ports, addrs
        self.steps = steps           # single-step the guest and report every instruction
        self._last_regs: dict[int, object] = {}
        self.vcpus = set(vcpus) if vcpus is not None else None
        self.start = time.perf_counter()
        self.count = 0

    @classmethod
    def to_stream(cls, stream: TextIO, json_lines: bool = False, **filters) -> "Tracer":
        def write(ev: TraceEvent) -> None:
            stream.write((json.dumps(asdict(ev)) if json_lines else ev.text()) + "\n")
        tracer = cls(write, **filters)
        tracer.stream = stream
        return tracer

    def wrap(self, loop):
        """The dispatch a traced vCPU loop uses: the loop's own, then this tracer told of
        the exit (``traced`` below). The vmm layer never imports this module: the Machine's
        ``run(trace=...)`` hands the tracer each vCPU loop and uses what this returns."""
        return traced(loop, self)

    def wants(self, vcpu: int, ex) -> bool:
        kind = KINDS.get(type(ex), "other")
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self.vcpus is not None and vcpu not in self.vcpus:
            return False
        if self.ports is not None:
            if not isinstance(ex, (exits.IoIn, exits.IoOut)) or not self.ports[0] <= ex.port <= self.ports[1]:
                return False
        if self.addrs is not None:
            if not isinstance(ex, (exits.MmioRead, exits.MmioWrite)) or not self.addrs[0] <= ex.addr <= self.addrs[1]:
                return False
        return True

    def event(self, vcpu_id: int, ex, data_in: bytes | None, rip: int, insn: str) -> TraceEvent:
        kind = KINDS.get(type(ex), "other")
        addr = size = count = data = None
        if isinstance(ex, (exits.IoIn, exits.IoOut)):
            addr, size, count = ex.port, ex.size, ex.count
            data = (ex.data if isinstance(ex, exits.IoOut) else data_in or b"").hex()
        elif isinstance(ex, (exits.MmioRead, exits.MmioWrite)):
            addr, size = ex.addr, ex.size
            data = (ex.data if isinstance(ex, exits.MmioWrite) else data_in or b"").hex()
        return TraceEvent(round(time.perf_counter() - self.start, 6), vcpu_id, kind, addr, size, count,
                          data, rip, insn)

    def step_event(self, vcpu_id: int, regs, insn_at, rip_before: int | None = None) -> TraceEvent:
        """A single step: the instruction that ran (at the previous RIP) and what it changed."""
        before = self._last_regs.get(vcpu_id)
        self._last_regs[vcpu_id] = regs
        changed = ()
        if before is not None:
            changed = tuple((n, getattr(before, n), getattr(regs, n)) for n in REG_NAMES
                            if getattr(before, n) != getattr(regs, n) and n != "rip")
        rip = before.rip if before is not None else regs.rip
        return TraceEvent(round(time.perf_counter() - self.start, 6), vcpu_id, "step", None, None, None,
                          None, rip, insn_at(rip), changed)

    def start_steps(self, vcpu_id: int, regs) -> None:
        self._last_regs[vcpu_id] = regs

    def emit(self, ev: TraceEvent) -> None:
        self.count += 1
        self.sink(ev)


def exiting_instruction(decode_at: Callable[[int], list[tuple[int, int, str]]], rip: int, kind: str) -> str:
    """The instruction that caused an exit: at RIP, or (for OUT, which KVM has already
    stepped over) the one ending exactly at RIP. ``decode_at(addr)`` returns
    [(address, length, text), ...] decoded from ``addr``."""
    if kind == "io-out":
        for back in range(1, 5):               # OUT encodings are 1 to 4 bytes long
            insns = decode_at(rip - back)
            if insns and insns[0][1] == back and insns[0][2].startswith(("out", "rep out")):
                return f"{insns[0][2]}  (at {rip - back:#x})"
    insns = decode_at(rip)
    return insns[0][2] if insns else ""


class ReplayDiverged(KvmpyError):
    """A replayed guest did something its recording does not show."""


class Replayer(Tracer):
    """Replays a recording (JSON lines from ``--trace-json`` / ``Tracer.to_stream``):
    every IN and MMIO read is answered from the recording instead of the devices, so the
    guest sees exactly the inputs it saw when it was recorded (serial input included)
    and, if it is deterministic, does the same again. OUT and MMIO writes still reach the
    devices (the output appears) and are checked against the recording; a mismatch
    raises ReplayDiverged naming the event.
    """

    IO_KINDS = tuple(KINDS[c] for c in (exits.IoOut, exits.IoIn, exits.MmioRead, exits.MmioWrite))

    def __init__(self, events: list[dict], sink=None):
        super().__init__(sink or (lambda ev: None))
        self.events = [e for e in events if e.get("kind") in self.IO_KINDS]
        self.pos = 0

    @classmethod
    def from_file(cls, path) -> "Replayer":
        with open(path) as f:
            events = [json.loads(line) for line in f if line.strip()]
        return cls(events)

    def wants(self, vcpu: int, ex) -> bool:
        return KINDS.get(type(ex)) in self.IO_KINDS

    def next_event(self, vcpu_id: int, ex) -> dict:
        """The recorded event for this exit; checks it is the same kind of access."""
        kind = KINDS.get(type(ex))
        addr = ex.port if isinstance(ex, (exits.IoIn, exits.IoOut)) else ex.addr
        if self.pos >= len(self.events):
            raise ReplayDiverged(f"exit {self.pos}: the guest did {kind} at {addr:#x}, "
                                 "but the recording has ended")
        ev = self.events[self.pos]
        if (ev["kind"], ev["addr"], ev["size"], ev["vcpu"]) != (kind, addr, ex.size, vcpu_id):
            raise ReplayDiverged(f"exit {self.pos}: the guest did {kind} at {addr:#x} size {ex.size} on "
                                 f"vCPU {vcpu_id}; the recording has {ev['kind']} at {ev['addr']:#x} "
                                 f"size {ev['size']} on vCPU {ev['vcpu']}")
        if kind in ("io-out", "mmio-write"):
            data = ex.data.hex()
            if data != ev["data"]:
                raise ReplayDiverged(f"exit {self.pos}: {kind} at {addr:#x} wrote {data}, "
                                     f"the recording wrote {ev['data']}")
        self.pos += 1
        return ev


# --- a vCPU loop's dispatch with a tracer watching ----------------------------------
def traced(loop, tracer):
    """A dispatch function for ``loop`` that reports each exit to ``tracer``."""
    memory, stats, dispatch = loop.memory, loop.stats, loop.dispatch

    def handle(vcpu, ex) -> None:
        if tracer.steps and isinstance(ex, exits.Debug):
            if tracer.vcpus is None or vcpu.id in tracer.vcpus:
                tracer.emit(tracer.step_event(vcpu.id, vcpu.get_regs(), insn_reader(memory, vcpu)))
            return
        wanted = tracer.wants(vcpu.id, ex)
        if isinstance(tracer, Replayer) and wanted:
            replay(vcpu, ex, tracer.next_event(vcpu.id, ex), dispatch, stats)
            return
        try:
            dispatch(vcpu, ex)
        finally:
            if wanted:
                try:
                    tracer.emit(trace_event(tracer, memory, vcpu, ex))
                except Exception:           # a trace must never hide the guest's own error
                    if not isinstance(ex, (exits.Shutdown, exits.InternalError, exits.FailEntry)):
                        raise
    return handle


def replay(vcpu, ex, ev: dict, dispatch, stats) -> None:
    """Inputs come from the recording; outputs go to the devices as usual."""
    if isinstance(ex, exits.IoIn):
        stats.exits[KINDS[exits.IoIn]] += 1
        vcpu.complete_io_in(ex, bytes.fromhex(ev["data"]))
    elif isinstance(ex, exits.MmioRead):
        stats.exits[KINDS[exits.MmioRead]] += 1
        vcpu.complete_mmio_read(bytes.fromhex(ev["data"]).ljust(ex.size, b"\0"))
    else:
        dispatch(vcpu, ex)


def decoder(memory, sregs):
    """decode_at(rip) -> [(address, length, text)] in the vCPU's current mode."""
    bits = modes.code_bits(sregs)

    def decode_at(rip: int):
        try:
            linear = rip if bits == 64 else (sregs.cs.base + rip) & 0xFFFFFFFF
            gpa = inspect.translate(memory.read_u64, sregs, linear).phys
            code = memory.read(gpa, min(16, memory.region_for(gpa).end - gpa))
        except (ValueError, GuestMemoryError):
            return []
        return decode(code, rip, bits)
    return decode_at


def insn_reader(memory, vcpu):
    """insn_at(rip) -> the instruction text at rip in the vCPU's current mode."""
    decode_at = decoder(memory, vcpu.get_sregs())
    return lambda rip: (decode_at(rip) or [(0, 0, "")])[0][2]


def trace_event(tracer, memory, vcpu, ex):
    regs = vcpu.get_regs()
    decode_at = decoder(memory, vcpu.get_sregs())
    data_in = None
    if isinstance(ex, exits.IoIn):
        data_in = vcpu.io_data(ex)
    elif isinstance(ex, exits.MmioRead):
        data_in = vcpu.mmio_data(ex.size)
    kind = KINDS.get(type(ex), "other")
    return tracer.event(vcpu.id, ex, data_in, regs.rip, exiting_instruction(decode_at, regs.rip, kind))
