"""KVMPY_FUZZ=N (tests/conftest.py) multiplies every hypothesis test's max_examples, those that
set their own with @settings included, once per test however many parametrized items share it;
a factor below 1 thins them out, leaving at least one."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).parents[1] / "conftest.py"

TESTS = '''
import pytest
from hypothesis import given, settings, strategies as st

@settings(max_examples=7, database=None)
@given(st.integers())
def test_explicit(x):
    pass

@settings(database=None)
@given(st.integers())
def test_default(x):
    pass

@pytest.mark.parametrize("p", [1, 2])
@settings(max_examples=5, database=None)
@given(st.integers())
def test_parametrized(p, x):
    pass
'''


def examples(tmp_path, fuzz: str | None) -> tuple[int, dict[str, int]]:
    """Run TESTS under the real conftest; (exit code, {test id: passing examples})."""
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_switch.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k != "KVMPY_FUZZ"}
    if fuzz is not None:
        env["KVMPY_FUZZ"] = fuzz
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
                        "--hypothesis-show-statistics", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    # "N passing examples" (hypothesis < 6.16x) or "N passing, 0 failing, ..." (newer)
    found = re.findall(r"::(\S+):\n.*?(\d+) passing\b", r.stdout, re.S)
    return r.returncode, {name: int(n) for name, n in found}


def test_without_the_switch_tests_run_their_own_counts(tmp_path):
    rc, got = examples(tmp_path, None)
    assert rc == 0 and got == {"test_explicit": 7, "test_default": 100,
                               "test_parametrized[1]": 5, "test_parametrized[2]": 5}


def test_the_switch_multiplies_every_count(tmp_path):
    rc, got = examples(tmp_path, "3")
    assert rc == 0 and got == {"test_explicit": 21, "test_default": 300,
                               "test_parametrized[1]": 15, "test_parametrized[2]": 15}


def test_a_fraction_thins_every_count_out_but_keeps_one(tmp_path):
    rc, got = examples(tmp_path, "0.1")
    assert rc == 0 and got == {"test_explicit": 1, "test_default": 10,
                               "test_parametrized[1]": 1, "test_parametrized[2]": 1}


@pytest.mark.parametrize("bad", ["0", "-2", "x", "nan", "inf"])
def test_a_bad_value_is_a_usage_error(tmp_path, bad):
    rc, _ = examples(tmp_path, bad)
    assert rc == pytest.ExitCode.USAGE_ERROR
