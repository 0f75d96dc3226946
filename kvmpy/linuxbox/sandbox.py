"""``LinuxSandbox``: Debian's stock kernel booted once, each command run from a checkpoint.

The machine: the kernel (default: Debian's cloud kernel, kvmpy.images.linuxkernel), its
root on a scratch copy of a root disk that holds the agent (default: kvmpy.images.rootfs
with Debian's python3 and guests/linux/kvmpy-agent.c added), a virtio-vsock device whose
host side is a UNIX socket in a private directory, and a virtio-rng. The disk's
``/etc/rc.local`` starts the agent, which connects to the host's vsock port AGENT_PORT
(the UNIX socket ``PATH_5200`` this module listens on: docs/vsock.md).

Boot: the host answers the agent's first connection with a READY request; the agent
replies, waits for one byte, and stops the machine itself (an ``out`` to isa-debug-exit):
the host takes the checkpoint there (``Machine.checkpoint()``, docs/reset.md).

A call: start the machine; after every reset the device tells the guest its connections
are gone (TRANSPORT_RESET), the agent sees its READY connection end and connects again;
the host sends the request (protocol.py), reads the reply with every length bounded,
then stops the machine and resets it in place. So each call starts from the same booted
system: a file one call writes is gone in the next, and so is anything it started. A
call that outlives its timeout, a guest that stops (a kernel panic reboots: panic=-1),
or an agent that vanishes mid-reply is an exception; the machine is reset all the same
and the next call runs.
"""
from __future__ import annotations

import os
import select
import shutil
import socket
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from ..images import linuxkernel, rootfs as rootfs_builder
from ..kvm.system import backend_modules
from ..vmm.machine import Machine
from ..sandbox.abi import SandboxError, SandboxTimeout
from . import disk as sandbox_disk, protocol
from .disk import AGENT_PORT

PYTHON_MAIN = "/run/kvmpy-main.py"
CONSOLE_KEEP = 64 << 10         # the console's last bytes, kept for error messages
WARMUP = "command -v python3 >/dev/null && python3 -c 'import os, re, subprocess' >/dev/null 2>&1; true"
RING0_EMULATED = (
    "LinuxSandbox needs KVM with hardware virtualisation (VMX or SVM): this host's KVM ({backend}) "
    "emulates guest ring 0, ~1000x slower, and Debian's kernel stops after its banner there "
    "(docs/linux.md, docs/host-notes.md). Run it on a host with 'vmx' or 'svm' in /proc/cpuinfo, "
    "or in the nested testbed (tests/nested/testbed.py).")


# One family of errors for both kinds of sandbox: kvmpy.SandboxError catches a LinuxSandbox's
# failures as it does a Sandbox's (the bounded message says why, with the console's end), and
# SandboxTimeout is the same class (the sandbox was reset and is usable).
class SandboxCrashed(SandboxError):
    """The guest stopped, or its agent vanished, during a call; the sandbox was reset and is usable."""


@dataclass(frozen=True)
class Result:
    """What a call did: ``status`` is the exit status or minus the signal (as subprocess has
    it), ``files`` the fetched files that could be read, ``missing`` why the others could not
    (``{path: "ENOENT (...)"}``), ``truncated`` which of "stdout", "stderr" and the fetched
    paths were cut at the sandbox's limits."""

    stdout: bytes
    stderr: bytes
    status: int
    files: dict[str, bytes] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    truncated: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        return self.status == 0


class _Console:
    """COM1's output: its last CONSOLE_KEEP bytes, and a copy to ``tee`` if given."""

    def __init__(self, tee=None):
        self.buf = bytearray()
        self.lock = threading.Lock()
        self.tee = tee

    def write(self, data) -> int:
        with self.lock:
            self.buf += data
            del self.buf[:-CONSOLE_KEEP]
        if self.tee is not None:
            self.tee.write(data)
        return len(data)

    def flush(self) -> None:
        if self.tee is not None:
            self.tee.flush()

    def tail(self, n: int = 3000) -> str:
        with self.lock:
            return self.buf[-n:].decode("utf-8", "replace")


def _readable(path, what: str) -> Path:
    p = Path(path)
    if not p.is_file() or not os.access(p, os.R_OK):
        raise SandboxError(f"{what} {p}: no such readable file")
    return p


def _files(files) -> dict[str, tuple[bytes, int]]:
    out = {}
    for path, value in (files or {}).items():
        data, mode = value if isinstance(value, tuple) else (value, 0o644)
        if isinstance(data, str):
            data = data.encode()
        out[str(path)] = (bytes(data), mode)
    return out


class LinuxSandbox:
    """Debian's kernel, booted once; ``run()`` and ``python()`` each start from its checkpoint.

    ``kernel``: a vmlinux (PVH) or bzImage, default Debian's cloud kernel's vmlinux.
    ``rootfs``: an ext4 root image with the agent (kvmpy.linuxbox.disk.build() makes one), copied to
    a scratch file; ``initrd``: the initramfs that mounts it (default: the root disk
    builder's). With your own kernel, bring the rootfs and initrd built for it.
    ``timeout``: a call's default limit in seconds; ``boot_timeout``: the boot's.
    ``max_output``/``max_fetch``: bytes kept per output stream and per fetched file.
    ``console``: a binary stream that gets the guest's console (e.g. sys.stdout.buffer).
    ``warmup``: a shell command run once before the checkpoint, so that what it reads is in
    the page cache of every call (default: python3 starts once, if there is one; None: none).
    """

    def __init__(self, kernel=None, rootfs=None, *, initrd=None, mem_size: int = 256 << 20, cpus: int = 1,
                 cmdline: str | None = None, timeout: float = 30.0, boot_timeout: float = 300.0,
                 max_output: int = 16 << 20, max_fetch: int = 16 << 20, console=None, offline: bool = False,
                 progress=None, warmup: str | None = WARMUP):
        kernel = _readable(kernel, "kernel") if kernel is not None else None
        image = _readable(rootfs, "root file system") if rootfs is not None else None
        initrd = _readable(initrd, "initrd") if initrd is not None else None
        backends = backend_modules()
        if "kvm_pvm" in backends:
            raise SandboxError(RING0_EMULATED.format(backend=", ".join(backends)))
        if kernel is None or image is None or initrd is None:
            linux = linuxkernel.fetch(offline=offline)
            kernel = kernel or linux.vmlinux
            if image is None:
                disk = sandbox_disk.build(linux, offline=offline, progress=progress)
                image, initrd = disk.image, initrd or disk.initrd
            elif initrd is None:            # every root disk of this kernel has the same initramfs
                initrd = rootfs_builder.build(linux, offline=offline, progress=progress).initrd
        self.timeout, self.max_output, self.max_fetch = timeout, max_output, max_fetch
        self.console = _Console(console)
        self.machine = self.listener = None
        self._started = False
        self.calls = 0
        self.agent = ""
        self.boot_seconds = None
        self._dir = tempfile.mkdtemp(prefix="kvmpy-linuxbox-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._scratch = tempfile.TemporaryFile(dir=self._dir, prefix="rootfs-")
        try:
            self._boot(kernel, image, initrd, mem_size, cpus, cmdline or rootfs_builder.CMDLINE + " quiet",
                       boot_timeout, warmup)
        except BaseException:
            self.close()
            raise

    def _boot(self, kernel, image, initrd, mem_size, cpus, cmdline, boot_timeout, warmup) -> None:
        rootfs_builder.copy_sparse(image, f"/proc/self/fd/{self._scratch.fileno()}")
        vsock = os.path.join(self._dir, "vm.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(f"{vsock}_{AGENT_PORT}")
        self.listener.listen(8)
        self.machine = m = Machine(mem_size=mem_size, cpus=cpus, serial=self.console, rng=True, vsock=vsock,
                                   disks=[f"/proc/self/fd/{self._scratch.fileno()}"])
        m.load(str(kernel), cmdline=cmdline, initrd=Path(initrd).read_bytes())
        t0 = time.monotonic()
        deadline = t0 + boot_timeout
        m.start()
        self._started = True
        try:
            if warmup:
                self._warm(warmup, deadline)
            conn = self._accept(deadline, "boot")
            with conn:
                conn.sendall(protocol.encode_ready())
                hello = protocol.read_reply(self._reader(conn, deadline, "boot"), protocol.MAX_MESSAGE, 0, 0)
                self.agent = hello.stdout.decode("utf-8", "replace")
                conn.sendall(b"\x01")           # the agent now stops the machine (isa-debug-exit)
                stop = m.wait(max(1.0, deadline - time.monotonic()))
                self._started = False
        except BaseException:
            self._stop()
            raise
        if stop.reason != "exit":
            raise SandboxError(f"the machine stopped ({stop.reason}) where the agent should have stopped it; "
                               f"console:\n{self.console.tail()}")
        m.checkpoint()
        self.boot_seconds = time.monotonic() - t0

    def _warm(self, command: str, deadline: float) -> None:
        """Run ``command`` once before the checkpoint: what it reads from the disk is then in the
        page cache every call starts with (python3's binary, libraries and byte code: ~1 s a call
        in the nested testbed)."""
        with self._accept(deadline, "boot") as conn:
            req = protocol.Request(["/bin/sh", "-c", command], {"HOME": "/root"}, max_output=protocol.MAX_MESSAGE,
                                   max_fetch=0)
            conn.sendall(protocol.encode_request(req))
            protocol.read_reply(self._reader(conn, deadline, "boot"), req.max_output, 0, 0)

    # --- calls ----------------------------------------------------------------------------
    def run(self, cmd, *, stdin: bytes = b"", files=None, fetch=(), timeout: float | None = None,
            env: dict | None = None, cwd: str = "/root") -> Result:
        """Run ``cmd`` (a shell command string, run by /bin/sh -c, or an argv list) from the
        checkpoint: ``stdin`` its input, ``files`` ({guest path: bytes or (bytes, mode)})
        written first, ``fetch`` (guest paths) read after it ended. Raises SandboxTimeout,
        SandboxCrashed, protocol.AgentError (a file that could not be written) or
        protocol.ProtocolError (a reply that broke the format); after each the sandbox is reset."""
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        fetch = [str(p) for p in fetch]
        req = protocol.Request(argv, {"HOME": "/root", **(env or {})}, cwd, bytes(stdin), _files(files), fetch,
                               self.max_output, self.max_fetch)
        reply = self._call(protocol.encode_request(req), len(fetch), self.timeout if timeout is None else timeout)
        got, missing, cut = {}, {}, {name for name, bit in (("stdout", 1), ("stderr", 2)) if reply.flags & bit}
        for path, (err, truncated, data) in zip(fetch, reply.fetched):
            if err:
                missing[path] = protocol.errno_text(err)
            else:
                got[path] = data
                if truncated:
                    cut.add(path)
        return Result(reply.stdout, reply.stderr, reply.status, got, missing, frozenset(cut))

    def python(self, code: str, *, args=(), files=None, **kw) -> Result:
        """Run ``code`` with the guest's python3 (Debian's, in the default root disk) as
        ``python3 /run/kvmpy-main.py ARGS...``; the other keywords are run()'s."""
        files = {**_files(files), PYTHON_MAIN: (code.encode() if isinstance(code, str) else bytes(code), 0o644)}
        return self.run(["python3", PYTHON_MAIN, *args], files=files, **kw)

    def _call(self, data: bytes, nfetch: int, timeout: float) -> protocol.Reply:
        """One request from the checkpoint: start, serve the agent's connection, stop, reset."""
        if self.machine is None:
            raise SandboxError("this LinuxSandbox is closed")
        deadline = time.monotonic() + timeout
        self._drain()
        self.machine.start()
        self._started = True
        try:
            conn = self._accept(deadline, "call")
            with conn:
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                try:
                    conn.sendall(data)
                except TimeoutError:
                    raise SandboxTimeout(f"the agent did not take the request within {timeout} s; "
                                         "the sandbox was reset") from None
                except OSError as e:
                    raise SandboxCrashed(f"the agent's connection failed while sending the request: {e}; "
                                         "the sandbox was reset") from None
                return protocol.read_reply(self._reader(conn, deadline, "call"), self.max_output, self.max_fetch,
                                           nfetch)
        finally:
            self._stop()
            self._reset()
            self.calls += 1

    def _accept(self, deadline: float, what: str) -> socket.socket:
        """The agent's next connection to the host's port; SandboxTimeout or SandboxCrashed."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxTimeout(f"{what}: the agent did not connect in time; console:\n{self.console.tail()}")
            ready, _, _ = select.select([self.listener], [], [], min(left, 0.1))
            if ready:
                conn, _ = self.listener.accept()
                return conn
            if not self.machine.running:
                raise self._crashed(what)

    def _reader(self, conn: socket.socket, deadline: float, what: str):
        """``read(n)`` for protocol.read_reply: exactly n bytes before ``deadline``, or an error."""
        def read(n: int) -> bytes:
            buf = bytearray()
            while len(buf) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SandboxTimeout(f"{what}: no whole reply within the timeout; the sandbox was reset")
                ready, _, _ = select.select([conn], [], [], min(left, 0.1))
                if not ready:
                    if not self.machine.running:
                        raise self._crashed(what)
                    continue
                try:
                    chunk = conn.recv(min(n - len(buf), 1 << 20))
                except OSError as e:
                    chunk, why = b"", str(e)
                else:
                    why = "end of stream"
                if not chunk:
                    raise SandboxCrashed(f"{what}: the agent's connection ended mid-reply ({why}); "
                                         f"console:\n{self.console.tail()}")
                buf += chunk
            return bytes(buf)
        return read

    def _crashed(self, what: str) -> SandboxCrashed:
        how = self._stop()
        return SandboxCrashed(f"{what}: the guest stopped ({how}); console:\n{self.console.tail()}")

    def _stop(self) -> str:
        """Stop the run in progress (if any) and say how it ended."""
        if not self._started:
            return "not running"
        self._started = False
        m = self.machine
        if m.running:
            m.request_stop("linuxbox")
        try:
            r = m.wait(30)
        except TimeoutError:
            self.close()
            raise SandboxError("the machine did not stop within 30 s; the sandbox is closed") from None
        except Exception as e:              # noqa: BLE001 - a guest error ends the run: say which
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return r.reason + (f", status {r.status}" if r.status is not None else "")

    def _reset(self) -> None:
        if self.machine is None:
            return
        try:
            self.machine.reset()
        except Exception as e:
            self.close()
            raise SandboxError(f"the reset failed ({e}); the sandbox is closed") from e

    def _drain(self) -> None:
        """Close connections left in the listener's backlog by an earlier call."""
        self.listener.setblocking(False)
        try:
            while True:
                self.listener.accept()[0].close()
        except (BlockingIOError, OSError):
            pass
        finally:
            self.listener.setblocking(True)

    # --- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop and close the machine, remove the scratch disk and the sockets. Idempotent."""
        m, self.machine = self.machine, None
        if m is not None:
            if m.running:
                m.request_stop("close")
            m.close()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self._scratch.close()
        self._cleanup()

    def __enter__(self) -> "LinuxSandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.machine is None else f"booted in {self.boot_seconds:.1f} s, {self.calls} calls"
        return f"<LinuxSandbox {state}>"
