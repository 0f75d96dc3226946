"""boot: time to boot a kernel with kvmpy, against QEMU with KVM on the same image, same run.

Two subjects (``--subject``; the default is ``multiboot``):

``multiboot``: the bundled multiboot v1 kernel ``multiboot-hello``
(guests/multiboot-hello.c), which prints the information its boot loader
passed and exits through isa-debug-exit with 0x2B (exit status 87). The time
is from start to that exit. 64 MiB, 10 rounds by default.

``linux``: Debian's cloud kernel (kvmpy.images.linuxkernel.fetch(): downloaded with
apt on first use, then cached), its uncompressed vmlinux booted through the
PVH entry with 512 MiB and ``console=ttyS0 earlyprintk=serial``. The time is
from start to the first appearance of ``Linux version `` on the serial port,
and the run is then stopped (killed, for a process). 3 rounds by default: on
a host without hardware virtualisation each run takes ~13-16 s (docs/host-notes.md).
Without the kernel (empty cache and no apt or network) the subject cannot run
(exit 2, saying so).

``linux-init``: the same vmlinux (PVH) and a busybox initramfs
(kvmpy.images.linuxkernel: ``files.initramfs(LINUX_INIT_SCRIPT)``, written once
into the kernel cache under its hash) whose /init prints ``kvmpy-init: 42``,
computed by the shell, then resets; 512 MiB, ``console=ttyS0
earlyprintk=serial panic=-1`` (``--append`` adds parameters, for every
variant alike). The time is from start to that marker on the serial port (the
run is then stopped), with splits: when ``Linux version `` and ``Run /init``
arrived (``marks_ms``), the phases between them (``phases_ms``, with
kvmpy/QEMU ratios in ``phase_ratios``), kvmpy-lib's exits at the end and at
each mark (``kvmpy_stats``), and, where debugfs shows them
(/sys/kernel/debug/kvm), KVM's own counters for each variant's VM
(``kvm_counters``: exits, io_exits, pf_taken, ...). Every variant gets the
same kernel file, initrd file, command line and memory; QEMU also gets
``-cpu host``, as kvmpy passes KVM's supported CPUID on. Where KVM emulates
guest ring 0 (kvm_pvm) Linux stops after its banner, so the subject refuses
to start there (exit 2, saying so); tests/nested/testbed.py --steps bench
runs it on kvm_amd inside QEMU's TCG.

Variants:

  kvmpy-lib     in this process: Machine(mem_size=--mem) construction, load()
                and run() until it returns with the guest's exit (or until the
                banner). kvmpy is already imported (the table splits the time).
  kvmpy-cli     a fresh `python -m kvmpy run IMAGE` process: wall time from
                spawn to its exit (or to the banner on its stdout), interpreter
                start-up and imports included.
  qemu          a fresh `qemu-system-x86_64 -M pc -enable-kvm -nodefaults
                -kernel IMAGE ...` process, spawn to exit (or banner). QEMU boots
                a multiboot -kernel through an option ROM (multiboot_dma.bin)
                that the firmware runs: on pc, SeaBIOS after its POST; a vmlinux
                with the PVH note through pvh.bin the same way.
  qemu-microvm  the same with -M microvm, whose firmware is bios-microvm.bin
                (qboot on Debian): it runs the same option ROMs (QEMU 7.2).
                microvm has its ISA serial port (COM1) by default.

Every QEMU command has -device isa-debug-exit,iobase=0xf4,iosize=0x01, so the
guest's exit ends QEMU the way it ends kvmpy, with the same status (checked).
Each run's output is checked too: it must match the guest's expected output
except where the machines differ (for multiboot-hello: mem_upper, which also
follows --mem, the memory map and the boot loader's name); a run that ends at
the banner must have printed it.
QEMU variants run only when QEMU is on PATH (or --qemu PATH); each is skipped,
with the reason on stderr and in the JSON, if its first run (the untimed
warm-up, or with --warmup 0 the first timed one) fails.

Informative extras (the "split" in the JSON): python-startup (a fresh
`python -c pass`) and python-import (`python -c "import kvmpy.cli,
kvmpy.vmm.machine"`, what `kvmpy run` imports) split kvmpy-cli's time.

Rounds (--rounds, default the subject's) run every variant once in an order
that rotates each round; the table shows medians and minimums. Ratios are of
medians: kvmpy-cli/qemu is the fair one (both fresh processes); kvmpy-lib/qemu
is what a program that imports kvmpy gets.

A subject is a function (SUBJECTS, in boot_subjects.py) returning a Subject: the image, how
kvmpy loads it, QEMU's arguments per machine type, the expected status and
output, and where the timing ends: at the guest's exit (``end="exit"``), or
at the first appearance of its banner on the serial port (``end="banner"``:
the run is then stopped), as ``linux`` does ("Linux version "), or at its
``marker`` (``end="marker"``, linux-init; ``splits`` are timed on the way).
With the native UART kvmpy's output reaches the host up to 20 ms late (its
flusher), so a banner or marker time carries that much (kvmpy-cli's also waits for the end of the
line: `kvmpy run` flushes its stdout at newlines); QEMU writes each byte as it
comes. SUBJECTS also gives each subject its default --mem and --rounds.
"""
from __future__ import annotations

import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

from . import _common
from ._common import BenchError
from .boot_subjects import (  # noqa: F401  (re-exported: boot.Subject, boot.SUBJECTS, ...)
    LINUX_BANNER, LINUX_CMDLINE, LINUX_INIT_CMDLINE, LINUX_INIT_MARKER, LINUX_INIT_SCRIPT, MICROVM_RTC_NOTE,
    SUBJECTS, MiB, Subject, SubjectSpec, linux, linux_init, linux_init_subject, multiboot, ring0_emulated)

NAME = "boot"
DESCRIPTION = ("boot a multiboot kernel to its exit (or Linux to its banner or to its /init): kvmpy "
               "in-process and CLI vs qemu-system-x86_64 -enable-kvm")
KVMPY_VARIANTS = ("kvmpy-lib", "kvmpy-cli")
QEMU_VARIANTS = ("qemu", "qemu-microvm")
EXTRAS = ("python-startup", "python-import")
QEMU = "qemu-system-x86_64"
#: QEMU's arguments common to every subject and machine type: KVM, no default devices
#: (NIC and its iPXE ROM, VGA, parallel port, monitor), COM1 on stdio, and the
#: isa-debug-exit device at kvmpy's port (layout.DEBUG_EXIT_PORT).
QEMU_COMMON = ("-enable-kvm", "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
               "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01")


# --- command line ----------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--subject", choices=sorted(SUBJECTS), default="multiboot",
                   help="what to boot: multiboot (default), the bundled multiboot-hello kernel to its "
                        "exit; linux, Debian's kernel (PVH vmlinux) to its 'Linux version' banner; "
                        "linux-init, the same kernel with a busybox initramfs to the line its /init "
                        "prints (needs VMX or SVM: exit 2 where KVM emulates ring 0)")
    p.add_argument("--rounds", type=_common.positive, default=None, metavar="R",
                   help="interleaved rounds, each runs every variant once (default: multiboot 10, "
                        "linux and linux-init 3)")
    p.add_argument("--warmup", type=_common.nonnegative, default=1, metavar="N",
                   help="untimed runs per variant first; the first also decides whether a QEMU "
                        "variant can run here (default 1; with 0 the first timed run decides)")
    p.add_argument("--mem", type=_common.positive, default=None, metavar="SIZE",
                   help="guest RAM for every variant (default: multiboot 64M, linux and linux-init 512M)")
    p.add_argument("--microvm-rtc", choices=("on", "auto"), default="on",
                   help="linux-init: the qemu-microvm variant's RTC, on (default, like kvmpy's machine) or "
                        "auto (microvm's default: none under KVM, and Linux then spends ~40,000 port exits "
                        "probing for it)")
    p.add_argument("--append", default="", metavar="TEXT",
                   help="linux, linux-init: more kernel parameters after the subject's command line, "
                        "for every variant alike (e.g. 'quiet')")
    p.add_argument("--qemu", default=QEMU, metavar="PATH",
                   help=f"the QEMU to compare against (default {QEMU} on PATH)")
    p.add_argument("--no-qemu", action="store_true", help="only kvmpy's variants")
    p.add_argument("--no-microvm", action="store_true", help="skip the qemu-microvm variant")
    p.add_argument("--no-pc", action="store_true", help="skip the qemu (-M pc) variant")
    p.add_argument("--no-extras", action="store_true",
                   help="skip python-startup and python-import (the kvmpy-cli split)")
    p.add_argument("--inherit-pycache", action="store_true",
                   help="run the child Pythons with this environment's bytecode caching as it is "
                        "(default: a temporary cache, PYTHONPYCACHEPREFIX, filled by the warm-up)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="give up on a run after this long (default 120)")


# --- one run of each variant ---------------------------------------------------------------
class _Marks:
    """When each of some outputs first appears in a byte stream that arrives in pieces. Only
    the new bytes (and the tail a pattern may straddle) are searched, so a long boot log costs
    no more than its length."""

    def __init__(self, marks: dict[str, bytes], stop: str | None = None,
                 on_mark: Callable[[str], None] | None = None):
        self.buf = bytearray()
        self.stop, self.on_mark = stop, on_mark
        self.ns: dict[str, int] = {}
        self._left = dict(marks)
        self._tail = max(map(len, marks.values()), default=1) - 1

    def feed(self, data) -> bool:
        """Add output; True once the stop mark has arrived."""
        start = max(0, len(self.buf) - self._tail)
        self.buf += data
        now = None
        for name, pattern in list(self._left.items()):
            if self.buf.find(pattern, start) >= 0:
                now = now or time.perf_counter_ns()
                self.ns[name] = now
                del self._left[name]
                if self.on_mark is not None:
                    self.on_mark(name)
        return self.stop is not None and self.stop in self.ns

    def ms_since(self, t0: int) -> dict[str, float]:
        """``NAME_ms`` for each mark seen: ms from ``t0``."""
        return {f"{name}_ms": (ns - t0) / 1e6 for name, ns in self.ns.items()}


class _Sink:
    """kvmpy-lib's serial stream: the marks' arrival, as a file-like object."""

    def __init__(self, marks: _Marks):
        self.marks = marks

    def write(self, data) -> int:
        self.marks.feed(data)
        return len(data)

    def flush(self) -> None:
        pass


def _offset_2m(machine) -> int | None:
    """Where guest RAM (its first region, at guest-physical 0) starts in this process, modulo
    2 MiB: KVM maps guest memory with 2 MiB pages only where this is 0 (and the host backs it
    with huge pages); otherwise every 4 KiB page the guest touches costs a nested page fault."""
    import ctypes
    try:
        anchor = ctypes.c_char.from_buffer(machine.memory.regions[0].mm)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    try:
        return ctypes.addressof(anchor) % (2 * MiB)
    finally:
        del anchor


def _missing(subject: "Subject", seen: dict) -> str:
    return f"before printing {subject.marks[subject.stop_at]!r}" if subject.stop_at not in seen else ""


def run_lib(subject: Subject, mem: int, timeout: float, before_close: Callable[[], None] | None = None) -> dict:
    """kvmpy-lib: Machine() + load() + run() in this process; ms for each and in all.

    ``run_ms`` is run()'s share of the timed part: to its return, or to the stop mark.
    ``stats`` has the machine's exit statistics at the end and, in ``at``, when each mark
    reached the sink (Machine.live_stats()). ``before_close`` is called once run() returned,
    while the VM still exists."""
    from kvmpy.errors import GuestError
    from kvmpy.vmm.machine import Machine
    machine = None
    at: dict[str, dict] = {}

    def on_mark(name: str) -> None:
        if machine is None:
            return
        s = machine.live_stats()
        at[name] = {"exits": dict(s.exits), "devices": dict(s.devices), "kvm_ns": s.kvm_ns, "vmm_ns": s.vmm_ns}
        if name == subject.stop_at:
            machine.request_stop(name)
    marks = _Marks(subject.marks, subject.stop_at, on_mark)
    t0 = time.perf_counter_ns()
    machine = Machine(mem_size=mem, serial=_Sink(marks))
    t1 = time.perf_counter_ns()
    try:
        machine.load(subject.image, **subject.load)
        t2 = time.perf_counter_ns()
        try:
            result = machine.run(timeout=timeout)
            why = f"stopped with {result.reason!r}, status {result.status}"
        except GuestError as e:             # e.g. a kernel that dies before its banner
            result, why = None, f"guest error: {str(e).splitlines()[0]}"
        t3 = time.perf_counter_ns()
        stats = {**machine.stats.as_dict(), "at": at, "ram_host_offset_2m": _offset_2m(machine)}
        if before_close is not None:
            before_close()
    finally:
        machine.close()
    t4 = time.perf_counter_ns()
    if subject.end == "exit":
        status = result.status & 0xFF if result is not None and result.reason == "exit" else None
        ok = status == subject.expect_status
    else:
        status, ok = None, subject.stop_at in marks.ns
        why = "" if ok else f"{why} {_missing(subject, marks.ns)}"
    end = t3 if subject.end == "exit" else marks.ns.get(subject.stop_at)
    ms = lambda a, b: (b - a) / 1e6 if a is not None and b is not None else None  # noqa: E731
    return {"ok": ok, "why": why, "status": status, "output": bytes(marks.buf), "ms": ms(t0, end),
            "banner_ms": None, **marks.ms_since(t0), "machine_ms": ms(t0, t1), "load_ms": ms(t1, t2),
            "run_ms": ms(t2, end), "close_ms": ms(t3, t4), "stats": stats}


def run_process(argv: list[str], env: dict | None, timeout: float, marks: dict[str, bytes] | None = None,
                stop: str | None = None, before_kill: Callable[[], None] | None = None) -> dict:
    """A fresh process, stdout read as it comes: ms from spawn to exit, or to the first
    appearance of ``marks[stop]`` (``before_kill`` is called, then the process is killed);
    ``NAME_ms`` for each mark seen."""
    watch = _Marks(marks or {}, stop)
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter_ns()
        try:
            # cwd "/": `python -m` puts the working directory first on sys.path, and a
            # checkout's unbuilt kvmpy/ there must not shadow the kvmpy under test
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    env=env, cwd="/")
        except OSError as e:
            raise BenchError(f"cannot start {argv[0]}: {e.strerror or e}") from None
        killed = None
        fd, deadline = proc.stdout.fileno(), t0 + int(timeout * 1e9)
        try:
            while True:
                left = (deadline - time.perf_counter_ns()) / 1e9
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    killed = f"still running after {timeout:g} s"
                    proc.kill()
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                if watch.feed(chunk):
                    if before_kill is not None:
                        before_kill()
                    proc.send_signal(signal.SIGKILL)
                    break
            rc = proc.wait()
            t1 = time.perf_counter_ns()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip()
    seen = stop is None or stop in watch.ns
    if killed:
        why = killed
    elif stop is not None:
        why = "" if seen else f"exited {rc} without printing {marks[stop]!r}"
    else:
        why = f"exited {rc}"
    why += (": " + stderr[-2000:]) if stderr else ""
    end = (watch.ns.get(stop) if stop is not None else t1) if not killed else None
    return {"ok": not killed and seen, "why": why, "status": rc, "output": bytes(watch.buf),
            "ms": (end - t0) / 1e6 if end is not None else None, "banner_ms": None, **watch.ms_since(t0)}


#: KVM's event counters in debugfs, summed over the VMs that exist (Documentation/virt/kvm/api.rst,
#: "KVM statistics"; a VM's counts go when it does): read before a run to a marker and again at the
#: marker, while its VM lives, where debugfs is mounted and readable (e.g. in the nested testbed).
KVM_DEBUGFS = pathlib.Path("/sys/kernel/debug/kvm")


def kvm_counters() -> dict[str, int] | None:
    """The host's KVM counters (exits, io_exits, mmio_exits, halt_exits, ...) now, or None."""
    try:
        names = sorted(os.listdir(KVM_DEBUGFS))
    except OSError:
        return None
    out = {}
    for name in names:
        try:
            out[name] = int((KVM_DEBUGFS / name).read_text())
        except (OSError, ValueError):       # per-VM directories, histograms, unreadable files
            pass
    return out or None


def _kvmpy_env(pycache: str | None) -> dict:
    """The environment for child Pythons: this kvmpy first on their path, and with
    ``pycache`` a bytecode cache there (as an installed kvmpy has its .pyc files)."""
    import kvmpy
    top = str(pathlib.Path(kvmpy.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": top + (os.pathsep + path if path else "")}
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


class Runner:
    """How to run each variant of one subject, and how to check a run."""

    def __init__(self, subject: Subject, args, qemu: str | None, pycache: str | None):
        self.s, self.args, self.env, self.pycache = subject, args, _kvmpy_env(pycache), pycache
        self.argv = {"kvmpy-cli": [sys.executable, "-m", "kvmpy", "run", "--mem", str(args.mem),
                                   *subject.cli, str(subject.image)],
                     "python-startup": [sys.executable, "-c", "pass"],
                     "python-import": [sys.executable, "-c", "import kvmpy.cli, kvmpy.vmm.machine"]}
        if qemu is not None:
            for v, extra in subject.qemu.items():
                self.argv[v] = [qemu, *QEMU_COMMON, "-m", f"{args.mem // MiB}M", *extra]

    def run(self, variant: str) -> dict:
        s, timeout = self.s, self.args.timeout
        if variant in EXTRAS:
            r = run_process(self.argv[variant], self.env, timeout)
            r["ok"] = r["status"] == 0
            return r
        before = kvm_counters() if s.end == "marker" else None
        after: dict = {}
        at_stop = (lambda: after.update(kvm_counters() or {})) if before is not None else None
        if variant == "kvmpy-lib":
            r = run_lib(s, self.args.mem, timeout, at_stop)
        else:
            env = self.env if variant == "kvmpy-cli" else None
            r = run_process(self.argv[variant], env, timeout, s.marks, s.stop_at, at_stop)
            if s.end == "exit" and r["ok"]:
                r["ok"] = r["status"] == s.expect_status
        if after:
            r["kvm_counters"] = {k: after[k] - before.get(k, 0) for k in after}
        if r["ok"] and s.end == "exit":
            want, got = s.normalize(s.expect_output), s.normalize(r["output"])
            if got != want:
                r["ok"] = False
                r["why"] = (f"its output differs from kvmpy's expected output beyond the known "
                            f"differences ({s.differences}):\n{_diff(want, got)}")
        if not r["ok"] and s.end == "exit" and r["status"] != s.expect_status:
            r["why"] = f"exit status {r['status']}, expected {s.expect_status} ({r['why']})"
        return r


def _diff(want: bytes, got: bytes) -> str:
    import difflib
    return "\n".join(difflib.unified_diff(want.decode(errors="replace").splitlines(),
                                          got.decode(errors="replace").splitlines(),
                                          "expected", "got", lineterm="", n=1))


# --- the benchmark ---------------------------------------------------------------------------
def find_qemu(args) -> tuple[str | None, str | None]:
    """(path of QEMU, None) or (None, why it is not used)."""
    if args.no_qemu:
        return None, "--no-qemu"
    path = shutil.which(args.qemu)
    if path is None:
        return None, f"{args.qemu} not found on PATH (install qemu-system-x86)"
    return path, None


def measure(args, progress) -> dict:
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-pycache-") as tmp:
        return _measure(args, progress, None if args.inherit_pycache else tmp)


def _pycache_note(pycache: str | None) -> str:
    if pycache is not None:
        return "temporary (PYTHONPYCACHEPREFIX), filled by the warm-up runs"
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return "inherited: off (PYTHONDONTWRITEBYTECODE), every child compiles what has no .pyc"
    return "inherited"


def _select(args, runner: Runner, no_qemu: str | None) -> tuple[list[str], dict[str, str]]:
    """The variants to run, and those left out with the reason (no QEMU, --no-pc, --no-microvm)."""
    unwanted = {"qemu-microvm": args.no_microvm and "--no-microvm", "qemu": args.no_pc and "--no-pc"}
    if no_qemu:
        skipped = dict.fromkeys(QEMU_VARIANTS, no_qemu)
    else:
        skipped = {v: why for v, why in unwanted.items() if why}
    return list(KVMPY_VARIANTS) + [v for v in QEMU_VARIANTS if v in runner.argv and v not in skipped], skipped


def _measure(args, progress, pycache: str | None) -> dict:
    spec = SUBJECTS[args.subject]
    args.mem = spec.mem if args.mem is None else args.mem
    args.rounds = spec.rounds if args.rounds is None else args.rounds
    from kvmpy.kvm import Kvm
    Kvm().close()                                   # KvmUnavailable (exit 2) before anything long
    progress(f"preparing subject {args.subject}")
    subject = spec.make(args)                       # linux: may download Debian's kernel (once)
    qemu, no_qemu = find_qemu(args)
    if no_qemu:
        progress.done()
        print(f"{NAME}: QEMU not used ({no_qemu}): reporting kvmpy only", file=sys.stderr)
    runner = Runner(subject, args, qemu, pycache)
    variants, skipped = _select(args, runner, no_qemu)
    extras = [] if args.no_extras else list(EXTRAS)
    outputs: dict[str, str] = {}

    def untimed(v: str, r: dict) -> bool:
        """A warm-up run (or with --warmup 0 the first timed one) decides whether a variant
        runs: a QEMU variant that fails is skipped, kvmpy's failing is an error."""
        if not r["ok"]:
            msg = f"{v}: {' '.join(runner.argv.get(v, ['Machine()']))}: {r['why']}"
            if v not in QEMU_VARIANTS:
                raise BenchError(msg)
            progress.done()
            print(f"{NAME}: skipping {msg}", file=sys.stderr)
            skipped[v] = r["why"]
            return False
        if v not in EXTRAS:
            outputs.setdefault(v, r["output"].decode(errors="replace"))
        return True

    for v in variants + extras:
        for i in range(args.warmup):
            progress(f"warm-up {i + 1}/{args.warmup}: {v}")
            if not untimed(v, runner.run(v)):
                break
    variants = [v for v in variants if v not in skipped]
    timed = tuple(variants + extras)
    samples: dict[str, list[dict]] = {v: [] for v in timed}
    counters: dict[str, list[dict]] = {v: [] for v in timed}
    lib_stats = None
    for rnd in range(args.rounds):
        for v in _common.rotate(timed, rnd):
            if v in skipped:                        # failed its first run (--warmup 0)
                continue
            progress(f"round {rnd + 1}/{args.rounds}: {v}")
            r = runner.run(v)
            if rnd == 0 and args.warmup == 0 and not untimed(v, r):
                continue
            if not r["ok"]:
                raise BenchError(f"{v}: {' '.join(runner.argv.get(v, ['Machine()']))}: {r['why']}")
            samples[v].append({k: x for k, x in r.items() if k.endswith("_ms") or k == "ms"})
            if "kvm_counters" in r:
                counters[v].append(r["kvm_counters"])
            if v == "kvmpy-lib":
                lib_stats = r["stats"]
    variants = [v for v in variants if v not in skipped]
    result = _result(args, subject, runner, variants, extras, samples, skipped, outputs, qemu)
    if subject.end == "marker":
        _add_phases(result, subject, variants, samples, counters, lib_stats)
    return result


def _med(samples: list[dict], key: str) -> float | None:
    xs = [s[key] for s in samples if s.get(key) is not None]
    return _common.summarize(xs)["median"] if xs else None


def _phases(subject: Subject, samples: list[dict]) -> dict[str, float]:
    """Median ms of each phase: from start to the first mark, then between consecutive marks
    (in boot order; a mark a run did not print is left out of that run's phases)."""
    per: dict[str, list[float]] = {}
    for s in samples:
        prev, t = "start", 0.0
        for m in subject.marks:
            x = s.get(f"{m}_ms")
            if x is not None:
                per.setdefault(f"{prev}-{m}", []).append(x - t)
                prev, t = m, x
    return {k: round(_common.summarize(xs)["median"], 3) for k, xs in per.items()}


def _median_counters(runs: list[dict]) -> dict[str, int]:
    keys = sorted({k for r in runs for k in r})
    return {k: int(_common.summarize([r.get(k, 0) for r in runs])["median"]) for k in keys}


def _add_phases(result: dict, subject: Subject, variants, samples, counters, lib_stats) -> None:
    """For a run to a marker: when each mark arrived, the phases between them and their
    kvmpy/QEMU ratios, kvmpy-lib's exit statistics (the last round's, and at each mark), and
    KVM's own counters per run where debugfs shows them."""
    result["params"]["marks"] = {m: x.decode() for m, x in subject.marks.items()}
    result["params"]["note"] = subject.note
    result["marks_ms"] = {v: {m: round(x, 3) for m in subject.marks
                              if (x := _med(samples[v], f"{m}_ms")) is not None} for v in variants}
    phases = result["phases_ms"] = {v: _phases(subject, samples[v]) for v in variants}
    ratios = {}
    for q in (v for v in QEMU_VARIANTS if v in phases):
        for k in (v for v in KVMPY_VARIANTS if v in phases):
            for ph, x in phases[k].items():
                if phases[q].get(ph):
                    ratios[f"{k}/{q} {ph}"] = round(x / phases[q][ph], 3)
    result["phase_ratios"] = ratios
    result["kvmpy_stats"] = lib_stats
    result["kvm_counters"] = {v: _median_counters(counters[v]) for v in variants if counters[v]}


def _result(args, subject, runner, variants, extras, samples, skipped, outputs, qemu) -> dict:
    summary = {v: {k: round(x, 3) for k, x in _common.summarize([s["ms"] for s in samples[v]]).items()}
               for v in variants + extras}
    med = {v: summary[v]["median"] for v in variants + extras}
    ratios = {}
    if "kvmpy-cli" in med and "kvmpy-lib" in med:
        ratios["kvmpy-cli/kvmpy-lib"] = round(med["kvmpy-cli"] / med["kvmpy-lib"], 3)
    for q in (v for v in QEMU_VARIANTS if v in med):
        for k in KVMPY_VARIANTS:
            ratios[f"{k}/{q}"] = round(med[k] / med[q], 3)
    lib = samples["kvmpy-lib"]
    split = {"kvmpy-lib": {k: round(_med(lib, k), 3) for k in ("machine_ms", "load_ms", "run_ms", "close_ms")}}
    if extras:
        start, imp = med["python-startup"], med["python-import"]
        split["kvmpy-cli"] = {"python_startup_ms": round(start, 3), "import_ms": round(imp - start, 3),
                              "rest_ms": round(med["kvmpy-cli"] - imp, 3)}
    banner = {v: round(_med(samples[v], "banner_ms"), 3) for v in variants if _med(samples[v], "banner_ms")}
    return {
        "benchmark": NAME,
        "host": {**_common.host_info(), "qemu": _common.tool_version([qemu, "--version"]) if qemu else None},
        "params": {"subject": subject.name, "image": str(subject.image), "title": subject.title,
                   "end": subject.end, "rounds": args.rounds, "warmup": args.warmup, "mem": args.mem,
                   "order": "rotating per round", "timeout_s": args.timeout,
                   "python_bytecode_cache": _pycache_note(runner.pycache),
                   "commands": {v: runner.argv[v] for v in variants + extras if v in runner.argv},
                   "output_differences": subject.differences},
        "results": [{"variant": v, "metric": subject.metric, "value": med[v], "unit": "ms"} for v in variants],
        "ratios": ratios,
        "skipped": skipped,
        "summary": summary,
        "samples": {v: [round(s["ms"], 3) for s in samples[v]] for v in variants + extras},
        "banner_ms": banner,
        "split": split,
        "outputs": outputs,
    }


def table(result: dict) -> str:
    p, summary, med = result["params"], result["summary"], {r["variant"]: r["value"] for r in result["results"]}
    refs = [q for q in QEMU_VARIANTS if q in med]
    rows = [[v, f"{summary[v]['median']:.1f}", f"{summary[v]['min']:.1f}",
             *(f"{summary[v]['median'] / summary[q]['median']:.3f}" for q in refs)] for v in med]
    what = {"exit": "its exit", "banner": "its banner"}.get(p["end"]) or repr(p.get("marks", {}).get("marker"))
    lines = [f"boot to {what}, subject {p['subject']}: {p['title']}; {p['rounds']} rounds, order rotating",
             _common.host_line(result["host"])]
    if result["host"].get("qemu"):
        lines.append(f"reference: {result['host']['qemu']}")
    lines.append(_common.format_table(["variant", "ms median", "min", *(f"x {q}" for q in refs)], rows))
    lib = result["split"]["kvmpy-lib"]
    run = "run()" if p["end"] == "exit" else f"run() to the {p['end']}"
    lines.append(f"kvmpy-lib: Machine() {lib['machine_ms']:.1f} ms + load() {lib['load_ms']:.1f} ms + "
                 f"{run} {lib['run_ms']:.1f} ms (then close() {lib['close_ms']:.1f} ms, not counted)")
    if "kvmpy-cli" in result["split"]:
        cli = result["split"]["kvmpy-cli"]
        lines.append(f"kvmpy-cli: python start-up {cli['python_startup_ms']:.1f} ms + import kvmpy.cli, "
                     f"kvmpy.vmm.machine {cli['import_ms']:.1f} ms + the rest {cli['rest_ms']:.1f} ms "
                     f"(bytecode cache: {p['python_bytecode_cache']})")
    for v, why in result["skipped"].items():
        lines.append(f"{v}: not run: {why.splitlines()[0] if why else '?'}")
    if refs:
        lines.append("  ".join(f"{k} = {x:.3f}" for k, x in result["ratios"].items() if "/qemu" in k))
    if "phases_ms" in result:
        lines += _phase_lines(result, refs)
    return "\n".join(lines)


#: KVM counters worth a row in the table (debugfs names), when any variant has them non-zero.
KVM_COUNTER_ROWS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "irq_window_exits",
                    "request_irq_exits", "signal_exits", "insn_emulation", "insn_emulation_fail",
                    "hypercalls", "pf_taken", "halt_wakeup", "halt_successful_poll", "halt_attempted_poll")


def _phase_lines(result: dict, refs: list[str]) -> list[str]:
    phases, variants = result["phases_ms"], list(result["phases_ms"])
    names = list(dict.fromkeys(ph for v in variants for ph in phases[v]))
    rows = [[v, *(f"{phases[v][ph]:.1f}" if ph in phases[v] else "-" for ph in names)] for v in variants]
    for q in refs:
        for k in (v for v in KVMPY_VARIANTS if v in phases):
            rows.append([f"{k}/{q}", *(f"{result['phase_ratios'][f'{k}/{q} {ph}']:.3f}"
                                       if f"{k}/{q} {ph}" in result["phase_ratios"] else "-" for ph in names)])
    lines = ["phases (ms, medians; kvmpy's output reaches the host up to 20 ms late):",
             _common.format_table(["phase", *names], rows)]
    st = result.get("kvmpy_stats")
    if st:
        top = lambda c: ", ".join(f"{k} {n}" for k, n in sorted(c.items(), key=lambda kv: -kv[1])[:8])  # noqa: E731
        lines.append(f"kvmpy-lib exits in its last round: {st['total_exits']} ({top(st['exits'])}); "
                     f"by device: {top(st['devices']) or '-'}; guest RAM at host address "
                     f"{st.get('ram_host_offset_2m')} mod 2 MiB")
        prev: dict = {"exits": {}, "devices": {}}
        for m, at in st["at"].items():
            d = {k: n - prev["devices"].get(k, 0) for k, n in at["devices"].items()}
            e = sum(at["exits"].values()) - sum(prev["exits"].values())
            lines.append(f"  to {m}: +{e} exits; by device: {top({k: n for k, n in d.items() if n}) or '-'}")
            prev = at
    kc = result.get("kvm_counters")
    if kc:
        vs = list(kc)
        keys = [k for k in KVM_COUNTER_ROWS if any(kc[v].get(k) for v in vs)]
        lines.append("KVM's counters per run (debugfs, medians):")
        lines.append(_common.format_table(["counter", *vs], [[k, *(str(kc[v].get(k, "-")) for v in vs)]
                                                              for k in keys]))
    return lines


def main(argv: list[str] | None = None, *, prog: str | None = None, results: pathlib.Path | None = None) -> int:
    """``kvmpy bench NAME [argv]``; ``results`` is where the JSON goes without --out."""
    return _common.run_main(sys.modules[__name__], argv, prog, results)
