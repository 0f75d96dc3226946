"""serial: guest output through COM1, kvmpy's native (C) UART and loop against the Python ones.

The guest (kvmpy/bench/serial_flood.S, assembled now with as/ld) sends --bytes
bytes (default 1 MiB) to COM1's transmit register with one `rep outsb` as fast
as it can, without polling LSR (kvmpy's UART transmits instantly: THRE is always
set), then writes to isa-debug-exit. It runs in long mode at CPL 0: KVM emulates
OUTS one byte per exit to user space, and on hosts without hardware
virtualisation an exit from CPL 3 costs about three times one from CPL 0.

  native   Machine(native=True): the C loop serves every THR write in the C
           16550, which batches the bytes; Python writes them out when its
           buffer fills and from the machine's watchdog thread every 20 ms.
  python   Machine(native=False): every byte is an exit dispatched in Python and
           a Serial16550 register write, which calls output.write(1 byte).

The bytes come from a pattern the host puts in guest memory; every round checks
that exactly those bytes arrived, in order. Each round is a fresh Machine (built
untimed); the time is the wall time of its run() call. Output goes to an
in-memory sink that counts its write() calls (its own cost, measured in the same
run, is reported as sink_ns_per_call). Rounds alternate the order of the variants;
the table shows medians. Ratio: native/python of the throughput.
"""
from __future__ import annotations

import io
import pathlib
import sys
import tempfile
import time

from . import _common
from ._common import BenchError

NAME = "serial"
DESCRIPTION = "guest writes 1 MiB to COM1: bytes/s of the native (C) UART and loop vs the Python ones"
VARIANTS = ("native", "python")
MiB = 1 << 20
CODE_ADDR = 0x100000            # where raw long-mode images go (layout.KERNEL_START)
BUFFER_ADDR = 0x200000          # the bytes to send, above the code
FLOOD_DONE = 0x5A               # serial_flood.S's isa-debug-exit value
NS_PER_BYTE_LIMIT = 200_000     # a run slower than this per byte is stuck: give up


def add_arguments(p) -> None:
    p.add_argument("--bytes", type=_common.positive, default=MiB, metavar="N",
                   help="bytes the guest writes per round (default 1 MiB = 1048576)")
    p.add_argument("--rounds", type=_common.positive, default=3, metavar="R",
                   help="rounds, each runs every variant once (default 3)")


class Sink:
    """The guest's serial= stream: keeps the bytes (to check them) and counts write() calls."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.calls = 0

    def write(self, data) -> int:
        self.calls += 1
        return self.buf.write(data)

    def flush(self) -> None:
        pass


def sink_ns_per_call(n: int = 100_000) -> float:
    """What one Sink.write of one byte costs here (the console batches both variants' writes)."""
    s, b = Sink(), b"x"
    t0 = time.perf_counter_ns()
    for _ in range(n):
        s.write(b)
    return (time.perf_counter_ns() - t0) / n


def pattern(n: int) -> bytes:
    """Byte i is i mod 256."""
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def run_once(code: bytes, data: bytes, native: bool) -> dict:
    """One fresh Machine sends ``data``; checks every byte; returns time, writes and exits."""
    import kvmpy
    n = len(data)
    ram = -(-(BUFFER_ADDR + n) // (2 * MiB)) * (2 * MiB)        # up to a whole 2 MiB page
    sink = Sink()
    with kvmpy.Machine(mem_size=ram, serial=sink, native=native) as m:
        m.load(code, format="raw", mode="long", load_addr=CODE_ADDR, entry=CODE_ADDR)
        m.memory.write(BUFFER_ADDR, data)
        vcpu = m.vcpus[0]
        regs = vcpu.get_regs()
        regs.rsi, regs.rcx = BUFFER_ADDR, n
        vcpu.set_regs(regs)
        limit = max(60.0, n * NS_PER_BYTE_LIMIT / 1e9)
        t0 = time.perf_counter_ns()
        result = m.run(timeout=limit)
        t1 = time.perf_counter_ns()
        exits = m.stats.exits["io-out"]
    variant = "native" if native else "python"
    if result.reason != "exit" or result.status != (FLOOD_DONE << 1) | 1 or result.regs.rcx != 0:
        raise BenchError(f"{variant}: the guest stopped with {result.reason!r} (status {result.status}, "
                         f"{n - result.regs.rcx} of {n} bytes sent) after {(t1 - t0) / 1e9:.1f} s")
    got = sink.buf.getvalue()
    if got != data:
        first = next((i for i, (a, b) in enumerate(zip(got, data)) if a != b), min(len(got), n))
        raise BenchError(f"{variant}: {len(got)} of {n} bytes arrived, first difference at byte {first}")
    ns = t1 - t0
    return {"ns": ns, "bytes_per_s": n * 1e9 / ns, "ns_per_byte": ns / n,
            "write_calls": sink.calls, "exits": exits}


def measure(args, progress) -> dict:
    data = pattern(args.bytes)
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-") as tmp:
        progress("assembling serial_flood.S ...")
        code = _common.assemble_raw("serial_flood.S", pathlib.Path(tmp), CODE_ADDR)
    from kvmpy.kvm import Kvm
    Kvm().close()                                   # KvmUnavailable (exit 2) before anything long
    sink_cost = sink_ns_per_call()
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in _common.rotate(VARIANTS, r):
            progress(f"round {r + 1}/{args.rounds}: {v:<6} {args.bytes} bytes")
            samples[v].append(run_once(code, data, native=(v == "native")))
    return _result(args, samples, sink_cost)


def _med(samples: list[dict], key: str) -> float:
    return _common.summarize([s[key] for s in samples])["median"]


def _result(args, samples, sink_cost) -> dict:
    n = args.bytes
    results, summary = [], {}
    for v in VARIANTS:
        bps = _med(samples[v], "bytes_per_s")
        calls = _med(samples[v], "write_calls") * MiB / n
        results += [{"variant": v, "metric": "bytes_per_s", "value": round(bps, 1), "unit": "B/s"},
                    {"variant": v, "metric": "write_calls_per_mib", "value": round(calls, 1), "unit": "calls/MiB"}]
        summary[v] = {"bytes_per_s": {k: round(x, 1) for k, x in
                                      _common.summarize([s["bytes_per_s"] for s in samples[v]]).items()},
                      "ns_per_byte": round(_med(samples[v], "ns_per_byte"), 1),
                      "exits_per_byte": round(_med(samples[v], "exits") / n, 4)}
    native, python = (_med(samples[v], "bytes_per_s") for v in VARIANTS)
    return {
        "benchmark": NAME,
        "host": _common.host_info(),
        "params": {"bytes": n, "rounds": args.rounds, "guest": "serial_flood.S (rep outsb, long mode, CPL 0)",
                   "order": "alternating per round", "sink_ns_per_call": round(sink_cost, 1)},
        "results": results,
        "ratios": {"native/python": round(native / python, 3)},
        "summary": summary,
        "samples": {v: [{k: round(x, 1) for k, x in s.items()} for s in samples[v]] for v in VARIANTS},
    }


def table(result: dict) -> str:
    p = result["params"]
    rows = []
    for v in VARIANTS:
        s = result["summary"][v]
        calls = next(r["value"] for r in result["results"] if r["variant"] == v and r["metric"] == "write_calls_per_mib")
        rows.append([v, f"{s['bytes_per_s']['median'] / 1e3:.1f}", f"{s['bytes_per_s']['max'] / 1e3:.1f}",
                     f"{s['ns_per_byte']:.0f}", f"{s['exits_per_byte']:.3f}", f"{calls:.0f}"])
    return "\n".join([
        f"serial output, guest {p['guest']}: {p['rounds']} rounds x {p['bytes']} bytes per variant",
        _common.host_line(result["host"]),
        _common.format_table(["variant", "kB/s median", "best", "ns/byte", "exits/byte", "write() calls/MiB"], rows),
        f"native/python = {result['ratios']['native/python']:.3f} (throughput); "
        f"the output sink costs {p['sink_ns_per_call']:.0f} ns per write() call"])


def main(argv: list[str] | None = None, *, prog: str | None = None, results: pathlib.Path | None = None) -> int:
    """``kvmpy bench NAME [argv]``; ``results`` is where the JSON goes without --out."""
    return _common.run_main(sys.modules[__name__], argv, prog, results)
