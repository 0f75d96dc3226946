"""Guest code as text: capstone disassembly in the guest's current mode.

Pure (bytes in, text out) and used by the inspector (x86/inspect.py) and the tracer
(debug/trace.py); capstone is imported on first use, so nothing pays for it until code is shown.
"""
from __future__ import annotations


def decode(code: bytes, addr: int, bits: int, count: int = 1) -> list[tuple[int, int, str]]:
    """Up to ``count`` instructions as (address, length, "mnemonic operands")."""
    try:
        import capstone
    except ImportError:
        return []
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    out = []
    for insn in capstone.Cs(capstone.CS_ARCH_X86, mode).disasm(code, addr):
        out.append((insn.address, insn.size, f"{insn.mnemonic} {insn.op_str}".strip()))
        if len(out) >= count:
            break
    return out


def disassemble(code: bytes, addr: int, bits: int, count: int = 6) -> str:
    """Up to ``count`` instructions of ``code`` (at guest address ``addr``), one per line.

    The first line is marked with ``=>``. If the first instruction cannot be decoded
    its bytes are shown as hex; decoding stops quietly at a later undecodable or
    truncated instruction (the caller reads a fixed-size window).
    """
    try:
        import capstone
    except ImportError:     # capstone is a dependency; keep errors readable without it
        return f"=> {addr:#x}: {code[:16].hex(' ')}  (install capstone to disassemble)"
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    lines = []
    for insn in md.disasm(code, addr):
        mark = "=>" if not lines else "  "
        lines.append(f"{mark} {insn.address:#x}: {insn.bytes.hex(' '):<24} {insn.mnemonic} {insn.op_str}".rstrip())
        if len(lines) >= count:
            break
    if not lines:
        lines.append(f"=> {addr:#x}: {code[:16].hex(' ')}  (not a valid {bits}-bit instruction)")
    return "\n".join(lines)
