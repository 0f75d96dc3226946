"""One fuzz case at a time: input in, ``Outcome`` out, the guest back to its ready point.

A ``Harness`` owns a ``Machine`` running one ELF guest. At construction it loads the
image, installs the exception IDT (:mod:`.traps`) and runs the guest until it writes
``ready`` to isa-debug-exit; there it zeroes the coverage map and takes a checkpoint
(``Machine.checkpoint()``, docs/reset.md). ``run(data)`` then:

1. checks ``data`` fits the guest's input buffer and writes it there (and its length,
   a little-endian u64, where ``length`` says);
2. runs the guest until it stops: ``done`` written to isa-debug-exit (no crash), an
   exception (an IDT stub's report: crash, named), a triple fault (crash), a report
   code of ``reports`` (crash, named by the harness's caller), the time budget (crash
   "timeout"), an address of ``end_at`` reached (no crash: an ``int3`` written there at
   the checkpoint leads to the #BP stub), or another exit (no crash; ``Outcome.exit``
   says which);
3. reads the coverage map straight from guest RAM (the guest counted its edges there:
   no exit per edge);
4. resets in place, so the next case starts from the checkpoint and sees nothing of
   this one.

The guest is hostile: its exit values, its stack and its writes are only read, bounded.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from ..errors import GuestError, GuestMemoryError, KvmpyError
from ..images import guests
from ..loader.elfsym import symbols
from ..vmm.console import TailSink
from ..vmm.machine import Machine
from . import traps

TAIL = 4096                 # bytes of the guest's serial output a harness keeps (for errors)


class HarnessError(KvmpyError):
    """The harness cannot be set up: a missing symbol, a guest that never gets ready..."""


@dataclass(frozen=True)
class Outcome:
    """What one case did. ``kind`` names a crash: "#PF" (an exception, by its SDM
    mnemonic), "triple-fault", "timeout", or a name from ``reports``; ``exit`` is the
    value the guest last wrote to isa-debug-exit (None when it wrote none);
    ``coverage`` the edge map as the case left it; ``time`` the case's seconds (input
    write, run and map read; the reset is not in it); ``stop`` how the run ended."""

    crashed: bool
    kind: str | None
    exit: int | None
    coverage: bytes
    time: float
    stop: str = "exit"                      # how the run ended: "done", "exit" (another value),
                                            # "exception", "timeout", "guest-error", "address"
                                            # (end_at), or Machine.run's "halt", "reset"...
    vector: int | None = None
    error_code: int | None = None
    fault_rip: int | None = None
    fault_address: int | None = None        # CR2, for a #PF
    reached: int | None = None              # the end_at address the case reached (stop "address")

    @property
    def edges(self) -> int:
        """How many map entries the case hit."""
        return len(self.coverage) - self.coverage.count(0)


def _image_path(image):
    """A path as given, or the path of the bundled guest of that name."""
    try:
        return guests.resolve(image)
    except KeyError:
        raise HarnessError(f"{image!r} is neither a file nor a bundled guest") from None


def _ends(syms: dict, end_at, mem_size: int, exceptions: bool) -> frozenset:
    """The guest addresses (symbols or numbers) where a case ends, checked to be in RAM."""
    if isinstance(end_at, (str, int)):
        end_at = (end_at,)
    ends = frozenset(_where(syms, e, 1, "end address")[0] for e in end_at)
    if ends and not exceptions:
        raise HarnessError("end_at needs exceptions=True: the case ends in the #BP stub of its IDT")
    for addr in ends:
        if not 0 <= addr < mem_size:
            raise HarnessError(f"the end address {addr:#x} is not inside {mem_size:#x} bytes of RAM")
    return ends


def _where(syms: dict, what, size: int | None, role: str) -> tuple[int, int]:
    """(address, size) of ``what``: an ELF symbol's name or a guest address."""
    if isinstance(what, str):
        sym = syms.get(what)
        if sym is None:
            raise HarnessError(f"the image has no symbol {what!r} for the {role}")
        return sym.value, sym.size if size is None else size
    if size is None:
        raise HarnessError(f"the {role} at {what:#x} needs its size")
    return int(what), size


class Harness:
    """A guest ready to run cases; see the module docstring and docs/fuzzing.md."""

    def __init__(self, image, *, input="fuzz_input", input_size: int | None = None,
                 length="fuzz_input_len", coverage="__fuzz_cov_map", coverage_size: int | None = None,
                 ready: int = 0x52, done: int = 0x44, reports: dict[int, str] | None = None,
                 timeout: float = 1.0, mem_size: int = 16 << 20, user: bool = True,
                 exceptions: bool = True, ready_timeout: float = 10.0, native: bool = False, end_at=(),
                 hot_pages: int = 64):
        path = self.image_path = _image_path(image)
        with open(path, "rb") as f:
            syms = symbols(f.read())
        self.input, self.input_size = _where(syms, input, input_size, "input")
        self.length = None if length is None else _where(syms, length, 8, "input length")[0]
        self.coverage, self.coverage_size = _where(syms, coverage, coverage_size, "coverage map")
        self.done, self.reports, self.timeout = done, dict(reports or {}), timeout
        self.end_at = _ends(syms, end_at, mem_size, exceptions)
        self.hot_pages = hot_pages
        for addr, size, role in ((self.input, self.input_size, "input"), (self.coverage, self.coverage_size, "map")):
            if size <= 0 or addr + size > mem_size:
                raise HarnessError(f"the {role} ({addr:#x}, {size:#x} bytes) is not inside {mem_size:#x} bytes of RAM")
        self.serial = TailSink(TAIL)
        # the Python run loop by default: a case makes one or two exits, where C saves nothing
        # (measured: the same speed or slower; docs/fuzzing.md)
        self.machine = Machine(mem_size=mem_size, serial=self.serial, native=native)
        try:
            self._start(path, user, exceptions, ready, ready_timeout)
        except BaseException:
            self.machine.close()
            raise

    def _start(self, path, user: bool, exceptions: bool, ready: int, ready_timeout: float) -> None:
        m = self.machine
        m.load(path, user=user)
        if exceptions:
            traps.install(m)
        r = m.run(timeout=ready_timeout)
        if r.reason != "exit" or r.status >> 1 != ready:
            raise HarnessError(f"the guest stopped ({r.reason}, rax {r.regs.rax:#x}) before its ready "
                               f"exit {ready:#x}; its output ended: {self.serial.data[-200:]!r}")
        m.memory.write(self.coverage, bytes(self.coverage_size))
        for addr in self.end_at:            # an int3 at each: the #BP stub ends the case there
            m.memory.write(addr, traps.INT3)
        # pages every case writes (the map, the stack) stay writable and are copied back at each
        # reset: on a shadow-paging host a write fault costs ~30 us, a page's copy ~0.3 (docs/reset.md)
        m.checkpoint(hot_pages=self.hot_pages)
        self.cases = 0

    def run(self, data: bytes) -> Outcome:
        """One case from the checkpoint; the machine is reset before this returns."""
        self._check(data)
        try:
            return self._case(data, None)
        finally:
            self.reset()

    def replay(self, data: bytes, drive=None) -> Outcome:
        """One case like ``run()``, but the machine is left where the case ended, for a look at
        its registers and memory (``kvmpy fuzz replay``); call ``reset()`` before the next case.
        ``drive(machine) -> RunResult`` runs the case instead of ``machine.run(timeout=...)``
        (a traced run, a gdb session)."""
        return self._case(data, drive)

    def _case(self, data: bytes, drive) -> Outcome:
        """The input in, the case run (by ``drive``, or to its end or the time budget), the map read."""
        self._check(data)
        m = self.machine
        t0 = time.perf_counter()
        m.memory.write(self.input, bytes(data))
        if self.length is not None:
            m.memory.write(self.length, struct.pack("<Q", len(data)))
        try:
            outcome = self._outcome(drive(m) if drive else m.run(timeout=self.timeout))
        except GuestError as e:     # a triple fault (no IDT, or a broken one), a failed entry
            outcome = {"crashed": True, "kind": e.reason or "guest-error", "exit": None, "stop": "guest-error"}
        cov = m.memory.read(self.coverage, self.coverage_size)
        return Outcome(coverage=cov, time=time.perf_counter() - t0, **outcome)

    def _check(self, data: bytes) -> None:
        if len(data) > self.input_size:
            raise ValueError(f"input of {len(data)} bytes does not fit the guest's {self.input_size}-byte buffer")

    def reset(self, times: dict | None = None) -> None:
        """Back to the checkpoint after ``replay()`` (``times``: Machine.reset's split)."""
        self.machine.reset(times)
        self.cases += 1

    def _outcome(self, r) -> dict:
        if r.reason == "timeout":
            return {"crashed": True, "kind": "timeout", "exit": None, "stop": "timeout"}
        if r.reason != "exit":              # a halt, a reset request...: the engine decides
            return {"crashed": False, "kind": None, "exit": None, "stop": r.reason}
        value = r.status >> 1             # isa-debug-exit: (v << 1) | 1
        vector = traps.vector_at(r.regs.rip)
        if vector == traps.BP and self.end_at:
            fault = self._fault(vector, r.regs.rsp)
            if fault.get("fault_rip", 0) - 1 in self.end_at:
                return {"crashed": False, "kind": None, "exit": value, "stop": "address",
                        "reached": fault["fault_rip"] - 1}
        if vector is not None:
            return {"crashed": True, "kind": traps.name(vector), "exit": value, "stop": "exception",
                    **self._fault(vector, r.regs.rsp)}
        if value in self.reports:
            return {"crashed": True, "kind": self.reports[value], "exit": value}
        return {"crashed": False, "kind": None, "exit": value, "stop": "done" if value == self.done else "exit"}

    def _fault(self, vector: int, rsp: int) -> dict:
        """The exception frame the CPU pushed (read defensively: the guest owns its stack)."""
        out = {"vector": vector}
        try:
            out["error_code"], out["fault_rip"] = traps.frame(vector, self.machine.memory.read(rsp, 16))
        except GuestMemoryError:
            pass
        if vector == traps.PF:
            out["fault_address"] = self.machine.vcpus[0].get_sregs().cr2
        return out

    def close(self) -> None:
        self.machine.close()

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
