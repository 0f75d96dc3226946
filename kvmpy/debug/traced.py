"""A vCPU loop's dispatch with a tracer watching: every exit reported, replays fed back.

``traced(loop, tracer)`` wraps a ``VcpuLoop`` (kvmpy/vmm/vcpu_loop.py): the wrapper
calls the loop's own ``dispatch`` and then tells the tracer (after, so an IN shows
what the guest received). When single-stepping, a debug exit is a step: it is reported
and the run goes on. A ``Replayer`` answers INs and MMIO reads from the recording
instead of the devices. The vmm layer never imports this module: the Machine's
``run(trace=...)`` hands the tracer a loop and uses what ``tracer.wrap`` returns.
"""
from __future__ import annotations

from ..errors import GuestMemoryError
from ..kvm import exits
from ..x86 import inspect, modes
from .disasm import decode
from .trace import KINDS, Replayer, exiting_instruction


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
        stats.exits["io-in"] += 1
        vcpu.complete_io_in(ex, bytes.fromhex(ev["data"]))
    elif isinstance(ex, exits.MmioRead):
        stats.exits["mmio-read"] += 1
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
