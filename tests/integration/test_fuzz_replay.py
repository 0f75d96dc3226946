"""``kvmpy fuzz replay`` (docs/fuzzing.md): one input again from the checkpoint, explained:
the exception by name, the registers of the code that faulted, that code disassembled;
with --trace, --inspect and --gdb. The child kvmpy is the installed one (lab.CHILD_ENV)."""
import json
import re
import shutil
import subprocess
import sys

import pytest

from kvmpy.fuzz import Harness, replay

from . import lab
from .test_gdbstub import needs_execution_breakpoints, sock_path

PAGE_FAULT = b"FZ\x01K\x04kvm!"
ASSERT = b"FZ\x01A\x03\x05\x02\x02"      # 5 != 2 + 2
UD = b"FZ\x01U\x02\xff\xee"
BENIGN = b"FZ\x01S\x02ab"
WILD = 0x7F0000000000
ARGS = ["fuzz", "replay", "--report", "0x43=assert"]


def kvmpy(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True, env=lab.CHILD_ENV,
                          timeout=90, cwd="/", **kw)


@pytest.fixture(scope="module")
def fault_rip():
    with Harness("fuzz-target", reports={0x43: "assert"}) as h:
        return h.run(PAGE_FAULT).fault_rip


def case(tmp_path, data: bytes, name="case"):
    f = tmp_path / name
    f.write_bytes(data)
    return str(f)


def test_replay_shows_the_exception_the_faulting_registers_and_code(tmp_path, fault_rip):
    r = kvmpy(*ARGS, case(tmp_path, PAGE_FAULT))
    out = r.stdout.decode()
    assert r.returncode == 1, r
    assert out.startswith(f"crash: #PF (vector 14, page fault) rip={fault_rip:#x} address={WILD:#x}"), out
    assert f"rax={WILD:016x}" in out                         # the stub's saved RAX: the faulting code's
    assert f"rip={fault_rip:016x}" in out and "cs=0x23 (CPL 3)" in out
    assert re.search(rf"=> {fault_rip:#x}: [0-9a-f ]+mov qword ptr \[rax\], 0xdead", out), out
    assert not r.stderr


def test_replay_of_a_report_an_invalid_opcode_and_a_clean_case(tmp_path):
    r = kvmpy(*ARGS, case(tmp_path, ASSERT))
    out = r.stdout.decode()
    assert r.returncode == 1 and out.startswith("crash: assert\nexit: 0x43"), r
    assert "the out that ended the case" in out and re.search(r"=> 0x[0-9a-f]+: e6 f4 +out 0xf4, al", out), out
    r = kvmpy(*ARGS, "-", input=UD)
    assert r.returncode == 1 and re.search(r"=> 0x[0-9a-f]+: 0f 0b +ud2", r.stdout.decode()), r
    r = kvmpy(*ARGS, case(tmp_path, BENIGN))
    assert r.returncode == 0 and r.stdout.startswith(b"ok: exit 0x44\n"), r


def test_replay_trace_json_trace_and_inspect(tmp_path, fault_rip):
    trace = tmp_path / "trace.jsonl"
    r = kvmpy(*ARGS, "--trace-json", str(trace), "--inspect", case(tmp_path, PAGE_FAULT))
    assert r.returncode == 1, r
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert events and events[-1]["kind"] == "io-out" and events[-1]["addr"] == 0xF4
    assert events[-1]["data"] == "0e"                        # the #PF stub reports vector 14
    out = r.stdout.decode()
    assert "=== the case's end (vCPU 0) ===" in out and "== page walks ==" in out
    assert f"RIP {fault_rip:#x}" in out or f"{fault_rip:#x}" in out.split("== page walks ==")[1]
    r = kvmpy(*ARGS, "--trace", "exits", case(tmp_path, ASSERT))
    assert r.returncode == 1 and b"io-out" in r.stderr and b"port=0xf4" in r.stderr, r


def test_replay_errors_are_one_line_and_help_teaches(tmp_path):
    for argv, status, says in (
            ([str(tmp_path / "missing")], 2, b"cannot read the input: No such file or directory"),
            (["--report", "x", case(tmp_path, BENIGN, "a")], 2, b"--report takes VALUE=NAME"),
            (["--image", "no-such-guest", case(tmp_path, BENIGN, "b")], 4, b"neither a file nor a bundled guest"),
            (["--gdb", sock_path(), "--trace", "exits", case(tmp_path, BENIGN, "c")], 2, b"cannot be combined"),
            ([case(tmp_path, bytes(5000), "d")], 2, b"longer than the guest's 4096-byte buffer")):
        r = kvmpy(*ARGS, *argv)
        assert r.returncode == status and says in r.stderr and b"Traceback" not in r.stderr, (argv, r)
    r = kvmpy("fuzz", "replay", "--help")
    assert r.returncode == 0 and b"examples:" in r.stdout and b"hbreak" in r.stdout and b"--trace" in r.stdout
    r = kvmpy("fuzz", "replay")
    assert r.returncode == 2 and b"INPUT" in r.stderr


def test_replay_gdb_nobody_comes_the_case_runs_on_its_own(tmp_path, fault_rip):
    r = kvmpy(*ARGS, "--gdb", sock_path(), "--gdb-wait", "0.5", case(tmp_path, PAGE_FAULT))
    assert r.returncode == 1 and r.stdout.startswith(b"crash: #PF"), r
    err = r.stderr.decode()
    assert "first run: crash: #PF" in err and f"hbreak *{fault_rip:#x}" in err
    assert "no debugger connected within 0.5 s" in err


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_replay_under_gdb_stops_before_the_fault(tmp_path):
    """--ring0: on kvm_pvm hosts breakpoints do not stop CPL-3 code (the note says so)."""
    needs_execution_breakpoints()
    with Harness("fuzz-target", user=False) as h:
        rip = h.run(PAGE_FAULT).fault_rip
    path = sock_path()
    vmm = subprocess.Popen([sys.executable, "-m", "kvmpy", *ARGS, "--ring0", "--gdb", path,
                            case(tmp_path, PAGE_FAULT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=lab.CHILD_ENV, cwd="/")
    try:
        assert vmm.stderr.readline().startswith(b"first run: crash: #PF")
        assert b"waiting for gdb on " + path.encode() in vmm.stderr.readline()
        g = subprocess.run(["gdb", "-batch", "-nx", "-ex", "set architecture i386:x86-64",
                            "-ex", f"target remote {path}", "-ex", f"hbreak *{rip:#x}", "-ex", "continue",
                            "-ex", "info registers rip rax", "-ex", "continue"],
                           capture_output=True, text=True, timeout=60)
        out, _ = vmm.communicate(timeout=60)
    finally:
        if vmm.poll() is None:
            vmm.kill()
    assert re.search(rf"rip\s+{rip:#x}", g.stdout) and re.search(rf"rax\s+{WILD:#x}", g.stdout), g
    assert vmm.returncode == 1 and out.startswith(b"crash: #PF"), out


def test_harness_replay_leaves_the_end_to_look_at_and_reset_brings_the_checkpoint_back():
    with Harness("fuzz-target", reports={0x43: "assert"}) as h:
        o = h.replay(PAGE_FAULT)
        regs, sregs, note = replay.context(h, o)
        assert (regs.rip, regs.rax, sregs.cs.selector & 3, note) == (o.fault_rip, WILD, 3, "")
        assert h.machine.vcpus[0].get_regs().rip != o.fault_rip     # the machine sits in the trap stub
        h.reset()
        assert h.run(BENIGN).exit == 0x44                          # the next case starts clean
        assert h.run(PAGE_FAULT).fault_rip == o.fault_rip
