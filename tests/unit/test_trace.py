"""Trace helpers that need no KVM: filters and finding the instruction behind an exit."""
from kvmpy.debug.trace import exiting_instruction, parse_filter


def test_parse_filter_ranges():
    """Port and address filters accept one value or an inclusive LO-HI range, in any base."""
    assert parse_filter("0x3f8") == (0x3F8, 0x3F8)
    assert parse_filter("0x3f8-0x3ff") == (0x3F8, 0x3FF)
    assert parse_filter("96-100") == (96, 100)
    assert parse_filter(None) is None


def test_out_is_found_behind_rip():
    """For OUT, KVM has stepped RIP past the instruction: the tracer finds the OUT ending at RIP."""
    code = {0x10: [(0x10, 1, "nop")], 0x11: [(0x11, 2, "out 0xe9, al")], 0x12: [(0x12, 1, "hlt")]}
    got = exiting_instruction(lambda a: code.get(a, []), 0x13, "io-out")
    assert got == "out 0xe9, al  (at 0x11)"


def test_in_is_at_rip():
    """For IN and MMIO, RIP still points at the instruction."""
    code = {0x20: [(0x20, 2, "in al, 0x60")]}
    assert exiting_instruction(lambda a: code.get(a, []), 0x20, "io-in") == "in al, 0x60"
    assert exiting_instruction(lambda a: [], 0x20, "mmio-read") == ""
