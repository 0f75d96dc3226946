"""The sandboxed VMM process (kvmpy.vmm.confine, docs/security.md "Confining the VMM process").

The seccomp filter, no_new_privs and the user drop are process-wide and cannot be undone,
so every test that turns them on runs its own interpreter (``python -c`` or ``python -m
kvmpy``); this pytest process is never confined.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kvmpy import guests
from kvmpy.cli import EXIT_VMM_ERROR
from kvmpy.vmm import confine
from . import lab

ENV = lab.CHILD_ENV
CMD = [sys.executable, "-m", "kvmpy"]

#: Real mode at 0x7c00: mov dx, 0x500; mov al, 1; out dx, al; hlt
OUT_TO_0x500 = bytes([0xBA, 0x00, 0x05, 0xB0, 0x01, 0xEE, 0xF4])

#: A script: kvmpy's CLI with a Python device at port 0x500 whose write() makes a system
#: call the filter refuses (``CALL``), run by the guest above from its vCPU thread.
HOSTILE_RUN = textwrap.dedent("""
    import os, socket, sys
    import kvmpy.cli
    from kvmpy.vmm import machine as mm

    class Hostile:
        def read(self, offset, size):
            return 0
        def write(self, offset, size, value):
            CALL

    load = mm.Machine.load
    def load_with_device(self, *args, **kwargs):
        self.pio.attach(0x500, 1, Hostile(), "hostile")
        return load(self, *args, **kwargs)
    mm.Machine.load = load_with_device
    sys.exit(kvmpy.cli.main(sys.argv[1:]))
""")


def python(code: str, *args, timeout=60, input=b""):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=timeout,
                          env=ENV, cwd="/", input=input)


def kvmpy(*args, input=b"", timeout=60):
    return subprocess.run([*CMD, *args], capture_output=True, timeout=timeout, env=ENV, cwd="/", input=input)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(OUT_TO_0x500)
    return str(path)


# --- (1) a refused call ends the run with an error that names it ----------------------------
@pytest.mark.parametrize("loop", [[], ["--python"]], ids=["native", "python"])
@pytest.mark.parametrize("call, name", [
    ("socket.socket(socket.AF_INET, socket.SOCK_STREAM)", "socket"),
    ("os.open('/tmp/kvmpy-confine-test', os.O_WRONLY | os.O_CREAT)", "openat"),
    ("os.fork()", "clone"),
    ("os.execv('/bin/true', ['true'])", "execve"),
])
def test_a_refused_call_from_a_vcpu_thread_ends_the_run_naming_it(image, loop, call, name):
    """The guest's OUT makes a Python device call ``socket``, ``open`` for writing, ``fork``
    or ``execve`` in the vCPU thread: the run ends with one line naming the call and the
    switch, exit status 4, no traceback, and the process was not killed by SIGSYS."""
    r = python(HOSTILE_RUN.replace("CALL", call), "run", image, "--format", "raw", "--no-irqchip", *loop)
    err = r.stderr.decode()
    assert r.returncode == EXIT_VMM_ERROR, (r.returncode, err)
    assert f"seccomp filter refused the system call {name} " in err, err
    assert "--no-sandbox" in err and "Traceback" not in err


def test_the_same_call_is_allowed_with_no_sandbox(image):
    """Without the sandbox the same device runs, and the guest halts: the refusal above was
    the filter's."""
    r = python(HOSTILE_RUN.replace("CALL", "socket.socket().close()"),
               "run", image, "--format", "raw", "--no-irqchip", "--no-sandbox")
    assert r.returncode == 0, r.stderr.decode()


def test_the_library_names_the_call_a_run_raised():
    """Machine.run() raises the device's OSError; confine.refused_call names the call."""
    code = textwrap.dedent(f"""
        import socket
        from kvmpy import Machine
        from kvmpy.vmm import confine
        class Hostile:
            def read(self, offset, size): return 0
            def write(self, offset, size, value): socket.socket()
        with Machine(mem_size=1 << 20, irqchip=False) as m:
            m.pio.attach(0x500, 1, Hostile())
            m.load({OUT_TO_0x500!r}, format="raw", mode="real", load_addr=0x7c00)
            confine.confine(m)
            try:
                m.run(timeout=10)
            except OSError as e:
                print("refused:", confine.refused_call(e))
    """)
    r = python(code)
    assert r.stdout.decode().strip() == "refused: socket", r.stderr.decode()


def test_refused_call_reads_the_errno():
    """The decoding alone (no filter loaded here): REFUSED + number, through a cause chain."""
    inner = OSError(confine.REFUSED + 41, "Unknown error")
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("a device failed") from e
    except RuntimeError as outer:
        assert confine.refused_call(outer) in ("socket", "number 41")
    assert "ioctl" in confine.refused_call(OSError(confine.REFUSED_ARGS, "x"))
    assert confine.refused_call(OSError(13, "Permission denied")) is None
    assert confine.refused_call(ValueError("x")) is None


# --- (2) the bundled demos run under the filter -------------------------------------------
@pytest.mark.parametrize("args", [["hello-long"], ["smp", "--cpus", "2"], ["hello-long", "--python"],
                                  ["hello-user"], ["fwcfg"], ["triple-fault"]],
                         ids=lambda a: " ".join(a))
def test_demos_run_under_the_filter(args):
    r = kvmpy("demo", *args)
    assert b"refused" not in r.stderr, r.stderr
    assert r.returncode == (122 if args == ["triple-fault"] else 0), r.stderr
    if args == ["triple-fault"]:        # the report still disassembles (a read-only import)
        assert b"ud2" in r.stderr


@pytest.mark.parametrize("loop", [[], ["--python"]], ids=["native", "python"])
def test_blk_write_under_the_filter(tmp_path, loop):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    r = kvmpy("demo", "blk-write", "--disk", str(disk), *loop)
    assert r.returncode == 0, r.stderr
    assert disk.read_bytes()[8:16] != bytes(8)          # the guest's pattern reached the file


def test_echo_under_the_filter():
    r = kvmpy("demo", "echo", input=b"piped\nquit\n")
    assert r.returncode == 0 and b"piped\n" in r.stdout and r.stdout.endswith(b"bye\n"), r.stderr


@pytest.mark.parametrize("loop", [[], ["--python"]], ids=["native", "python"])
def test_a_stopped_and_continued_run_goes_on_under_the_filter(loop):
    """SIGSTOP then SIGCONT (Ctrl-Z, fg): the sleeps and waits the stop interrupted go on through
    restart_syscall, which the filter allows (refused, a thread's futex wait failed: SIGABRT)."""
    p = subprocess.Popen([*CMD, "run", str(guests.get("echo").path), *loop], env=ENV, cwd="/",
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not _status(p.pid).get("Seccomp", "0").startswith("2"):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        time.sleep(0.3)                          # the vCPU and the other threads wait now
        for _ in range(3):
            p.send_signal(signal.SIGSTOP)
            time.sleep(0.2)
            p.send_signal(signal.SIGCONT)
            time.sleep(0.2)
        out, err = p.communicate(b"still here\nquit\n", timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == guests.get("echo").expect_status & 0xFF, err
    assert out.endswith(b"still here\nquit\nbye\n")


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _wait_for(path, proc, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _ctl(sock, *args):
    r = kvmpy("ctl", str(sock), *args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout.decode()


def test_control_socket_under_the_filter(tmp_path):
    """--control widens the filter just enough: ctl status, pause, resume, stats, snapshot
    and stop all work; the process is confined meanwhile (Seccomp 2, NoNewPrivs 1, no
    core files), and the snapshot restores."""
    sock, snap = tmp_path / "vm.sock", tmp_path / "snap"
    proc = subprocess.Popen([*CMD, "run", str(guests.get("counter").path), "--cmdline", "n=1000000",
                             "--control", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=ENV, cwd="/")
    try:
        _wait_for(sock, proc)
        st = _status(proc.pid)
        assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", st
        with open(f"/proc/{proc.pid}/limits") as f:
            assert any(line.startswith("Max core file size") and line.split()[4:6] == ["0", "0"] for line in f)
        assert "running" in _ctl(sock, "status")
        _ctl(sock, "pause")
        _ctl(sock, "resume")
        assert "exits" in _ctl(sock, "stats")
        _ctl(sock, "snapshot", str(snap))
        _ctl(sock, "stop")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
    assert (snap / "manifest.json").is_file()
    r = kvmpy("restore", str(snap), "--timeout", "1")
    assert r.returncode == 124 and b"refused" not in r.stderr, r.stderr


def test_stats_svg_is_written_under_the_filter(tmp_path):
    """--stats-svg writes a new file after the run: the option widens the filter."""
    svg = tmp_path / "chart.svg"
    r = kvmpy("demo", "hello-long", "--stats-svg", str(svg))
    assert r.returncode == 0 and svg.read_text().startswith("<svg"), r.stderr


# --- (3) dropping to an unprivileged user --------------------------------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")


@needs_root
def test_run_as_nobody_keeps_the_fds_opened_before(tmp_path):
    """--run-as nobody: the guest writes a disk only root may open, through the fd opened
    before the drop; and the process ends up as nobody with no supplementary groups."""
    disk = tmp_path / "root-only.img"
    disk.write_bytes(bytes(1 << 20))
    os.chmod(disk, 0o600)
    r = kvmpy("demo", "blk-write", "--disk", str(disk), "--run-as", "nobody")
    assert r.returncode == 0, r.stderr
    assert disk.read_bytes()[8:16] != bytes(8)


@needs_root
def test_run_as_changes_every_id_for_good():
    """After confine(run_as=...): all uids and gids are nobody's, no groups, /dev/kvm cannot
    be opened again, the vCPU fds still work, setuid(0) fails; no filter here (seccomp off)."""
    code = textwrap.dedent("""
        import os
        from kvmpy import Machine
        from kvmpy.vmm import confine
        with Machine(mem_size=1 << 20, irqchip=False) as m:
            m.load(bytes([0xF4]), format="raw", mode="real", load_addr=0x7c00)
            confine.confine(m, run_as="nobody:nogroup", seccomp=False)
            print(os.getresuid(), os.getresgid(), os.getgroups())
            try:
                os.open("/dev/kvm", os.O_RDWR)
            except PermissionError:
                print("kvm closed")
            try:
                os.setuid(0)
            except PermissionError:
                print("no way back")
            print(m.run(timeout=10).reason)
    """)
    r = python(code)
    assert r.stdout.decode().split("\n")[:4] == [
        "(65534, 65534, 65534) (65534, 65534, 65534) []", "kvm closed", "no way back", "halt"], r.stderr


def test_run_as_an_unknown_user_is_a_clear_error():
    r = kvmpy("demo", "hello-long", "--run-as", "no-such-user-kvmpy")
    assert r.returncode == EXIT_VMM_ERROR and b"no user named 'no-such-user-kvmpy'" in r.stderr
    assert b"Traceback" not in r.stderr


# --- (4) no_new_privs, the limits, and a missing library -----------------------------------
def test_confine_sets_no_new_privs_the_filter_and_the_limits():
    """confine(): NoNewPrivs 1 and Seccomp 2 in /proc/self/status, core files 0, open files
    capped at what it reports (read from /proc: getrlimit itself, prlimit64, is refused)."""
    code = textwrap.dedent("""
        from kvmpy.vmm import confine
        done = confine.confine()
        status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
        limits = {l[:26].strip(): l[26:].split()[:2] for l in open("/proc/self/limits").read().splitlines()[1:]}
        print(status["NoNewPrivs"], status["Seccomp"], *limits["Max core file size"],
              limits["Max open files"] == [str(done.limits["nofile"])] * 2, "ioctl" in done.allowed)
    """)
    r = python(code)
    assert r.stdout.decode().split() == ["1", "2", "0", "0", "True", "True"], r.stderr


def test_no_sandbox_leaves_the_process_alone():
    code = textwrap.dedent("""
        import sys, kvmpy.cli
        from kvmpy.cli import running
        seen = {}
        drive = running._drive
        def spy(args, machine, *rest, **kw):
            code = drive(args, machine, *rest, **kw)
            seen.update(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
            return code
        running._drive = spy
        assert kvmpy.cli.main(sys.argv[1:]) == 0
        print(seen["Seccomp"], seen["NoNewPrivs"])
    """)
    assert python(code, "demo", "hello-long", "--no-sandbox").stdout.decode().split()[-2:] == ["0", "0"]
    assert python(code, "demo", "hello-long").stdout.decode().split()[-2:] == ["2", "1"]


def test_a_missing_libseccomp_is_a_clear_error():
    code = textwrap.dedent("""
        import ctypes, sys
        real = ctypes.CDLL
        def cdll(name, *args, **kwargs):
            if name and "seccomp" in name:
                raise OSError(f"{name}: cannot open shared object file")
            return real(name, *args, **kwargs)
        ctypes.CDLL = cdll
        import kvmpy.cli
        sys.exit(kvmpy.cli.main(sys.argv[1:]))
    """)
    r = python(code, "demo", "hello-long")
    err = r.stderr.decode()
    assert r.returncode == EXIT_VMM_ERROR and "needs libseccomp" in err and "--no-sandbox" in err, err
    assert "Traceback" not in err and b"Hello" not in r.stdout        # the guest never ran
    assert python(code, "demo", "hello-long", "--no-sandbox").returncode == 0


# --- (5) --vsock widens the filter by UNIX sockets only ---------------------------------------
def test_the_vsock_filter_allows_unix_sockets_and_nothing_that_writes_files():
    """confine(vsock=True): a UNIX socket connects; an INET socket, bind and a file opened for
    writing are refused, each naming its call."""
    code = textwrap.dedent("""
        import os, socket
        from kvmpy.vmm import confine
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind("/tmp/kvmpy-vsock-filter-%d" % os.getpid())
        listener.listen(1)
        confine.confine(vsock=True)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(listener.getsockname())
        s, _ = listener.accept()
        c.sendall(b"ping")
        print("unix", s.recv(4))
        for what, call in [("inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
                           ("bind", lambda: socket.socket(socket.AF_UNIX).bind("/tmp/kvmpy-vsock-x")),
                           ("write", lambda: os.open("/tmp/kvmpy-vsock-y", os.O_WRONLY | os.O_CREAT))]:
            try:
                call()
                print(what, "allowed")
            except OSError as e:
                print(what, confine.refused_call(e))
        os.unlink(listener.getsockname())
        print("unlinked")
    """)
    r = python(code)
    assert r.stdout.decode().splitlines() == ["unix b'ping'", "inet socket", "bind bind", "write openat",
                                              "unlinked"], r.stderr


def test_the_compiled_filter_is_kept_and_a_damaged_copy_is_compiled_again(image, tmp_path):
    """The first confined run keeps libseccomp's program in the cache; a later run whose copy
    was damaged still refuses the call (it compiled the filter again) and keeps a good copy."""
    from kvmpy.vmm import seccomp_prog
    env = {**ENV, "KVMPY_CACHE": str(tmp_path / "cache")}
    script = HOSTILE_RUN.replace("CALL", "socket.socket(socket.AF_INET, socket.SOCK_STREAM)")
    argv = [sys.executable, "-c", script, "run", image, "--format", "raw", "--no-irqchip"]
    for damage in (None, b"\xff" * 16, b""):
        kept = list((tmp_path / "cache" / "seccomp").glob("*.bpf")) if damage is not None else []
        for path in kept:
            path.write_bytes(path.read_bytes()[:-16] + damage)
        r = subprocess.run(argv, capture_output=True, timeout=60, env=env, cwd="/")
        assert r.returncode == EXIT_VMM_ERROR and b"refused the system call socket " in r.stderr, r.stderr
        kept = list((tmp_path / "cache" / "seccomp").glob("*.bpf"))
        assert len(kept) == 1 and seccomp_prog.read(kept[0]) is not None
