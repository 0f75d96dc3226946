"""machine_fixture(): a pytest fixture whose machine boots once and is reset in place per test.

The factory follows pytest-postgresql's: a call in conftest.py returns a fixture, named by
the variable it is assigned to (or ``name=``). Behind it, the plugin's pool fixture of the
chosen scope (``kvmpy_pool_session``, ``_package``, ``_module``, ``_class``) holds one
``Rig`` per fixture (and per ``params`` entry): the machine, booted to its ready point and
checkpointed when a test first asks for it, closed when the scope ends.

Each test gets the machine at its checkpoint: the rig resets it *before* lending it to the
next test (lifecycle/reset.py), so a failing test's machine is still as the test left it
when pytest writes the report (serial output, registers) and when ``--pdb`` stops there. A
machine the test closed, or whose checkpoint it dropped, is booted again. Serial output
already written is not reset (docs/reset.md): the rig empties the machine's in-memory
output before each test, so ``serial_output`` holds this test's, and gives ``stats`` a
fresh ``Stats``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import pytest

from .kvmcheck import device, require_kvm

SCOPES = ("session", "package", "module", "class")
#: What an item's failing report is given: (fixture name, Rig) for each machine it was lent.
LENT = pytest.StashKey[list]()
SERIAL_TAIL = 64 << 10            # bytes of serial output a report shows at most


class BootError(Exception):
    """The guest did not reach its ready point; the message has the run's end and its output."""


@dataclass(frozen=True, eq=False)
class MachineSpec:
    """What machine_fixture() was asked for: the image, how to load it, the ready point, the
    Machine's options and disks. ``eq=False``: each call of the factory is its own machine."""

    image: object
    ready: object
    load: dict
    machine: dict
    disks: tuple
    timeout: float

    def disk_paths(self, tmpdir) -> list:
        """The disks for Machine(): an int is a zeroed scratch disk of that many bytes."""
        out = []
        for i, d in enumerate(self.disks):
            if isinstance(d, int) and not isinstance(d, bool):
                path = tmpdir / f"disk{i}.img"
                with open(path, "wb") as f:
                    f.truncate(d)
                d = str(path)
            out.append(d)
        return out

    def load_into(self, m) -> None:
        """Load the image: a bundled guest's name brings its loader options (explicit ones win)."""
        image, options = self.image, {}
        if isinstance(image, str) and os.sep not in image and not os.path.exists(image):
            from ..images import guests
            g = guests.get(image)
            image = g.path
            options = {"format": g.format, "mode": g.mode, "load_addr": g.load_addr, "entry": g.entry,
                       "user": g.user}
        options.update({k: v for k, v in self.load.items() if v is not None})
        options = {k: v for k, v in options.items() if v is not None}
        fmt = options.pop("format", "auto")
        m.load(image, fmt, **options)

    def reach_ready(self, m) -> None:
        """Run the guest to where tests start (nothing to run without an image and ``ready``)."""
        __tracebackhide__ = True
        if callable(self.ready):
            self.ready(m)
            return
        if self.image is None and self.ready is None:
            return
        r = m.run(timeout=self.timeout)
        want = None if self.ready is None else (self.ready << 1) | 1
        if r.reason != "exit" or (want is not None and r.status != want):
            expected = "an isa-debug-exit" if want is None else f"exit status {want:#x} (value {self.ready:#x})"
            tail = m.serial_output[-2000:].decode(errors="replace")
            raise BootError(f"the guest did not reach its ready point: its run ended with {r.reason} "
                            f"status {r.status:#x}, expected {expected}; serial output:\n{tail}")


def boot(spec: MachineSpec, options: dict, tmpdir):
    """A Machine built from ``spec`` and ``options``, at its ready point, checkpointed."""
    __tracebackhide__ = True
    from .. import Machine
    m = Machine(kvm=device(), disks=spec.disk_paths(tmpdir), **options)
    try:
        if spec.image is not None:
            spec.load_into(m)
        spec.reach_ready(m)
        m.checkpoint()
    except BaseException:
        m.close()
        raise
    return m


@dataclass(eq=False)
class Rig:
    """One fixture's machine, held at its checkpoint between the tests it is lent to."""

    spec: MachineSpec
    options: dict
    tmpdir: object
    machine: object = None
    boot_output: bytes = b""
    boot_s: float = 0.0
    boots: int = 0
    lent_to: str | None = None            # the node id of the last test that had it
    tests: int = 0
    notes: list = field(default_factory=list)

    def boot(self) -> None:
        __tracebackhide__ = True
        t0 = time.perf_counter()
        self.machine = boot(self.spec, self.options, self.tmpdir)
        self.boot_s, self.boots = time.perf_counter() - t0, self.boots + 1
        self.boot_output = self.machine.console.output if self.machine.console.buffer is not None else b""

    def lend(self, nodeid: str):
        """The machine at its checkpoint, for the test ``nodeid``."""
        __tracebackhide__ = True
        if self.machine is None:
            self.boot()
        elif self.lent_to is not None:
            self.put_back()
        m = self.machine
        if m.console.buffer is not None:           # this test's output only (what went out is not reset)
            m.console.buffer.seek(0)
            m.console.buffer.truncate()
        m.stats = type(m.stats)()
        self.lent_to, self.tests = nodeid, self.tests + 1
        return m

    def put_back(self) -> None:
        """Reset in place; boot anew if the last test closed the machine or dropped its checkpoint."""
        m = self.machine
        if m.running:
            m.request_stop("kvmpy.testing: the next test starts")
            try:
                m.wait(10)
            except Exception:          # noqa: BLE001  the run's own end is the last test's business
                pass
        if m.vm is not None and m.checkpointed and not m.running:
            try:
                m.reset()
                return
            except Exception as e:     # noqa: BLE001  boot a new one rather than fail every later test
                self.notes.append(f"reset after {self.lent_to} failed ({e}); booted anew")
        m.close()
        self.machine = None
        self.boot()

    def sections(self, name: str) -> list[tuple[str, str]]:
        """The report sections of a failing test: its serial output and a register report."""
        m = self.machine
        if m is None:
            return []
        head = (f"machine {name!r}: booted in {self.boot_s * 1e3:.1f} ms ({self.boots}x), "
                f"lent to {self.tests} test(s), reset in place before each\n")
        head += "".join(n + "\n" for n in self.notes)
        return [(f"kvmpy serial: {name}", serial_text(m)), (f"kvmpy registers: {name}", head + registers_text(m))]

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()
            self.machine = None


def serial_text(m) -> str:
    """What the guest printed on COM1 since the test began (its last SERIAL_TAIL bytes)."""
    if m.vm is None:
        return "(the machine was closed)"
    if m.console.buffer is None:
        return "(serial output went to the stream given as serial=)"
    out = m.console.output
    if not out:
        return "(none)"
    cut = f"(the last {SERIAL_TAIL} of {len(out)} bytes)\n" if len(out) > SERIAL_TAIL else ""
    return cut + out[-SERIAL_TAIL:].decode(errors="replace")


def registers_text(m) -> str:
    """Machine.inspect() of every vCPU (a running machine is paused for it)."""
    if m.vm is None:
        return "(the machine was closed)"
    paused = m.running and m.pause(timeout=2)
    try:
        parts = []
        for n in range(len(m.vcpus)):
            try:
                parts.append(m.inspect(n))
            except Exception as e:     # noqa: BLE001  a report must not hide the test's failure
                parts.append(f"vCPU {n}: no report ({type(e).__name__}: {e})")
        return "\n".join(parts)
    finally:
        if paused:
            m.resume()


class Pool:
    """The rigs of one scope (the plugin's kvmpy_pool_<scope> fixtures), and the boots that failed."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.rigs: dict = {}
        self.failed: dict = {}

    def lend(self, key, spec: MachineSpec, options: dict, nodeid: str):
        __tracebackhide__ = True
        if key in self.failed:
            raise BootError(f"the machine did not boot for an earlier test: {self.failed[key]}")
        rig = self.rigs.get(key)
        if rig is None:
            rig = self.rigs[key] = Rig(spec, options, self.tmp_path_factory.mktemp("kvmpy", numbered=True))
        try:
            return rig, rig.lend(nodeid)
        except Exception as e:
            self.failed[key] = f"{type(e).__name__}: {e}"
            raise

    def close(self) -> None:
        rigs, self.rigs = list(self.rigs.values()), {}
        for rig in rigs:
            rig.close()


def machine_fixture(image=None, *, ready=None, mem_size: int = 16 << 20, disks=(), scope: str = "session",
                    params=None, ids=None, name: str | None = None, timeout: float = 30.0, format=None,
                    mode=None, user=None, cmdline=None, load_addr=None, entry=None, **machine_options):
    """A pytest fixture giving each test a Machine reset in place to the checkpoint taken at
    ``ready``; the machine boots once per ``scope`` (see docs/pytest.md).

    ``image``: a bundled guest's name (``kvmpy.guests``: its format, mode and ``user`` come
    along), a path, bytes, or None for a machine with nothing loaded. ``ready``: the value the
    guest writes to isa-debug-exit (port 0xf4) where tests start; None: its first run must end
    with any such write (with no image: nothing runs); a callable ``ready(machine)`` gets it
    there itself. ``disks``: paths, ``kvmpy.Disk``s, or ints (a zeroed scratch disk of that
    many bytes). ``params``: a list of dicts of Machine options, each its own machine (``ids``
    name them). The rest are ``Machine()`` and ``load()`` options.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if ready is not None and not callable(ready) and not (isinstance(ready, int) and 0 <= ready <= 0xFF):
        raise ValueError(f"ready is the byte the guest writes to port 0xf4, a callable or None, not {ready!r}")
    spec = MachineSpec(image, ready, {"format": format, "mode": mode, "user": user, "cmdline": cmdline,
                                      "load_addr": load_addr, "entry": entry},
                       {"mem_size": mem_size, **machine_options}, tuple(disks), timeout)

    def kvmpy_machine(request):
        __tracebackhide__ = True       # a failing boot shows its error, not these frames
        require_kvm()                  # the plugin's pytest_fixture_setup has checked already
        pool = request.getfixturevalue(f"kvmpy_pool_{scope}")
        overrides = getattr(request, "param", None) or {}
        key = (spec, getattr(request, "param_index", 0))
        rig, m = pool.lend(key, spec, {**spec.machine, **overrides}, request.node.nodeid)
        request.node.stash.setdefault(LENT, []).append((request.fixturename, rig))
        return m

    kvmpy_machine.kvmpy_machine = True        # for the plugin's pytest_fixture_setup
    kvmpy_machine.__doc__ = f"A kvmpy Machine ({image or 'no image'}) booted once per {scope}, reset in place per test."
    return pytest.fixture(params=params, ids=ids, name=name)(kvmpy_machine)
