"""Tests of the C extension that need no /dev/kvm (but do need the built extension)."""
import os

import pytest


@pytest.fixture(autouse=True)
def _native_required():
    """Skip without the extension, or fail when KVMPY_REQUIRE_KVM=1 (CI builds it)."""
    try:
        import kvmpy._native  # noqa: F401
    except ImportError as e:
        if os.environ.get("KVMPY_REQUIRE_KVM") == "1":
            pytest.fail(f"kvmpy._native is not built: {e}")
        pytest.skip(f"kvmpy._native is not built: {e}")
