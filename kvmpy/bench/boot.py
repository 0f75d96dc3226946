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

A subject is a function (see SUBJECTS) returning a Subject: the image, how
kvmpy loads it, QEMU's arguments per machine type, the expected status and
output, and where the timing ends: at the guest's exit (``end="exit"``), or
at the first appearance of its banner on the serial port (``end="banner"``:
the run is then stopped), as ``linux`` does ("Linux version "). With the
native UART kvmpy's output reaches the host up to 20 ms late (its flusher),
so a banner time carries that much (kvmpy-cli's also waits for the end of the
line: `kvmpy run` flushes its stdout at newlines); QEMU writes each byte as it
comes. SUBJECTS also gives each subject its default --mem and --rounds.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, NamedTuple

from . import _common
from ._common import BenchError

NAME = "boot"
DESCRIPTION = ("boot a multiboot kernel to its exit (or Linux to its banner): kvmpy in-process and CLI "
               "vs qemu-system-x86_64 -enable-kvm")
KVMPY_VARIANTS = ("kvmpy-lib", "kvmpy-cli")
QEMU_VARIANTS = ("qemu", "qemu-microvm")
EXTRAS = ("python-startup", "python-import")
QEMU = "qemu-system-x86_64"
MiB = 1 << 20
#: QEMU's arguments common to every subject and machine type: KVM, no default devices
#: (NIC and its iPXE ROM, VGA, parallel port, monitor), COM1 on stdio, and the
#: isa-debug-exit device at kvmpy's port (layout.DEBUG_EXIT_PORT).
QEMU_COMMON = ("-enable-kvm", "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
               "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01")


@dataclasses.dataclass(frozen=True)
class Subject:
    """One kernel to boot, and how each variant boots it and checks the run."""

    name: str
    title: str                              # for the table: what the image is
    image: pathlib.Path
    load: dict                              # Machine.load() keyword arguments (kvmpy-lib)
    cli: tuple[str, ...]                    # `kvmpy run` options before IMAGE (kvmpy-cli)
    qemu: dict[str, tuple[str, ...]]        # QEMU variant -> its arguments after QEMU_COMMON and -m
    banner: bytes                           # the kernel's first output
    end: str = "exit"                       # "exit": time to the guest's exit; "banner": to the banner
    expect_status: int | None = None        # exit status of every run (end == "exit")
    expect_output: bytes = b""              # kvmpy's output (checked after normalize)
    normalize: Callable[[bytes], bytes] = bytes            # maps an output to what must agree
    differences: str = ""                   # what normalize hides, for the JSON

    @property
    def metric(self) -> str:
        return "to_exit" if self.end == "exit" else "to_banner"


# --- subjects ------------------------------------------------------------------------
def _normalize_multiboot(out: bytes) -> bytes:
    """multiboot-hello's output with what differs between boot loaders blanked out.

    Anything before the banner (firmware chatter) goes; mem_upper, the memory map
    (QEMU's lists reserved ranges that kvmpy's does not) and the boot loader's name
    differ between kvmpy and QEMU, between QEMU's machine types and with --mem.
    """
    i = out.find(b"multiboot-hello: magic")
    text = (out[i:] if i >= 0 else out).replace(b"\r\n", b"\n")
    text = re.sub(rb"mem_upper \d+K", b"mem_upper ?K", text)
    text = re.sub(rb"(?m)^mmap .*\n", b"", text)
    return re.sub(rb"(?m)^boot loader: .*$", b"boot loader: ?", text)


def multiboot(args) -> Subject:
    """The bundled multiboot v1 kernel multiboot-hello, booted to its exit (0x2B, status 87)."""
    from kvmpy import guests
    g = guests.get("multiboot-hello")
    image = _common.guest_image(g.name)
    return Subject(
        name="multiboot", title=f"guests/multiboot-hello.c (multiboot v1, ELF32), {args.mem // MiB} MiB",
        image=image, load={"format": "multiboot"}, cli=("--format", "multiboot"),
        qemu={"qemu": ("-M", "pc", "-kernel", str(image)),
              "qemu-microvm": ("-M", "microvm", "-kernel", str(image))},
        banner=b"multiboot-hello: magic", end="exit", expect_status=g.expect_status & 0xFF,
        expect_output=g.expect_output, normalize=_normalize_multiboot,
        differences="mem_upper, the memory map (mmap lines) and the boot loader's name; "
                    "anything before the banner")


LINUX_CMDLINE = "console=ttyS0 earlyprintk=serial"   # earlyprintk: without it nothing shows before the host dies
LINUX_BANNER = b"Linux version "


def _linux_files():
    """Debian's kernel from kvmpy.images.linuxkernel: fetched (apt) or, failing that, whatever is cached."""
    from kvmpy import linuxkernel
    from kvmpy.errors import KvmpyError
    try:
        return linuxkernel.fetch()
    except (KvmpyError, OSError) as e:
        found = linuxkernel.cached()
        if found is not None and found.vmlinux.is_file():
            return found
        raise BenchError(f"subject linux skipped: no kernel in the cache {linuxkernel.cache_dir()} and "
                         f"fetching one failed ({e}); run 'python -m kvmpy.images.linuxkernel' once online") from None


def linux(args) -> Subject:
    """Debian's cloud kernel, the uncompressed vmlinux through its PVH entry, to "Linux version "."""
    files = _linux_files()
    image = str(files.vmlinux)
    kernel = ("-kernel", image, "-append", LINUX_CMDLINE)
    return Subject(
        name="linux", title=f"Debian {files.kernel_package} vmlinux (PVH entry), {args.mem // MiB} MiB, "
                            f"cmdline {LINUX_CMDLINE!r}",
        image=files.vmlinux, load={"format": "pvh", "cmdline": LINUX_CMDLINE},
        cli=("--format", "pvh", "--cmdline", LINUX_CMDLINE),
        qemu={"qemu": ("-M", "pc", *kernel), "qemu-microvm": ("-M", "microvm", *kernel)},
        banner=LINUX_BANNER, end="banner",
        differences="only the banner's presence is checked (the run is stopped there)")


class SubjectSpec(NamedTuple):
    make: Callable[..., Subject]            # the parsed arguments (--mem resolved) -> Subject
    mem: int                                # default --mem
    rounds: int                             # default --rounds


#: --subject NAME -> how to make its Subject, and its defaults.
SUBJECTS: dict[str, SubjectSpec] = {
    "multiboot": SubjectSpec(multiboot, mem=64 * MiB, rounds=10),
    "linux": SubjectSpec(linux, mem=512 * MiB, rounds=3),   # ~15 s a run without VMX/SVM, < 1 s with
}


# --- command line ----------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--subject", choices=sorted(SUBJECTS), default="multiboot",
                   help="what to boot: multiboot (default), the bundled multiboot-hello kernel to its "
                        "exit; linux, Debian's kernel (PVH vmlinux) to its 'Linux version' banner")
    p.add_argument("--rounds", type=_common.positive, default=None, metavar="R",
                   help="interleaved rounds, each runs every variant once (default: multiboot 10, linux 3)")
    p.add_argument("--warmup", type=_common.nonnegative, default=1, metavar="N",
                   help="untimed runs per variant first; the first also decides whether a QEMU "
                        "variant can run here (default 1; with 0 the first timed run decides)")
    p.add_argument("--mem", type=_common.positive, default=None, metavar="SIZE",
                   help="guest RAM for every variant (default: multiboot 64M, linux 512M)")
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
class _Sink:
    """kvmpy-lib's serial stream: keeps the output, notes when the banner first arrives."""

    def __init__(self, banner: bytes, on_banner: Callable[[], None] | None):
        self.buf = bytearray()
        self.banner, self.on_banner = banner, on_banner
        self.banner_ns: int | None = None

    def write(self, data) -> int:
        self.buf += data
        if self.banner_ns is None and self.banner in self.buf:
            self.banner_ns = time.perf_counter_ns()
            if self.on_banner is not None:
                self.on_banner()
        return len(data)

    def flush(self) -> None:
        pass


def run_lib(subject: Subject, mem: int, timeout: float) -> dict:
    """kvmpy-lib: Machine() + load() + run() in this process; ms for each and in all.

    ``run_ms`` is run()'s share of the timed part: to its return, or to the banner."""
    from kvmpy.errors import GuestError
    from kvmpy.vmm.machine import Machine
    machine = None

    def stop():
        if machine is not None:
            machine.request_stop("banner")
    sink = _Sink(subject.banner, stop if subject.end == "banner" else None)
    t0 = time.perf_counter_ns()
    machine = Machine(mem_size=mem, serial=sink)
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
    finally:
        machine.close()
    t4 = time.perf_counter_ns()
    if subject.end == "exit":
        status = result.status & 0xFF if result is not None and result.reason == "exit" else None
        ok = status == subject.expect_status
    else:
        status, ok = None, sink.banner_ns is not None
        why = "" if ok else f"{why} before printing {subject.banner!r}"
    end = t3 if subject.end == "exit" else sink.banner_ns
    ms = lambda a, b: (b - a) / 1e6 if a is not None and b is not None else None  # noqa: E731
    return {"ok": ok, "why": why, "status": status, "output": bytes(sink.buf), "ms": ms(t0, end),
            "banner_ms": ms(t0, sink.banner_ns), "machine_ms": ms(t0, t1), "load_ms": ms(t1, t2),
            "run_ms": ms(t2, end), "close_ms": ms(t3, t4)}


def run_process(argv: list[str], env: dict | None, timeout: float, banner: bytes | None = None,
                end: str = "exit") -> dict:
    """A fresh process, stdout read as it comes: ms from spawn to exit (or to the banner)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter_ns()
        try:
            # cwd "/": `python -m` puts the working directory first on sys.path, and a
            # checkout's unbuilt kvmpy/ there must not shadow the kvmpy under test
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    env=env, cwd="/")
        except OSError as e:
            raise BenchError(f"cannot start {argv[0]}: {e.strerror or e}") from None
        out, banner_ns, killed = bytearray(), None, None
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
                out += chunk
                if banner is not None and banner_ns is None and banner in out:
                    banner_ns = time.perf_counter_ns()
                    if end == "banner":
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
    if killed:
        why = killed
    elif end == "banner":
        why = "" if banner_ns is not None else f"exited {rc} without printing the banner"
    else:
        why = f"exited {rc}"
    why += (": " + stderr[-2000:]) if stderr else ""
    ms = (banner_ns if end == "banner" else t1) if not killed else None
    return {"ok": not killed and (end != "banner" or banner_ns is not None), "why": why, "status": rc,
            "output": bytes(out), "ms": (ms - t0) / 1e6 if ms is not None else None,
            "banner_ms": (banner_ns - t0) / 1e6 if banner_ns is not None else None}


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
        if variant == "kvmpy-lib":
            r = run_lib(s, self.args.mem, timeout)
        elif variant in EXTRAS:
            r = run_process(self.argv[variant], self.env, timeout)
            r["ok"] = r["status"] == 0
            return r
        else:
            env = self.env if variant == "kvmpy-cli" else None
            r = run_process(self.argv[variant], env, timeout, s.banner, s.end)
            if s.end == "exit" and r["ok"]:
                r["ok"] = r["status"] == s.expect_status
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
    unwanted = {"qemu-microvm": args.no_microvm and "--no-microvm", "qemu": args.no_pc and "--no-pc"}
    skipped: dict[str, str] = {}
    if no_qemu:
        skipped.update(dict.fromkeys(QEMU_VARIANTS, no_qemu))
    else:
        skipped.update({v: why for v, why in unwanted.items() if why})
    variants = list(KVMPY_VARIANTS) + [v for v in QEMU_VARIANTS if v in runner.argv and v not in skipped]
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
    variants = [v for v in variants if v not in skipped]
    return _result(args, subject, runner, variants, extras, samples, skipped, outputs, qemu)


def _med(samples: list[dict], key: str) -> float | None:
    xs = [s[key] for s in samples if s.get(key) is not None]
    return _common.summarize(xs)["median"] if xs else None


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
    what = "its exit" if p["end"] == "exit" else "its banner"
    lines = [f"boot to {what}, subject {p['subject']}: {p['title']}; {p['rounds']} rounds, order rotating",
             _common.host_line(result["host"])]
    if result["host"].get("qemu"):
        lines.append(f"reference: {result['host']['qemu']}")
    lines.append(_common.format_table(["variant", "ms median", "min", *(f"x {q}" for q in refs)], rows))
    lib = result["split"]["kvmpy-lib"]
    run = "run()" if p["end"] == "exit" else "run() to the banner"
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
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str | None = None, results: pathlib.Path | None = None) -> int:
    """``kvmpy bench NAME [argv]``; ``results`` is where the JSON goes without --out."""
    return _common.run_main(sys.modules[__name__], argv, prog, results)
