#!/usr/bin/env python3
"""The PIO exit round trip through kvmpy against a minimal C loop on the same guest.

Every variant runs the bundled ``pio-loop`` guest (guests/pio-loop.S: an endless
``out %al,$0x80; inc %al`` in real mode), where each loop iteration is exactly one
VM exit to user space, and reports wall-clock nanoseconds per exit:

  c           benchmarks/c/pio_ref.c, compiled now with gcc: KVM_RUN, check
              exit_reason, KVM_RUN again. The floor: the kernel's and the
              guest's share of the round trip.
  cffi-ioctl  a Python loop calling the cffi ioctl wrapper on the vCPU fd, no
              decoding: the cost of crossing from Python into C and back.
  vcpu.run    a Python loop over kvmpy's ``Vcpu.run()``: the ioctl plus decoding
              the kvm_run page into an ``exits.IoOut`` value.
  machine     ``Machine.run()`` with a counting device on port 0x80 that calls
              ``request_stop`` after N writes: the whole run loop (stats,
              ``match``, bus lookup, device write).

The variants interleave over several rounds, in a rotating order, so drift on a
noisy host hits all of them alike; each is warmed up first. The table shows the
median over rounds and the ratio to the C median of the same run.

    python3 benchmarks/exit_roundtrip.py [--exits N] [--rounds R] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

_common.use_source_tree()

NAME = "exit_roundtrip"
GUEST = "pio-loop"
PORT = 0x80                     # the guest's `out %al, $0x80`
RAM = 2 << 20                   # the same 2 MiB the C reference maps
C_SOURCE = _common.BENCH_DIR / "c" / "pio_ref.c"
VARIANTS = ("c", "cffi-ioctl", "vcpu.run", "machine")


class StopAfter:
    """A port-0x80 device that counts guest writes and stops the machine after ``limit``."""

    def __init__(self, machine):
        self.machine = machine
        self.count = 0
        self.limit = 0

    def arm(self, limit: int) -> None:
        self.count, self.limit = 0, limit

    def read(self, offset: int, size: int) -> int:
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        self.count += 1
        if self.count == self.limit:
            self.machine.request_stop("exits-done")


class CReference:
    """pio_ref built into a temporary directory; one process per round."""

    def __init__(self, image: pathlib.Path, tmpdir: pathlib.Path, warmup: int):
        self.exe = _common.compile_c(C_SOURCE, tmpdir)
        self.image, self.warmup = image, warmup

    def measure(self, n: int) -> float:
        argv = [str(self.exe), str(self.image), str(n), "1", str(self.warmup)]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
        return json.loads(r.stdout)["batch_ns_per_exit"][0]


class KvmpyVariants:
    """A Machine (for ``machine``) and a bare Kvm/Vm/Vcpu (for the low-level loops)."""

    def __init__(self, image: pathlib.Path):
        import kvmpy
        from kvmpy import guests
        from kvmpy.abi import lib
        from kvmpy.x86 import layout
        from kvmpy.x86.modes import real_mode
        from kvmpy.x86.regs import RFLAGS_RESERVED1, Regs

        self.exits = kvmpy.exits
        g = guests.get(GUEST)
        self.machine = kvmpy.Machine(mem_size=RAM)
        self.machine.load(image, format=g.format, mode=g.mode, load_addr=g.load_addr, entry=g.entry)
        self.counter = StopAfter(self.machine)
        self.machine.pio.attach(PORT, 1, self.counter, "stop-after")

        # The low level, set up like pio_ref.c: RAM at 0, image at 0x7c00, CS=0 IP=0x7c00.
        self.kvm = kvmpy.Kvm()
        self.vm = self.kvm.create_vm()
        self.vm.add_memory(0, RAM)
        self.vm.memory.write(layout.REAL_MODE_LOAD, image.read_bytes())
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_sregs(real_mode(self.vcpu.get_sregs()))
        self.vcpu.set_regs(Regs(rip=layout.REAL_MODE_LOAD, rsp=layout.REAL_MODE_LOAD,
                                rflags=RFLAGS_RESERVED1))
        self._ioctl, self._kvm_run = lib.kvmpy_ioctl_int, lib.KVM_RUN

    def close(self) -> None:
        self.machine.close()
        self.vm.close()
        self.kvm.close()

    def machine_run(self, n: int) -> float:
        m = self.machine
        self.counter.arm(n)
        before = m.stats.exits["io-out"]
        t0 = time.perf_counter_ns()
        result = m.run()
        t1 = time.perf_counter_ns()
        done = m.stats.exits["io-out"] - before
        if result.reason != "exits-done" or self.counter.count != n or done != n:
            raise RuntimeError(f"machine: stopped with {result.reason!r} after {done} PIO exits, "
                               f"{self.counter.count} device writes (wanted {n})")
        return (t1 - t0) / n

    def vcpu_run(self, n: int) -> float:
        run = self.vcpu.run
        t0 = time.perf_counter_ns()
        for _ in range(n):
            ex = run()
        t1 = time.perf_counter_ns()
        self._check_last(ex, "vcpu.run")
        return (t1 - t0) / n

    def cffi_ioctl(self, n: int) -> float:
        ioctl, fd, req = self._ioctl, self.vcpu.fd, self._kvm_run
        bad = 0
        t0 = time.perf_counter_ns()
        for _ in range(n):
            if ioctl(fd, req, 0) < 0:
                bad += 1
        t1 = time.perf_counter_ns()
        if bad:
            raise RuntimeError(f"cffi-ioctl: {bad} of {n} KVM_RUN calls failed")
        self._check_last(self.exits.decode(self.vcpu.run_page, self.vcpu.run_size), "cffi-ioctl")
        return (t1 - t0) / n

    def _check_last(self, ex, variant: str) -> None:
        if not (isinstance(ex, self.exits.IoOut) and ex.port == PORT):
            raise RuntimeError(f"{variant}: the guest's last exit was {ex}, not an OUT to port {PORT:#x}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exits", type=int, default=20_000, metavar="N", help="exits per variant per round (default 20000)")
    p.add_argument("--rounds", type=int, default=5, metavar="R", help="interleaved rounds (default 5)")
    p.add_argument("--warmup", type=int, default=2_000, metavar="N", help="untimed exits before timing (default 2000)")
    p.add_argument("--json", action="store_true",
                   help="print the JSON result object on stdout (the table then goes to stderr)")
    p.add_argument("--cpu", type=int, metavar="N",
                   help="pin this process and the C reference to CPU N (steadier on a busy host)")
    p.add_argument("--check-max-ratio", type=float, metavar="X",
                   help="exit with status 1 if machine/c is above X")
    a = p.parse_args(argv)
    if a.exits < 1 or a.rounds < 1 or a.warmup < 0:
        p.error("--exits and --rounds must be at least 1, --warmup at least 0")
    if a.cpu is not None and a.cpu not in os.sched_getaffinity(0):
        p.error(f"--cpu {a.cpu}: not one of the CPUs this process may use {sorted(os.sched_getaffinity(0))}")
    return a


def measure(args) -> dict:
    from kvmpy import guests

    image = guests.path(GUEST)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})             # inherited by the pio_ref children
    progress = _common.Progress()
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        with tempfile.TemporaryDirectory(prefix="kvmpy-bench-") as tmp:
            progress.update(f"{NAME}: building {C_SOURCE.name} ...")
            c = CReference(image, pathlib.Path(tmp), args.warmup)
            kv = KvmpyVariants(image)
            try:
                run = {"c": c.measure, "cffi-ioctl": kv.cffi_ioctl, "vcpu.run": kv.vcpu_run,
                       "machine": kv.machine_run}
                if args.warmup:
                    progress.update(f"{NAME}: warming up ({args.warmup} exits per kvmpy variant)")
                    for v in VARIANTS[1:]:              # pio_ref warms itself up in each process
                        run[v](args.warmup)
                for r in range(args.rounds):
                    order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
                    for v in order:
                        progress.update(f"{NAME}: round {r + 1}/{args.rounds}: {v:<10} x {args.exits} exits")
                        samples[v].append(run[v](args.exits))
            finally:
                kv.close()
    finally:
        progress.done()

    summary = {v: _common.summarize(s) for v, s in samples.items()}
    c_med = summary["c"]["median"]
    return {
        "benchmark": NAME,
        "host": _common.host_info(),
        "params": {"exits": args.exits, "rounds": args.rounds, "warmup": args.warmup,
                   "guest": GUEST, "image": str(image), "order": "rotating per round", "cpu": args.cpu},
        "results": [{"variant": v, "metric": "ns_per_exit", "value": round(summary[v]["median"], 1),
                     "unit": "ns", "min": round(summary[v]["min"], 1), "mean": round(summary[v]["mean"], 1),
                     "max": round(summary[v]["max"], 1), "samples": [round(x, 1) for x in samples[v]]}
                    for v in VARIANTS],
        "ratios": {f"{v}/c": round(summary[v]["median"] / c_med, 3) for v in VARIANTS[1:]},
        "overhead_ns": {f"{v}-c": round(summary[v]["median"] - c_med, 1) for v in VARIANTS[1:]},
    }


def table(result: dict) -> str:
    c_med = next(r["value"] for r in result["results"] if r["variant"] == "c")
    rows = [[r["variant"], f"{r['value']:.0f}", f"{r['min']:.0f}",
             f"{r['value'] / c_med:.3f}", f"{r['value'] - c_med:+.0f}"] for r in result["results"]]
    p, h = result["params"], result["host"]
    head = (f"PIO exit round trip, guest {p['guest']}: {p['rounds']} rounds x {p['exits']} exits per variant\n"
            f"host: {h['cpu_model']}, kernel {h['release']}, KVM backend {', '.join(h['kvm_backends']) or '?'}\n")
    return head + _common.format_table(["variant", "ns/exit median", "min", "ratio vs C", "ns over C"], rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    from kvmpy.errors import KvmpyError

    try:
        result = measure(args)
    except (KvmpyError, _common.BuildError, OSError, RuntimeError) as e:
        print(f"{NAME}: {e}", file=sys.stderr)      # kvmpy's errors carry a hint at the fix
        return 2
    path = _common.write_results(NAME, result)
    # With --json, stdout is the JSON object alone (for pipes); the table goes to stderr.
    out = sys.stderr if args.json else sys.stdout
    print(table(result), file=out)
    print(f"JSON: {path}", file=out)
    if args.json:
        print(json.dumps(result, indent=2))
    ratio = result["ratios"]["machine/c"]
    if args.check_max_ratio is not None and ratio > args.check_max_ratio:
        print(f"{NAME}: machine/c = {ratio:.3f} exceeds --check-max-ratio {args.check_max_ratio}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
