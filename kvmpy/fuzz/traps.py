"""Naming a guest's CPU exception: an IDT whose every gate reports its vector and stops.

kvmpy boots a guest without an IDT, so any exception ends in a triple fault, and
KVM_EXIT_SHUTDOWN does not say which exception began it. A harness wants the name
("#PF at 0x10050c"), so before the guest's ready point it installs a 64-bit IDT (SDM
vol. 3, 6.14.1: 16-byte interrupt gates) whose gate v points at a stub in ring 0:

    mov $v, %al ; out %al, $0xf4 ; jmp .

The ``out`` to isa-debug-exit stops the run with RIP just after it, inside the stub
page: RIP says which vector it was, unlike the exit status, which a guest could also
write. The CPU has pushed the exception frame on the TSS's RSP0 stack (the guest runs
at CPL 3): the error code (for the vectors that have one), RIP, CS, RFLAGS, RSP, SS.
The other registers are the faulting code's, except RAX, which the stub needs for its
``out``: it first stores RAX at ``SAVED_RAX`` (``movabs %rax, SAVED_RAX``, 10 bytes), so
``kvmpy fuzz replay`` shows the faulting context whole. A stub is 16 bytes:

    movabs %rax, SAVED_RAX ; mov $v, %al ; out %al, $0xf4 ; jmp .

Gate 3 (#BP) alone has DPL 3, so an ``int3`` at CPL 3 reaches its stub instead of raising #GP:
a harness ends a case where the guest reaches an address by writing an ``int3`` there
(``Harness(end_at=...)``); the stub's frame then holds that address plus one.

The IDT and stubs live at ``layout.FUZZ_TRAPS``, a page the boot tables leave free.
A guest at CPL 3 can write them (its identity map is user-accessible): a guest that
does only confuses its own harness, and the reset puts them back for the next case.
Pure: bytes in, bytes out.
"""
from __future__ import annotations

import struct

from ..x86 import layout

VECTORS = 32
GATE = struct.Struct("<HHBBHII")          # offset 15:0, selector, IST, type/attr, 31:16, 63:32, 0
GATE_INTERRUPT_DPL0 = 0x8E               # present, DPL 0, 64-bit interrupt gate
GATE_INTERRUPT_DPL3 = 0xEE               # the same, reachable by int3 from CPL 3
INT3 = b"\xCC"
STUB_SIZE = 16
IDT_BASE = layout.FUZZ_TRAPS
STUBS = layout.FUZZ_TRAPS + VECTORS * GATE.size
SAVED_RAX = STUBS + VECTORS * STUB_SIZE  # where a stub stores the faulting code's RAX (8 bytes)
OUT_END = 14                             # RIP after the stub's out: stub + 14
FRAME = struct.Struct("<QQQQQ")          # what the CPU pushed after any error code: RIP CS RFLAGS RSP SS

#: the SDM's mnemonics (vol. 3, table 6-1)
NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
         10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
         19: "#XM", 20: "#VE", 21: "#CP", 28: "#HV", 29: "#VC", 30: "#SX"}
WITH_ERROR_CODE = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}
PF = 14
BP = 3

assert SAVED_RAX + 8 <= layout.FUZZ_TRAPS + layout.FUZZ_TRAPS_SIZE


def name(vector: int) -> str:
    return NAMES.get(vector, f"vector {vector}")


def tables(port: int = layout.DEBUG_EXIT_PORT) -> tuple[int, bytes, int]:
    """(IDT base, the IDT followed by the stubs, the IDT limit for ``sregs.idt``)."""
    idt, stubs = bytearray(), bytearray()
    for v in range(VECTORS):
        at = STUBS + v * STUB_SIZE
        kind = GATE_INTERRUPT_DPL3 if v == BP else GATE_INTERRUPT_DPL0
        idt += GATE.pack(at & 0xFFFF, layout.SEL_CODE64, 0, kind, (at >> 16) & 0xFFFF, at >> 32, 0)
        stubs += b"\x48\xA3" + struct.pack("<Q", SAVED_RAX) + bytes([0xB0, v, 0xE6, port, 0xEB, 0xFE])
    return IDT_BASE, bytes(idt + stubs + bytes(8)), len(idt) - 1


def install(machine, port: int = layout.DEBUG_EXIT_PORT) -> None:
    """Write the IDT and its stubs into ``machine``'s RAM and point vCPU 0's IDTR at them."""
    base, blob, limit = tables(port)
    machine.memory.write(base, blob)
    s = machine.vcpus[0].get_sregs()
    s.idt = type(s.idt)(base=base, limit=limit)
    machine.vcpus[0].set_sregs(s)


def vector_at(rip: int) -> int | None:
    """The vector whose stub stops at ``rip``, or None when ``rip`` is no stub's."""
    off = rip - STUBS - OUT_END
    if 0 <= off < VECTORS * STUB_SIZE and off % STUB_SIZE == 0:
        return off // STUB_SIZE
    return None


def frame(vector: int, stack: bytes) -> tuple[int | None, int]:
    """(error code or None, faulting RIP) from the 16 bytes at the handler's RSP."""
    first, second = struct.unpack_from("<QQ", stack)
    return (first, second) if vector in WITH_ERROR_CODE else (None, first)


def context(vector: int, stack: bytes) -> dict:
    """The interrupted code's rip, cs, rflags, rsp and ss from the ``FRAME.size + 8`` bytes
    at the handler's RSP (the error code first, for the vectors that have one)."""
    skip = 8 if vector in WITH_ERROR_CODE else 0
    return dict(zip(("rip", "cs", "rflags", "rsp", "ss"), FRAME.unpack_from(stack, skip)))
