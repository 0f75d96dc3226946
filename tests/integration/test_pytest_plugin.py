"""kvmpy's pytest plugin (kvmpy.testing, docs/pytest.md) in a project that uses it.

A made-up project's conftest defines ``vm = machine_fixture("reset-case", ready=0x52, ...)``;
its first test dirties RAM (guest and host writes), registers, COM1 (output and input), the
RTC's CMOS and a disk sector; the next test finds every one of them as the checkpoint had
them. A failing test's report carries the guest's serial output and a register report; a guest
that never gets ready fails its first test with its output, and the next at once.
"""
import json
import os
import subprocess
import sys

import pytest

from . import lab

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import pluginrun  # noqa: E402
from pluginrun import HEADER  # noqa: E402

pytest_plugins = ["pytester"]

CONFTEST = HEADER + '''
import hashlib, os, struct
import pytest
from kvmpy.testing import machine_fixture

MAILBOX = 0x300000
vm = machine_fixture("reset-case", ready=0x52, mem_size=16 << 20, disks=[256 << 10])
wrong = machine_fixture("reset-case", ready=0x99, mem_size=16 << 20)      # its first exit is 0x52


def observe(m):
    """RAM, vCPU registers, every device's state and the disk as the guest reads it."""
    v = m.vcpus[0]
    return {"ram": hashlib.sha256(m.memory.read(0, m.mem_size)).hexdigest(), "regs": v.get_regs(),
            "sregs": v.get_sregs(), "xsave": v.get_xsave(), "devices": m.platform.save_state(),
            "disk": os.pread(m.reset_point.overlays[0].fd, 256 << 10, 0)}


def case(m, pages=40, seed=9, serial=12, sector=3, cmos=1, regs=1):
    m.memory.write(MAILBOX, struct.pack("<8Q", pages, 5, 3, seed, serial, sector, cmos, regs))
    r = m.run(timeout=10)
    assert (r.reason, r.status) == ("exit", (0x44 << 1) | 1), m.serial_output


@pytest.fixture(scope="session")
def seen():
    return {}
'''

TESTS = '''
from conftest import case, observe

def test_a_dirties_everything(vm, seen):
    seen["start"] = start = observe(vm)
    vm.memory.write(0x500000, b"host was here")
    vm.feed_serial(b"typed")
    case(vm)
    now = observe(vm)
    changed = sorted(k for k in start if start[k] != now[k])
    assert changed == ["devices", "disk", "ram", "regs", "xsave"]
    assert vm.serial_output == b"jklmnopqrstu"
    assert vm.stats.exits

def test_b_finds_the_checkpoint(vm, seen):
    now = observe(vm)
    assert [k for k in now if now[k] != seen["start"][k]] == []
    assert vm.serial_output == b"" and not vm.stats.exits
    assert vm.memory.read(0x500000, 13) == bytes(13)

def test_c_fails_on_purpose(vm):
    case(vm, seed=2, serial=6)
    assert vm.serial_output == b"nothing"

def test_d_after_a_failure_and_a_closed_machine(vm):
    case(vm, serial=0)
    vm.close()

def test_e_gets_a_machine_booted_anew(vm, seen):
    assert observe(vm)["ram"] == seen["start"]["ram"]

def test_f_never_ready(wrong):
    pass

def test_g_never_ready_again(wrong):
    pass
'''


def test_each_test_gets_the_checkpoint_and_a_failure_reports_serial_and_registers(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_isolation=TESTS)
    result = pluginrun.run(pytester, monkeypatch, "-v")
    result.assert_outcomes(passed=4, failed=1, errors=2)
    result.stdout.fnmatch_lines([
        "*test_a_dirties_everything PASSED*", "*test_b_finds_the_checkpoint PASSED*",
        "*test_c_fails_on_purpose FAILED*", "*test_e_gets_a_machine_booted_anew PASSED*"])
    result.stdout.fnmatch_lines([                 # the failure's sections, in its report
        "*AssertionError*", "*- kvmpy serial: vm -*", "cdefgh", "*- kvmpy registers: vm -*",
        "machine 'vm': booted in * ms (1x), lent to 3 test(s), reset in place before each",
        "=== vCPU 0 ===", "*long mode (64-bit), CPL 3*", "*rax=0000000000000044*", "== code at 0x*"])
    assert result.stdout.str().count("- kvmpy serial: vm -") == 1      # the passing tests have none
    result.stdout.fnmatch_lines([          # a guest that never gets ready: its end and output, then at once
        "*BootError: the guest did not reach its ready point: its run ended with exit status 0xa5, "
        "expected exit status 0x133 (value 0x99); serial output:", "*reset-case: ready",
        "*BootError: the machine did not boot for an earlier test: BootError: the guest did not reach*"])


@pytest.mark.parametrize("scope", ["module", "session"])
def test_a_machine_boots_once_per_scope_and_params_make_one_each(pytester, monkeypatch, scope):
    pytester.makeconftest(HEADER + f'''
import pytest
from kvmpy.testing import machine_fixture
box = machine_fixture(None, mem_size=1 << 20, scope={scope!r}, params=[{{}}, {{"native": False}}], ids=["c", "py"])
built = []

@pytest.fixture
def seen(box):
    built.append(box)              # kept alive: each machine's id() stays its own
    return built
''')
    code = '''
def test_{0}_{1}(box, seen):
    box.load(bytes.fromhex("b0{1:02x} e6f4"), format="raw", mode="real")
    assert box.run(timeout=10).status == ({1} << 1) | 1
'''
    for mod in ("one", "two"):
        pytester.makepyfile(**{f"test_{mod}": "".join(code.format(mod, v) for v in (1, 2, 3))})
    pytester.makepyfile(test_z_count=f'''
from conftest import built
def test_count():
    assert len({{id(m) for m in built}}) == {4 if scope == "module" else 2}, built
''')
    pluginrun.run(pytester, monkeypatch).assert_outcomes(passed=13)


def test_the_benchmark_runs(tmp_path):
    """benchmarks/pytest_plugin.py (docs/pytest.md's figures) at a tiny size: its JSON's shape."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "pytest_plugin.py")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, script, "--tests", "2", "--out", str(out)], capture_output=True, text=True,
                       env=lab.CHILD_ENV, cwd="/", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    for order in ("grouped", "interleaved"):
        assert len(res[order]["samples_ms"]["plugin"]) == len(res[order]["samples_ms"]["fresh"]) == 2
        assert res[order]["ratio_plugin_over_fresh"] > 0
