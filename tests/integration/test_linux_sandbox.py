"""kvmpy.LinuxSandbox: Debian's kernel booted once, every command from its checkpoint.

Here (any host): the agent (guests/linux/kvmpy-agent.c) serves requests on a socket pair
without a VM (--serve-stdin), so its fork/exec, pipes, limits and files are checked where
it is built; bad paths and a ring-0-emulating KVM (kvm_pvm) are clear errors.
In the nested testbed (python tests/nested/testbed.py --steps pytest
tests/integration/test_linux_sandbox.py): a booted sandbox runs commands and python3,
files go in and out, nothing one call wrote is there in the next, and a timeout and a
kernel crash leave it usable. The protocol's parser is fuzzed in tests/unit/test_linuxbox_protocol.py.
"""
import os
import shutil
import socket
import statistics
import subprocess
import time

import pytest

import kvmpy
from kvmpy.images import debroot, guests, linuxkernel, rootfs
from kvmpy.kvm.system import backend_modules
from kvmpy.linuxbox import AgentError, SandboxCrashed, SandboxError, SandboxTimeout, disk, protocol

RING0_EMULATED = "kvm_pvm" in backend_modules()
needs_ring0 = pytest.mark.skipif(RING0_EMULATED, reason="Linux stops after its banner where KVM emulates guest "
                                                        "ring 0 (kvm_pvm, docs/host-notes.md); the nested "
                                                        "testbed runs this")
BOOT_TIMEOUT = 400.0


# --- the agent on this host ------------------------------------------------------------
def agent_call(req: protocol.Request) -> protocol.Reply:
    """One request served by ``kvmpy-agent --serve-stdin`` on a socket pair."""
    host, guest = socket.socketpair()
    proc = subprocess.Popen([str(guests.built("kvmpy-agent")), "--serve-stdin"], stdin=guest)
    guest.close()
    try:
        host.settimeout(30)
        host.sendall(protocol.encode_request(req))
        buf = bytearray()
        while chunk := host.recv(1 << 16):
            buf += chunk
        return protocol.read_reply(protocol.bytes_reader(bytes(buf)), req.max_output, req.max_fetch, len(req.fetch))
    finally:
        host.close()
        assert proc.wait(30) == 0


def test_the_agent_runs_a_command_with_stdin_files_and_an_environment(tmp_path):
    into = tmp_path / "new" / "dir" / "in.txt"
    req = protocol.Request(["sh", "-c", "cat; echo err >&2; cat in.txt; echo $GREETING; exit 3"],
                           env={"GREETING": "hi", "PATH": "/usr/bin:/bin"}, cwd=str(into.parent), stdin=b"x" * 300000,
                           files={str(into): (b"file!\n", 0o640)},
                           fetch=[str(into), str(tmp_path / "missing"), str(tmp_path)])
    r = agent_call(req)
    assert (r.stdout, r.stderr, r.status) == (b"x" * 300000 + b"file!\nhi\n", b"err\n", 3)
    assert r.fetched == [(0, False, b"file!\n"), (2, False, b""), (21, False, b"")]
    assert oct(into.stat().st_mode & 0o777) == oct(0o640)


def test_the_agent_bounds_outputs_and_fetched_files_and_reports_signals(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"y" * 5000)
    req = protocol.Request(["sh", "-c", "head -c 100000 /dev/zero; head -c 10 /dev/zero >&2; kill -9 $$"],
                           fetch=[str(big)], max_output=1000, max_fetch=4096)
    r = agent_call(req)
    assert (len(r.stdout), len(r.stderr), r.flags, r.status) == (1000, 10, protocol.STDOUT_TRUNCATED, -9)
    assert r.fetched == [(0, True, b"y" * 4096)]


def test_the_agent_returns_when_a_background_child_keeps_the_pipes_open():
    t = time.monotonic()
    r = agent_call(protocol.Request(["sh", "-c", "sleep 30 & echo started"]))
    assert (r.stdout, r.status) == (b"started\n", 0) and time.monotonic() - t < 10


def test_the_agent_reports_what_it_cannot_do(tmp_path):
    r = agent_call(protocol.Request(["/no/such/program"]))
    assert r.status == 127 and b"cannot execute /no/such/program" in r.stderr
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(AgentError, match="cannot write .*/file/below: Not a directory"):
        agent_call(protocol.Request(["true"], files={str(tmp_path / "file" / "below"): (b"", 0o644)}))


def test_the_agent_answers_a_request_it_cannot_read_with_an_error():
    host, guest = socket.socketpair()
    proc = subprocess.Popen([str(guests.built("kvmpy-agent")), "--serve-stdin"], stdin=guest)
    guest.close()
    with host:
        host.sendall(b"KVMQ" + bytes(16))              # version 0
        with pytest.raises(AgentError, match="^bad request header$"):
            protocol.read_reply(host.makefile("rb").read, 0, 0, 0)
    assert proc.wait(30) == 0


# --- the root disk ------------------------------------------------------------------------
def test_the_sandbox_disk_holds_python3_its_libraries_and_the_agent():
    """Debian's python3 with its loader and libraries (links kept), byte code, the agent and the
    rc.local that starts it; rcS runs rc.local before it says ready."""
    debugfs = shutil.which("debugfs") or shutil.which("debugfs", path="/usr/sbin:/sbin")
    try:
        d = disk.build()
    except (linuxkernel.FetchError, rootfs.RootfsError) as e:
        pytest.skip(f"cannot build the sandbox's root disk: {e}")
    if debugfs is None:
        pytest.skip("debugfs not found (apt-get install e2fsprogs)")

    def ask(request: str) -> str:
        return subprocess.run([debugfs, "-R", request, str(d.image)], capture_output=True, text=True,
                              timeout=60).stdout
    assert d.size == rootfs.DEFAULT_PYTHON_SIZE
    assert 'Fast link dest: "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"' in ask("stat /lib64/ld-linux-x86-64.so.2")
    assert 'Fast link dest: "python3.11"' in ask("stat /usr/bin/python3")
    for path in ("/usr/bin/python3.11", "/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libz.so.1",
                 "/usr/lib/python3.11/os.py", "/usr/sbin/kvmpy-agent"):
        assert "Type: regular" in ask(f"stat {path}") or "Fast link dest" in ask(f"stat {path}"), path
    if debroot.bytecode_tag() == "pyc-unchecked":
        assert "os.cpython-311.pyc" in ask("ls /usr/lib/python3.11/__pycache__")
    assert ask("cat /etc/rc.local") == disk.RC_LOCAL
    assert "[ -x /etc/rc.local ] && /etc/rc.local\necho" in ask("cat /etc/init.d/rcS")


# --- errors before any boot ---------------------------------------------------------------
@pytest.mark.parametrize("arg", ["kernel", "rootfs", "initrd"])
def test_a_missing_kernel_rootfs_or_initrd_is_a_clear_error(tmp_path, arg):
    with pytest.raises(SandboxError, match=f"{tmp_path}/nope: no such readable file"):
        kvmpy.LinuxSandbox(**{arg: tmp_path / "nope"})


@pytest.mark.skipif(not RING0_EMULATED, reason="this host's KVM runs guest ring 0")
def test_on_a_ring0_emulating_kvm_the_error_says_linux_needs_hardware_virtualisation(tmp_path):
    for f in ("vmlinux", "rootfs.img", "initrd"):
        (tmp_path / f).write_bytes(b"x")
    with pytest.raises(SandboxError, match=r"needs KVM with hardware virtualisation \(VMX or SVM\).*kvm_pvm"):
        kvmpy.LinuxSandbox(tmp_path / "vmlinux", tmp_path / "rootfs.img", initrd=tmp_path / "initrd")


# --- in a booted sandbox (the nested testbed) ------------------------------------------------
@pytest.fixture(scope="module")
def sandbox():
    try:
        disk.build()
    except (linuxkernel.FetchError, rootfs.RootfsError) as e:
        if os.environ.get("KVMPY_REQUIRE_KVM") == "1":
            pytest.fail(f"cannot build the sandbox's root disk: {e}")
        pytest.skip(f"cannot build the sandbox's root disk: {e}")
    with kvmpy.LinuxSandbox(timeout=60, boot_timeout=BOOT_TIMEOUT) as sb:
        print(f"\nLinuxSandbox: {sb.agent}; boot to the checkpoint {sb.boot_seconds:.1f} s")
        yield sb


@needs_ring0
def test_a_command_gives_stdout_stderr_and_status(sandbox):
    r = sandbox.run("echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.status, r.ok) == (b"out\n", b"err\n", 3, False)
    r = sandbox.run(["tr", "a-z", "A-Z"], stdin=b"hello " * 20000)
    assert (r.stdout, r.status) == (b"HELLO " * 20000, 0)
    assert sandbox.run("uname -r").stdout.decode().strip() in sandbox.agent


@needs_ring0
def test_files_go_in_and_come_out(sandbox):
    r = sandbox.run("tr a-z A-Z < /root/in/hello.txt > /root/out.txt; chmod 0755 /root/in/run.sh; /root/in/run.sh",
                    files={"/root/in/hello.txt": b"hello guest\n", "/root/in/run.sh": "#!/bin/sh\necho ran\n"},
                    fetch=["/root/out.txt", "/root/missing"])
    assert (r.stdout, r.status) == (b"ran\n", 0), r.stderr
    assert r.files == {"/root/out.txt": b"HELLO GUEST\n"}
    assert r.missing == {"/root/missing": "ENOENT (No such file or directory)"}


@needs_ring0
def test_each_call_starts_from_the_checkpoint(sandbox):
    r = sandbox.run("echo one > /root/state.txt; sync; echo two > /tmp/t; (sleep 1000 &); cat /root/state.txt")
    assert r.stdout == b"one\n"
    r = sandbox.run("cat /root/state.txt /tmp/t; pgrep sleep || echo no-sleep")
    assert r.status == 0 and r.stderr.count(b"No such file") == 2 and r.stdout == b"no-sleep\n", r


@needs_ring0
def test_a_timeout_raises_and_the_sandbox_goes_on(sandbox):
    t = time.monotonic()
    with pytest.raises(SandboxTimeout):
        sandbox.run("sleep 1000", timeout=3)
    assert time.monotonic() - t < 30
    assert sandbox.run("echo alive").stdout == b"alive\n"


@needs_ring0
def test_a_kernel_crash_raises_and_the_sandbox_goes_on(sandbox):
    with pytest.raises(SandboxCrashed, match="the guest stopped"):
        sandbox.run("echo c > /proc/sysrq-trigger; sleep 100", timeout=60)
    assert sandbox.run("echo alive").stdout == b"alive\n"


@needs_ring0
def test_python_code_runs_in_debians_python3(sandbox):
    r = sandbox.python("import os, sys\nprint(sys.version_info[:2], os.getcwd(), sys.argv[1:])\n"
                       "open('/root/py.txt', 'w').write(sys.stdin.read().upper())\nsys.exit(4)",
                       args=["a", "b"], stdin=b"from stdin", fetch=["/root/py.txt"])
    assert (r.stdout, r.status, r.files) == (b"(3, 11) /root ['a', 'b']\n", 4, {"/root/py.txt": b"FROM STDIN"}), r
    r = sandbox.python("raise SystemExit(1 / 0)")
    assert r.status == 1 and b"ZeroDivisionError" in r.stderr


@needs_ring0
def test_call_latency(sandbox):
    """Not a bound: the numbers the docs quote (median of a few trivial calls, and python3)."""
    times = {}
    for name, call in (("true", lambda: sandbox.run(["true"])), ("python3", lambda: sandbox.python("pass"))):
        took = []
        for _ in range(5):
            t = time.perf_counter()
            assert call().status == 0
            took.append(time.perf_counter() - t)
        times[name] = statistics.median(took)
    print(f"\nLinuxSandbox: per call (start, agent round trip, stop, reset) median: "
          f"`true` {times['true'] * 1e3:.0f} ms, python3 -c pass {times['python3'] * 1e3:.0f} ms")
