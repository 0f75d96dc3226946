"""Is KVM usable here? The check behind the ``kvm`` marker and the machine fixtures.

Where it is not, a test is skipped with the reason, unless ``KVMPY_REQUIRE_KVM=1`` (CI
sets it): then it fails, so that a run cannot pass by skipping everything.
``KVMPY_KVM_DEVICE`` names the device the fixtures' machines open (default ``/dev/kvm``);
pointing it at a path that does not exist shows what a host without KVM sees.
"""
import os

import pytest

DEVICE_ENV = "KVMPY_KVM_DEVICE"
REQUIRE_ENV = "KVMPY_REQUIRE_KVM"


def device() -> str:
    """The KVM device to open: ``$KVMPY_KVM_DEVICE``, else /dev/kvm."""
    return os.environ.get(DEVICE_ENV) or "/dev/kvm"


def kvm_problem(path: str | None = None) -> str | None:
    """Why machines cannot run here (no compiled extension, no usable KVM device), or None."""
    path = path or device()
    try:
        import kvmpy._native  # noqa: F401        the C extension: loaded only when a test needs KVM
    except ImportError as e:
        return f"kvmpy._native is not built ({e}); run 'pip install .' or 'python csrc/build.py'"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{path} is not usable: {e.strerror}"
    os.close(fd)
    return None


def require_kvm() -> None:
    """Skip the running test where KVM is not usable; fail it instead with KVMPY_REQUIRE_KVM=1."""
    problem = kvm_problem()
    if problem is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {problem}", pytrace=False)
    pytest.skip(f"{problem} (kvmpy; {REQUIRE_ENV}=1 makes this a failure)")
