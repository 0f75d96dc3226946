"""Every stop is obeyed (issue 11, item 11): whatever a guest does, a timeout, request_stop(),
close(), Ctrl-C and `ctl stop` end its run within about a second, in both loops.

The hostile guests: a virtio-blk request that republishes itself (blk-selffeed), COM1
flooded into a pipe nobody reads, an endless port-I/O loop, tight loops at CPL 0
(emulated on kvm_pvm) and at CPL 3, and eight vCPUs racing on that self-feeding queue
(blk-smprace: every vCPU writes QueueNotify, half the APs also rewrite the available
ring). Each run is waited for with a limit, so a regression fails the test instead of
hanging the suite.
"""
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.lifecycle.control import request

from .lab import selffeed_disk, wait_until
from . import lab

WITHIN = 1.0                     # seconds from the stop to the end of the run
FLOOD = bytes.fromhex("baf803 b078 ee ebfd")     # mov dx,0x3f8; mov al,'x'; out dx,al; jmp back to the out
SPIN3 = bytes.fromhex("ebfe")                      # jmp . (loaded in long mode, ring 3)
NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
GUESTS = ["selffeed", "serial-flood", "pio-flood", "spin-cpl0", "spin-cpl3", "smp-race"]
RACING = b"blk-smprace: 8 vCPUs notifying\n"       # all 7 APs checked in, the BSP joins the race
STUCK = []                       # machines a regression left running: kept, never closed


@pytest.fixture(scope="module")
def feeding_disk(tmp_path_factory):
    return selffeed_disk(tmp_path_factory.mktemp("stops") / "disk.img")


@pytest.fixture
def stalled_pipe():
    """The write end of a 4 KiB pipe nobody reads (closed, with the read end, afterwards)."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    out = os.fdopen(w, "wb", buffering=0)
    yield out
    os.close(r)
    out.close()


def hostile(name, native, disk, pipe):
    """A loaded Machine running guest ``name`` (not started)."""
    if name == "selffeed":
        g = guests.get("blk-selffeed")
        m = kvmpy.Machine(disks=[disk], native=native, irqchip=False)
        m.load(g.path, user=True)
    elif name == "smp-race":
        g = guests.get("blk-smprace")
        m = kvmpy.Machine(disks=[disk], cpus=g.cpus, native=native, irqchip=True)
        m.load(g.path, user=True)
    elif name == "serial-flood":
        m = kvmpy.Machine(mem_size=1 << 20, serial=pipe, native=native)
        m.load(FLOOD, format="raw", mode="real")
    elif name in ("pio-flood", "spin-cpl0"):
        g = guests.get("pio-loop" if name == "pio-flood" else "spin")
        m = kvmpy.Machine(mem_size=1 << 20, native=native)
        m.load(g.path, g.format, mode=g.mode)
    else:
        m = kvmpy.Machine(mem_size=4 << 20, native=native)
        m.load(SPIN3, format="raw", mode="long", user=True)
    return m


def started(m, name, timeout=None):
    """Start ``m`` and return once its guest is at its hostile work."""
    m.start(timeout=timeout)
    if name == "selffeed":
        wait_until(lambda: b"blk-selffeed: feeding\n" in m.serial_output, 20, "the guest to feed")
    elif name == "smp-race":
        wait_until(lambda: RACING in m.serial_output, 20, "the eight vCPUs to race")
    time.sleep(0.3)
    return m


def ended_within(m, limit):
    """Seconds until m's run ends (at most ``limit``); a stuck run is kept and fails."""
    t = time.monotonic()
    try:
        m.wait(limit)
    except TimeoutError:
        STUCK.append(m)
        pytest.fail(f"the run did not end within {limit} s")
    except kvmpy.KvmpyError:
        pass                     # the run ended (with an error is fine: e.g. the stream broke)
    return time.monotonic() - t


@NATIVE
@pytest.mark.parametrize("name", GUESTS)
def test_a_timeout_ends_a_hostile_guest(kvm_required, feeding_disk, stalled_pipe, name, native):
    m = hostile(name, native, feeding_disk, stalled_pipe)
    t = time.monotonic()
    started(m, name, timeout=1.0)
    took = ended_within(m, 10) + (time.monotonic() - t)
    assert took < 1.0 + WITHIN + 1.0      # the timeout, the stop, and the guest's start-up
    m.close()


@NATIVE
@pytest.mark.parametrize("name", GUESTS)
def test_request_stop_ends_a_hostile_guest(kvm_required, feeding_disk, stalled_pipe, name, native):
    m = started(hostile(name, native, feeding_disk, stalled_pipe), name)
    m.request_stop()
    assert ended_within(m, 10) < WITHIN
    m.close()


@NATIVE
@pytest.mark.parametrize("name", GUESTS)
def test_close_ends_a_hostile_guest(kvm_required, feeding_disk, stalled_pipe, name, native):
    m = started(hostile(name, native, feeding_disk, stalled_pipe), name)
    closer = threading.Thread(target=m.close, daemon=True)
    t = time.monotonic()
    closer.start()
    closer.join(10)
    if closer.is_alive():
        STUCK.append(m)
        pytest.fail("close() did not return within 10 s")
    assert time.monotonic() - t < WITHIN


# --- the command line: Ctrl-C and `ctl stop` ------------------------------------------------
def cli_args(name, disk, image_dir):
    """`kvmpy run` arguments for guest ``name``."""
    if name == "selffeed":
        return [str(guests.get("blk-selffeed").path), "--disk", disk, "--user", "--no-irqchip"]
    if name == "smp-race":
        return [str(guests.get("blk-smprace").path), "--disk", disk, "--user", "--cpus", "8"]
    if name in ("pio-flood", "spin-cpl0"):
        return [str(guests.get("pio-loop" if name == "pio-flood" else "spin").path), "--format", "raw",
                "--mode", "real"]
    path = os.path.join(image_dir, f"{name}.bin")
    with open(path, "wb") as f:
        f.write(FLOOD if name == "serial-flood" else SPIN3)
    mode = ["--mode", "real"] if name == "serial-flood" else ["--mode", "long", "--user"]
    return [path, "--format", "raw", *mode]


def cli_run(name, native, disk, tmp_path, control=None):
    """A `kvmpy run` process of guest ``name`` whose stdout nobody reads (a pipe that fills)."""
    cmd = [sys.executable, "-m", "kvmpy", "run", *cli_args(name, disk, str(tmp_path))]
    if not native:
        cmd.append("--python")
    if control:
        cmd += ["--control", control]
    env = lab.CHILD_ENV
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            env=env, cwd="/")


def exited_within(p, limit):
    t = time.monotonic()
    try:
        p.wait(limit)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"kvmpy did not exit within {limit} s")
    return time.monotonic() - t


@NATIVE
@pytest.mark.parametrize("name", GUESTS)
def test_ctrl_c_ends_a_hostile_guest(kvm_required, feeding_disk, tmp_path, name, native):
    # The control socket appears once the run is under way (and kvmpy's Ctrl-C handler is
    # in place): Python's start-up alone takes seconds where TCG runs it (the nested testbed).
    sock = tempfile.mktemp(prefix="kvmpy-int-", suffix=".sock", dir="/tmp")
    p = cli_run(name, native, feeding_disk, tmp_path, control=sock)
    try:
        wait_until(lambda: os.path.exists(sock) or p.poll() is not None, 30, "the control socket")
        time.sleep(0.5)                  # the guest at work
        assert p.poll() is None
        p.send_signal(signal.SIGINT)
        assert exited_within(p, 10) < WITHIN + 0.5
        assert p.returncode == 130
    finally:
        p.kill()
        p.stdout.close()


@NATIVE
@pytest.mark.parametrize("name", GUESTS)
def test_ctl_stop_ends_a_hostile_guest(kvm_required, feeding_disk, tmp_path, name, native):
    sock = tempfile.mktemp(prefix="kvmpy-stop-", suffix=".sock", dir="/tmp")
    p = cli_run(name, native, feeding_disk, tmp_path, control=sock)
    try:
        wait_until(lambda: os.path.exists(sock) or p.poll() is not None, 20, "the control socket")
        time.sleep(0.5)
        assert p.poll() is None
        t = time.monotonic()
        assert request(sock, "stop", timeout=5)["ok"]
        exited_within(p, 10)
        assert time.monotonic() - t < WITHIN + 0.5      # from the request to the process's exit
    finally:
        p.kill()
        p.stdout.close()


# --- pause() parks all eight racing vCPUs ------------------------------------------------------
def used_idx(m):
    return m.platform.disks[0].model.save_state()["queues"][0]["used_idx"]


@NATIVE
def test_pause_parks_every_vcpu_of_the_smp_race(kvm_required, feeding_disk, native):
    m = started(hostile("smp-race", native, feeding_disk, None), "smp-race")
    t = time.monotonic()
    assert m.pause(timeout=10)
    assert time.monotonic() - t < WITHIN
    try:
        before = used_idx(m), m.live_stats().devices["virtio-blk0"]
        for v in m.vcpus[1:]:                   # every AP got past its trampoline into the race
            sregs = v.get_sregs()
            assert sregs.cr0 & 1 and not sregs.cr0 & (1 << 31)        # protected mode, paging off
            assert 0x100000 <= v.get_regs().rip < 0x200000             # in the image at 1 MiB
        time.sleep(0.2)
        assert (used_idx(m), m.live_stats().devices["virtio-blk0"]) == before   # nobody notifies
    finally:
        m.resume()
    wait_until(lambda: m.live_stats().devices["virtio-blk0"] > before[1], 5, "the race to go on")
    m.request_stop()
    assert ended_within(m, 10) < WITHIN
    m.close()
