"""The gdb stub against peers that are not gdb (issue 11, item 3): bad packets get an
error reply, never a traceback; lengths and packet sizes are bounded; only the VM's owner
may connect; the wait for a debugger ends on a timeout or a stop request."""
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import kvmpy
from kvmpy import guests
from kvmpy.debug.gdbstub import MAX_JUNK, MAX_MEMORY, PACKET_SIZE, GdbStub, GdbStubError, checksum

from .test_gdbstub import HELLO, Client, Served, kvmpy_cmd, sock_path

NOBODY = 65534


@pytest.fixture(scope="module")
def stub():
    """A stub (never served) on a 64 MiB long-mode machine, for handle() alone."""
    with kvmpy.Machine(mem_size=64 << 20) as m:
        m.load(HELLO.path)
        s = GdbStub(m, sock_path())
        yield s
        s.close()


# --- bad packets get E01, not a traceback --------------------------------------------
@pytest.mark.parametrize("pkt", [
    "P0=" + "ff" * 9,                   # OverflowError: a 9-byte value for an 8-byte register
    "P10=" + "ff" * 9,                  # ... rip
    "c" + "f" * 20,                     # OverflowError: resume at an address beyond 64 bits
    "s-1",                              # OverflowError: a negative address
    "P-1=00",                           # int() took the sign: wrote r15
    "p-1",                              # ... and read it
    "Hg-5", "qThreadExtraInfo,0", "G 00", "m 0,4", "m0,+4",
])
def test_bad_numbers_get_an_error_reply(stub, pkt):
    assert stub.handle(pkt) == "E01"


def test_a_breakpoint_beyond_64_bits_is_refused_not_a_crash_at_the_next_continue(stub):
    """Z took any int; set_guest_debug then raised OverflowError out of the next c/s."""
    for pkt in ("Z1,-1,1", "Z1,1ffffffffffffffff,1", "Z2,-8,8", "Z0," + "f" * 17 + ",1"):
        assert stub.handle(pkt) == "E01"
    assert stub.slots == [None] * 4


def test_memory_lengths_are_bounded(stub):
    """m with a huge length read it all into memory (and twice that as hex)."""
    tracemalloc.start()
    try:
        assert stub.handle("m0,%x" % (32 << 20)) == "E01"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert len(stub.handle("m100000,%x" % MAX_MEMORY)) == 2 * MAX_MEMORY
    assert stub.handle("m100000,%x" % (MAX_MEMORY + 1)) == "E01"
    assert stub.handle("M200000,2:0102") == "OK" and stub.handle("m200000,2") == "0102"
    assert stub.handle("M200000,3:0102") == "E01"                       # length and data disagree
    assert stub.handle("M200000,%x:%s" % (MAX_MEMORY + 1, "00" * (MAX_MEMORY + 1))) == "E01"
    assert stub.handle("G" + "00" * 537) == "E01"                       # more than gdb's 536 bytes


# --- hypothesis: any packet ----------------------------------------------------------
NUMBER = st.integers(0, 1 << 80).map("{:x}".format) | st.integers(-(1 << 70), 0).map(str) | \
    st.sampled_from(["", "0", "-1", "x", "xx", "ff" * 8, "ff" * 9, "1_0", " 1", "+1", "2000", "2001"])
#: the packets the stub parses, with any numbers in their fields (c and s are left out: they run the guest)
TEMPLATES = ["m{},{}", "M{},{}:{}", "p{}", "P{}={}", "Z{},{},{}", "z{},{},{}", "Hg{}", "Hc{}", "H{}",
             "T{}", "G{}", "qThreadExtraInfo,{}", "?{}", "g{}", "q{}", "D{}"]
GRAMMAR = st.builds(lambda t, nums: t.format(*nums), st.sampled_from(TEMPLATES), st.lists(NUMBER, min_size=3, max_size=3))
NOISE = st.builds(str.__add__, st.sampled_from(list("?gGpPmMzZHTqDv") + ["qSupported", "qThreadExtraInfo,"]),
                  st.text(alphabet="0123456789abcdefABCDEFx,:=;-+ #$}*\x00\xff", max_size=64)
                  | st.binary(max_size=64).map(lambda b: b.decode("latin-1")))


def well_formed(reply) -> bool:
    return reply is None or (isinstance(reply, str) and len(reply) <= PACKET_SIZE
                             and all(ch not in reply for ch in "$#") and reply.isascii())


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(pkt=GRAMMAR | NOISE)
def test_any_packet_gets_a_well_formed_reply(stub, pkt):
    """The stub never raises, its reply fits the packet size, and memory stays bounded."""
    stub.done = False
    tracemalloc.start()
    try:
        reply = stub.handle(pkt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert well_formed(reply), reply
    assert peak < 1 << 20
    assert stub.error is None


# --- framing: packet size, floods, resets -----------------------------------------------
def frame(payload: bytes) -> bytes:
    return b"$" + payload + b"#" + checksum(payload)


def served(machine, timeout=30):
    s = Served(machine, timeout=timeout)
    return s, Client(s.stub.address)


def test_a_packet_over_the_advertised_size_gets_an_error_and_the_session_goes_on():
    with kvmpy.Machine(mem_size=1 << 20) as m:
        m.load(guests.path("spin"), format="raw", mode="real")
        s, c = served(m)
        assert c.ask("qSupported") == "PacketSize=%x" % PACKET_SIZE
        c.sock.sendall(frame(b"M0,%x:" % (PACKET_SIZE // 2) + b"00" * (PACKET_SIZE // 2)))
        assert c.reply() == "E01"
        assert c.ask("?") == "T05thread:1;"
        assert len(s.stub.buf) < PACKET_SIZE
        c.send("D")
        assert c.reply() == "OK"
        s.join()
    assert s.error is None


@pytest.mark.parametrize("flood", [b"$" + b"a" * 100, b"+" * 100, frame(b"g")[:-2] + b"zz"])
def test_a_peer_sending_unbounded_data_is_dropped_with_bounded_memory(flood):
    """Before: a packet that never ended grew the buffer without bound."""
    with kvmpy.Machine(mem_size=1 << 20) as m:
        m.load(guests.path("spin"), format="raw", mode="real")
        s, c = served(m)
        biggest = 0
        sent = 0
        try:
            while sent < 64 * MAX_JUNK:
                c.sock.sendall(flood * 1000)
                sent += len(flood) * 1000
                biggest = max(biggest, len(s.stub.buf))
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.join()
    assert s.error is None and sent < 64 * MAX_JUNK, "the stub kept reading"
    assert biggest <= PACKET_SIZE + 4096


def test_a_peer_that_resets_gets_no_traceback():
    """Before: the ack to a packet whose sender had gone raised BrokenPipeError out of serve()."""
    with kvmpy.Machine(mem_size=1 << 20) as m:
        m.load(guests.path("spin"), format="raw", mode="real")
        s, c = served(m)
        c.sock.sendall(frame(b"g") * 50)
        c.sock.close()
        s.join()
    assert s.error is None


# --- who may connect ---------------------------------------------------------------------
def test_the_socket_is_the_owners_only(monkeypatch):
    with kvmpy.Machine(mem_size=1 << 20) as m:
        path = sock_path()
        stub = GdbStub(m, path)
        st_ = os.lstat(path)
        assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o600
        stub.close()
        assert not os.path.exists(path)
        with pytest.raises(GdbStubError, match="loopback"):
            GdbStub(m, 0, host="0.0.0.0")
        with open(path, "w"):
            pass
        with pytest.raises(GdbStubError, match="not a socket"):
            GdbStub(m, path)


@pytest.mark.parametrize("tcp", [False, True])
def test_a_connection_from_another_uid_is_refused(monkeypatch, tcp):
    """Seen from a stub that believes it runs as someone else, our own connection is foreign."""
    import kvmpy.debug.gdbstub as gs
    with kvmpy.Machine(mem_size=1 << 20) as m:
        s = Served(m, 0 if tcp else None, timeout=1.5)
        monkeypatch.setattr(gs.os, "getuid", lambda: NOBODY)
        c = Client(s.stub.port if tcp else s.stub.address)
        assert c.sock.recv(16) == b""           # closed unanswered
        s.join()
    assert s.stub.refused == 1 and s.stub.stopped_waiting == "timeout" and s.result is None


@pytest.mark.parametrize("tcp", [False, True])
def test_our_own_connection_is_accepted(tcp):
    with kvmpy.Machine(mem_size=1 << 20) as m:
        s = Served(m, 0 if tcp else None)
        c = Client(s.stub.port if tcp else s.stub.address)
        assert c.ask("qAttached") == "1"
        c.send("D")
        assert c.reply() == "OK"
        s.join()
    assert s.stub.refused == 0


AS_NOBODY = """
import json, os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect_errno": e.errno})); sys.exit()
s.settimeout(10)
try:
    s.sendall(b"$g#67")
    got = s.recv(100).decode("latin-1")
except OSError:             # closed unanswered, maybe before our packet went out
    got = ""
print(json.dumps({"got": got}))
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_another_user_cannot_read_the_registers():
    """Before: anyone on the host could connect to 127.0.0.1:PORT and read the guest."""
    with kvmpy.Machine(mem_size=1 << 20) as m:
        s = Served(m, timeout=20)
        path = s.stub.address

        def as_nobody():
            r = subprocess.run([sys.executable, "-c", AS_NOBODY, path], capture_output=True, timeout=30, cwd="/")
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        assert as_nobody() == {"connect_errno": errno.EACCES}
        os.chmod(path, 0o666)                   # should the mode be widened, SO_PEERCRED still refuses
        assert as_nobody() == {"got": ""}
        assert s.stub.refused == 1
        c = Client(path)                        # and the owner still gets the session
        assert c.ask("qAttached") == "1"
        c.send("D")
        c.reply()
        s.join()


# --- the wait for a debugger ends ------------------------------------------------------------
def test_the_wait_honours_the_timeout_and_request_stop():
    with kvmpy.Machine(mem_size=1 << 20) as m:
        t0 = time.monotonic()
        s = Served(m, timeout=0.5)
        s.join()
        assert s.result is None and s.stub.stopped_waiting == "timeout"
        assert time.monotonic() - t0 < 5
        s = Served(m, timeout=None)
        time.sleep(0.3)
        s.stub.request_stop("interrupted")
        s.join()
        assert s.result is None and s.stub.stopped_waiting == "interrupted"


def test_request_stop_ends_a_session_whose_guest_runs():
    with kvmpy.Machine(mem_size=1 << 20) as m:
        m.load(guests.path("spin"), format="raw", mode="real")
        s, c = served(m)
        c.send("c")
        time.sleep(0.3)
        s.stub.request_stop("interrupted")
        assert c.reply() == "T02thread:1;"
        s.join()
    assert s.error is None and s.result.reason == "interrupted"


def test_cli_gdb_honours_timeout():
    """Before: kvmpy demo --gdb PORT --timeout 1 waited for gdb for ever."""
    path = sock_path()
    vmm = kvmpy_cmd("demo", "hello-long", "--gdb", path, "--timeout", "1")
    try:
        _, err = vmm.communicate(timeout=30)
    finally:
        if vmm.poll() is None:
            vmm.kill()
    assert vmm.returncode == 124, err
    assert b"no debugger connected within 1 s" in err
    assert not os.path.exists(path)


def test_cli_gdb_ctrl_c_ends_the_wait():
    """Before: Ctrl-C asked the (not yet running) machine to stop and the wait went on."""
    vmm = kvmpy_cmd("demo", "hello-long", "--gdb", sock_path())
    try:
        assert b"waiting for gdb" in vmm.stderr.readline()
        vmm.send_signal(signal.SIGINT)
        _, err = vmm.communicate(timeout=30)
    finally:
        if vmm.poll() is None:
            vmm.kill()
    assert vmm.returncode == 130, err


@pytest.mark.parametrize("value,message", [("1234", "tcp:1234"), ("tcp:x", "tcp:PORT"), ("tcp:70000", "65535")])
def test_cli_gdb_forms(value, message):
    vmm = kvmpy_cmd("demo", "hello-long", "--gdb", value)
    _, err = vmm.communicate(timeout=30)
    assert vmm.returncode == 2 and message.encode() in err, err
