"""Snapshots (first slice of issue 5): a stopped machine saved and continued elsewhere."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import kvmpy
import kvmpy.lifecycle.snapshot
from kvmpy import guests
from kvmpy.lifecycle.snapshot import SnapshotError

from . import lab
from .lab import DISK_BYTES, fresh_disk, open_fds, rewrite_manifest, wait_until

ENV = lab.CHILD_ENV


def snapshot_echo(path, native=True):
    """The echo guest, stopped while it waits for input after echoing 'abc'."""
    g = guests.get("echo")
    with kvmpy.Machine(native=native) as m:
        m.load(g.path)
        m.feed_serial(b"abc\n")
        assert m.run(timeout=0.5).reason == "timeout"
        before = m.serial_output
        m.feed_serial(b"x")                          # input still in the UART's FIFO is saved too
        m.snapshot(path)
    return before


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_restore_in_a_new_process_continues_the_guest(tmp_path, native):
    """A snapshot restored in a fresh process carries on: pending serial input, then new input, then exit."""
    snap = tmp_path / "snap"
    assert snapshot_echo(str(snap), native).endswith(b"abc\n")
    code = ("import sys, kvmpy\n"
            f"m = kvmpy.Machine.restore({str(snap)!r}, native={native})\n"
            "m.feed_serial(b'yz\\nquit\\n')\n"
            "r = m.run(timeout=20)\n"
            "sys.stdout.buffer.write(m.serial_output); sys.exit(r.status & 0xff)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=ENV, cwd="/", timeout=60)
    assert r.stdout == b"xyz\nquit\nbye\n", r.stderr
    assert r.returncode == guests.get("echo").expect_status & 0xFF


def test_damaged_snapshots_are_refused(tmp_path):
    """A corrupted manifest or RAM file, a truncated RAM file, or another version is refused clearly."""
    snap = tmp_path / "snap"
    snapshot_echo(str(snap))
    manifest = snap / "manifest.json"
    body = json.loads(manifest.read_text())
    ram = snap / body["ram"][0]["file"]
    good_ram = ram.read_bytes()

    ram.write_bytes(good_ram[:-4096])
    with pytest.raises(SnapshotError, match="has .* bytes"):
        kvmpy.Machine.restore(str(snap))
    ram.write_bytes(good_ram[:100] + b"\x01" + good_ram[101:])
    with pytest.raises(SnapshotError, match="corrupted"):
        kvmpy.Machine.restore(str(snap))
    ram.write_bytes(good_ram)

    body["vcpus"][0]["regs"]["rip"] += 1               # edited without fixing the checksum
    manifest.write_text(json.dumps(body))
    with pytest.raises(SnapshotError, match="checksum"):
        kvmpy.Machine.restore(str(snap))
    body["version"] = 99
    manifest.write_text(json.dumps(body))
    with pytest.raises(SnapshotError, match="version"):
        kvmpy.Machine.restore(str(snap))
    manifest.write_text("{}")
    with pytest.raises(SnapshotError, match="magic"):
        kvmpy.Machine.restore(str(snap))


def test_snapshot_refuses_a_disk_that_changed_size(tmp_path):
    """A snapshot refers to its disks by path: a file of another size is refused, nothing starts."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(8192))
    with kvmpy.Machine(disks=[str(disk)]) as m:
        m.snapshot(str(tmp_path / "snap"))
    disk.write_bytes(bytes(4096))
    with pytest.raises(SnapshotError, match="changed size: 8192 bytes .* 4096 now"):
        kvmpy.Machine.restore(str(tmp_path / "snap"))


# --- the counter guest: snapshots at chosen moments, continued in new processes ---------------
COUNTER_CMDLINE = "n=60 pages=64"


def start_counter(disk, native=True, cmdline=COUNTER_CMDLINE, **kw):
    return lab.counter(disk, cmdline, native, **kw)


@pytest.fixture(scope="module")
def counter_reference(tmp_path_factory):
    """Output, disk and exit status of an uninterrupted run."""
    return lab.reference_run(tmp_path_factory.mktemp("ref"), COUNTER_CMDLINE)


def restore_in_new_process(snap, disk, native=True):
    """`kvmpy restore` in a fresh process: (stdout, exit code)."""
    cmd = [sys.executable, "-m", "kvmpy", "restore", str(snap), "--disk", str(disk), "--timeout", "120"]
    if not native:
        cmd.append("--python")
    r = subprocess.run(cmd, capture_output=True, env=ENV, cwd="/", timeout=180)
    return r.stdout, r.returncode, r.stderr


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(delays=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=3).map(sorted),
       native_src=st.booleans(), native_dst=st.booleans())
def test_snapshots_at_chosen_moments_continue_like_an_uninterrupted_run(
        tmp_path_factory, counter_reference, delays, native_src, native_dst):
    """Snapshots of the running guest (RAM, vCPU, UART, virtio queues) taken at hypothesis-chosen
    moments, each restored in a new process with a copy of the disk as it was then: every
    continuation ends with the same serial output and disk as a run never interrupted."""
    ref_out, ref_disk, ref_status = counter_reference
    tmp = tmp_path_factory.mktemp("moments")
    disk = fresh_disk(tmp / "disk.img")
    taken = []
    with start_counter(disk, native_src) as m:
        m.start(timeout=120)
        t0 = time.monotonic()
        for k, delay in enumerate(delays):
            time.sleep(max(0.0, t0 + delay - time.monotonic()))
            if not m.pause():
                break                                   # the guest already finished
            snap = tmp / f"snap{k}"
            m.snapshot(str(snap))                       # paused: stays paused
            copy = tmp / f"disk{k}.img"
            shutil.copyfile(disk, copy)                 # snapshots refer to disks; users copy them
            taken.append((snap, copy, m.serial_output))
            m.resume()
        result = m.wait(120)
    assert result.reason == "exit" and m.serial_output == ref_out
    for snap, copy, before in taken:
        out, code, err = restore_in_new_process(snap, copy, native_dst)
        assert before + out == ref_out, err.decode()[-2000:]
        assert code == ref_status & 0xFF
        assert open(copy, "rb").read() == ref_disk


def test_snapshot_of_a_machine_with_a_disk_in_flight_state(tmp_path, counter_reference):
    """The virtio queue indices are saved: a restore whose disk copy is taken at the same
    moment continues writing where the guest was, in this process, twice from one snapshot."""
    ref_out, ref_disk, _ = counter_reference
    disk = fresh_disk(tmp_path / "disk.img")
    with start_counter(disk) as m:
        m.start(timeout=120)
        wait_until(lambda: b" sectors\n" in m.serial_output, 10, "the guest to set up its disk")
        assert m.pause()                            # the whole run takes ~0.3 s: no fixed sleep
        m.snapshot(str(tmp_path / "snap"))
        before = m.serial_output
        state = json.loads((tmp_path / "snap" / "manifest.json").read_text())["devices"]["disks"][0]
        m.request_stop()
        m.wait()
    assert state["path"] == disk and state["size"] == DISK_BYTES and state["state"]["queues"][0]["ready"]
    for i in range(2):
        copy = tmp_path / f"copy{i}.img"
        shutil.copyfile(disk, copy)
        with kvmpy.Machine.restore(str(tmp_path / "snap"), disks=[str(copy)], native=bool(i)) as r:
            assert r.run(timeout=120).reason == "exit"
            assert before + r.serial_output == ref_out
        assert copy.read_bytes() == ref_disk




@pytest.mark.parametrize("edit, message", [
    (lambda b: b["devices"]["disks"][0]["state"]["queues"][0].update(desc=1 << 60), "virtio state"),
    (lambda b: b["devices"]["disks"][0]["state"]["queues"][0].update(num=3), "virtio state"),
    (lambda b: b["devices"]["com1"].update(rx="00" * 100000), "does not fit"),
    (lambda b: b["machine"].update(mem_size=128 << 20), "RAM"),
    (lambda b: b["vcpus"].append(b["vcpus"][0]), "does not fit"),
    (lambda b: b["devices"]["disks"][0].update(path="/nonexistent/disk.img"), "No such file"),
    (lambda b: b["devices"]["fw_cfg"].update(offset=10 ** 6), "fw_cfg"),
    (lambda b: b["ram"][0].update(file="../../etc/passwd"), "RAM file"),
])
def test_inconsistent_snapshots_are_refused_and_nothing_starts(tmp_path, edit, message):
    """State that passes the checksum but cannot be right is refused clearly, without leaking fds."""
    disk = fresh_disk(tmp_path / "disk.img")
    with start_counter(disk) as m:
        m.start(timeout=120)
        wait_until(lambda: b" sectors\n" in m.serial_output, 10, "the guest to set up its disk")
        assert m.pause()
        m.snapshot(str(tmp_path / "snap"))
        m.request_stop()
        m.wait()
    rewrite_manifest(tmp_path / "snap", edit)
    fds = open_fds()
    with pytest.raises(SnapshotError, match=message):
        kvmpy.Machine.restore(str(tmp_path / "snap"))
    assert open_fds() <= fds, open_fds() - fds


def rss_private_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Dirty", "Private_Clean")))


def test_restore_maps_ram_lazily_and_clones_share_it(tmp_path):
    """A 1 GiB snapshot restores without reading its RAM into memory, and clones of a machine
    share the pages none of them wrote (copy-on-write), yet each sees its own writes."""
    with kvmpy.Machine(mem_size=1 << 30) as m:
        m.memory.write(64 << 20, b"\x5a" * (32 << 20))      # 32 MiB that are not holes
        m.snapshot(str(tmp_path / "big"))
        blocks = sum(os.stat(p).st_blocks * 512 for p in (tmp_path / "big").iterdir())
        assert blocks < 40 << 20                             # zeros are holes on disk
        before = rss_private_kib()
        clones = kvmpy.lifecycle.snapshot.clone(m, 4)
    try:
        for c in clones:
            assert c.memory.read(64 << 20, 4) == b"\x5a" * 4
            c.memory.read(64 << 20, 32 << 20)                # every clone reads all 32 MiB
        clones[0].memory.write(80 << 20, b"mine")
        assert clones[1].memory.read(80 << 20, 4) == b"\x5a" * 4
        grown = rss_private_kib() - before
        assert grown < 4 * (32 << 10) // 2, f"{grown} KiB private after 4 clones read 32 MiB each"
    finally:
        for c in clones:
            c.close()
    with kvmpy.Machine.restore(str(tmp_path / "big"), verify=False) as r:
        assert r.memory.read((64 << 20) + 12345, 3) == b"\x5a" * 3
        assert r.memory.read(900 << 20, 8) == bytes(8)


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.015, 0.02, 0.025])
def test_snapshot_of_several_vcpus_while_they_boot(tmp_path, delay):
    """The smp guest, caught while the APs are being started (INIT/SIPI, each AP's own
    mp_state and LAPIC): the restored machine brings them all up and prints the same."""
    g = guests.get("smp")
    with kvmpy.Machine(cpus=4) as m:
        m.load(g.path, g.format, mode=g.mode)
        m.start(timeout=60)
        time.sleep(delay)
        if m.pause():
            m.snapshot(str(tmp_path / "snap"))
            m.request_stop()
            result = m.wait(30)
        else:                                           # it finished first: snapshot the end
            result = m.wait(30)
            m.snapshot(str(tmp_path / "snap"))
        before = m.serial_output
    if result.reason == "exit":
        assert before == g.expect_output
        return
    with kvmpy.Machine.restore(str(tmp_path / "snap")) as r:
        assert r.run(timeout=60).status == g.expect_status
        assert before + r.serial_output == g.expect_output


def _paths(obj, prefix=()):
    """Every key path in a JSON value (dict keys and list indexes)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@pytest.fixture(scope="module")
def small_snapshot(tmp_path_factory):
    """A snapshot of the counter guest (with its disk) caught mid-run, and its manifest."""
    tmp = tmp_path_factory.mktemp("hostile")
    disk = fresh_disk(tmp / "disk.img")
    with start_counter(disk, mem_size=4 << 20, cmdline="n=20000 pages=4") as m:
        m.start(timeout=60)
        time.sleep(0.2)
        assert m.pause()
        m.snapshot(str(tmp / "snap"))
        m.request_stop()
        m.wait()
    return tmp / "snap", json.loads((tmp / "snap" / "manifest.json").read_text())


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=20),
                        st.sampled_from(["", "00", "zz", "ff" * 5000]), st.lists(st.integers(), max_size=3),
                        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_edited_manifest_is_restored_or_refused_cleanly(small_snapshot, tmp_path_factory, data):
    """One value anywhere in a snapshot's manifest replaced (checksum fixed): restore either
    works or raises SnapshotError; no other exception, no leaked file descriptors."""
    snap, body = small_snapshot
    work = tmp_path_factory.mktemp("edit") / "snap"
    shutil.copytree(snap, work)
    paths = [p for p in _paths(body) if p and p[0] != "sha256"]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(JSON_VALUES)

    def edit(b):
        target = b
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    rewrite_manifest(work, edit)
    fds = open_fds()
    try:
        kvmpy.Machine.restore(str(work)).close()
    except SnapshotError:
        pass
    assert open_fds() <= fds, open_fds() - fds


def test_a_pending_tsc_deadline_timer_survives_a_restore():
    """KVM takes IA32_TSC_DEADLINE only while the LAPIC timer is in TSC-deadline mode, so it
    must go back after the LAPIC (as a Linux guest's timer would otherwise never fire)."""
    import struct
    from kvmpy import snapshot
    deadline_msr, lvtt = 0x6E0, 0x320
    with kvmpy.Machine(mem_size=2 << 20) as m:
        v = m.vcpus[0]
        lapic = bytearray(v.get_lapic())
        struct.pack_into("<I", lapic, 0xF0, struct.unpack_from("<I", lapic, 0xF0)[0] | 0x100)   # APIC on
        struct.pack_into("<I", lapic, lvtt, (2 << 17) | 0xEC)          # timer: TSC-deadline mode
        v.set_lapic(bytes(lapic))
        deadline = v.get_msrs([0x10])[0x10] + (1 << 40)
        v.set_msrs({deadline_msr: deadline})
        body = snapshot.capture(m)
        body["sha256"] = snapshot.body_sha(body)
    with snapshot.machine_for(body, None, "test") as r:
        snapshot.apply(r, body)
        assert r.vcpus[0].get_msrs([deadline_msr])[deadline_msr] == deadline


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_a_machine_without_the_in_kernel_irqchip_restores(tmp_path, native):
    """Without the irqchip KVM refuses to set some MSRs it reads back (MSR_KVM_POLL_CONTROL):
    one that already holds its saved value must not make the restore fail."""
    disk = fresh_disk(tmp_path / "disk.img")
    g = guests.get("counter")
    with kvmpy.Machine(disks=[disk], irqchip=False, native=native) as m:
        m.load(g.path, g.format, mode=g.mode, cmdline="n=40 pages=16")
        m.start(timeout=120)
        wait_until(lambda: b"count 3 " in m.serial_output, 30, "the guest to count")
        assert m.pause()
        m.snapshot(str(tmp_path / "snap"))
        before = m.serial_output
        m.resume()
        assert m.wait(120).reason == "exit"
        full = m.serial_output
    shutil.copyfile(disk, tmp_path / "copy.img")
    with kvmpy.Machine.restore(str(tmp_path / "snap"), disks=[str(tmp_path / "copy.img")], native=native) as r:
        assert r.run(timeout=120).reason == "exit"
        assert before + r.serial_output == full


def test_machine_check_registers_survive_a_restore_and_older_states_still_restore():
    """IA32_MCG_STATUS/CTL (in KVM's MSR list) and the banks' MSRs (not in it, saved as QEMU
    does) come back after a restore; a state saved before kvmpy set banks up (no bank MSRs,
    MCG_CTL 0) restores too."""
    from kvmpy import snapshot
    from kvmpy.x86 import mce
    with kvmpy.Machine(mem_size=2 << 20) as m:
        v = m.vcpus[0]
        if not v.mcg_cap:
            pytest.skip("this KVM sets up no machine-check banks")
        bank1_status = 0x400 + 4 * 1 + 1
        v.set_msrs({bank1_status: 0xBE00_0000_0001_0005, mce.IA32_MCG_STATUS: 0x5})
        body = snapshot.capture(m)
    saved = body["vcpus"][0]["msrs"]
    assert saved[str(bank1_status)] == 0xBE00_0000_0001_0005 and saved[str(0x400 + 4 * 9 + 3)] == 0
    assert saved[str(mce.IA32_MCG_CTL)] == (1 << 64) - 1
    body["sha256"] = snapshot.body_sha(body)
    with snapshot.machine_for(body, None, "test") as r:
        snapshot.apply(r, body)
        got = r.vcpus[0].get_msrs([bank1_status, mce.IA32_MCG_STATUS])
        assert got == {bank1_status: 0xBE00_0000_0001_0005, mce.IA32_MCG_STATUS: 0x5}
    old = {k: val for k, val in saved.items() if not 0x400 <= int(k) < 0x480}
    old[str(mce.IA32_MCG_CTL)] = 0
    body["vcpus"][0]["msrs"] = old
    body["sha256"] = snapshot.body_sha(body)
    with snapshot.machine_for(body, None, "test") as r:
        snapshot.apply(r, body)
        assert r.vcpus[0].get_msrs([mce.IA32_MCG_CTL]) == {mce.IA32_MCG_CTL: 0}
