"""sandbox: kvmpy.Sandbox calls against a forked subprocess per call.

The bundled ``sandbox-demo`` guest (guests/sandbox-demo.c, CPL 3, 16 MiB of RAM). Measured
in rounds (--rounds), the variants' order rotated each round:

  trivial       ``sb.call("nop")``: one exit, then the reset to the checkpoint; median and
                p99 over --calls calls a round, and where the time goes (medians): run (the
                guest's ``Machine.run``), host (arguments, call page, result), reset and its
                parts (``Machine.reset(times)``: pages, vcpu, irqchip, devices, disks)
  dirty 1 MiB   ``sb.call("dirty", 256)``: the guest writes one byte in each of 256 pages,
                which the reset copies back
  create-call-destroy   ``Sandbox()`` (boot to the ready point, checkpoint), one trivial
                call, ``close()`` (--creates times a round)
  pool          --pool-calls trivial calls from --threads threads on a ``SandboxPool`` of
                --pool-size sandboxes: calls per second

The reference, in the same run: what a user picks instead on one machine, ``os.fork()``
per call running the equivalent Python function in the child (nothing for trivial; a
fresh 1 MiB bytearray with one byte written per page for dirty), the result sent back
through a pipe, the child reaped; for the pool, the same from --threads threads. No
sandbox is open while the reference forks (a parent's guest RAM would slow its forks).
Ratios: fork/sandbox for the latencies (above 1: the sandbox is faster), sandbox/fork for
calls per second. The issue's target: a trivial call plus its reset at most 100 us median.
"""
from __future__ import annotations

import os
import pickle
import statistics
import sys
import threading
import time
import warnings

from . import _common
from ._common import BenchError

NAME = "sandbox"
DESCRIPTION = "kvmpy.Sandbox call latency (trivial, 1 MiB dirtied), create-call-destroy, pool calls/s vs fork per call"
GUEST = "sandbox-demo"
MEM = 16 << 20
DIRTY_PAGES = 256
TARGET_US = 100.0
SPLIT = ("run", "host", "reset", "pages", "vcpu", "irqchip", "devices", "disks")


def add_arguments(p) -> None:
    p.add_argument("--calls", type=_common.positive, default=None, metavar="N",
                   help="calls per variant and round (default 1000; --quick: 40)")
    p.add_argument("--rounds", type=_common.positive, default=None, metavar="R",
                   help="rounds (default 3; --quick: 1)")
    p.add_argument("--creates", type=_common.positive, default=None, metavar="N",
                   help="create-call-destroy cycles a round (default 20; --quick: 3)")
    p.add_argument("--pool-size", type=_common.positive, default=2, metavar="N",
                   help="sandboxes in the pool (default 2)")
    p.add_argument("--threads", type=_common.positive, default=4, metavar="T",
                   help="threads calling the pool, and forking for the reference (default 4)")
    p.add_argument("--pool-calls", type=_common.positive, default=None, metavar="N",
                   help="calls a round from all the threads (default 1000; --quick: 40)")
    p.add_argument("--native", action="store_true",
                   help="run the guest in the C run loop (default: the Python loop, as Sandbox does)")
    p.add_argument("--irqchip", action="store_true",
                   help="give the sandboxes the in-kernel irqchip and PIT (default: without, as Sandbox does)")
    p.add_argument("--quick", action="store_true", help="40 calls, 3 creates, one round (a smoke test)")


# --- the reference: a fork per call ----------------------------------------------------------
def _nop():
    return None


def _dirty(pages: int) -> int:
    buf = bytearray(pages * 4096)
    for p in range(pages):
        buf[p * 4096] = (p + 1) & 0xFF
    return pages


def fork_call(fn, *args):
    """Run ``fn(*args)`` in a forked child; its pickled result comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: compute, send, leave at once
        try:
            os.close(r)
            os.write(w, pickle.dumps(fn(*args)))
        finally:
            os._exit(0)
    os.close(w)
    try:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return pickle.loads(b"".join(chunks))


def _latencies(call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        call()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def _concurrently(call, threads: int, total: int) -> float:
    """Calls per second of ``total`` calls of ``call`` from ``threads`` threads."""
    left = [total]
    lock = threading.Lock()
    errors: list = []

    def worker():
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            try:
                call()
            except BaseException as e:              # noqa: BLE001 - re-raised in the caller
                errors.append(e)
                return
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return total / (time.perf_counter() - t0)


# --- the sandbox -----------------------------------------------------------------------------
def _sandbox_round(image, args, out: dict) -> None:
    from ..sandbox import Sandbox
    with Sandbox(image, mem_size=MEM, native=args.native, irqchip=args.irqchip) as sb:
        sb.call("nop")                               # warm up
        if sb.call("dirty", DIRTY_PAGES) != DIRTY_PAGES:
            raise BenchError(f"{GUEST}: dirty({DIRTY_PAGES}) returned something else")
        out["trivial"] += _latencies(lambda: sb.call("nop"), args.calls)
        for _ in range(args.calls):                  # where the time goes, on separate calls
            times: dict = {}
            sb.call("nop", times=times)
            for k in SPLIT:
                out["split"].setdefault(k, []).append(times.get(k, 0) / 1000)
        out["dirty"] += _latencies(lambda: sb.call("dirty", DIRTY_PAGES), args.calls)


def _create_call_destroy(image, args) -> None:
    from ..sandbox import Sandbox
    sb = Sandbox(image, mem_size=MEM, native=args.native, irqchip=args.irqchip)
    try:
        sb.call("nop")
    finally:
        sb.close()


def _pool_round(image, args) -> float:
    from ..sandbox import SandboxPool
    with SandboxPool(image, size=args.pool_size, mem_size=MEM, native=args.native,
                     irqchip=args.irqchip) as pool:
        pool.call("nop")
        return _concurrently(lambda: pool.call("nop"), args.threads, args.pool_calls)


def _round(image, args, r: int, sbx: dict, ref: dict, progress) -> None:
    steps = {
        "sandbox": lambda: _sandbox_round(image, args, sbx),
        "fork": lambda: (ref["trivial"].extend(_latencies(lambda: fork_call(_nop), args.calls)),
                         ref["dirty"].extend(_latencies(lambda: fork_call(_dirty, DIRTY_PAGES), args.calls))),
        "create": lambda: sbx["create"].extend(_latencies(lambda: _create_call_destroy(image, args), args.creates)),
        "pool": lambda: sbx["pool"].append(_pool_round(image, args)),
        "fork pool": lambda: ref["pool"].append(
            _concurrently(lambda: fork_call(_nop), args.threads, args.pool_calls)),
    }
    for name in _common.rotate(tuple(steps), r):
        progress(f"round {r + 1}/{args.rounds}: {name}")
        steps[name]()


def measure(args, progress) -> dict:
    args.calls = args.calls or (40 if args.quick else 1000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.creates = args.creates or (3 if args.quick else 20)
    args.pool_calls = args.pool_calls or (40 if args.quick else 1000)
    image = _common.guest_image(GUEST)
    sbx = {"trivial": [], "dirty": [], "create": [], "pool": [], "split": {}}
    ref = {"trivial": [], "dirty": [], "pool": []}
    _create_call_destroy(image, args)               # warm up (imports, page cache)
    with warnings.catch_warnings():                  # forking from a process with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        for r in range(args.rounds):
            _round(image, args, r, sbx, ref, progress)
    return _result(args, sbx, ref)


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


def _stats(xs: list[float]) -> dict:
    return {"median_us": statistics.median(xs), "p99_us": _p99(xs), "samples": len(xs)}


def _result(args, sbx: dict, ref: dict) -> dict:
    s = {k: _stats(sbx[k]) for k in ("trivial", "dirty", "create")}
    f = {k: _stats(ref[k]) for k in ("trivial", "dirty")}
    s["pool_calls_per_s"] = statistics.median(sbx["pool"])
    f["pool_calls_per_s"] = statistics.median(ref["pool"])
    s["split_us"] = {k: statistics.median(v) for k, v in sbx["split"].items()}
    results = []
    for variant, d in (("sandbox", s), ("fork", f)):
        for k in ("trivial", "dirty", "create"):
            if k in d:
                results += [{"variant": variant, "metric": f"{k}_median", "value": round(d[k]["median_us"], 2), "unit": "us"},
                            {"variant": variant, "metric": f"{k}_p99", "value": round(d[k]["p99_us"], 2), "unit": "us"}]
        results.append({"variant": variant, "metric": "pool_calls_per_s", "value": round(d["pool_calls_per_s"], 1),
                        "unit": "calls/s"})
    results += [{"variant": "sandbox", "metric": f"split_{k}", "value": round(v, 2) or 0.01, "unit": "us"}
                for k, v in s["split_us"].items()]
    ratios = {"fork/sandbox trivial": f["trivial"]["median_us"] / s["trivial"]["median_us"],
              "fork/sandbox dirty": f["dirty"]["median_us"] / s["dirty"]["median_us"],
              "fork/sandbox create-call-destroy": f["trivial"]["median_us"] / s["create"]["median_us"],
              "sandbox/fork pool calls_per_s": s["pool_calls_per_s"] / f["pool_calls_per_s"]}
    params = {"calls": args.calls, "rounds": args.rounds, "creates": args.creates, "pool_size": args.pool_size,
              "threads": args.threads, "pool_calls": args.pool_calls, "native": args.native, "irqchip": args.irqchip,
              "quick": args.quick,
              "guest": GUEST, "mem": MEM, "cpl": 3, "dirty_pages": DIRTY_PAGES, "target_us_trivial": TARGET_US}
    return {"benchmark": NAME, "host": _common.host_info(), "params": params, "results": results,
            "ratios": {k: round(v, 3) for k, v in ratios.items()}, "sandbox": s, "fork": f}


def table(result: dict) -> str:
    p, s, f = result["params"], result["sandbox"], result["fork"]
    lines = [f"sandbox calls: {p['guest']} at CPL 3, {p['mem'] >> 20} MiB RAM, {p['rounds']} round(s) of "
             f"{p['calls']} calls; pool of {p['pool_size']} from {p['threads']} threads; "
             f"{'C' if p['native'] else 'Python'} run loop, {'with' if p['irqchip'] else 'no'} irqchip",
             _common.host_line(result["host"])]
    rows = []
    for label, k in (("trivial call", "trivial"), (f"dirty 1 MiB ({p['dirty_pages']} pages)", "dirty"),
                     ("create-call-destroy", "create")):
        ref = f["trivial" if k == "create" else k]
        rows.append([label, f"{s[k]['median_us']:.1f}", f"{s[k]['p99_us']:.1f}", f"{ref['median_us']:.1f}",
                     f"{ref['p99_us']:.1f}", f"{ref['median_us'] / s[k]['median_us']:.2f}x"])
    rows.append(["pool calls/s", f"{s['pool_calls_per_s']:.0f}", "", f"{f['pool_calls_per_s']:.0f}", "",
                 f"{s['pool_calls_per_s'] / f['pool_calls_per_s']:.2f}x"])
    lines.append(_common.format_table(["", "sandbox median us", "p99 us", "fork median us", "p99 us",
                                       "fork/sandbox"], rows))
    sp = s["split_us"]
    lines.append("trivial call, where the time goes (medians, us): "
                 + ", ".join(f"{k} {sp[k]:.1f}" for k in SPLIT if k in sp)
                 + "  (pages..disks are the reset's parts)")
    verdict = "met" if s["trivial"]["median_us"] <= TARGET_US else "not met"
    lines.append(f"target: trivial call + reset median <= {TARGET_US:g} us: {verdict} "
                 f"({s['trivial']['median_us']:.1f} us)")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str | None = None, results=None) -> int:
    """``kvmpy bench sandbox [argv]``; ``results`` is where the JSON goes without --out."""
    return _common.run_main(sys.modules[__name__], argv, prog, results)
