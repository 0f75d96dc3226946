"""kvmpy.testing: tests that run guests, for pytest (docs/pytest.md).

Installing kvmpy registers the plugin (``kvmpy.testing.plugin``, the ``pytest11`` entry
point named ``kvmpy``): the ``kvm`` marker, the report sections of a failing test, and the
pools behind :func:`machine_fixture`. In a conftest.py::

    from kvmpy.testing import machine_fixture

    vm = machine_fixture("reset-case", ready=0x52, mem_size=16 << 20, disks=[256 << 10])

boots the guest once per session, runs it to its ready point, checkpoints it, and gives
every test that asks for ``vm`` that machine reset in place to the checkpoint.

Importing this package is cheap (pytest imports it in every run where kvmpy is installed):
the machine's modules load when a fixture first boots one, and nothing touches /dev/kvm
before a test asks for it.
"""
from .kvmcheck import DEVICE_ENV, REQUIRE_ENV, device, kvm_problem, require_kvm
from .fixtures import BootError, machine_fixture

__all__ = ["machine_fixture", "BootError", "kvm_problem", "require_kvm", "device", "DEVICE_ENV", "REQUIRE_ENV"]
