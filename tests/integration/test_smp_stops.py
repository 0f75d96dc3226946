"""A stop reaches every vCPU of an SMP guest, wherever it is (issue: the smp demo's run that
never returned on an AMD host).

When one vCPU ends the run, the others are somewhere: in KVM_RUN waiting for INIT or SIPI
(KVM_MP_STATE_UNINITIALIZED), halted with interrupts off by the in-kernel local APIC (in
KVM_RUN, where only a signal reaches them), between two exits the C loop serves, or in a
Python device. Each must leave, and the run must return, in both loops. The guests here
are a few bytes of machine code (listings below): the BSP starts the APs with INIT-SIPI-SIPI
and ends the run with isa-debug-exit, right away or once they have checked in; each AP
checks in and then halts, loops on a port C serves, loops on a Python device, or spins.

The regressions: the kick signal blocked in the thread that starts the machine (inherited
by every vCPU thread, it left halted APs in KVM_RUN for ever), and kicks that are lost (each
used to be sent once). Every run is waited for with a limit, so a regression fails instead
of hanging the suite.
``KVMPY_STRESS=N`` multiplies the rounds (N=20 for a long campaign; under CPU contention,
``taskset -c 0``, for the interleavings a quiet host does not show).
"""
import os
import random
import signal
import struct
import threading
import time

import pytest

import kvmpy
from kvmpy import guests

NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
STRESS = int(os.environ.get("KVMPY_STRESS", "1") or "1")
LIMIT = 10.0                    # seconds a run may take to end before it counts as hung
CPUS = 4
STUCK = []                      # machines a regression left running: kept, never closed

# The BSP (32-bit protected mode, CPL 0, loaded at 1 MiB). WAIT_APS and DELAY are patched in.
#   mov $0xfee00000, %ebx
#   orl $0x1ff, 0xf0(%ebx)              SVR: local APIC on
#   movl $0, 0x310(%ebx)
#   movl $0x000c4500, 0x300(%ebx)       INIT to all but self
#   movl $0x000c4608, 0x300(%ebx)       Startup IPI, vector 8 (0x8000), to all but self
#   movl $0x000c4608, 0x300(%ebx)       and the second one
#   mov WAIT_APS, %ecx
# 1: pause; cmp %ecx, 0x9000; jb 1b     until that many APs checked in
#   mov DELAY, %ecx
# 2: dec %ecx; jns 2b
#   mov $0, %al; out %al, $0xf4         isa-debug-exit: the run ends
# 3: cli; hlt; jmp 3b
BSP = bytes.fromhex(
    "bb0000e0fe818bf0000000ff010000c7831003000000000000c7830003000000450c00c7830003000008"
    "460c00c7830003000008460c008b0d58001000f390390d0090000072f68b0d5c0010004979fdb000e6f4"
    "faf4ebfc") + bytes(8)
BSP_PARAMS = 0x100058           # WAIT_APS, DELAY (u32 each)
# A BSP that ends the run at once, without starting anyone: the APs wait for INIT in KVM_RUN.
#   mov $0, %al; out %al, $0xf4; 1: cli; hlt; jmp 1b
BSP_ALONE = bytes.fromhex("b000e6f4faf4ebfc")
# The AP trampoline (real mode, at 0x8000; DS = 0):
#   lock incl 0x9000                    check in
#   mov 0x9004, %al                     what next: 0 halt, 1 OUT to an unclaimed port (C
#   cmp $1 / $2 / $3, %al ...           serves it), 2 IN from a Python device, 3 spin
# halt: cli; hlt; jmp halt
# io:   out %al, $0x80; jmp io
# pyio: mov $0x500, %dx; 1: in %dx, %al; jmp 1b
# spin: jmp spin
AP = bytes.fromhex("66f0ff060090a004903c01740c3c02740c3c03740efaf4ebfce680ebfcba0005ecebfdebfe")
AP_AT, CHECKIN = 0x8000, 0x9000
AP_MODES = {"halt": 0, "c-io": 1, "python-io": 2, "spin": 3}


class Port:
    """A Python device at 0x500: what the python-io APs read in a loop."""

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        pass


def smp_machine(native, ap_mode="halt", wait_aps=0, delay=0, alone=False):
    m = kvmpy.Machine(mem_size=2 << 20, cpus=CPUS, native=native)
    m.pio.attach(0x500, 1, Port(), "port")
    m.load(BSP_ALONE if alone else BSP, format="raw", mode="protected")
    m.memory.write(AP_AT, AP)
    m.memory.write(CHECKIN, struct.pack("<II", 0, AP_MODES[ap_mode]))
    if not alone:
        m.memory.write(BSP_PARAMS, struct.pack("<II", wait_aps, delay))
    return m


def ended(m, limit=LIMIT):
    """The RunResult of m's run begun with start(); a run still going after ``limit``
    seconds is kept (never closed: its threads may be stuck in KVM_RUN) and fails."""
    try:
        return m.wait(limit)
    except TimeoutError:
        STUCK.append(m)
        pytest.fail(f"the run did not end within {limit} s (vCPU threads {[v.thread_id for v in m.vcpus]})")


def checked_in(m) -> int:
    return struct.unpack("<I", m.memory.read(CHECKIN, 4))[0]


def blocked_signals() -> set:
    return signal.pthread_sigmask(signal.SIG_BLOCK, [])


@NATIVE
@pytest.mark.parametrize("ap_mode", list(AP_MODES))
@pytest.mark.parametrize("when", ["at-once", "checked-in"])
def test_the_guest_s_stop_reaches_every_ap(native, ap_mode, when):
    """The BSP ends the run right after the Startup IPIs (APs anywhere between waiting for
    INIT and their loop) or once all have checked in; the run returns every time."""
    rnd = random.Random(f"{native}{ap_mode}{when}")
    for _ in range(8 * STRESS):
        wait = CPUS - 1 if when == "checked-in" else 0
        with smp_machine(native, ap_mode, wait, rnd.choice([0, 10, 1000, 100000])) as m:
            m.start()
            r = ended(m)
            assert (r.reason, r.status) == ("exit", 1)
            if when == "checked-in":
                assert checked_in(m) == CPUS - 1


@NATIVE
def test_the_guest_s_stop_reaches_aps_that_were_never_started(native):
    """The APs wait for INIT inside KVM_RUN (KVM_MP_STATE_UNINITIALIZED) when the BSP ends
    the run: they are kicked out of it too."""
    for _ in range(8 * STRESS):
        with smp_machine(native, alone=True) as m:
            m.start()
            assert ended(m).reason == "exit"


@NATIVE
def test_stops_and_pauses_at_random_moments(native):
    """request_stop(), a timeout, close() and pause/resume cycles, each at a random moment
    of the APs' life (bring-up included), with the APs doing each of their things: every
    pause completes, every run ends."""
    rnd = random.Random(f"random-moments-{native}")
    for _ in range(16 * STRESS):
        m = smp_machine(native, rnd.choice(list(AP_MODES)), wait_aps=99)     # the BSP never ends the run
        how = rnd.choice(["stop", "pauses", "timeout", "close"])
        m.start(timeout=rnd.random() * 0.01 if how == "timeout" else None)
        time.sleep(rnd.random() * rnd.choice([0.0005, 0.005, 0.05]))
        if how == "pauses":
            for _ in range(rnd.randrange(1, 10)):
                assert m.pause(timeout=LIMIT) is True
                m.resume()
                time.sleep(rnd.random() * 0.001)
        if how == "close":
            closer = threading.Thread(target=m.close, daemon=True)
            closer.start()
            closer.join(LIMIT)
            if closer.is_alive():
                STUCK.append(m)
                pytest.fail(f"close() did not return within {LIMIT} s")
            continue
        if how != "timeout":
            m.request_stop("interrupted")
        assert ended(m).reason in ("interrupted", "timeout")
        m.close()


# --- regressions: the kick that does not arrive ------------------------------------------------
@NATIVE
@pytest.mark.parametrize("caller", ["run", "start"])
def test_a_blocked_kick_signal_does_not_hang_the_run(native, caller):
    """The smp demo with the kick signal blocked in the thread that runs the machine (as a
    parent process or a test runner can hand down: a thread inherits its creator's mask and
    a process keeps it across exec). Before the fix every vCPU thread inherited it, the APs
    halted in the in-kernel LAPIC never saw their kick and the run never returned (its
    timeout is cancelled once vCPU 0 has stopped). Now each vCPU thread unblocks it while it
    runs, and the caller's mask is given back as it was."""
    g = guests.get("smp")
    sig = signal.SIGRTMIN
    box = {}

    def body(m):
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
        try:
            if caller == "run":
                box["result"] = m.run(timeout=LIMIT)
            else:
                m.start(timeout=LIMIT)
                box["result"] = m.wait(LIMIT + 5)
            box["mask"] = blocked_signals()
        except BaseException as e:
            box["error"] = e
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    m = kvmpy.Machine(mem_size=64 << 20, cpus=g.cpus, native=native)
    m.load(g.path, g.format, mode=g.mode)
    t = threading.Thread(target=body, args=(m,), daemon=True)   # the test's own mask stays as it is
    t.start()
    t.join(LIMIT + 10)
    if t.is_alive():
        STUCK.append(m)
        pytest.fail("the run did not end: a vCPU never saw its kick")
    if "error" in box:
        raise box["error"]
    assert (box["result"].reason, box["result"].status) == ("exit", g.expect_status)
    assert m.serial_output == g.expect_output
    assert sig in box["mask"]                   # the caller's thread: blocked again, as it was
    m.close()


@NATIVE
def test_the_caller_s_signal_mask_is_left_alone(native):
    """vCPU 0 runs in the caller's thread: a kick signal that was not blocked there is not
    blocked after the run either."""
    with smp_machine(native, "halt", CPUS - 1) as m:
        before = blocked_signals()
        assert m.run(timeout=LIMIT).reason == "exit"
        assert blocked_signals() == before


def lossy(vcpu, lost: int, after):
    """``vcpu.kick`` that does nothing the first ``lost`` times it is called once ``after()``
    holds: a kick that never arrives (e.g. its signal blocked, or spent on the handler
    outside KVM_RUN while something cleared immediate_exit)."""
    kick, left = vcpu.kick, [lost]

    def maybe_kick():
        if after() and left[0] > 0:
            left[0] -= 1
            return
        kick()
    vcpu.kick = maybe_kick
    return kick


@NATIVE
def test_a_lost_stop_kick_is_sent_again(native):
    """The APs halt in the in-kernel LAPIC and the BSP ends the run; the first two kicks each
    AP gets after the stop are lost. Before the fix those two were all it got (vCPU 0's, and
    run_loops' after vCPU 0 ended): the run never returned. The watchdog now kicks every
    vCPU until its loop has ended."""
    m = smp_machine(native, "halt", CPUS - 1)
    kicks = [lossy(v, 2, lambda: m.gate.stop.reason is not None) for v in m.vcpus[1:]]
    m.start(timeout=LIMIT)
    try:
        r = m.wait(LIMIT)
    except TimeoutError:
        for v, kick in zip(m.vcpus[1:], kicks):      # let the stuck run go with working kicks
            v.kick = kick
        m.request_stop()
        m.wait(LIMIT)
        m.close()
        pytest.fail("the run did not end: a lost kick was not sent again")
    assert (r.reason, r.status) == ("exit", 1)
    m.close()


@NATIVE
def test_a_lost_pause_kick_is_sent_again(native):
    """A pause whose kick to a halted AP is lost still completes (the AP is kicked again)."""
    with smp_machine(native, "halt", wait_aps=99) as m:
        m.start(timeout=LIMIT * 3)
        deadline = time.monotonic() + LIMIT
        while checked_in(m) < CPUS - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert checked_in(m) == CPUS - 1
        lossy(m.vcpus[1], 1, lambda: True)
        t = time.monotonic()
        assert m.pause(timeout=LIMIT) is True
        assert time.monotonic() - t < LIMIT / 2
        m.resume()
        m.request_stop()
        assert ended(m).reason == "interrupted"


# --- the C loop: a kick is obeyed at the next exit boundary ------------------------------------
# Real mode: cld; mov $0x1000,%ax; mov %ax,%es; 1: mov $0x8000,%di; mov $0xffff,%cx;
# mov $0x80,%dx; rep insb; jmp 1b   (an unclaimed port: C serves every exit)
REP_INSB = bytes.fromhex("fcb800108ec0bf0080b9ffffba8000f36cebf3")


@NATIVE
def test_a_stop_ends_a_guest_whose_exits_chain(native):
    """Each exit of a long `rep insb` is completed by the next KVM_RUN, which then makes the
    next exit at once, before KVM looks at immediate_exit: the C loop looks at it itself
    after each exit it serves, so request_stop() still ends the run at once."""
    chained = 0
    for _ in range(4 * STRESS):
        with kvmpy.Machine(mem_size=1 << 20, native=native) as m:
            m.load(REP_INSB, format="raw", mode="real")
            m.start()
            time.sleep(0.05)
            m.request_stop()
            assert ended(m).reason == "interrupted"
            chained += m.stats.exits["io-in"] > 0   # on a loaded host the vCPU may not have begun yet
    assert chained > 0
