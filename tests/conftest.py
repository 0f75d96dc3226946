"""Shared test configuration.

kvmpy's pytest plugin (kvmpy.testing) is active: loaded through its entry point where kvmpy
is installed, by ``pytest_plugins`` below where the checkout runs uninstalled.

Integration tests need a usable /dev/kvm and the compiled extension. Without them
they are skipped, except when KVMPY_REQUIRE_KVM=1 (as in CI), where a missing KVM
is a failure: CI must never pass by skipping everything.

A longer fuzz campaign on demand: ``KVMPY_FUZZ=N`` multiplies the ``max_examples`` of
every hypothesis test by N, including tests that set their own with ``@settings``
(which a settings profile cannot override). ``--hypothesis-show-statistics`` reports
how many examples each test ran.
"""
import importlib.util
import os
import shutil
import subprocess
from importlib.metadata import entry_points

import pytest

REQUIRE_KVM = os.environ.get("KVMPY_REQUIRE_KVM") == "1"
PLUGIN = "kvmpy.testing.plugin"


def plugin_installed() -> bool:
    """Does pytest load kvmpy's plugin by itself (kvmpy installed with its pytest11 entry point)?"""
    return any(ep.value == PLUGIN for ep in entry_points(group="pytest11"))


def plugin_here() -> bool:
    """Is there a kvmpy with the plugin to load (not an older kvmpy, as where a test copies this
    conftest into a project of its own)?"""
    try:
        return importlib.util.find_spec(PLUGIN) is not None
    except ImportError:
        return False


# kvmpy's plugin (docs/pytest.md) for the suite's own machine fixtures: installed, pytest loads it
# through the entry point; run from a checkout without installing, this conftest loads it.
pytest_plugins = [PLUGIN] if not plugin_installed() and plugin_here() else []


def kvm_problem() -> str | None:
    """Why KVM tests cannot run here, or None if they can."""
    try:
        import kvmpy._native  # noqa: F401
    except ImportError as e:
        return f"kvmpy._native is not built ({e}); run 'pip install .' or 'python csrc/build.py'"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm is not usable: {e.strerror}"
    os.close(fd)
    return None


_PROBLEM = kvm_problem()


def fuzz_factor() -> float:
    """N from ``KVMPY_FUZZ=N`` (1 when unset): a positive number; below 1 it thins the
    examples out (the nested testbed uses 0.25, where every example is slow)."""
    raw = os.environ.get("KVMPY_FUZZ", "").strip() or "1"
    try:
        factor = float(raw)
    except ValueError:
        factor = 0.0
    if not factor > 0 or factor != factor or factor == float("inf"):
        raise pytest.UsageError(f"KVMPY_FUZZ must be a positive number (the examples multiplier), not {raw!r}")
    return factor


def scale_examples(test, factor: float) -> bool:
    """Multiply a hypothesis test's max_examples by ``factor`` (at least one example is
    left); False if ``test`` is not one.

    A test's own ``@settings`` lives on the wrapped function (hypothesis reads it from
    there on each run), so this replaces it with a copy whose only change is
    max_examples. Each function is scaled once, however many parametrized items share it.
    """
    test = getattr(test, "__func__", test)          # a method's function
    if not getattr(test, "is_hypothesis_test", False) or getattr(test, "_kvmpy_fuzz_scaled", False):
        return False
    from hypothesis import settings
    current = getattr(test, "_hypothesis_internal_use_settings", None) or settings.default
    test._hypothesis_internal_use_settings = settings(current, max_examples=max(1, round(current.max_examples * factor)))
    test._kvmpy_fuzz_scaled = True
    return True


def pytest_collection_modifyitems(config, items):
    factor = fuzz_factor()
    if factor != 1:
        for item in items:
            scale_examples(getattr(item, "obj", None), factor)


def pytest_report_header(config):
    factor = fuzz_factor()
    return [f"KVMPY_FUZZ={factor}: every hypothesis test runs {factor}x its max_examples"] if factor > 1 else []


@pytest.fixture
def kvm_required():
    """Skip (or, with KVMPY_REQUIRE_KVM=1, fail) when KVM is not usable."""
    if _PROBLEM is not None:
        if REQUIRE_KVM:
            pytest.fail(f"KVMPY_REQUIRE_KVM=1 but {_PROBLEM}")
        pytest.skip(_PROBLEM)


@pytest.fixture
def loop_device(tmp_path):
    """A block device: a loop device over an 8 MiB file (-> (device path, backing file)).
    Skipped unless root with losetup(8) and a free loop device."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs root and losetup(8)")
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    r = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)
