"""kvmpy's pytest plugin where KVM is missing (docs/pytest.md): the ``kvm`` marker and the
machine fixtures skip with the reason, or fail with KVMPY_REQUIRE_KVM=1; the plugin itself
imports nothing heavy. "Missing" is simulated with KVMPY_KVM_DEVICE naming a path that does
not exist, so these run on any host (pytester, in a child process)."""
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import pluginrun  # noqa: E402

pytest_plugins = ["pytester"]

PROJECT = pluginrun.HEADER + '''
from kvmpy.testing import machine_fixture
vm = machine_fixture("reset-case", ready=0x52)
'''
TESTS = '''
import pytest

@pytest.mark.kvm
def test_marked():
    raise AssertionError("a kvm test ran without KVM")

def test_with_a_machine(vm):
    raise AssertionError("a machine without KVM")

def test_plain():
    pass
'''
HIDDEN = {"KVMPY_KVM_DEVICE": "/nonexistent/kvm"}
WHY = "/nonexistent/kvm is not usable: No such file or directory"


def project(pytester):
    pytester.makeconftest(PROJECT)
    pytester.makepyfile(test_k=TESTS)


def test_without_kvm_the_marked_tests_skip_with_the_reason(pytester, monkeypatch):
    project(pytester)
    result = pluginrun.run(pytester, monkeypatch, "-rs", env={**HIDDEN, "KVMPY_REQUIRE_KVM": None})
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines([f"SKIPPED [[]2[]] *{WHY} (kvmpy; KVMPY_REQUIRE_KVM=1 makes this a failure)"])


def test_with_kvmpy_require_kvm_they_fail_instead(pytester, monkeypatch):
    project(pytester)
    result = pluginrun.run(pytester, monkeypatch, env={**HIDDEN, "KVMPY_REQUIRE_KVM": "1"})
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines([f"*KVMPY_REQUIRE_KVM=1 but {WHY}*"])
    assert "a kvm test ran without KVM" not in result.stdout.str()


def test_the_marker_is_registered(pytester, monkeypatch):
    project(pytester)
    result = pluginrun.run(pytester, monkeypatch, "--markers", session=False)
    result.stdout.fnmatch_lines(["@pytest.mark.kvm: needs a usable KVM device*KVMPY_REQUIRE_KVM=1*"])


def test_the_plugin_imports_nothing_heavy():
    """pytest imports it in every run of every project where kvmpy is installed."""
    code = ("import sys, pytest; before = set(sys.modules); import kvmpy.testing.plugin; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    env = {**os.environ, "PYTHONPATH": pluginrun.PKG_PARENT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                         check=True).stdout.split()
    assert out == ["kvmpy", "kvmpy.testing", "kvmpy.testing.fixtures", "kvmpy.testing.kvmcheck",
                   "kvmpy.testing.plugin"]
