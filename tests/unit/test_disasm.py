"""Human-facing diagnostics: disassembly at RIP (disasm.py) and run statistics (stats.py).

Stats tests live here too because they are the other half of what a failure report
prints; move them to test_stats.py if that file is ever created.
"""
import json
import re
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.x86.disasm import disassemble
from kvmpy.vmm.stats import Stats

capstone = pytest.importorskip("capstone")


def instructions(text: str) -> list[tuple[str, int, str]]:
    """Parse disassemble() output into (marker, address, 'mnemonic operands')."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^(=>|  ) (0x[0-9a-f]+): ((?:[0-9a-f]{2} ?)+?)\s{2,}(\S.*)$", line)
        assert m, f"unparseable line: {line!r}"
        out.append((m.group(1), int(m.group(2), 16), " ".join(m.group(4).split())))
    return out


# --- disassembly --------------------------------------------------------------------

def test_16_bit_hello_real_decodes():
    """b0 2a e6 e9 f4 in 16-bit mode is mov al, 0x2a / out 0xe9, al / hlt at consecutive addresses."""
    got = instructions(disassemble(b"\xb0\x2a\xe6\xe9\xf4", 0x7C00, 16))
    assert got == [("=>", 0x7C00, "mov al, 0x2a"), ("  ", 0x7C02, "out 0xe9, al"), ("  ", 0x7C04, "hlt")]


def test_32_bit_decodes_with_32_bit_operands():
    """b8 imm32 is mov eax in 32-bit mode but mov ax + a stray imm16 in 16-bit mode."""
    code = b"\xb8\x2a\x00\x00\x00\xf4"
    got32 = instructions(disassemble(code, 0x100000, 32))
    assert got32 == [("=>", 0x100000, "mov eax, 0x2a"), ("  ", 0x100005, "hlt")]
    got16 = instructions(disassemble(code, 0x100000, 16))
    assert got16[0] == ("=>", 0x100000, "mov ax, 0x2a")


def test_64_bit_decodes_rex_prefix():
    """48 c7 c0 imm32 is mov rax in 64-bit mode, while 32-bit mode reads 0x48 as dec eax."""
    code = b"\x48\xc7\xc0\x2a\x00\x00\x00\xf4"
    assert instructions(disassemble(code, 0x100000, 64)) == [
        ("=>", 0x100000, "mov rax, 0x2a"), ("  ", 0x100007, "hlt")]
    assert instructions(disassemble(code, 0x100000, 32))[0] == ("=>", 0x100000, "dec eax")


def test_only_the_first_line_is_marked():
    """Exactly one line carries '=>' and it is the first."""
    lines = disassemble(b"\x90" * 5, 0x1000, 64).splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("=>")
    assert not any(line.startswith("=>") for line in lines[1:])


@pytest.mark.parametrize("count", [1, 3, 6])
def test_count_limits_the_number_of_lines(count):
    """At most ``count`` instructions are shown even if more bytes decode."""
    assert len(disassemble(b"\x90" * 20, 0, 32, count=count).splitlines()) == count


@pytest.mark.parametrize("code,bits", [
    (b"\x06", 64), (b"\xff\xff", 64), (b"\x0f\x04", 32), (b"\xf0\x90", 16), (b"", 16)])
def test_invalid_bytes_give_a_readable_line(code, bits):
    """Undecodable (or no) bytes give one '=>' line with the address, hex and the mode, not an exception."""
    text = disassemble(code, 0xFFF0, bits)
    assert len(text.splitlines()) == 1
    assert text.startswith("=> 0xfff0:")
    assert code.hex(" ") in text
    assert f"{bits}-bit" in text


def test_valid_prefix_before_invalid_bytes_is_still_shown():
    """A decodable instruction followed by garbage shows the instruction rather than failing."""
    got = instructions(disassemble(b"\xf4\x06\x06", 0x10, 64))
    assert got[0] == ("=>", 0x10, "hlt")


def test_long_input_shows_at_most_16_bytes_of_hex():
    """The fallback line is bounded: at most 16 bytes of hex, however much was passed."""
    text = disassemble(b"\x06" * 1000, 0, 64)
    assert text.count("06") == 16


@given(code=st.binary(max_size=64), addr=st.integers(0, (1 << 64) - 64), bits=st.sampled_from([16, 32, 64]))
@settings(max_examples=200, deadline=None)
def test_random_bytes_never_raise(code, addr, bits):
    """Any bytes in any mode give at least one line, the first marked '=>' at ``addr``."""
    text = disassemble(code, addr, bits)
    lines = text.splitlines()
    assert 1 <= len(lines) <= 6
    assert lines[0].startswith(f"=> {addr:#x}:")


# --- stats --------------------------------------------------------------------------

def sample_stats() -> Stats:
    return Stats(exits=Counter({"IoOut": 40, "Hlt": 1, "MmioWrite": 3}),
                 devices=Counter({"com1": 39, "debug-exit": 1}),
                 unclaimed_writes=2, kvm_ns=3_000_000_000, vmm_ns=1_000_000_000)


def test_stats_str_lists_exits_and_devices_with_counts():
    """str(Stats) shows the total, each exit reason and each device with its count, busiest first."""
    text = str(sample_stats())
    assert re.search(r"exits: 44\b", text)
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(\S+)\s+(\d+)$", text, re.M)}
    assert counts == {"IoOut": 40, "Hlt": 1, "MmioWrite": 3, "com1": 39, "debug-exit": 1}
    assert text.index("IoOut") < text.index("MmioWrite") < text.index("Hlt")
    assert text.index("Hlt") < text.index("com1"), "devices come after exit reasons"
    assert "unclaimed writes dropped: 2" in text


def test_stats_str_reports_time_split():
    """The time line gives total seconds and the KVM_RUN vs VMM percentages."""
    text = str(sample_stats())
    assert "4.000 s" in text
    assert "75.0% in KVM_RUN" in text and "25.0% in the VMM" in text


def test_empty_stats_str_is_just_zero_exits():
    """A fresh Stats prints 'exits: 0' and no device, time or per-exit lines (no division by zero)."""
    assert str(Stats()) == "exits: 0"
    assert "per exit" not in str(Stats(vmm_ns=5))


def test_stats_as_dict_round_trips_and_is_json():
    """as_dict() holds every counter; a Stats rebuilt from it is equal; it serialises to JSON."""
    s = sample_stats()
    d = json.loads(json.dumps(s.as_dict()))
    assert d["total_exits"] == 44 == s.total_exits
    rebuilt = Stats(exits=Counter(d["exits"]), devices=Counter(d["devices"]),
                    unclaimed_writes=d["unclaimed_writes"], kvm_ns=d["kvm_ns"], vmm_ns=d["vmm_ns"])
    assert rebuilt == s
    assert rebuilt.as_dict() == s.as_dict()


def test_stats_svg_draws_every_reason_and_device():
    """Stats.to_svg is well-formed SVG with a labelled bar for each exit reason and device and the time split."""
    import xml.etree.ElementTree as ET
    from collections import Counter
    from kvmpy.vmm.stats import Stats
    s = Stats(exits=Counter({"io-out": 40, "mmio-write": 3}), devices=Counter({"com1": 40, "virtio-blk0": 3}),
              kvm_ns=900, vmm_ns=100)
    root = ET.fromstring(s.to_svg("t <&>"))
    texts = [e.text for e in root.iter("{http://www.w3.org/2000/svg}text")]
    assert {"io-out", "mmio-write", "com1", "virtio-blk0", "40", "3", "t <&>"} <= set(texts)
    assert any(t and t.startswith("KVM_RUN (guest + kernel) 90.0%") for t in texts)
    bars = [e for e in root.iter("{http://www.w3.org/2000/svg}rect") if e.get("fill") == "#4a7fb5"]
    assert len(bars) == 4 and max(int(b.get("width")) for b in bars) == 380


def test_stats_split_guest_and_kernel_time_when_the_host_accounts_it():
    """With guest time accounted, --stats splits KVM_RUN time into guest and kernel; without, it says so."""
    from kvmpy.vmm.stats import Stats
    s = Stats(kvm_ns=800, vmm_ns=200, guest_ns=600)
    assert "of which guest 60.0%, kernel 20.0%" in str(s)
    assert "not accounted" in str(Stats(kvm_ns=800, vmm_ns=200))
