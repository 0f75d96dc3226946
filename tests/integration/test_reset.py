"""Reset in place (lifecycle/reset.py, docs/reset.md): after any case, a reset machine is
indistinguishable from its checkpoint.

The reset-case guest (guests/reset-case.c, CPL 3) runs cases a hypothesis strategy
chooses: RAM pages dirtied (how many, where, with what), COM1 output, a CMOS write, a disk
sector written through virtio-blk, registers and XMM left changed; the host writes RAM and
feeds COM1 input too. After reset() every observable equals the checkpoint: all RAM, every
vCPU's saved state, the irqchips and PIT, every device's save_state(), the disk as the
guest reads it; the disk's file is never written. Time moves on: the TSC, the kvmclock and
the PIT's load times and the MSRs that count time (TIME_MSRS) are set aside.
"""
import hashlib
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy import Machine
from kvmpy.images import guests
from kvmpy.lifecycle.reset import ResetError
from kvmpy.vmm.state import SnapshotError

MAILBOX, ARRAY = 0x300000, 0x400000
MEM = 16 << 20
DISK = 256 << 10
READY, DONE = (0x52 << 1) | 1, (0x44 << 1) | 1
NO_SECTOR = (1 << 64) - 1
# MSRs that count time: the TSC, APERF/MPERF, Hyper-V's VP runtime and reference time
# (KVM lists the last two on kvm_amd; they derive from the vCPU's run time and the kvmclock)
TIME_MSRS = (0x10, 0xE7, 0xE8, 0x40000010, 0x40000020)
PIT_LOAD_TIME = [(24 * i + 16, 24 * i + 24) for i in range(3)]   # kvm_pit_channel_state.count_load_time


def _pit_without_load_times(blob: str) -> bytes:
    b = bytearray.fromhex(blob)
    for lo, hi in PIT_LOAD_TIME:
        b[lo:hi] = bytes(hi - lo)
    return bytes(b)


def observe(m) -> dict:
    """Everything a case could change, with the time fields split off under "time"."""
    msrs = sorted(m.supported_msrs() & set(m.kvm.msr_index_list()))
    vcpus = [v.save_state(msrs) for v in m.vcpus]
    tsc = [{i: v["msrs"].pop(str(i)) for i in TIME_MSRS if str(i) in v["msrs"]} for v in vcpus]
    vm = m.vm.save_state()
    clock = vm.pop("clock")
    if "pit2" in vm:
        vm["pit2"] = _pit_without_load_times(vm["pit2"])
    ram = [hashlib.sha256(r.mm[:]).hexdigest() for r in m.memory.regions]
    return {"vcpus": vcpus, "vm": vm, "devices": m.platform.save_state(), "ram": ram,
            "time": {"tsc": tsc, "clock": clock}}


def differences(a, b, path: str = "") -> list[str]:
    """Where two observations differ (paths like vcpus[0].msrs.59; blobs by byte offset)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in (differences(a.get(k), b.get(k), f"{path}.{k}") if k in a and k in b
                          else [f"{path}.{k} (only in one)"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if a == b:
        return []
    if isinstance(a, (str, bytes)) and isinstance(b, (str, bytes)) and len(a) == len(b) and len(a) > 64:
        x = bytes.fromhex(a) if isinstance(a, str) else a
        y = bytes.fromhex(b) if isinstance(b, str) else b
        offs = [i for i in range(len(x)) if x[i] != y[i]]
        return [f"{path}: bytes {offs[:12]}: {x[offs[0]:offs[0] + 8].hex()} != {y[offs[0]:offs[0] + 8].hex()}"]
    return [f"{path}: {a!r} != {b!r}"]


def guest_disk(m) -> bytes:
    """The disk as the guest reads it: the overlay while a checkpoint is held."""
    fd = m.reset_point.overlays[0].fd
    return os.pread(fd, DISK + 1, 0)


@pytest.fixture(scope="module", params=[(True, False, None, 0), (False, True, False, 0), (True, True, None, 24)],
                ids=["native-get-syncregs", "python-clear-ioctls", "native-clear-hot"])
def rig(request, tmp_path_factory):
    """The C devices with KVM_GET_DIRTY_LOG and the kvm_run page for regs; the Python devices
    with KVM_CLEAR_DIRTY_LOG and KVM_SET_REGS/SREGS/VCPU_EVENTS; the C devices with up to 24 hot
    pages (left writable, copied back at every reset)."""
    native, clear, sync, hot = request.param
    path = tmp_path_factory.mktemp("reset") / "disk.img"
    path.write_bytes(os.urandom(DISK))
    m = Machine(mem_size=MEM, disks=[str(path)], native=native)
    m.load(guests.path("reset-case"), user=True)
    r = m.run(timeout=10)
    assert (r.reason, r.status) == ("exit", READY), m.serial_output
    m.checkpoint(clear_dirty_log=clear, sync_regs=sync, hot_pages=hot)
    assert (m.reset_point.manual, m.reset_point.sync is not None) == (clear, sync is None)
    rig = {"m": m, "path": path, "file": path.read_bytes(), "seen": observe(m), "disk": guest_disk(m)}
    yield rig
    m.close()


case_st = st.fixed_dictionaries({
    "pages": st.one_of(st.integers(0, 20), st.integers(0, 600)),
    "first": st.integers(0, 3071), "stride": st.integers(0, 700), "seed": st.integers(0, (1 << 64) - 1),
    "serial": st.integers(0, 40), "sector": st.one_of(st.just(NO_SECTOR), st.integers(0, DISK // 512 - 1)),
    "cmos": st.booleans(), "regs": st.booleans(),
    "host": st.lists(st.tuples(st.integers(MAILBOX + 64, MEM - 64), st.binary(min_size=1, max_size=64)),
                     max_size=4),
    "feed": st.binary(max_size=8),
})


def run_case(m, c) -> None:
    m.memory.write(MAILBOX, struct.pack("<8Q", c["pages"], c["first"], c["stride"], c["seed"], c["serial"],
                                        c["sector"], int(c["cmos"]), int(c["regs"])))
    for gpa, data in c["host"]:
        m.memory.write(gpa, data)
    if c["feed"]:
        m.feed_serial(c["feed"])
    r = m.run(timeout=10)
    assert (r.reason, r.status) == ("exit", DONE), (r, m.serial_output[-200:])


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases=st.lists(case_st, min_size=1, max_size=3))
def test_a_reset_machine_equals_its_checkpoint(rig, cases):
    m, seen = rig["m"], rig["seen"]
    for c in cases:
        run_case(m, c)
        if c["pages"] or c["regs"] or c["sector"] != NO_SECTOR:
            assert observe(m) != seen                 # the case did change something
        m.reset()
        now = observe(m)
        t_seen, t_now = seen.pop("time"), now.pop("time")
        try:
            diffs = differences(seen, now)
            assert not diffs, "\n".join(diffs)
            # time goes back for the kvmclock; the TSC keeps counting (docs/reset.md)
            assert abs(t_now["clock"] - t_seen["clock"]) < 2_000_000_000
        finally:
            seen["time"] = t_seen
        assert guest_disk(m) == rig["disk"]
        assert rig["path"].read_bytes() == rig["file"]          # the file is never written


def test_the_next_case_starts_from_the_checkpoint(rig):
    """Serial output of the same case twice, reset in between, is the same (the guest sees
    the checkpoint's RAM and registers, not the last case's)."""
    m = rig["m"]
    c = {"pages": 3, "first": 5, "stride": 1, "seed": 9, "serial": 12, "sector": 4, "cmos": True,
         "regs": True, "host": [], "feed": b""}
    outs = []
    for _ in range(2):
        before = len(m.serial_output)
        run_case(m, c)
        outs.append(m.serial_output[before:])
        m.reset()
    assert outs[0] == outs[1] == bytes(ord("a") + (9 + i) % 26 for i in range(12))


def test_hot_pages_stay_writable_and_still_come_back(rig):
    """The same case again and again: with hot pages its pages become hot (copied back at every
    reset, no longer write-protected), and the machine still comes back to the checkpoint."""
    m, seen = rig["m"], rig["seen"]
    hot_max = m.reset_point.regions[0].c.hot_max
    c = {"pages": 6, "first": 40, "stride": 3, "seed": 5, "serial": 0, "sector": NO_SECTOR, "cmos": False,
         "regs": False, "host": [], "feed": b""}
    for _ in range(3):
        run_case(m, c)
        m.reset()
    hot = sum(r.c.hot_count for r in m.reset_point.regions)
    assert (hot >= 6) if hot_max else hot == 0
    assert hot <= hot_max * len(m.reset_point.regions)
    now = observe(m)
    now.pop("time")
    assert not differences({k: v for k, v in seen.items() if k != "time"}, now)


def test_hot_pages_turn_manual_protection_on():
    with Machine(mem_size=MEM) as m:
        m.load(guests.path("reset-case"), user=True)
        assert m.run(timeout=10).status == READY
        m.checkpoint(hot_pages=8)
        assert m.reset_point.manual and m.reset_point.regions[0].c.hot_max == 8


def test_checkpointed_machines_refuse_snapshots_and_reset_needs_a_checkpoint(tmp_path):
    with Machine(mem_size=MEM) as m:
        with pytest.raises(Exception, match="checkpoint"):
            m.reset()
        m.load(guests.path("reset-case"), user=True)
        m.run(timeout=10)
        m.checkpoint()
        with pytest.raises(SnapshotError, match="drop_checkpoint"):
            m.snapshot(tmp_path / "snap")
        m.drop_checkpoint()
        assert not m.checkpointed
        m.snapshot(tmp_path / "snap")           # fine again


def test_checkpoint_needs_a_stopped_machine():
    with Machine(mem_size=MEM) as m:
        m.load(guests.path("spin"))
        m.start(timeout=5)
        try:
            with pytest.raises(ResetError, match="stopped"):
                m.checkpoint()
        finally:
            m.request_stop()
            m.wait()


def test_drop_checkpoint_sends_the_disk_back_to_its_file(tmp_path):
    """After drop_checkpoint() the guest's writes reach the file again (the overlay is gone)."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK))
    with Machine(mem_size=MEM, disks=[str(path)]) as m:
        m.load(guests.path("reset-case"), user=True)
        m.run(timeout=10)
        m.checkpoint()
        c = {"pages": 0, "first": 0, "stride": 1, "seed": 7, "serial": 0, "sector": 2, "cmos": False,
             "regs": False, "host": [], "feed": b""}
        run_case(m, c)
        assert path.read_bytes() == bytes(DISK)
        m.drop_checkpoint()                      # back at the checkpoint: the next run is a case
        run_case(m, c)
        data = path.read_bytes()
        assert data[1024:1032] == struct.pack("<Q", 7) and data[:1024] == bytes(1024)


@pytest.mark.parametrize("cpus,irqchip", [(2, True), (1, False)], ids=["2-vcpus", "no-irqchip"])
def test_other_machine_shapes_reset_too(cpus, irqchip):
    """Two vCPUs (the second never started: its mp_state and LAPIC go back too), and a
    machine without the in-kernel irqchip (no LAPIC, irqchip or PIT to put back)."""
    with Machine(mem_size=MEM, cpus=cpus, irqchip=irqchip) as m:
        m.load(guests.path("reset-case"), user=True)
        assert m.run(timeout=10).status == READY
        m.checkpoint()
        seen = observe(m)
        t_seen = seen.pop("time")
        for seed in range(3):
            run_case(m, {"pages": 40, "first": seed, "stride": 3, "seed": seed, "serial": 5, "sector": NO_SECTOR,
                         "cmos": True, "regs": True, "host": [(MAILBOX + 4096, b"x" * 100)], "feed": b"in"})
            assert m.reset() >= 40
            now = observe(m)
            now.pop("time")
            diffs = differences(seen, now)
            assert not diffs, "\n".join(diffs)
        assert t_seen["clock"] > 0


def test_after_a_manual_protection_checkpoint_the_dirty_log_reads_as_before():
    """A checkpoint with KVM_CLEAR_DIRTY_LOG leaves the VM in manual protection; once it is
    dropped, get_dirty_log (live migration's) still returns each write once, not forever."""
    with Machine(mem_size=MEM) as m:
        m.load(guests.path("reset-case"), user=True)
        assert m.run(timeout=10).status == READY
        m.checkpoint(clear_dirty_log=True)
        m.drop_checkpoint()
        assert m.vm.manual_protect
        m.vm.log_dirty_pages(True)
        slot = m.memory.regions[0].slot
        m.vm.get_dirty_log(slot)                             # start clean
        run_case(m, {"pages": 4, "first": 100, "stride": 1, "seed": 3, "serial": 0, "sector": NO_SECTOR,
                     "cmos": False, "regs": False, "host": [], "feed": b""})
        first = int.from_bytes(m.vm.get_dirty_log(slot), "little")
        array_page = ARRAY // 4096
        assert all(first >> (array_page + 100 + i) & 1 for i in range(4))
        again = int.from_bytes(m.vm.get_dirty_log(slot), "little")
        assert not any(again >> (array_page + 100 + i) & 1 for i in range(4))   # reported once
