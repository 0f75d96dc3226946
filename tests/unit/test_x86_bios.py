"""The BIOS reset entry (kvmpy/x86/bios.py), read back by a disassembler in real mode."""
import pytest

from kvmpy.x86 import bios
from kvmpy.x86.disasm import decode


def text(code: bytes) -> list[str]:
    return [t for _, _, t in decode(code, 0xFFF0, 16, count=16)]


def test_the_reset_entry_writes_the_rcr_then_pulses_the_i8042_then_halts():
    code = bios.reset_entry(0xCF9, 0x60)
    assert len(code) == 16 and bios.RESET_ENTRY + len(code) == 1 << 20
    assert text(code)[:8] == ["mov dx, 0xcf9", "mov al, 6", "out dx, al", "mov al, 0xfe", "out 0x64, al",
                              "cli", "hlt", "jmp 0xfffb"]


@pytest.mark.parametrize("reset_port, i8042_port, first", [(None, 0x60, "mov al, 0xfe"), (0xCF9, None, "mov dx, 0xcf9"),
                                                           (None, None, "cli")])
def test_the_reset_entry_uses_what_the_machine_has(reset_port, i8042_port, first):
    code = bios.reset_entry(reset_port, i8042_port)
    assert len(code) == 16 and text(code)[0] == first and "hlt" in text(code)
