"""exits: the PIO exit round trip, kvmpy's run loops against a minimal C loop, same guest, same run.

Every variant runs the bundled guest ``pio-loop`` (guests/pio-loop.S: an endless
``out %al,$0x80; inc %al`` in real mode), where each loop iteration is exactly
one VM exit to user space, and reports wall-clock nanoseconds per exit:

  raw            kvmpy/bench/pio_ref.c, compiled now with gcc: KVM_RUN, check
                 exit_reason, KVM_RUN again. The floor: kernel + guest. One
                 process for all rounds (`pio_ref IMAGE serve`).
  native         Machine(native=True): port 0x80 is claimed by no device, so the
                 C loop (csrc/runloop.c) serves every exit without returning to
                 Python. Stopped by run(timeout=T).
  python         Machine(native=False): the all-Python run loop (decode, match,
                 bus lookup of an unclaimed port) for every exit. Stopped by time.
Informative extras (--no-extras drops them):
  cffi-ioctl     a Python loop calling the cffi ioctl wrapper, no decoding
  vcpu.run       a Python loop over Vcpu.run(): the ioctl + decoding an IoOut
  python-device  Machine(native=True) with a Python device on port 0x80 that
                 stops the run after N writes: C hands every exit to Python

Like for like: every variant's VM has the same platform. By default that is
kvmpy's (Machine(irqchip=True): in-kernel irqchip and PIT, TSS and identity-map
pages), and pio_ref builds the same ("pc"); --no-irqchip gives all of them none.

Time-stopped variants run one run(timeout=T) per round and divide the run loop's
own time (m.stats.kvm_ns + vmm_ns: from its first KVM_RUN to its last exit, the
span pio_ref times) by the PIO exits it counted. T is calibrated by an untimed
warm-up run on the same Machine, then by the previous round, so that a round is
about --exits exits. The rest of the run() call, its fixed cost (the watchdog's
hand-offs, the settle, the registers read for the RunResult), is reported separately
("split" in the JSON, with the wall time per exit, from the median round so
that its parts add up). A round whose loop time is more than its wall time, or
whose parts do not add up, stops the benchmark (BenchError): no ratio is printed
from numbers that cannot be right. Rounds interleave the variants in a rotating
order; the table shows medians and ratios to raw's median, by the loops' clocks
and by wall time per exit. Targets on the development machines: native/raw <=
1.05, python/raw <= 1.3.

--all, the exit-cost lab: one table of ns per exit for every exit kind, each from
its own loop in exit_kinds.S (32-bit protected mode, assembled at run time): PIO
out and in, MMIO write and read (no RAM at 0xe0000000), HLT with the irqchip off
(one run() per HLT for native and python), for raw (exit_ref.c), native and
python; and cpuid, an ioeventfd-served OUT and a plain nop, which never leave
KVM and so get one number (variant "kernel") from batches of 1000 timed by
exit_ref.c. See benchmarks/README.md.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile
import time

from . import _common
from ._common import BenchError

NAME = "exits"
DESCRIPTION = "PIO exit round trip: C reference vs kvmpy's native (C) and Python run loops"
GUEST = "pio-loop"
PORT = 0x80                     # the guest's `out %al, $0x80`
RAM = 2 << 20                   # the same 2 MiB the C reference maps
VARIANTS = ("raw", "native", "python")
EXTRAS = ("cffi-ioctl", "vcpu.run", "python-device")
TARGETS = {"native/raw": 1.05, "python/raw": 1.3}
CALIBRATE_S = 0.05              # the warm-up run that calibrates T, and the shortest T
#: how far a round's loop clock (kvm_ns + vmm_ns) may run ahead of its wall clock: clock reads
CLOCK_SLACK_NS = 200_000


def add_arguments(p) -> None:
    p.add_argument("--exits", type=_common.positive, default=20_000, metavar="N",
                   help="exits per variant per round (default 20000)")
    p.add_argument("--rounds", type=_common.positive, default=5, metavar="R",
                   help="interleaved rounds (default 5)")
    p.add_argument("--warmup", type=_common.nonnegative, default=2_000, metavar="N",
                   help="untimed exits per variant before timing (default 2000)")
    p.add_argument("--no-irqchip", action="store_true",
                   help="every variant without the in-kernel irqchip and PIT (Machine(irqchip=False), "
                        "pio_ref bare); default: kvmpy's default platform for all, pio_ref included. "
                        "Not with --all: there each kind has kvmpy's default platform, hlt none")
    p.add_argument("--no-extras", action="store_true",
                   help="only raw, native and python (skip cffi-ioctl, vcpu.run, python-device)")
    p.add_argument("--all", action="store_true",
                   help="the exit-cost lab: every exit kind (PIO in/out, MMIO read/write, HLT, and the "
                        "in-kernel cpuid and ioeventfd) for raw, native and python; --exits is per kind")
    p.add_argument("--hlt-exits", type=_common.positive, default=200, metavar="N",
                   help="with --all: HLT exits per round for native and python, where every HLT ends "
                        "a run() call (default 200)")


class Raw:
    """pio_ref built into a temporary directory, one process serving every round (`pio_ref IMAGE serve`).

    Like kvmpy's variants, its VM is created and warmed up once; each round is one
    timed batch, answered over a pipe (the pipe is outside the timed part).
    """

    def __init__(self, image: pathlib.Path, tmpdir: pathlib.Path, warmup: int, irqchip: bool = True):
        exe = _common.compile_c("pio_ref.c", tmpdir)
        self.argv = [str(exe), str(image), "serve", str(warmup), "pc" if irqchip else "bare"]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self._expect("ready")

    def _expect(self, what: str) -> str:
        line = self.proc.stdout.readline().strip()
        if not line or (what == "ready" and line != "ready"):
            self.proc.stdin.close()
            err = self.proc.stderr.read().strip()
            rc = self.proc.wait()
            raise BenchError(f"{' '.join(self.argv)} exited {rc}: {err or 'no ' + what}")
        return line

    def measure(self, n: int) -> dict:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return {"ns": float(self._expect("batch result")), "exits": n}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def _machine(native: bool, irqchip: bool = True):
    import kvmpy
    from kvmpy import guests
    g = guests.get(GUEST)
    m = kvmpy.Machine(mem_size=RAM, native=native, irqchip=irqchip)
    try:
        m.load(guests.path(GUEST), format=g.format, mode=g.mode, load_addr=g.load_addr, entry=g.entry)
    except BaseException:
        m.close()
        raise
    return m


class TimedMachine:
    """``native`` and ``python``: no device on port 0x80, so the run is stopped by its timeout."""

    def __init__(self, native: bool, machine=None, counter: str = "io-out", label: str = GUEST,
                 irqchip: bool = True):
        self.m = _machine(native, irqchip) if machine is None else machine
        self.counter, self.label = counter, label
        self.ns_estimate = 10_000.0

    def close(self) -> None:
        self.m.close()

    def _run(self, seconds: float) -> dict:
        s = self.m.stats
        c = self.counter
        e0, k0, v0 = s.exits[c], s.kvm_ns, s.vmm_ns
        t0 = time.perf_counter_ns()
        result = self.m.run(timeout=seconds)
        t1 = time.perf_counter_ns()
        n = s.exits[c] - e0
        if result.reason != "timeout" or n < 1 or s.total_exits - s.exits[c] - s.exits["interrupted"]:
            raise BenchError(f"{self.label} stopped with {result.reason!r} after {n} {c} exits; "
                             f"exits by reason: {dict(s.exits)}")
        # The run loop's own clock: from its first KVM_RUN to its last exit (the span pio_ref
        # times too). The rest of the run() call is its fixed cost: threads, timer, harvest.
        return _split(self.label, n, s.kvm_ns - k0, s.vmm_ns - v0, t1 - t0, 1)

    def warm(self, n: int) -> None:
        """Run untimed (caches, shadow page tables) and calibrate ns/exit for choosing T."""
        self.ns_estimate = self._run(max(CALIBRATE_S, n * self.ns_estimate / 1e9))["ns"]

    def measure(self, n: int) -> dict:
        # At least CALIBRATE_S: run() takes a few ms to start its threads, and a timer
        # that fires before the first exit would measure nothing (tiny --exits only).
        r = self._run(max(CALIBRATE_S, n * self.ns_estimate / 1e9))
        self.ns_estimate = r["ns"]                  # the next round's T follows the host's pace
        return r


def _split(label: str, n: int, kvm: int, vmm: int, wall: int, runs: int) -> dict:
    """One round of a Machine variant: ns per exit by the loop's clock and by the wall
    clock, and the parts, which must add up: the loop's time (KVM_RUN + VMM) is part of
    the run() calls' wall time, the rest is their fixed cost. BenchError if not."""
    loop = kvm + vmm
    if kvm <= 0 or vmm < 0 or loop > wall + runs * CLOCK_SLACK_NS:
        raise BenchError(f"{label}: the run loop's clock does not add up: {kvm} ns in KVM_RUN + {vmm} ns "
                         f"in the VMM = {loop} ns, in run() calls that took {wall} ns of wall time "
                         f"({n} exits); no ratio from these numbers")
    return {"ns": loop / n, "exits": n, "kvm_ns": kvm / n, "vmm_ns": vmm / n, "wall_ns": wall / n,
            "run_overhead_us": max(0, wall - loop) / runs / 1000}


def _median_round(samples: list[dict]) -> dict:
    """The round whose ns is the median (the lower one of an even count): its parts add up,
    where medians taken part by part need not."""
    return sorted(samples, key=lambda s: s["ns"])[(len(samples) - 1) // 2]


class _StopAfter:
    """A port-0x80 device that counts guest writes and stops the machine after ``limit``."""

    def __init__(self, machine):
        self.machine, self.count, self.limit = machine, 0, 0

    def read(self, offset: int, size: int) -> int:
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        self.count += 1
        if self.count == self.limit:
            self.machine.request_stop("exits-done")


class PythonDevice:
    """``python-device``: a native Machine whose port 0x80 belongs to a Python device."""

    def __init__(self, irqchip: bool = True):
        self.m = _machine(native=True, irqchip=irqchip)
        self.dev = _StopAfter(self.m)
        self.m.pio.attach(PORT, 1, self.dev, "stop-after")

    def close(self) -> None:
        self.m.close()

    def warm(self, n: int) -> None:
        if n:
            self.measure(n)

    def measure(self, n: int) -> dict:
        self.dev.count, self.dev.limit = 0, n
        before = self.m.stats.exits["io-out"]
        t0 = time.perf_counter_ns()
        result = self.m.run()
        t1 = time.perf_counter_ns()
        done = self.m.stats.exits["io-out"] - before
        if result.reason != "exits-done" or self.dev.count != n or done != n:
            raise BenchError(f"python-device: stopped with {result.reason!r} after {done} PIO exits, "
                             f"{self.dev.count} device writes (wanted {n})")
        return {"ns": (t1 - t0) / n, "exits": n}


class BareVcpu:
    """``cffi-ioctl`` and ``vcpu.run``: Kvm/Vm/Vcpu set up like pio_ref.c (the same platform:
    irqchip, PIT, TSS and identity map unless --no-irqchip), no Machine."""

    def __init__(self, image: pathlib.Path, irqchip: bool = True):
        import kvmpy
        from kvmpy.kvm.abi import lib
        from kvmpy.x86 import layout
        from kvmpy.x86.modes import real_mode
        from kvmpy.kvm.regs import RFLAGS_RESERVED1, Regs

        self.exits = kvmpy.kvm.exits
        self.kvm = kvmpy.Kvm()
        try:
            self.vm = self.kvm.create_vm()
            self.vm.add_memory(0, RAM)
            if irqchip:                         # the platform raw ("pc") and the Machines have
                self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
                self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
                self.vm.create_irqchip()
                self.vm.create_pit2()
            self.vm.memory.write(layout.REAL_MODE_LOAD, image.read_bytes())
            self.vcpu = self.vm.create_vcpu(0)
            self.vcpu.set_sregs(real_mode(self.vcpu.get_sregs()))
            self.vcpu.set_regs(Regs(rip=layout.REAL_MODE_LOAD, rsp=layout.REAL_MODE_LOAD,
                                    rflags=RFLAGS_RESERVED1))
        except BaseException:
            self.kvm.close()
            raise
        self._ioctl, self._kvm_run = lib.kvmpy_ioctl_int, lib.KVM_RUN

    def close(self) -> None:
        self.vm.close()
        self.kvm.close()

    def vcpu_run(self, n: int) -> dict:
        run = self.vcpu.run
        t0 = time.perf_counter_ns()
        for _ in range(n):
            ex = run()
        t1 = time.perf_counter_ns()
        self._check_last(ex, "vcpu.run")
        return {"ns": (t1 - t0) / n, "exits": n}

    def cffi_ioctl(self, n: int) -> dict:
        ioctl, fd, req = self._ioctl, self.vcpu.fd, self._kvm_run
        bad = 0
        t0 = time.perf_counter_ns()
        for _ in range(n):
            if ioctl(fd, req, 0) < 0:
                bad += 1
        t1 = time.perf_counter_ns()
        if bad:
            raise BenchError(f"cffi-ioctl: {bad} of {n} KVM_RUN calls failed")
        self._check_last(self.exits.decode(self.vcpu.run_page, self.vcpu.run_size), "cffi-ioctl")
        return {"ns": (t1 - t0) / n, "exits": n}

    def _check_last(self, ex, variant: str) -> None:
        if not (isinstance(ex, self.exits.IoOut) and ex.port == PORT):
            raise BenchError(f"{variant}: the guest's last exit was {ex}, not an OUT to port {PORT:#x}")


def measure(args, progress) -> dict:
    if args.all:
        return measure_all(args, progress)
    image = _common.guest_image(GUEST)
    variants = VARIANTS + (() if args.no_extras else EXTRAS)
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    owned = []                                  # closed in reverse order, whatever happens

    def own(obj):
        owned.append(obj)
        return obj

    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-") as tmp:
        try:
            progress("building pio_ref.c ...")
            irqchip = not args.no_irqchip
            raw = own(Raw(image, pathlib.Path(tmp), args.warmup, irqchip))
            native = own(TimedMachine(native=True, irqchip=irqchip))
            python = own(TimedMachine(native=False, irqchip=irqchip))
            run = {"raw": raw.measure, "native": native.measure, "python": python.measure}
            warm = {"native": native.warm, "python": python.warm}      # raw warmed up before "ready"
            if not args.no_extras:
                bare, dev = own(BareVcpu(image, irqchip)), own(PythonDevice(irqchip))
                run.update({"cffi-ioctl": bare.cffi_ioctl, "vcpu.run": bare.vcpu_run,
                            "python-device": dev.measure})
                warm.update({"cffi-ioctl": bare.cffi_ioctl, "vcpu.run": bare.vcpu_run,
                             "python-device": dev.warm})
            progress(f"warming up ({args.warmup} exits per variant)")
            for w in warm.values():
                w(args.warmup)
            for r in range(args.rounds):
                for v in _common.rotate(variants, r):
                    progress(f"round {r + 1}/{args.rounds}: {v:<13} ~{args.exits} exits")
                    samples[v].append(run[v](args.exits))
        finally:
            for o in reversed(owned):
                o.close()
    return _result(args, image, variants, samples)


def _result(args, image, variants, samples) -> dict:
    ns = {v: [s["ns"] for s in samples[v]] for v in variants}
    summary = {v: _common.summarize(ns[v]) for v in variants}
    raw = summary["raw"]["median"]
    split, wall = {}, {}
    for v in ("native", "python"):
        m = _median_round(samples[v])
        split[v] = {"kvm_ns_per_exit": round(m["kvm_ns"], 1), "vmm_ns_per_exit": round(m["vmm_ns"], 1),
                    "wall_ns_per_exit": round(m["wall_ns"], 1), "run_overhead_us": round(m["run_overhead_us"], 1)}
        wall[f"{v}/raw"] = round(_common.summarize([s["wall_ns"] for s in samples[v]])["median"] / raw, 3)
    return {
        "benchmark": NAME,
        "host": _common.host_info(),
        "params": {"exits": args.exits, "rounds": args.rounds, "warmup": args.warmup, "guest": GUEST,
                   "image": str(image), "order": "rotating per round",
                   "platform": "bare (no irqchip, no PIT)" if args.no_irqchip else
                   "pc (in-kernel irqchip and PIT, TSS and identity map): every variant, raw too"},
        "results": [{"variant": v, "metric": "ns_per_exit", "value": round(summary[v]["median"], 1), "unit": "ns"}
                    for v in variants],
        "ratios": {f"{v}/raw": round(summary[v]["median"] / raw, 3) for v in variants[1:]},
        "targets": TARGETS,
        "overhead_ns": {f"{v}-raw": round(summary[v]["median"] - raw, 1) for v in variants[1:]},
        "summary": {v: {k: round(x, 1) for k, x in summary[v].items()} for v in variants},
        "samples": {v: [round(x, 1) for x in ns[v]] for v in variants},
        "exits_per_round": {v: [s["exits"] for s in samples[v]] for v in variants},
        "split": split,
        "wall_ratios": wall,
    }


def table(result: dict) -> str:
    if result["params"].get("all"):
        return table_all(result)
    raw = result["summary"]["raw"]["median"]
    rows = []
    for r in result["results"]:
        v, s = r["variant"], result["summary"][r["variant"]]
        n = result["exits_per_round"][v]
        rows.append([v, f"{s['median']:.0f}", f"{s['min']:.0f}", f"{s['median'] / raw:.3f}",
                     f"{s['median'] - raw:+.0f}", f"{min(n)}-{max(n)}" if min(n) != max(n) else str(n[0])])
    p = result["params"]
    lines = [f"PIO exit round trip, guest {p['guest']}: {p['rounds']} rounds x ~{p['exits']} exits per variant",
             _common.host_line(result["host"]),
             f"platform: {p.get('platform', '?')}",
             _common.format_table(["variant", "ns/exit median", "min", "x raw", "ns over raw", "exits/round"], rows)]
    for v, sp in result["split"].items():
        lines.append(f"{v} (median round): {sp['kvm_ns_per_exit']:.0f} ns in KVM_RUN + {sp['vmm_ns_per_exit']:.0f} "
                     f"ns in the VMM per exit; {sp['wall_ns_per_exit']:.0f} ns wall per exit, run() fixed cost "
                     f"{sp['run_overhead_us']:.0f} us per round; by wall time "
                     f"{v}/raw = {result['wall_ratios'][f'{v}/raw']:.3f}")
    for k, limit in result["targets"].items():
        got = result["ratios"][k]
        lines.append(f"{k} = {got:.3f} (target <= {limit}: {'met' if got <= limit else 'NOT met'})")
    return "\n".join(lines)


# --- --all: the exit-cost lab ------------------------------------------------------------
KIND_IMAGE = "exit_kinds.S"     # one endless loop per kind, a 4 KiB page each
KIND_BASE = 0x100000            # linked and loaded here, entered in flat 32-bit protected mode
REPS = 1000                     # in-kernel exits (or nops) per batch in exit_kinds.S
#: kind -> (page in exit_kinds.S, Machine.stats.exits counter; None: served inside KVM)
KINDS = {
    "pio-out": (0, "io-out"), "pio-in": (1, "io-in"), "mmio-write": (2, "mmio-write"),
    "mmio-read": (3, "mmio-read"), "hlt": (4, "hlt"), "cpuid": (5, None), "ioeventfd": (6, None),
    "nop": (7, None),
}
KIND_TEXT = {
    "pio-out": "out %al,$0x80 (unclaimed port)", "pio-in": "in $0x80,%al (unclaimed port)",
    "mmio-write": "movb %al,0xe0000000 (no RAM)", "mmio-read": "movb 0xe0000000,%al (no RAM)",
    "hlt": "hlt, irqchip off", "cpuid": "cpuid (served in KVM)",
    "ioeventfd": "out to an ioeventfd port (in KVM)", "nop": "nop: no exit (reference)",
}
USER_VARIANTS = ("raw", "native", "python")


class RawKind(Raw):
    """exit_ref.c serving one kind (`exit_ref IMAGE ENTRY KIND WARMUP`); for in-kernel kinds
    each request is in batches of REPS guest exits, and the answer is per batch."""

    def __init__(self, exe: pathlib.Path, image: pathlib.Path, kind: str, warmup: int):
        self.argv = [str(exe), str(image), str(KIND_BASE + KINDS[kind][0] * 0x1000), kind, str(warmup),
                     "pc" if _kind_irqchip(kind) else "bare"]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self._expect("ready")


def _kind_irqchip(kind: str) -> bool:
    """kvmpy's default platform (and exit_ref's "pc"), except for hlt: with the irqchip HLT stays in KVM."""
    return kind != "hlt"


def _kind_machine(native: bool, image: pathlib.Path, kind: str):
    import kvmpy
    m = kvmpy.Machine(mem_size=RAM, native=native, irqchip=_kind_irqchip(kind))
    try:
        m.load(image, format="raw", mode="protected", load_addr=KIND_BASE,
               entry=KIND_BASE + KINDS[kind][0] * 0x1000)
    except BaseException:
        m.close()
        raise
    return m


class HaltMachine:
    """``hlt`` for native and python: every HLT stops the machine, so one run() per exit.

    ``ns`` is the run loop's own clock per run (KVM_RUN plus the VMM work before it,
    as for the other kinds); ``wall_ns`` is the whole run() call, its fixed cost included.
    """

    def __init__(self, native: bool, image: pathlib.Path):
        self.m = _kind_machine(native, image, "hlt")

    def close(self) -> None:
        self.m.close()

    def warm(self, n: int) -> None:
        self.measure(max(1, min(n, 20)))

    def measure(self, n: int) -> dict:
        s = self.m.stats
        e0, k0, v0 = s.exits["hlt"], s.kvm_ns, s.vmm_ns
        t0 = time.perf_counter_ns()
        for _ in range(n):
            result = self.m.run()
            if result.reason != "halt":
                raise BenchError(f"hlt guest stopped with {result.reason!r}; exits by reason: {dict(s.exits)}")
        t1 = time.perf_counter_ns()
        done = s.exits["hlt"] - e0
        if done != n:
            raise BenchError(f"hlt guest: {done} HLT exits in {n} runs; exits by reason: {dict(s.exits)}")
        return _split("hlt", n, s.kvm_ns - k0, s.vmm_ns - v0, t1 - t0, n)


def measure_all(args, progress) -> dict:
    samples: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-") as tmp:
        tmpdir = pathlib.Path(tmp)
        progress(f"building exit_ref.c and {KIND_IMAGE} ...")
        exe = _common.compile_c("exit_ref.c", tmpdir)
        image = tmpdir / "exit_kinds.bin"
        image.write_bytes(_common.assemble_raw(KIND_IMAGE, tmpdir, KIND_BASE))
        for kind, (_, counter) in KINDS.items():
            variants = USER_VARIANTS if counter else ("kernel",)
            samples[kind] = {v: [] for v in variants}
            owned = []
            try:
                if counter is None:         # served inside KVM: the VMM is not involved, one number
                    batches = max(1, args.exits // REPS)
                    raw = RawKind(exe, image, kind, max(1, args.warmup // REPS))
                    owned.append(raw)
                    run = {"kernel": lambda n, raw=raw, b=batches: dict(raw.measure(b), exits=b * REPS)}
                else:
                    raw = RawKind(exe, image, kind, args.warmup)
                    owned.append(raw)
                    if kind == "hlt":
                        native, python = HaltMachine(True, image), HaltMachine(False, image)
                    else:
                        native, python = (TimedMachine(nat, _kind_machine(nat, image, kind), counter, kind)
                                          for nat in (True, False))
                    owned += [native, python]
                    progress(f"{kind}: warming up")
                    native.warm(args.warmup)
                    python.warm(args.warmup)
                    n_machine = args.hlt_exits if kind == "hlt" else args.exits
                    run = {"raw": raw.measure, "native": lambda n, f=native.measure: f(n_machine),
                           "python": lambda n, f=python.measure: f(n_machine)}
                for r in range(args.rounds):
                    for v in _common.rotate(variants, r):
                        progress(f"{kind}: round {r + 1}/{args.rounds}: {v}")
                        samples[kind][v].append(run[v](args.exits))
            finally:
                for o in reversed(owned):
                    o.close()
    return _result_all(args, samples)


def _result_all(args, samples) -> dict:
    summary, split, results, ratios = {}, {}, [], {}
    pio_raw = _common.summarize([s["ns"] for s in samples["pio-out"]["raw"]])["median"]
    for kind, per in samples.items():
        summary[kind] = {}
        for v, ss in per.items():
            ns = [s["ns"] for s in ss]
            if v == "kernel":       # a batch is REPS in-kernel exits and the OUT that ends it
                ns = [max(0.0, (x - pio_raw) / REPS) for x in ns]
            summary[kind][v] = {k: round(x, 1) for k, x in _common.summarize(ns).items()}
            summary[kind][v]["samples"] = [round(x, 1) for x in ns]
            results.append({"variant": v, "metric": kind, "value": summary[kind][v]["median"], "unit": "ns"})
            if "kvm_ns" in ss[0]:
                m = _median_round(ss)
                split.setdefault(kind, {})[v] = {
                    "kvm_ns_per_exit": round(m["kvm_ns"], 1), "vmm_ns_per_exit": round(m["vmm_ns"], 1),
                    "wall_ns_per_exit": round(m["wall_ns"], 1), "run_overhead_us": round(m["run_overhead_us"], 1)}
        if "raw" in per:
            for v in ("native", "python"):
                ratios[f"{kind} {v}/raw"] = round(summary[kind][v]["median"] / summary[kind]["raw"]["median"], 3)
    return {
        "benchmark": NAME,
        "host": _common.host_info(),
        "params": {"all": True, "exits": args.exits, "hlt_exits": args.hlt_exits, "rounds": args.rounds,
                   "warmup": args.warmup, "image": KIND_IMAGE, "mode": "protected32", "reps": REPS,
                   "kinds": KIND_TEXT, "order": "kinds in turn, variants rotating per round"},
        "results": results,
        "ratios": ratios,
        "summary": summary,
        "split": split,
        "notes": {
            "raw": "kvmpy/bench/exit_ref.c: KVM_RUN, check the exit, KVM_RUN again",
            "kernel": f"cpuid, ioeventfd and nop never leave KVM, so raw, native and python are the same: "
                      f"exit_ref.c times batches of {REPS} and one OUT to port 0x80; the OUT's cost "
                      f"(raw pio-out median) is subtracted and the rest divided by {REPS}",
            "hlt": "every HLT ends a Machine.run(): native and python show the run loop's own clock per "
                   "exit; split.hlt.*.wall_ns_per_exit is the whole run() call",
        },
    }


def table_all(result: dict) -> str:
    p, su = result["params"], result["summary"]
    rows = []
    for kind in KINDS:
        s = su[kind]
        if "raw" in s:
            raw = s["raw"]["median"]
            star = "*" if kind == "hlt" else ""
            rows.append([kind, f"{raw:.0f}", f"{s['native']['median']:.0f}{star}",
                         f"{s['python']['median']:.0f}{star}", f"{s['native']['median'] / raw:.3f}{star}",
                         f"{s['python']['median'] / raw:.3f}{star}", KIND_TEXT[kind]])
        else:
            k = f"{s['kernel']['median']:.0f}"
            rows.append([kind, k, "=", "=", "-", "-", KIND_TEXT[kind]])
    lines = [f"Exit cost by kind, ns per exit (medians of {p['rounds']} rounds, ~{p['exits']} exits per kind "
             f"and variant; {p['hlt_exits']} for native/python hlt); guest: {p['image']}, 32-bit, CPL0",
             _common.host_line(result["host"]),
             _common.format_table(["kind", "raw", "native", "python", "native/raw", "python/raw", "guest loop"],
                                  rows),
             f"cpuid, ioeventfd, nop: served inside KVM (nop: no exit), one number for every VMM "
             f"(\"=\"): per batch of {p['reps']}, minus one raw pio-out, / {p['reps']}."]
    hlt = result["split"].get("hlt", {})
    if hlt:
        lines.append("* hlt: every HLT ends run(), so each exit is a run() of its own; shown is the run loop's "
                     "clock (one KVM_RUN and the work before it),\n  the whole run() call per HLT: "
                     + ", ".join(f"{v} {sp['wall_ns_per_exit'] / 1000:.0f} us" for v, sp in hlt.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str | None = None, results: pathlib.Path | None = None) -> int:
    """``kvmpy bench NAME [argv]``; ``results`` is where the JSON goes without --out."""
    return _common.run_main(sys.modules[__name__], argv, prog, results)
