"""Every integration test runs real guests on /dev/kvm (see tests/conftest.py)."""
import pytest

from kvmpy.testing import machine_fixture

#: A 1 MiB machine with nothing loaded, built once per session for each loop (C, then Python)
#: and reset in place before each test that takes it (kvmpy's pytest plugin, docs/pytest.md):
#: for tests that load a few instructions, run them and look at the result.
small_machine = machine_fixture(None, mem_size=1 << 20, params=[{"native": True}, {"native": False}],
                                ids=["native", "python"])


@pytest.fixture(autouse=True)
def _kvm(kvm_required):
    """Applies the KVM requirement to every test in this directory."""
