"""blk --limits: does a rate-limited virtio-blk disk hold its limit? (``kvmpy bench blk --limits``)

The same guest as ``blk`` (blk-bench: 11 phases, one request in flight) runs on a disk
with one limit at a time, ``iops=N`` (operations per second) or ``bps=N`` (data bytes
per second), in the native and the Python machine. The disk's size is chosen per limit
so a run lasts a few seconds (1-16 MiB: each phase moves the whole disk).

What counts: from the guest's mark before phase 1 to its mark after phase 11, the
operations (every request, flushes included) or the data bytes the guest moved, which
the host knows from the phases (blk.phase_bytes). A bucket holds one second of its
rate and is full when the window opens, so the disk owes the guest
``size + rate * T`` tokens over a window of T seconds; the achieved rate is therefore
``(moved - size) / T``, and ``achieved/limit`` should be 1 (within 5 %) whenever the
limit, not the guest, is what slows it. A leftover of at most one request (up to
1 MiB for bps) at the window's end is the formula's error.
"""
from __future__ import annotations

import pathlib
import statistics
import tempfile


from . import _common
from ._common import BenchError

KiB, MiB = 1 << 10, 1 << 20
IOPS = (200, 500, 1000)
BPS = (2 * MiB, 8 * MiB, 32 * MiB)
TARGET_S = 2.5                  # aim for runs of about this long
TOLERANCE = 0.05


def work(blk, capacity: int) -> tuple[int, int]:
    """(operations, data bytes) of phases 1-11 on a disk of ``capacity`` sectors."""
    ops = nbytes = 0
    for ph in blk.PHASES:
        n = blk.phase_bytes(ph, capacity)
        ops += n // ph.size + (1 if ph.kind == "seq-write" else 0)      # a write phase ends with a flush
        nbytes += n
    return ops, nbytes


def disk_for(blk, kind: str, limit: int) -> int:
    """The smallest disk (1-16 MiB) whose run takes about TARGET_S at ``limit``."""
    for mib in range(1, 17):
        ops, nbytes = work(blk, mib * MiB // blk.SECTOR)
        moved = ops if kind == "iops" else nbytes
        if (moved - limit) / limit >= TARGET_S:
            return mib * MiB
    return 16 * MiB


def run_limited(blk, image, disk: pathlib.Path, capacity: int, native: bool, kind: str, limit: int) -> dict:
    import kvmpy
    from kvmpy.x86 import layout
    guest = kvmpy.images.guests.get(blk.GUEST)
    marks = blk.Marks()
    with kvmpy.Machine(disks=[kvmpy.Disk(str(disk), **{kind: limit})], native=native) as m:
        m.pio.attach(layout.BENCH_MARK_PORT, 4, marks, "bench-mark")
        m.load(image, user=guest.user)
        result = m.run(timeout=blk.RUN_TIMEOUT_S)
        out = m.serial_output
    if result.reason != "exit" or result.status != guest.disk_status:
        raise BenchError(f"{kind}={limit}: the guest stopped with {result.reason!r} (status {result.status}):\n"
                         f"{out.decode(errors='replace')}")
    blk.check_output(out, capacity)
    marks.spans()                   # the marks are in order
    window = marks.marks[-1][0] - marks.marks[0][0]
    ops, nbytes = work(blk, capacity)
    moved = ops if kind == "iops" else nbytes
    achieved = (moved - limit) * 1e9 / window
    return {"window_s": round(window / 1e9, 3), "moved": moved, "achieved": round(achieved, 1),
            "ratio": round(achieved / limit, 4)}


def measure(blk, args, progress) -> dict:
    image = _common.guest_image(blk.GUEST)
    from kvmpy.kvm import Kvm
    Kvm().close()
    cases = [("iops", n) for n in IOPS] + [("bps", n) for n in BPS]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-", dir=args.dir) as tmp:
        for kind, limit in cases:
            size = min(disk_for(blk, kind, limit), args.disk_size)
            disk = pathlib.Path(tmp) / f"disk-{size}.img"
            if not disk.exists():
                blk.make_disk(disk, size)
            for native in (True, False):
                variant = "native" if native else "python"
                samples = []
                for r in range(args.rounds):
                    progress(f"{kind}={limit} {variant} round {r + 1}/{args.rounds} ({size // MiB} MiB disk)")
                    samples.append(run_limited(blk, image, disk, size // blk.SECTOR, native, kind, limit))
                ratio = statistics.median(s["ratio"] for s in samples)
                rows.append({"variant": variant, "limit": kind, "value": limit, "disk_size": size,
                             "achieved": statistics.median(s["achieved"] for s in samples),
                             "ratio": ratio, "within_5pct": abs(ratio - 1) <= TOLERANCE,
                             "samples": samples})
    return _result(blk, args, image, rows)


def _result(blk, args, image, rows) -> dict:
    worst = max(abs(r["ratio"] - 1) for r in rows)
    return {
        "benchmark": blk.NAME, "mode": "limits",
        "host": _common.host_info(),
        "params": {"rounds": args.rounds, "guest": blk.GUEST, "image": str(image), "iops": list(IOPS),
                   "bps": list(BPS), "tolerance": TOLERANCE,
                   "achieved": "(moved - one second's bucket) / window, window = mark before phase 1 "
                               "to mark after phase 11"},
        "results": [{"variant": r["variant"], "metric": f"{r['limit']}={r['value']}", "value": r["achieved"],
                     "unit": "ops/s" if r["limit"] == "iops" else "B/s"} for r in rows],
        "ratios": {f"{r['variant']} achieved/limit {r['limit']}={r['value']}": r["ratio"] for r in rows},
        "limits": rows,
        "summary": {"worst_deviation": round(worst, 4), "all_within_5pct": all(r["within_5pct"] for r in rows)},
    }


def table(result: dict) -> str:
    def amount(r):
        return f"{r['value']}" if r["limit"] == "iops" else f"{r['value'] // MiB}M"
    rows = [[r["variant"], f"{r['limit']}={amount(r)}", f"{r['disk_size'] // MiB}M",
             f"{r['achieved']:.0f}" if r["limit"] == "iops" else f"{r['achieved'] / MiB:.2f}M",
             f"{r['ratio']:.3f}", "yes" if r["within_5pct"] else "NO"] for r in result["limits"]]
    s = result["summary"]
    return "\n".join([
        f"virtio-blk rate limits, guest {result['params']['guest']}: {result['params']['rounds']} round(s), "
        "achieved = (moved - bucket) / window",
        _common.host_line(result["host"]),
        _common.format_table(["variant", "limit", "disk", "achieved/s", "achieved/limit", "within 5 %"], rows),
        f"worst deviation {s['worst_deviation'] * 100:.1f} %: "
        f"{'every limit held within 5 %' if s['all_within_5pct'] else 'NOT every limit held within 5 %'}"])


