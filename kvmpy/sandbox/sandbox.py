"""Function calls into a micro-VM: ``Sandbox(image).call("add", 2, 3)``.

A ``Sandbox`` owns a ``Machine`` running one ELF guest built with the sandbox SDK
(guests/runtime/sandbox.h). At construction it loads the image at CPL 3, installs the
exception IDT of :mod:`kvmpy.fuzz.traps` (so a crash is named) and runs the guest to its
ready point, where the guest has published its export table in the call page; there it
reads the table and takes a checkpoint (docs/reset.md). Then each ``call``:

1. checks the arguments against the export's signature (TypeError before the guest runs);
2. writes the arguments' bytes into ``sandbox_args`` and the call into the call page
   (:mod:`.abi`), and resumes the guest: one exit (isa-debug-exit 'D') ends the call;
3. serves the guest's host calls on the way ('H' exits), each checked against what the
   program registered: an unknown name or wrong argument types is refused with an error
   returned into the guest, never a Python call;
4. reads the result, bounds-checked (:func:`.abi.parse_reply`);
5. resets the machine to the checkpoint, whatever happened: the next call sees nothing of
   this one. A crash (a named exception, a triple fault), a timeout or a broken ABI is an
   exception in the caller (:class:`.abi.SandboxError` and its subclasses).

A sandbox serves one call at a time (a lock); ``SandboxPool`` serves many threads.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

from ..errors import GuestError, GuestMemoryError
from ..fuzz import traps
from ..images import guests
from ..loader.elfsym import symbols
from ..vmm.console import TailSink
from ..vmm.machine import Machine
from . import abi
from .abi import (GuestFunctionError, SandboxCrash, SandboxError, SandboxProtocolError, SandboxTimeout,
                  Signature, Val)

TAIL = 4096                     # bytes of the guest's serial output kept (for errors)
DEFAULT_MAX_RESULT = 1 << 20


def image_path(image) -> str:
    """A path as given, or the path of the bundled guest of that name."""
    try:
        return os.fspath(guests.resolve(image))
    except KeyError:
        raise SandboxError(f"{image!r} is neither a file nor a bundled guest") from None


class HostFunction:
    """A Python callable the guest may call, and the signature every call must match."""

    def __init__(self, name: str, fn: Callable, signature: str):
        if not callable(fn):
            raise TypeError(f"host function {name!r}: {fn!r} is not callable")
        if not name or len(name.encode()) > abi.MAX_NAME:
            raise ValueError(f"host function name {name!r}: 1 to {abi.MAX_NAME} bytes")
        self.name, self.fn, self.signature = name, fn, abi.parse_signature(signature)


class Sandbox:
    """A guest whose exported functions the host calls; see the module docstring and
    docs/sandboxes.md. ``timeout`` is each call's default time budget in seconds, ``mem_size``
    the guest's RAM, ``max_result`` the most bytes a call may return; ``host_functions``
    maps a name to ``(callable, "ARGS:RET")`` (or use :meth:`register`). ``clear_dirty_log``
    checkpoints with KVM_CLEAR_DIRTY_LOG (``Machine.checkpoint``; docs/sandboxes.md has what
    was measured); ``hot_pages``: pages every call writes stay writable and are copied back at
    each reset instead of write-protected again (``Machine.checkpoint``; 0: off); ``irqchip``
    gives the guest the in-kernel interrupt controllers and PIT (off by default: a reset is
    cheaper without them)."""

    def __init__(self, image="sandbox-demo", *, mem_size: int = 16 << 20, timeout: float = 1.0,
                 max_result: int = DEFAULT_MAX_RESULT, host_functions: dict | None = None,
                 ready_timeout: float = 10.0, native: bool = False, clear_dirty_log: bool = False,
                 irqchip: bool = False, hot_pages: int = 64):
        path = image_path(image)
        with open(path, "rb") as f:
            syms = symbols(f.read())
        page, args = syms.get("sandbox_page"), syms.get("sandbox_args")
        if page is None or args is None:
            raise SandboxError(f"{path} has no sandbox_page/sandbox_args: build it with guests/runtime/sandbox.c")
        if page.size != abi.PAGE_SIZE:
            raise SandboxError(f"{path}: sandbox_page is {page.size} bytes, this kvmpy's ABI {abi.PAGE_SIZE}")
        if args.value + args.size > mem_size or page.value + page.size > mem_size:
            raise SandboxError(f"{path} does not fit in {mem_size:#x} bytes of RAM")
        self.page, self.args_addr, self.args_size = page.value, args.value, args.size
        self.mem_size, self.timeout, self.max_result = mem_size, timeout, max_result
        self.clear_dirty_log, self.hot_pages = clear_dirty_log, hot_pages
        self.host_functions: dict[str, HostFunction] = {}
        for name, (fn, sig) in (host_functions or {}).items():
            self.register(name, fn, sig)
        self.calls = 0
        self._times: dict | None = None
        self._owner: int | None = None             # the thread inside call(), if any
        self._lock = threading.Lock()
        self.serial = TailSink(TAIL)
        # the Python run loop: a call makes one or two exits, where C saves nothing
        # (kvmpy.fuzz.harness makes the same choice)
        # no in-kernel PIC/IOAPIC/LAPIC/PIT by default: a sandbox guest takes no interrupts, and
        # without them a reset has one vCPU ioctl (the LAPIC) and the irqchip's state fewer to
        # put back (~20 us of ~110 on kvm_pvm: docs/sandboxes.md)
        self.machine = Machine(mem_size=mem_size, serial=self.serial, native=native, irqchip=irqchip)
        try:
            self.exports = self._start(path, ready_timeout)
        except BaseException:
            self.machine.close()
            raise

    def _start(self, path: str, ready_timeout: float) -> dict:
        m = self.machine
        m.load(path, user=True)
        traps.install(m)
        r = m.run(timeout=ready_timeout)
        if r.reason != "exit" or r.status >> 1 != abi.EXIT_READY:
            raise SandboxError(f"the guest stopped ({r.reason}, rax {r.regs.rax:#x}) before its ready point; "
                               f"its output ended: {self.serial.data[-200:]!r}")
        exports = abi.parse_exports(m.memory.read(self.page, abi.PAGE_SIZE), m.memory.read, self.mem_size)
        m.checkpoint(clear_dirty_log=self.clear_dirty_log, hot_pages=self.hot_pages)
        return exports

    def register(self, name: str, fn: Callable, signature: str) -> None:
        """Let the guest call ``fn`` as ``name`` with arguments of ``signature`` ("si:i")."""
        self.host_functions[name] = HostFunction(name, fn, signature)

    def signature(self, name: str) -> Signature:
        return self._export(name).signature

    def _export(self, name: str) -> abi.Export:
        e = self.exports.get(name)
        if e is None:
            raise SandboxError(f"the guest exports no function {name!r} (it has: {', '.join(sorted(self.exports))})")
        return e

    def call(self, name: str, *args, timeout: float | None = None, times: dict | None = None):
        """Call the guest function ``name``; returns its int, bytes, str or None. ``timeout``
        overrides the sandbox's budget (seconds); ``times`` gets nanoseconds added: "run" (the
        guest's runs), "host" (before and after them: arguments, page, result, host calls),
        "reset" and the reset's parts (``Machine.reset(times)``)."""
        t0, run0 = time.perf_counter_ns(), (times or {}).get("run", 0)
        export = self._export(name)
        vals, blob = abi.encode_args(export.signature, args, self.args_addr, self.args_size, name)
        budget = self.timeout if timeout is None else timeout
        if self._owner == threading.get_ident():
            raise SandboxError(f"{name}: a host function called its own sandbox (a call cannot nest)")
        with self._lock:
            m = self.machine
            if m is None:
                raise SandboxError("the sandbox is closed")
            self._times, self._owner = times, threading.get_ident()
            try:
                if blob:
                    m.memory.write(self.args_addr, blob)
                m.memory.write(self.page + abi.OFFSET["func"], abi.pack_call(export.index, vals))
                return self._serve(export, time.monotonic() + budget, budget)
            except (SandboxProtocolError, GuestMemoryError) as e:
                raise SandboxProtocolError(f"{name}: {e}") from None
            finally:
                self.calls, self._owner = self.calls + 1, None
                t1 = time.perf_counter_ns()
                m.reset(times)
                if times is not None:
                    _add(times, "reset", time.perf_counter_ns() - t1)
                    _add(times, "host", t1 - t0 - (times.get("run", 0) - run0))

    def _serve(self, export: abi.Export, deadline: float, budget: float):
        m = self.machine
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxTimeout(f"{export.name}: no result within {budget:g} s (host calls included)")
            t0 = time.perf_counter_ns()
            try:
                r = m.run(timeout=left)
            except GuestError as e:         # a triple fault (the guest broke its IDT), a failed entry
                kind = e.reason or "guest-error"
                raise SandboxCrash(f"{export.name}: the guest crashed: {kind}", kind) from e
            finally:
                if self._times is not None:
                    _add(self._times, "run", time.perf_counter_ns() - t0)
            if r.reason == "timeout":
                raise SandboxTimeout(f"{export.name}: no result within {budget:g} s (host calls included)")
            if r.reason != "exit":
                raise SandboxCrash(f"{export.name}: the guest stopped ({r.reason})", r.reason)
            vector = traps.vector_at(r.regs.rip)
            if vector is not None:
                raise self._crash(export.name, vector, r.regs.rsp)
            value = r.status >> 1
            if value == abi.EXIT_DONE:
                return self._result(export)
            if value != abi.EXIT_HOST:
                raise SandboxProtocolError(f"the guest wrote {value:#x} to isa-debug-exit "
                                           f"(the ABI has {abi.EXIT_DONE:#x} done, {abi.EXIT_HOST:#x} host call)")
            self._host_call()

    def _crash(self, name: str, vector: int, rsp: int) -> SandboxCrash:
        kind, rip, address = traps.name(vector), None, None
        try:
            _, rip = traps.frame(vector, self.machine.memory.read(rsp, 16))
        except GuestMemoryError:            # the guest owns its stack
            pass
        if vector == traps.PF:
            address = self.machine.vcpus[0].get_sregs().cr2
        where = f" at {rip:#x}" if rip is not None else ""
        what = f" (address {address:#x})" if address is not None else ""
        return SandboxCrash(f"{name}: the guest crashed: {kind}{where}{what}", kind, vector, rip, address)

    def _result(self, export: abi.Export):
        m = self.machine
        reply = abi.parse_reply(m.memory.read(self.page, abi.PAGE_SIZE), export.signature.ret,
                                self.mem_size, self.max_result)
        if reply.error:
            raise GuestFunctionError(export.name, m.memory.read(reply.value, reply.len).decode("utf-8", "replace"))
        if reply.type == abi.INT:
            return abi.to_i64(reply.value)
        if reply.type == 0:
            return None
        data = m.memory.read(reply.value, reply.len)
        if reply.type == abi.BYTES:
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SandboxProtocolError(f"the guest returned a str that is not UTF-8 ({e})") from None

    # --- host calls -------------------------------------------------------------------
    def _host_call(self) -> None:
        """Serve one 'H' exit: the guest's request is checked, then answered or refused."""
        m = self.machine
        req = abi.parse_host_request(m.memory.read(self.page, abi.PAGE_SIZE), self.mem_size, self.args_size)
        try:
            fn, args = self._host_args(req)
        except _Refused as e:
            return self._answer(req, abi.STATUS_ERROR, "s", str(e).encode())
        result = fn.fn(*args)               # a Python exception aborts the call, in the caller
        ret = fn.signature.ret
        if not ret:
            return self._answer(req, abi.STATUS_OK, "", None)
        try:
            x = abi.check_value(ret, result, f"host function {fn.name!r}'s result")
        except TypeError as e:
            raise SandboxError(str(e)) from None
        if not isinstance(x, int) and len(x) > req.cap:
            return self._answer(req, abi.STATUS_ERROR, "s", f"host function {fn.name!r} returned {len(x)} "
                                f"bytes; the guest's buffer holds {req.cap}".encode())
        return self._answer(req, abi.STATUS_OK, ret, x)

    def _host_args(self, req: abi.HostRequest) -> tuple[HostFunction, list]:
        m = self.machine
        name = m.memory.read(req.name_addr, req.name_len).decode("utf-8", "replace")
        fn = self.host_functions.get(name)
        if fn is None:
            raise _Refused(f"host function {name!r} is not registered")
        got = "".join(abi.NAMES[v.type] for v in req.args)
        if got != fn.signature.args:
            raise _Refused(f"host function {name!r} takes ({fn.signature.args}), the guest passed ({got})")
        args = []
        for v in req.args:
            if v.type == abi.INT:
                args.append(abi.to_i64(v.value))
                continue
            data = m.memory.read(v.value, v.len)
            if v.type == abi.STR:
                try:
                    data = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise _Refused(f"host function {name!r}: a str argument is not UTF-8") from None
            args.append(data)
        return fn, args

    def _answer(self, req: abi.HostRequest, status: int, letter: str, x) -> None:
        m = self.machine
        if isinstance(x, int):
            val = Val(abi.INT, x, 0)
        elif x is None:
            val = Val(0, 0, 0)
        else:
            x = x[:req.cap]                 # a refusal's message is cut to the buffer
            m.memory.write(req.buf, x)
            val = Val(abi.TYPES[letter], req.buf, len(x))
        m.memory.write(self.page + abi.OFFSET["host_status"], abi.pack_answer(status, val))

    # --- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            m, self.machine = self.machine, None
        if m is not None:
            m.close()

    @property
    def closed(self) -> bool:
        return self.machine is None

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _add(times: dict, key: str, ns: int) -> None:
    times[key] = times.get(key, 0) + ns


class _Refused(Exception):
    """A host call the host will not make; its message goes back into the guest."""
