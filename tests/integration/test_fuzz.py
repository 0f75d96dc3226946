"""kvmpy.fuzz (docs/fuzzing.md): a case in, an Outcome out, the guest back at its checkpoint.

The fuzz-target guest (guests/fuzz-target.c, CPL 3) parses "FZ\\x01" + records and counts
its edges (gcc -fsanitize-coverage=trace-pc) into __fuzz_cov_map; its planted bugs: a 'K'
record "kvm!" writes through a wild pointer (#PF), 'U' ff ee runs ud2 (#UD), a bad 'A'
checksum reports 0x43, 'H' 0x77 spins. Each case exits 0x53 if it sees the previous
case's RAM (its canary set).
"""
import hashlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.fuzz import Harness, HarnessError
from kvmpy.images import guests
from kvmpy.loader.elfsym import symbols

DONE, ASSERT, STALE = 0x44, 0x43, 0x53
REPORTS = {ASSERT: "assert", STALE: "stale"}
BENIGN = b"FZ\x01S\x02abN\x00"
WILD = 0x7F0000000000                   # where the 'K' bug writes
SYMS = symbols(guests.path("fuzz-target").read_bytes())


def record(kind: bytes, payload: bytes) -> bytes:
    return kind + bytes([len(payload)]) + payload


@pytest.fixture(scope="module")
def harness():
    with Harness("fuzz-target", reports=REPORTS, timeout=0.5) as h:
        yield h


def ram_digest(h) -> str:
    return hashlib.sha256(h.machine.memory.read(0, h.machine.mem_size)).hexdigest()


def test_benign_input_is_not_a_crash(harness):
    o = harness.run(BENIGN)
    assert (o.crashed, o.kind, o.exit, o.stop) == (False, None, DONE, "done")
    assert o.edges > 0 and len(o.coverage) == SYMS["__fuzz_cov_map"].size
    assert o.time > 0


def test_page_fault_is_named_with_its_frame(harness):
    o = harness.run(b"FZ\x01" + record(b"N", b"x") + record(b"K", b"kvm!"))
    assert (o.crashed, o.kind, o.vector, o.stop) == (True, "#PF", 14, "exception")
    assert o.fault_address == WILD
    assert o.error_code & 0b110 == 0b110            # a write, from user mode (SDM 4.7)
    text_end = SYMS["__bss_start"].value
    assert SYMS["_start"].value <= o.fault_rip < text_end
    assert harness.run(BENIGN).exit == DONE         # the next case is fine


def test_invalid_opcode_assert_report_and_timeout(harness):
    ud = harness.run(b"FZ\x01" + record(b"U", b"\xff\xee"))
    assert (ud.crashed, ud.kind, ud.vector, ud.error_code) == (True, "#UD", 6, None)
    assert harness.run(b"FZ\x01" + record(b"A", b"\x05\x02\x03")).exit == DONE     # 2 + 3 == 5
    bad = harness.run(b"FZ\x01" + record(b"A", b"\x06\x02\x03"))
    assert (bad.crashed, bad.kind, bad.exit, bad.stop) == (True, "assert", ASSERT, "exit")
    hang = harness.run(b"FZ\x01" + record(b"H", b"\x77"))
    assert (hang.crashed, hang.kind, hang.exit, hang.stop) == (True, "timeout", None, "timeout")
    assert 0.5 <= hang.time < 5
    assert harness.run(BENIGN).exit == DONE


def test_without_the_idt_an_exception_is_a_triple_fault():
    with Harness("fuzz-target", exceptions=False) as h:
        o = h.run(b"FZ\x01" + record(b"K", b"kvm!"))
        assert (o.crashed, o.kind, o.vector, o.stop) == (True, "triple-fault", None, "guest-error")
        assert h.run(BENIGN).exit == DONE           # reset after a shutdown exit


def test_different_inputs_give_different_coverage(harness):
    """Each byte of the key that matches reaches one more block: the map grows with it."""
    maps = [harness.run(b"FZ\x01" + record(b"K", key)).coverage for key in (b"xxxx", b"kxxx", b"kvxx", b"kvmx")]
    edges = [len(c) - c.count(0) for c in maps]
    assert edges == sorted(edges) and len(set(edges)) == 4, edges
    assert len(set(maps)) == 4
    assert harness.run(b"").coverage != maps[0]


def test_input_bounds(harness):
    size = SYMS["fuzz_input"].size
    assert harness.run(b"FZ\x01" + b"N\x00" * ((size - 3) // 2)).exit == DONE
    with pytest.raises(ValueError, match="does not fit"):
        harness.run(bytes(size + 1))
    assert harness.run(bytes(size)).exit == DONE


def test_harness_setup_errors():
    with pytest.raises(HarnessError, match="neither a file nor a bundled guest"):
        Harness("no-such-guest")
    with pytest.raises(HarnessError, match="no symbol 'nope'"):
        Harness("fuzz-target", input="nope")
    with pytest.raises(HarnessError, match="needs its size"):
        Harness("fuzz-target", input=0x200000)
    with pytest.raises(HarnessError, match="not inside"):
        Harness("fuzz-target", input=0x200000, input_size=32 << 20)
    with pytest.raises(HarnessError, match="before its ready exit"):
        Harness("fuzz-target", ready=0x99, ready_timeout=2)    # the guest's first exit is 0x52


RECORDS = st.lists(st.tuples(st.sampled_from(b"NSAKUZ"), st.binary(max_size=6)), max_size=6).map(
    lambda rs: b"FZ\x01" + b"".join(bytes([t, len(p)]) + p for t, p in rs))
INPUTS = st.one_of(st.binary(max_size=64), RECORDS,
                   st.sampled_from([b"FZ\x01K\x04kvm!", b"FZ\x01U\x02\xff\xee"]))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=INPUTS)
def test_outcome_is_deterministic_and_the_checkpoint_comes_back(harness, data):
    """The same input twice gives the same outcome and map; after every case the guest's RAM
    and registers are the checkpoint's, and no case sees the last one's canary."""
    m = harness.machine
    before, regs = ram_digest(harness), m.vcpus[0].get_regs()
    first, second = harness.run(data), harness.run(data)
    key = lambda o: (o.crashed, o.kind, o.exit, o.stop, o.vector, o.error_code, o.fault_rip, o.fault_address, o.coverage)
    assert key(first) == key(second)
    assert first.exit != STALE and first.kind != "timeout"
    assert ram_digest(harness) == before
    assert m.vcpus[0].get_regs() == regs


RUNS = 6000                                 # about 4,400 are needed: 8-15 s on this host
HIT = bytes([0] + [1] * 255)              # a map entry -> 1 if the case hit it


def hits(coverage: bytes) -> int:
    """The map's hit entries as the bits of one integer (cheap to compare and merge)."""
    return int.from_bytes(coverage.translate(HIT), "little")


def byte_walk(harness, seed: bytes, budget: int):
    """A test's loop, not a fuzzer: take the newest kept input, try every value of every
    byte of it, keep each input that hits a map entry no input hit before; stop at the
    first crash other than the assert report, or after ``budget`` runs."""
    seen, corpus, queue, runs = hits(harness.run(seed).coverage), [seed], [seed], 1
    while queue:
        parent = queue.pop()
        for pos in range(len(parent)):
            for value in range(256):
                if value == parent[pos]:
                    continue
                if runs == budget:
                    return None, runs, corpus
                data = parent[:pos] + bytes([value]) + parent[pos + 1:]
                o = harness.run(data)
                runs += 1
                if o.crashed and o.kind != "assert":
                    return o, runs, corpus
                h = hits(o.coverage)
                if h & ~seen:
                    seen |= h
                    corpus.append(data)
                    queue.append(data)
    return None, runs, corpus


def test_a_coverage_guided_loop_finds_the_planted_page_fault(harness):
    """From a seed two key bytes short of the bug, the loop keeps the input that matches
    the third byte (new coverage: one more block of check_key) and from it finds the #PF."""
    o, runs, corpus = byte_walk(harness, b"FZ\x01K\x04kv??", RUNS)
    assert any(c[5:8] == b"kvm" for c in corpus), corpus
    assert o is not None, f"no crash in {runs} runs"
    assert (o.kind, o.fault_address) == ("#PF", WILD)
    print(f"found the #PF after {runs} runs; {len(corpus)} inputs kept")


def test_the_c_run_loop_gives_the_same_outcomes(harness):
    """native=True (the C run loop) gives the outcomes and maps of the default Python loop."""
    inputs = [BENIGN, b"FZ\x01" + record(b"K", b"kvm!"), b"FZ\x01" + record(b"U", b"\xff\xee"),
              b"FZ\x01" + record(b"A", b"\x06\x02\x03"), b"FZ\x01" + record(b"K", b"kvxx")]
    key = lambda o: (o.crashed, o.kind, o.exit, o.stop, o.vector, o.error_code, o.fault_rip, o.coverage)
    with Harness("fuzz-target", reports=REPORTS, timeout=0.5, native=True) as c:
        assert [key(c.run(d)) for d in inputs] == [key(harness.run(d)) for d in inputs]


def test_a_case_can_end_where_the_guest_reaches_an_address():
    """end_at: an int3 at fuzz_check_key (the 'K' record's check) ends the case there, not a crash;
    cases that never get there end as before, and an int3 the guest runs itself is still a crash."""
    key = SYMS["fuzz_check_key"].value
    with Harness("fuzz-target", reports=REPORTS, timeout=0.5, end_at="fuzz_check_key") as h:
        o = h.run(b"FZ\x01" + record(b"K", b"kvm!"))            # would be the #PF without end_at
        assert (o.crashed, o.kind, o.stop, o.reached) == (False, None, "address", key)
        assert o.edges > 0
        assert h.run(BENIGN).stop == "done"
        assert h.run(b"FZ\x01" + record(b"U", b"\xff\xee")).kind == "#UD"
        assert h.run(b"FZ\x01" + record(b"K", b"xyz")).reached == key      # any 'K' record gets there
        assert h.machine.memory.read(key, 1) == b"\xcc"                      # the int3 stays put after resets
    with pytest.raises(HarnessError, match="needs exceptions=True"):
        Harness("fuzz-target", exceptions=False, end_at=key)
    with pytest.raises(HarnessError, match="not inside"):
        Harness("fuzz-target", end_at=64 << 20)
    with pytest.raises(HarnessError, match="no symbol 'nowhere'"):
        Harness("fuzz-target", end_at=["nowhere"])
