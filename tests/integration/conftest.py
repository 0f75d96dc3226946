"""Every integration test runs real guests on /dev/kvm (see tests/conftest.py)."""
import pytest


@pytest.fixture(autouse=True)
def _kvm(kvm_required):
    """Applies the KVM requirement to every test in this directory."""
