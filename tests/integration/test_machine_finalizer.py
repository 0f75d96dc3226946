"""A Machine nobody closed is finalized, not leaked (issue 11, item 10): dropping the last
reference releases its vCPUs, VM, RAM, disks and /dev/kvm at once, without waiting for
the garbage collector, and warns (ResourceWarning) as an unclosed file does."""
import gc
import os
import threading
import warnings
import weakref

import pytest

import kvmpy

CODE = bytes.fromhex("b0 07 e6 f4")           # mov al, 7; out 0xf4, al


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def watchdog_threads() -> int:
    return sum(t.name == "vcpu-watchdog" for t in threading.enumerate())


def machine(disk, native, run):
    m = kvmpy.Machine(mem_size=1 << 20, cpus=2, disks=[disk], native=native)
    if run:
        m.load(CODE, format="raw")
        assert m.run(timeout=10).status == 15     # isa-debug-exit: (7 << 1) | 1
    return m


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("run", [False, True], ids=["built", "ran"])
def test_machines_never_closed_release_their_fds_without_the_gc(tmp_path, no_gc, native, run):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(8192))
    machine(str(disk), native, run).close()          # warm imports and caches
    base, watchdogs = fds(), watchdog_threads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            m = machine(str(disk), native, run)
            alive = weakref.ref(m)
            assert fds() > base
            del m
            assert alive() is None, "the Machine outlived its last reference (a reference cycle?)"
            assert fds() == base
            assert watchdog_threads() == watchdogs, "a dropped machine left its watchdog thread running"
    unclosed = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert len(unclosed) == 10 and "unclosed kvmpy.Machine" in str(unclosed[0].message)


def test_a_closed_machine_does_not_warn(tmp_path, no_gc):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with kvmpy.Machine(mem_size=1 << 20) as m:
            m.load(CODE, format="raw")
            m.run(timeout=10)
        del m
        kvmpy.Machine(mem_size=1 << 20).close()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_machine_that_failed_to_build_does_not_warn(tmp_path, no_gc):
    base = fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(kvmpy.DeviceError):
            kvmpy.Machine(mem_size=1 << 20, disks=[str(tmp_path / "missing.img")])
    assert fds() == base
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
