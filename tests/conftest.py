"""Shared test configuration.

Integration tests need a usable /dev/kvm and the compiled extension. Without them
they are skipped, except when KVMPY_REQUIRE_KVM=1 (as in CI), where a missing KVM
is a failure: CI must never pass by skipping everything.
"""
import os

import pytest

REQUIRE_KVM = os.environ.get("KVMPY_REQUIRE_KVM") == "1"


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


@pytest.fixture
def kvm_required():
    """Skip (or, with KVMPY_REQUIRE_KVM=1, fail) when KVM is not usable."""
    if _PROBLEM is not None:
        if REQUIRE_KVM:
            pytest.fail(f"KVMPY_REQUIRE_KVM=1 but {_PROBLEM}")
        pytest.skip(_PROBLEM)
