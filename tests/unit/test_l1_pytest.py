"""The nested testbed's pytest step (tests/nested/l1_pytest.py): L2 Linux tests that fail are run
once more, and pass the step only if they pass then; any other failure fails it at once."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "nested" / "l1_pytest.py"
FLAKY = '''
import os
def test_boot():
    first = not os.path.exists("ran-once")
    open("ran-once", "w").close()
    assert not first, "L2 died (the emulator)"
def test_fine():
    pass
'''
BROKEN = "def test_broken():\n    assert False\n"


def step(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return subprocess.run([sys.executable, str(SCRIPT), "-p", "no:kvmpy", *files], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_a_linux_test_that_fails_once_passes_on_the_rerun(tmp_path):
    r = step(tmp_path, {"tests/integration/test_linux.py": FLAKY})
    assert r.returncode == 0, r.stdout
    assert "running them once more" in r.stdout
    assert "passed on the rerun: tests/integration/test_linux.py::test_boot" in r.stdout


def test_other_failures_are_not_run_again(tmp_path):
    r = step(tmp_path, {"tests/integration/test_linux.py": FLAKY, "tests/integration/test_guests.py": BROKEN})
    assert r.returncode == 1 and "once more" not in r.stdout


def test_a_linux_test_that_fails_twice_fails_the_step(tmp_path):
    r = step(tmp_path, {"tests/integration/test_linux_disk.py": BROKEN})
    assert r.returncode == 1 and "once more" in r.stdout and "passed on the rerun" not in r.stdout


def test_the_testbed_boots_l1_again_only_when_l1_itself_died():
    """L1's own kernel panic before its steps end is the emulator's: one more boot. A panic
    printed by an L2 (in a failing test's output) while L1 goes on to the end is not."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import testbed
    finally:
        sys.path.remove(str(SCRIPT.parent))
    died = testbed.Result()
    for line in ["@@kvmpy-l1 begin pytest t=30", "  | [  382.1] Kernel panic - not syncing: corrupted stack end"]:
        died.feed(line)
    assert died.l1_died and "corrupted stack end" in died.panic
    l2 = testbed.Result()
    for line in ["  | E   Kernel panic - not syncing: VFS", "@@kvmpy-l1 end pytest rc=1 t=40", "@@kvmpy-l1 done t=41"]:
        l2.feed(line)
    assert not l2.l1_died and "pytest (rc=1)" in l2.failures(["pytest"])
    assert testbed.L1_ATTEMPTS == 2
    for trouble in ("[  104.212456] BUG: scheduling while atomic: python3/291/0x00110001",
                    "[  363.767634] INFO: task khugepaged:36 blocked for more than 120 seconds."):
        wedged = testbed.Result()
        wedged.feed(trouble)
        assert wedged.l1_died and wedged.panic == trouble
    echoed = testbed.Result()                   # an L2's kernel line in a test's failure output
    echoed.feed("E         [    2.1] BUG: kernel NULL pointer dereference")
    assert not echoed.l1_died
