"""The control socket (kvmpy.lifecycle.control) and `kvmpy ctl` / `kvmpy run --control`.

Only the socket's owner may use it; every request gets an answer, bad ones an
{"ok": false, "error": ...} that leaves the server serving; the socket file never
clobbers another file or another VM's live socket, and goes away with its server.
"""
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

import kvmpy
import kvmpy.cli
from kvmpy import guests
from kvmpy.lifecycle.control import ControlError, ControlServer, request

from .lab import wait_until
from . import lab

ENV = lab.CHILD_ENV
COUNTER = guests.get("counter")
NOBODY = 65534


@pytest.fixture
def sockdir():
    """A short directory for sockets (pytest's tmp_path can exceed AF_UNIX's 108 bytes),
    world-searchable so another user reaches the socket file's own permissions."""
    d = tempfile.mkdtemp(prefix="kvmpy-ctl-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def load_raw(m, name):
    g = guests.get(name)
    m.load(g.path, g.format, mode=g.mode, load_addr=g.load_addr, entry=g.entry)




def raw_exchange(path, lines: list[bytes]) -> list[dict]:
    """Send raw request lines on one connection; the answers, one per line sent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        f = s.makefile("rb")
        answers = []
        for line in lines:
            s.sendall(line)
            answers.append(json.loads(f.readline()))
        return answers


@pytest.fixture
def pio_machine(sockdir):
    """A running pio-loop guest (endless, one exit per iteration) with a ControlServer."""
    with kvmpy.Machine(mem_size=2 << 20) as m:
        load_raw(m, "pio-loop")
        path = os.path.join(sockdir, "vm.sock")
        with ControlServer(m, path) as server:
            m.start(timeout=60)
            yield m, path, server
            m.request_stop("interrupted")
            try:
                m.wait(10)
            except RuntimeError:                    # the test has waited for it already
                pass


def moving(m) -> bool:
    """Whether the guest's RAX changes (the pio-loop guest increments it all the time);
    tries for up to 5 s, since a busy host may not run the vCPU thread for a while."""
    try:
        wait_until(lambda: _moved(m), 5, "the guest to move")
    except AssertionError:
        return False
    return True


def _moved(m) -> bool:
    a = m.vcpus[0].get_regs().rax
    time.sleep(0.02)
    return m.vcpus[0].get_regs().rax != a


# --- the library client ------------------------------------------------------------------
def test_socket_file_is_a_socket_with_mode_0600_and_close_removes_it(sockdir):
    path = os.path.join(sockdir, "vm.sock")
    with kvmpy.Machine(mem_size=1 << 20) as m:
        server = ControlServer(m, path)
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
        server.close()
        assert not os.path.lexists(path)
        server.close()                              # idempotent
    with pytest.raises(ControlError, match="cannot connect"):
        request(path, "status", timeout=5)


def test_commands_through_the_library_client(pio_machine, tmp_path, capsys):
    m, path, _ = pio_machine
    assert request(path, "status", timeout=10) == {"ok": True, "running": True, "paused": False}
    running = request(path, "inspect", timeout=10)
    assert running["ok"] is False and "paused" in running["error"]
    assert request(path, "pause", timeout=10) == {"ok": True, "running": True, "paused": True}
    assert m.paused
    assert request(path, "status", timeout=10) == {"ok": True, "running": True, "paused": True}
    regs = m.vcpus[0].get_regs()
    report = request(path, "inspect", timeout=10)
    assert report["ok"] and "real mode" in report["text"] and f"rip={regs.rip:016x}" in report["text"]
    bad_vcpu = request(path, "inspect", vcpu=3, timeout=10)
    assert bad_vcpu["ok"] is False and "no vCPU 3" in bad_vcpu["error"]
    stats = request(path, "stats", timeout=10)
    assert stats["ok"] and isinstance(stats["stats"], dict) and stats["text"]
    snap = tmp_path / "snap"
    answer = request(path, "snapshot", path=str(snap), timeout=30)
    assert answer == {"ok": True, "path": str(snap)}
    assert (snap / "manifest.json").is_file() or any(snap.iterdir())
    assert m.paused                                 # a paused machine stays paused through a snapshot
    again = request(path, "snapshot", path=str(snap), timeout=30)
    assert again["ok"] is False and str(snap) in again["error"]      # exists: refused, not overwritten
    assert request(path, "resume", timeout=10) == {"ok": True, "running": True, "paused": False}
    assert moving(m), "the guest goes on after resume"
    assert request(path, "stop", timeout=10) == {"ok": True}
    assert m.wait(10).reason == "stopped"
    assert request(path, "status", timeout=10) == {"ok": True, "running": False, "paused": False}
    stopped = request(path, "pause", timeout=10)
    assert stopped["ok"] is False and "not running" in stopped["error"]
    assert request(path, "resume", timeout=10) == {"ok": True, "running": False, "paused": False}
    assert kvmpy.cli.main(["ctl", path, "resume"]) == 0    # says so, rather than "running"
    assert capsys.readouterr().out == "stopped\n"
    assert kvmpy.cli.main(["ctl", path, "pause"]) == 4
    assert "not running" in capsys.readouterr().err


def test_a_snapshot_taken_through_the_socket_continues_to_the_same_end(sockdir, tmp_path):
    """Paused, saved through the socket, stopped: the restored machine prints exactly the
    rest of the uninterrupted run's output and exits as it would have."""
    n, pages = 400, 1
    path = os.path.join(sockdir, "vm.sock")
    snap = str(tmp_path / "snap")
    with kvmpy.Machine() as m, ControlServer(m, path):
        m.load(COUNTER.path, "elf", mode="long", cmdline=f"n={n} pages={pages}")
        m.start(timeout=60)
        wait_until(lambda: (m.console.drain(), b"count 5 " in m.serial_output)[1], 10, "some output")
        assert request(path, "pause", timeout=10)["ok"]
        assert request(path, "snapshot", path=snap, timeout=30)["ok"]
        assert request(path, "stop", timeout=10)["ok"]
        assert m.wait(10).reason == "stopped"
        before = m.serial_output
    assert b"counter: done" not in before
    with kvmpy.Machine.restore(snap) as r:
        result = r.run(timeout=60)
        after = r.serial_output
    assert (result.reason, result.status) == ("exit", COUNTER.expect_status)
    assert before + after == guests.counter_output(n, pages)


BAD_REQUESTS = [
    (b"this is not json\n", "bad request"),
    (b"[1, 2, 3]\n", "JSON object"),
    (b"\"status\"\n", "JSON object"),
    (b'{"cmd": "frobnicate"}\n', "unknown command"),
    (b'{"nocmd": 1}\n', "unknown command"),
    (b'{"cmd": "snapshot"}\n', "path"),
    (b'{"cmd": "snapshot", "path": ""}\n', "path"),
    (b'{"cmd": "snapshot", "path": 42}\n', "path"),
    (b'{"cmd": "migrate"}\n', "to"),
    (b'{"cmd": "migrate", "to": 4444}\n', "HOST:PORT"),
    (b'{"cmd": "migrate", "to": "no-port-here"}\n', "HOST:PORT"),
    (b'{"cmd": "migrate", "to": "127.0.0.1:1", "key": "not hex"}\n', "in hex"),
    (b'{"cmd": "migrate", "to": "127.0.0.1:1", "key": 17}\n', "in hex"),
    (b'{"cmd": "migrate", "to": "127.0.0.1:1", "key": "0011"}\n', "16 to 4096 bytes"),
    (b'{"cmd": "inspect", "vcpu": "zero"}\n', "bad request"),
    (b'{"cmd": "inspect", "vcpu": [0]}\n', "bad request"),
]


@pytest.mark.parametrize("line,why", BAD_REQUESTS, ids=[w + str(i) for i, (_, w) in enumerate(BAD_REQUESTS)])
def test_a_bad_request_gets_an_error_and_the_server_keeps_serving(pio_machine, line, why):
    m, path, _ = pio_machine
    bad, status = raw_exchange(path, [line, b'{"cmd": "status"}\n'])   # the same connection goes on
    assert bad["ok"] is False and why in bad["error"], bad
    assert status == {"ok": True, "running": True, "paused": False}
    assert request(path, "status", timeout=10)["ok"]                   # and new connections
    assert not m.paused and moving(m)


def test_an_oversized_request_is_refused_and_the_server_keeps_serving(pio_machine):
    m, path, _ = pio_machine
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        try:
            s.sendall(b'{"cmd": "status", "pad": "' + b"x" * (1 << 20) + b'"}\n')
        except (BrokenPipeError, ConnectionResetError):
            pass                                    # the server may hang up before reading it all
        answer = json.loads(s.makefile("rb").readline())
    assert answer["ok"] is False and "too long" in answer["error"]
    assert request(path, "status", timeout=10)["ok"] and moving(m)


def test_a_request_that_breaks_the_decoder_still_gets_an_answer(pio_machine):
    """Deeply nested JSON makes json.loads raise RecursionError: answered, not a dead thread."""
    m, path, _ = pio_machine
    bad, status = raw_exchange(path, [b"[" * 60000 + b"\n", b'{"cmd": "status"}\n'])
    assert bad["ok"] is False and bad["error"]
    assert status["ok"] and moving(m)


class FakeServer:
    """A Unix socket server that answers every connection with ``reply`` (bytes) and hangs up,
    or (reply None) reads the request and never answers."""

    def __init__(self, path, reply):
        import threading
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.reply, self.conns = reply, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            conn.recv(4096)
            if self.reply is not None:
                conn.sendall(self.reply)
                conn.close()

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("reply,why", [(b"garbage\n", "garbage"), (b"[1]\n", "garbage"),
                                       (b"", "without answering"), (None, "did not answer")],
                         ids=["not-json", "not-object", "hangs-up", "silent"])
def test_the_client_reports_a_misbehaving_server_as_control_error(sockdir, reply, why):
    path = os.path.join(sockdir, "fake.sock")
    fake = FakeServer(path, reply)
    try:
        with pytest.raises(ControlError, match=why):
            request(path, "status", timeout=0.5)
        if reply is not None:                   # and `kvmpy ctl` exits 4 with a message, no traceback
            r = ctl(path, "status")
            assert r.returncode == 4 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        fake.close()


def _as_nobody(path: str, chmod_world: bool) -> dict:
    """Connect to the socket as user 65534 and ask it to pause; what happened."""
    code = f"""
import json, os, socket
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect({path!r})
except OSError as e:
    print(json.dumps({{"connect_errno": e.errno}})); raise SystemExit
try:
    s.sendall(b'{{"cmd": "pause"}}\\n')
except OSError:
    pass            # the server may have answered and hung up already
line = s.makefile("rb").readline()
print(json.dumps({{"answer": json.loads(line) if line else None}}))
"""
    if chmod_world:
        os.chmod(path, 0o666)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_another_user_is_refused_and_the_vm_is_unaffected(pio_machine):
    """The 0600 mode keeps another user from connecting; and should the mode be widened,
    the server's SO_PEERCRED check still refuses them."""
    import errno
    m, path, _ = pio_machine
    got = _as_nobody(path, chmod_world=False)
    assert got == {"connect_errno": errno.EACCES}
    got = _as_nobody(path, chmod_world=True)
    answer = got["answer"]
    assert answer is not None and answer["ok"] is False and str(NOBODY) in answer["error"]
    assert not m.paused and m.running and moving(m)
    assert request(path, "status", timeout=10) == {"ok": True, "running": True, "paused": False}


class SlowMachine:
    """Stands in for a Machine whose pause() takes a while (a big guest's snapshot, say)."""

    def __init__(self):
        import threading
        self.entered, self.finished = threading.Event(), threading.Event()

    def pause(self):
        self.entered.set()
        time.sleep(0.5)
        self.finished.set()
        return True


def test_close_finishes_requests_under_way_and_does_not_wait_for_idle_clients(sockdir):
    """Once close() returns the server no longer touches the machine (the caller closes
    it next), and a connected client that sends nothing does not hold close() up."""
    import threading
    path = os.path.join(sockdir, "vm.sock")
    m = SlowMachine()
    server = ControlServer(m, path)
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(path)
    answers = []
    t = threading.Thread(target=lambda: answers.append(request(path, "pause", timeout=10)))
    t.start()
    assert m.entered.wait(10)
    t0 = time.monotonic()
    server.close()
    assert m.finished.is_set()                      # the pause ended before close() returned
    assert time.monotonic() - t0 < 5
    t.join(10)
    assert answers == [{"ok": True, "running": True, "paused": True}]    # and its client got the answer
    assert idle.recv(1) == b""                      # the idle client was hung up on
    idle.close()
    assert not os.path.lexists(path)


def test_close_leaves_a_newer_servers_socket_alone(sockdir):
    """If our socket file was removed and another VM now serves that path, closing the
    old server does not delete the new one's socket."""
    path = os.path.join(sockdir, "vm.sock")
    with kvmpy.Machine(mem_size=1 << 20) as m1, kvmpy.Machine(mem_size=1 << 20) as m2:
        old = ControlServer(m1, path)
        os.unlink(path)
        with ControlServer(m2, path):
            old.close()
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            assert request(path, "status", timeout=10)["ok"]
        assert not os.path.lexists(path)


def test_a_stale_socket_file_is_replaced(sockdir):
    path = os.path.join(sockdir, "vm.sock")
    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "s.bind(sys.argv[1]); s.listen(1)\n")         # dies without unlinking it
    subprocess.run([sys.executable, "-c", code, path], check=True, timeout=30)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with kvmpy.Machine(mem_size=1 << 20) as m, ControlServer(m, path):
        assert request(path, "status", timeout=10) == {"ok": True, "running": False, "paused": False}
    assert not os.path.lexists(path)


def test_a_live_socket_of_another_server_is_refused(sockdir):
    path = os.path.join(sockdir, "vm.sock")
    with kvmpy.Machine(mem_size=1 << 20) as m1, kvmpy.Machine(mem_size=1 << 20) as m2:
        with ControlServer(m1, path):
            inode = os.lstat(path).st_ino
            with pytest.raises(ControlError, match="another process is listening"):
                ControlServer(m2, path)
            assert os.lstat(path).st_ino == inode                 # untouched
            assert request(path, "status", timeout=10)["ok"]      # and still served
        assert not os.path.lexists(path)


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_a_path_that_is_not_a_socket_is_refused_and_left_alone(sockdir, kind):
    path = os.path.join(sockdir, "vm.sock")
    target = os.path.join(sockdir, "precious")
    with open(target, "wb") as f:
        f.write(b"precious data")
    if kind == "file":
        os.rename(target, path)
    elif kind == "directory":
        os.mkdir(path)
    else:
        os.symlink(target, path)
    with kvmpy.Machine(mem_size=1 << 20) as m:
        with pytest.raises(ControlError, match="not a socket"):
            ControlServer(m, path)
    assert os.path.lexists(path)
    if kind == "file":
        with open(path, "rb") as f:
            assert f.read() == b"precious data"
    elif kind == "symlink":
        assert os.readlink(path) == target
        with open(target, "rb") as f:
            assert f.read() == b"precious data"


def test_a_socket_path_that_cannot_be_bound_is_a_clear_control_error(sockdir):
    with kvmpy.Machine(mem_size=1 << 20) as m:
        with pytest.raises(ControlError, match="No such file or directory"):
            ControlServer(m, os.path.join(sockdir, "missing-dir", "vm.sock"))
        with pytest.raises(ControlError, match="too long"):
            ControlServer(m, os.path.join(sockdir, "x" * 120))


# --- the command line ---------------------------------------------------------------------
def kvmpy_cli(*args, timeout=30, **kw):
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True, text=True,
                          env=ENV, cwd="/", timeout=timeout, **kw)


def ctl(path, *args):
    return kvmpy_cli("ctl", path, *args)


def test_ctl_against_a_missing_socket_exits_4_without_a_traceback(sockdir):
    path = os.path.join(sockdir, "nothing.sock")
    r = ctl(path, "status")
    assert r.returncode == 4
    assert r.stdout == ""
    assert "cannot connect" in r.stderr and path in r.stderr and "No such file" in r.stderr
    assert "Traceback" not in r.stderr


def test_ctl_against_a_socket_nobody_serves_exits_4(sockdir):
    path = os.path.join(sockdir, "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                                       # the file stays, nobody listens
    r = ctl(path, "pause")
    assert r.returncode == 4 and "cannot connect" in r.stderr and "Traceback" not in r.stderr


def test_run_with_control_and_ctl_end_to_end(sockdir, tmp_path):
    """`kvmpy run IMAGE --control PATH` served by `kvmpy ctl`: status, pause, resume, stats,
    inspect, snapshot, stop; the snapshot continues under `kvmpy restore` to the guest's
    normal end, and the two outputs together are the uninterrupted run's."""
    n, pages = 1500, 1
    path = os.path.join(sockdir, "vm.sock")
    snap = str(tmp_path / "snap")
    vm = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", str(COUNTER.path), "--cmdline",
                           f"n={n} pages={pages}", "--control", path, "--timeout", "60"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=ENV, cwd="/")
    try:
        wait_until(lambda: os.path.exists(path) or vm.poll() is not None, 10, "the control socket")
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600

        r = ctl(path, "status")
        assert (r.returncode, r.stdout, r.stderr) == (0, "running\n", "")
        r = ctl(path, "inspect")
        assert r.returncode == 4 and "paused" in r.stderr and "Traceback" not in r.stderr
        r = ctl(path, "pause")
        assert (r.returncode, r.stdout) == (0, "paused\n")
        r = ctl(path, "status")
        assert (r.returncode, r.stdout) == (0, "paused\n")
        r = ctl(path, "resume")
        assert (r.returncode, r.stdout) == (0, "running\n")
        r = ctl(path, "status")
        assert (r.returncode, r.stdout) == (0, "running\n")
        r = ctl(path, "pause")
        assert (r.returncode, r.stdout) == (0, "paused\n")
        r = ctl(path, "stats")
        assert r.returncode == 0 and "io-out" in r.stdout
        r = ctl(path, "inspect", "0")
        assert r.returncode == 0 and "vCPU 0" in r.stdout and "long mode" in r.stdout
        r = ctl(path, "inspect", "7")
        assert r.returncode == 4 and "no vCPU 7" in r.stderr
        r = ctl(path, "snapshot")
        assert r.returncode == 2 and "needs DIR" in r.stderr
        r = ctl(path, "snapshot", snap)
        assert (r.returncode, r.stdout) == (0, f"saved {snap}\n"), r.stderr
        r = ctl(path, "stop")
        assert r.returncode == 0, r.stderr
        out, err = vm.communicate(timeout=30)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.communicate()
    assert vm.returncode == 0, err                  # stopped through --control: exit 0
    assert "stopped through the control socket" in err.decode()
    assert b"counter: done" not in out
    assert not os.path.lexists(path)                # the server removed its socket

    r = ctl(path, "status")                         # the VM has gone
    assert r.returncode == 4 and "cannot connect" in r.stderr

    restored = subprocess.run([sys.executable, "-m", "kvmpy", "restore", snap], capture_output=True,
                              env=ENV, cwd="/", timeout=60, stdin=subprocess.DEVNULL)
    assert restored.returncode == COUNTER.expect_status & 0xFF, restored.stderr
    assert out + restored.stdout == guests.counter_output(n, pages)


def test_stats_of_a_running_vm_include_the_c_loops_counts(pio_machine):
    """The native loop counts its exits in C and adds them to Machine.stats when a run ends;
    the control socket's stats show them while the run goes on, and they grow."""
    m, path, _ = pio_machine
    wait_until(lambda: request(path, "stats", timeout=10)["stats"]["exits"].get("io-out", 0) > 100,
               10, "io-out exits to show up")
    first = request(path, "stats", timeout=10)["stats"]["exits"]["io-out"]
    wait_until(lambda: request(path, "stats", timeout=10)["stats"]["exits"]["io-out"] > first,
               10, "the count to grow")
    assert m.stats.exits.get("io-out", 0) == 0          # the machine's own stats: at the run's end


def test_kvmpy_inspect_pauses_for_the_report_and_the_guest_goes_on(pio_machine):
    """`kvmpy inspect PATH [VCPU]` shows a running VM's state (it pauses it for a moment) and
    leaves it running; a paused VM stays paused; a bad vCPU is a clear error."""
    m, path, _ = pio_machine
    r = kvmpy_cli("inspect", path)
    assert r.returncode == 0, r.stderr
    assert "=== vCPU 0 ===" in r.stdout and "real mode" in r.stdout and "rip=" in r.stdout
    assert m.running and not m.paused
    assert moving(m), "the guest goes on after the report"
    assert request(path, "pause", timeout=10)["ok"]
    r = kvmpy_cli("inspect", path, "0")
    assert r.returncode == 0 and f"rip={m.vcpus[0].get_regs().rip:016x}" in r.stdout
    assert m.paused                                     # it was paused before: it stays so
    r = kvmpy_cli("inspect", path, "5")
    assert r.returncode == 4 and "no vCPU 5" in r.stderr and "Traceback" not in r.stderr
    request(path, "resume", timeout=10)


def test_a_run_started_paused_waits_for_ctl_resume(sockdir):
    """`kvmpy run --paused --control PATH` holds the guest until `kvmpy ctl PATH resume`, then
    the guest runs to its normal end; without --control, --paused is a usage error."""
    r = kvmpy_cli("run", str(COUNTER.path), "--paused")
    assert r.returncode == 2 and "--paused needs --control" in r.stderr
    path = os.path.join(sockdir, "vm.sock")
    vm = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", str(COUNTER.path), "--cmdline", "n=5 pages=1",
                           "--control", path, "--paused", "--timeout", "60"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd="/")
    try:
        wait_until(lambda: os.path.exists(path) or vm.poll() is not None, 10, "the control socket")
        r = ctl(path, "status")
        assert (r.returncode, r.stdout) == (0, "paused\n"), r.stderr
        time.sleep(0.2)
        assert ctl(path, "status").stdout == "paused\n"          # still held
        r = ctl(path, "resume")
        assert (r.returncode, r.stdout) == (0, "running\n")
        out, err = vm.communicate(timeout=60)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.communicate()
    assert vm.returncode == COUNTER.expect_status & 0xFF, err
    assert out == guests.counter_output(5, 1)
