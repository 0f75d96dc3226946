"""A crash you can act on: one case's end as text (``kvmpy fuzz replay``, docs/fuzzing.md).

After ``Harness.replay(data)`` the machine is where the case ended. For an exception that
is inside the trap stub (:mod:`.traps`), in ring 0; the code that faulted is recovered
from what the CPU pushed on the RSP0 stack (RIP, CS, RFLAGS, RSP, SS), RAX from the
stub's save slot, and the other registers are the faulting code's as they stand. For a
report or another isa-debug-exit value the ``out`` that ended the case is shown; for a
timeout, where the guest was when the budget ran out.

Everything read here is the guest's and hostile: a frame that cannot be read leaves the
registers as the vCPU has them, and the report says so.
"""
from __future__ import annotations

from dataclasses import replace

from ..errors import GuestMemoryError, KvmpyError
from ..debug.trace import decoder, exiting_instruction
from ..loader.elfsym import symbols
from ..x86 import inspect
from . import traps

CODE_LINES = 6          # instructions of the faulting code shown


def context(harness, outcome):
    """(regs, sregs, note) of the code the case ended in, as the module docstring says."""
    v = harness.machine.vcpus[0]
    regs, sregs = v.get_regs(), v.get_sregs()
    if outcome.vector is None:
        return regs, sregs, ""
    mem = harness.machine.memory
    try:
        frame = traps.context(outcome.vector, mem.read(regs.rsp, traps.FRAME.size + 8))
        rax = mem.read_u64(traps.SAVED_RAX)
    except (GuestMemoryError, ValueError):
        return regs, sregs, "(the exception frame could not be read: the trap stub's registers)"
    regs = replace(regs, rip=frame["rip"], rsp=frame["rsp"], rflags=frame["rflags"], rax=rax)
    sregs = replace(sregs, cs=replace(sregs.cs, selector=frame["cs"] & 0xFFFF, dpl=frame["cs"] & 3),
                    ss=replace(sregs.ss, selector=frame["ss"] & 0xFFFF, dpl=frame["ss"] & 3))
    return regs, sregs, ""


def headline(outcome) -> str:
    """One line: "crash: #PF (vector 14) ..." or "ok: exit 0x44"."""
    if not outcome.crashed:
        return f"ok: exit {outcome.exit:#x}" if outcome.exit is not None else f"ok: {outcome.stop}"
    what = outcome.kind
    if outcome.vector is not None:
        what += f" (vector {outcome.vector}, {_LONG.get(outcome.vector, 'a CPU exception')})"
    fields = (("rip", outcome.fault_rip), ("address", outcome.fault_address), ("error_code", outcome.error_code))
    return f"crash: {what}" + "".join(f" {k}={val:#x}" for k, val in fields if val is not None)


_LONG = {0: "divide error", 1: "debug", 3: "breakpoint", 6: "invalid opcode", 8: "double fault",
         13: "general protection", 14: "page fault", 17: "alignment check", 12: "stack fault"}


def function_at(path, addr: int) -> str:
    """``name+0xoff`` of the ELF function holding ``addr``, or "" (no symbols, or none there)."""
    try:
        with open(path, "rb") as f:
            syms = symbols(f.read())
    except (OSError, KvmpyError, ValueError):
        return ""
    for name, sym in syms.items():
        if sym.size and sym.value <= addr < sym.value + sym.size:
            return f"{name}+{addr - sym.value:#x}"
    return ""


def code(harness, outcome, regs, sregs) -> str:
    """The faulting code disassembled (the instruction at RIP marked), or for an ``out``
    exit the ``out`` itself and what follows."""
    mem = harness.machine.memory
    rip = regs.rip
    if outcome.vector is None and outcome.stop in ("done", "exit"):     # a report is an exit too
        found = exiting_instruction(decoder(mem, sregs), rip, "io-out")
        if "(at " in found:
            rip = int(found.rsplit("(at ", 1)[1].rstrip(")"), 16)
    try:
        return inspect.code_at(replace(regs, rip=rip), sregs, mem, CODE_LINES)
    except (ValueError, KvmpyError) as e:   # TranslationError: RIP does not map; not RAM
        return f"(no code at {rip:#x}: {e})"


def report(harness, outcome) -> str:
    """The outcome, the registers of the code the case ended in, and that code."""
    regs, sregs, note = context(harness, outcome)
    lines = [headline(outcome), f"exit: {outcome.exit:#x}" if outcome.exit is not None else "exit: none",
             f"stop: {outcome.stop}  edges: {outcome.edges}  time: {outcome.time * 1e3:.2f} ms", "",
             f"registers{' ' + note if note else ''}:"]
    lines += ["  " + line for line in regs.dump().splitlines()]
    lines.append(f"  cs={sregs.cs.selector:#x} (CPL {sregs.cs.selector & 3})  ss={sregs.ss.selector:#x}  "
                 f"cr2={sregs.cr2:#x}  cr3={sregs.cr3:#x}")
    where = function_at(harness.image_path, regs.rip)
    title = "the out that ended the case" if outcome.vector is None and outcome.stop in ("done", "exit") else "code"
    lines += ["", f"{title}{f' (in {where})' if where else ''}:"]
    lines += ["  " + line for line in code(harness, outcome, regs, sregs).splitlines()]
    return "\n".join(lines)


def inspection(harness, outcome) -> str:
    """``--inspect``: the full vCPU report (kvmpy.x86.inspect) of the code the case ended in."""
    regs, sregs, _ = context(harness, outcome)
    return inspect.report(regs, sregs, harness.machine.memory, title="the case's end (vCPU 0)")
