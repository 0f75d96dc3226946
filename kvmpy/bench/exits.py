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

Time-stopped variants run one run(timeout=T) per round and divide the run loop's
own time (m.stats.kvm_ns + vmm_ns: from its first KVM_RUN to its last exit, the
span pio_ref times) by the PIO exits it counted. T is calibrated by an untimed
warm-up run on the same Machine, then by the previous round, so that a round is
about --exits exits. The rest of the run() call, its fixed cost (starting the
timer and flusher threads: a few ms on a busy host), is reported separately
("split" in the JSON, with the wall time per exit). Rounds interleave the
variants in a rotating order; the table shows medians and ratios to raw's median.
Targets on the development machines: native/raw <= 1.05, python/raw <= 1.3.
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


def add_arguments(p) -> None:
    p.add_argument("--exits", type=_common.positive, default=20_000, metavar="N",
                   help="exits per variant per round (default 20000)")
    p.add_argument("--rounds", type=_common.positive, default=5, metavar="R",
                   help="interleaved rounds (default 5)")
    p.add_argument("--warmup", type=_common.nonnegative, default=2_000, metavar="N",
                   help="untimed exits per variant before timing (default 2000)")
    p.add_argument("--no-extras", action="store_true",
                   help="only raw, native and python (skip cffi-ioctl, vcpu.run, python-device)")


class Raw:
    """pio_ref built into a temporary directory, one process serving every round (`pio_ref IMAGE serve`).

    Like kvmpy's variants, its VM is created and warmed up once; each round is one
    timed batch, answered over a pipe (the pipe is outside the timed part).
    """

    def __init__(self, image: pathlib.Path, tmpdir: pathlib.Path, warmup: int):
        exe = _common.compile_c("pio_ref.c", tmpdir)
        self.argv = [str(exe), str(image), "serve", str(warmup)]
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


def _machine(native: bool):
    import kvmpy
    from kvmpy import guests
    g = guests.get(GUEST)
    m = kvmpy.Machine(mem_size=RAM, native=native)
    try:
        m.load(guests.path(GUEST), format=g.format, mode=g.mode, load_addr=g.load_addr, entry=g.entry)
    except BaseException:
        m.close()
        raise
    return m


class TimedMachine:
    """``native`` and ``python``: no device on port 0x80, so the run is stopped by its timeout."""

    def __init__(self, native: bool):
        self.m = _machine(native)
        self.ns_estimate = 10_000.0

    def close(self) -> None:
        self.m.close()

    def _run(self, seconds: float) -> dict:
        s = self.m.stats
        e0, k0, v0 = s.exits["io-out"], s.kvm_ns, s.vmm_ns
        t0 = time.perf_counter_ns()
        result = self.m.run(timeout=seconds)
        t1 = time.perf_counter_ns()
        n = s.exits["io-out"] - e0
        if result.reason != "timeout" or n < 1 or s.total_exits - s.exits["io-out"] - s.exits["interrupted"]:
            raise BenchError(f"{GUEST} stopped with {result.reason!r} after {n} PIO exits; "
                             f"exits by reason: {dict(s.exits)}")
        # The run loop's own clock: from its first KVM_RUN to its last exit (the span pio_ref
        # times too). The rest of the run() call is its fixed cost: threads, timer, harvest.
        loop = (s.kvm_ns - k0) + (s.vmm_ns - v0)
        return {"ns": loop / n, "exits": n, "kvm_ns": (s.kvm_ns - k0) / n, "vmm_ns": (s.vmm_ns - v0) / n,
                "wall_ns": (t1 - t0) / n, "run_overhead_us": (t1 - t0 - loop) / 1000}

    def warm(self, n: int) -> None:
        """Run untimed (caches, shadow page tables) and calibrate ns/exit for choosing T."""
        self.ns_estimate = self._run(max(CALIBRATE_S, n * self.ns_estimate / 1e9))["ns"]

    def measure(self, n: int) -> dict:
        # At least CALIBRATE_S: run() takes a few ms to start its threads, and a timer
        # that fires before the first exit would measure nothing (tiny --exits only).
        r = self._run(max(CALIBRATE_S, n * self.ns_estimate / 1e9))
        self.ns_estimate = r["ns"]                  # the next round's T follows the host's pace
        return r


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

    def __init__(self):
        self.m = _machine(native=True)
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
    """``cffi-ioctl`` and ``vcpu.run``: Kvm/Vm/Vcpu set up like pio_ref.c, no Machine."""

    def __init__(self, image: pathlib.Path):
        import kvmpy
        from kvmpy.abi import lib
        from kvmpy.x86 import layout
        from kvmpy.x86.modes import real_mode
        from kvmpy.x86.regs import RFLAGS_RESERVED1, Regs

        self.exits = kvmpy.exits
        self.kvm = kvmpy.Kvm()
        try:
            self.vm = self.kvm.create_vm()
            self.vm.add_memory(0, RAM)
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
            raw = own(Raw(image, pathlib.Path(tmp), args.warmup))
            native, python = own(TimedMachine(native=True)), own(TimedMachine(native=False))
            run = {"raw": raw.measure, "native": native.measure, "python": python.measure}
            warm = {"native": native.warm, "python": python.warm}      # raw warmed up before "ready"
            if not args.no_extras:
                bare, dev = own(BareVcpu(image)), own(PythonDevice())
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
    split = {}
    for v in ("native", "python"):
        med = lambda key: _common.summarize([s[key] for s in samples[v]])["median"]  # noqa: E731
        split[v] = {"kvm_ns_per_exit": round(med("kvm_ns"), 1), "vmm_ns_per_exit": round(med("vmm_ns"), 1),
                    "wall_ns_per_exit": round(med("wall_ns"), 1), "run_overhead_us": round(med("run_overhead_us"), 1)}
    return {
        "benchmark": NAME,
        "host": _common.host_info(),
        "params": {"exits": args.exits, "rounds": args.rounds, "warmup": args.warmup, "guest": GUEST,
                   "image": str(image), "order": "rotating per round"},
        "results": [{"variant": v, "metric": "ns_per_exit", "value": round(summary[v]["median"], 1), "unit": "ns"}
                    for v in variants],
        "ratios": {f"{v}/raw": round(summary[v]["median"] / raw, 3) for v in variants[1:]},
        "targets": TARGETS,
        "overhead_ns": {f"{v}-raw": round(summary[v]["median"] - raw, 1) for v in variants[1:]},
        "summary": {v: {k: round(x, 1) for k, x in summary[v].items()} for v in variants},
        "samples": {v: [round(x, 1) for x in ns[v]] for v in variants},
        "exits_per_round": {v: [s["exits"] for s in samples[v]] for v in variants},
        "split": split,
    }


def table(result: dict) -> str:
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
             _common.format_table(["variant", "ns/exit median", "min", "x raw", "ns over raw", "exits/round"], rows)]
    for v, sp in result["split"].items():
        lines.append(f"{v}: {sp['kvm_ns_per_exit']:.0f} ns in KVM_RUN + {sp['vmm_ns_per_exit']:.0f} ns in the "
                     f"VMM per exit; run() fixed cost {sp['run_overhead_us']:.0f} us per round")
    for k, limit in result["targets"].items():
        got = result["ratios"][k]
        lines.append(f"{k} = {got:.3f} (target <= {limit}: {'met' if got <= limit else 'NOT met'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str | None = None, results: pathlib.Path | None = None) -> int:
    """``kvmpy bench NAME [argv]``; ``results`` is where the JSON goes without --out."""
    return _common.run_main(sys.modules[__name__], argv, prog, results)
