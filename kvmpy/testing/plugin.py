"""The pytest plugin (entry point ``pytest11: kvmpy``; docs/pytest.md).

pytest loads it in every run of every project where kvmpy is installed, so it imports
only pytest and kvmpy.testing's small modules, and touches /dev/kvm only when a test asks:

- the ``kvm`` marker: the test is skipped where KVM is not usable, or fails there with
  KVMPY_REQUIRE_KVM=1 (kvmcheck.py);
- the pools behind machine_fixture() (fixtures.py), one fixture per scope, each closing its
  machines when its scope ends;
- a failing test that was lent a machine gets two report sections per machine: the guest's
  serial output during the test and a register report of every vCPU (Machine.inspect()).
"""
import pytest

from .fixtures import LENT, SCOPES, Pool
from .kvmcheck import require_kvm

MARKER = ("kvm: needs a usable KVM device and kvmpy's compiled extension: skipped without them, "
          "failed instead with KVMPY_REQUIRE_KVM=1 (kvmpy.testing)")
_REPORTED = pytest.StashKey[bool]()


def pytest_configure(config):
    config.addinivalue_line("markers", MARKER)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("kvm") is not None:
        require_kvm()


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    """A machine fixture skips (or fails) its test before booting where KVM is not usable."""
    if getattr(fixturedef.func, "kvmpy_machine", False):
        require_kvm()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    lent = item.stash.get(LENT, [])
    if report.failed and lent and not item.stash.get(_REPORTED, False):
        item.stash[_REPORTED] = True            # once per test: a teardown error adds nothing new
        for name, rig in lent:
            try:
                report.sections.extend(rig.sections(name))
            except Exception as e:  # noqa: BLE001  never an INTERNALERROR for a report
                report.sections.append((f"kvmpy: {name}", f"no report: {type(e).__name__}: {e}"))


def _pool_fixture(scope: str):
    def pool(tmp_path_factory):
        p = Pool(tmp_path_factory)
        yield p
        p.close()
    pool.__doc__ = f"The machines kvmpy.testing.machine_fixture(scope={scope!r}) fixtures have booted."
    return pytest.fixture(scope=scope, name=f"kvmpy_pool_{scope}")(pool)


kvmpy_pool_session, kvmpy_pool_package, kvmpy_pool_module, kvmpy_pool_class = map(_pool_fixture, SCOPES)
