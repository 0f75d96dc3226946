"""An emulation failure names the instruction at RIP, not always int3 (issue 12b).

On kvm_pvm, ring-0 code is emulated and int3, xgetbv, clac, rdtscp, clwb and invpcid in
64-bit mode end in KVM_EXIT_INTERNAL_ERROR; a hardware host runs them (or raises #UD, which
without an IDT triple-faults). The message is checked only when the internal error happens.
"""
import pytest

import kvmpy
from kvmpy.errors import GuestError
from kvmpy.kvm.exits import InternalError
from kvmpy.vmm.vcpu_loop import internal_error_message

EMULATION = InternalError(1, ())


@pytest.mark.parametrize("name,code", [
    ("int3", "cc"), ("xgetbv", "31c9 0f01d0"), ("clac", "0f01ca"), ("rdtscp", "0f01f9")])
def test_the_message_names_the_instruction_that_failed(kvm_required, name, code):
    try:
        with kvmpy.Machine(mem_size=4 << 20) as m:
            m.load(bytes.fromhex(code + " e6f4"), format="raw", mode="long")    # then out 0xf4,al
            result = m.run(timeout=10)
    except GuestError as e:
        if e.reason != "internal-error":
            return                  # e.g. #UD without an IDT on a host that lacks the feature
        first = str(e).splitlines()[0]
        assert f"KVM could not emulate `{name}` at 0x" in first, first
        assert "--user" in first and "docs/host-notes.md" in first       # the advice stays
        if name != "int3":
            assert "could not emulate `int3`" not in first
        return
    assert result.reason == "exit"          # the host ran it


@pytest.mark.parametrize("line,expected", [
    ("=> 0x1234: 0f 01 d0                 xgetbv", "`xgetbv` at 0x1234"),
    ("=> 0x10: d8 c1                    fadd st(1)", "`fadd st(1)` at 0x10"),   # hex-looking mnemonic
    ("=> 0x10: ad                       lodsd eax, dword ptr [rsi]", "`lodsd eax, dword ptr [rsi]` at 0x10"),
    ("=> 0x20: 0f 01 fd e6  (not a valid 64-bit instruction)", "the instruction at 0x20 (bytes 0f 01 fd e6)"),
    ("(cannot read guest code: unmapped)", "the instruction at RIP"),
    ("", "the instruction at RIP"),
])
def test_the_message_reads_the_first_disassembled_line(line, expected):
    msg = internal_error_message(EMULATION, line + "\n   0x1237: 90  nop")
    assert msg.startswith(f"KVM could not emulate {expected} (internal error, emulation failure); ")


def test_other_internal_errors_keep_their_kind():
    msg = internal_error_message(InternalError(3, ()), "=> 0x1234: f4                       hlt")
    assert msg.startswith("KVM internal error (delivery_ev) on `hlt` at 0x1234; ")
