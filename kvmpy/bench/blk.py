"""blk: virtio-blk throughput measured inside the guest, against pread/pwrite on the host, same file, same run.

The guest is the bundled ``blk-bench`` (guests/blk-bench.c, ring 3, polling
virtio-blk driver, one request in flight). On a scratch disk file it runs 11
phases, each moving min(16 MiB, disk) bytes rounded down to whole requests:

  1-10  sequential read (odd) / write (even) from sector 0 in 4K, 16K, 64K,
        256K and 1M requests; a write phase ends with a flush (fdatasync)
  11    random 4 KiB reads at LCG offsets over the whole disk

and writes ``outl P`` to the benchmark marker port (layout.BENCH_MARK_PORT)
just before phase P and ``P | 0x80000000`` just after it. A Python device on
that port timestamps each write (time.perf_counter_ns); a phase's throughput
is its bytes over the time between its two marks. Variants:

  host     the reference: os.preadv/os.pwritev on the same file from this
           process, the same request sizes, amounts and random offsets, an
           fdatasync at the end of each write phase, into page-aligned
           buffers (mmap; the guest's are page-aligned too)
  native   Machine(native=True): the C loop and C virtio-blk serve every
           queue notify (preadv/pwritev straight into guest RAM)
  python   Machine(native=False): every exit and the virtio-blk device in Python

``--virtio pci`` puts the disk behind virtio-pci for native and python (the guest finds
it on PCI bus 0): native then runs the Python transport with C serving the requests
(vmm/native_blk.py), python the Python model under the same transport.

The disk file (--disk-size, default 32 MiB, in a temporary directory under
--dir) is written once with non-zero data (no holes) and never dropped from
the page cache: this measures the cached path, the same for all variants.
The guest OVERWRITES its first 16 MiB every run; so do the host's write phases.
Rounds run host, native and python in an order that rotates each round; the
table shows medians. MB/s is 10^6 bytes per second. Headline: native/host for
1 MiB sequential reads (target on the development machines: at least 0.5).
"""
from __future__ import annotations

import argparse
import mmap
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time
from typing import NamedTuple

from . import _common
from ._common import BenchError

NAME = "blk"
DESCRIPTION = "virtio-blk sequential/random I/O timed in the guest vs host pread/pwrite on the same file"
GUEST = "blk-bench"
VARIANTS = ("host", "native", "python")
KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
AMOUNT = 16 * MiB               # blk-bench's per-phase cap
RAND_SIZE = 4 * KiB
PHASE_END = 0x8000_0000         # or-ed into the phase number after a phase
HEADLINE = "seq-read-1M"
TARGETS = {"native/host": 0.5}  # at least
RUN_TIMEOUT_S = 600.0           # one guest run takes ~1 s here at the default size
LCG_MUL, LCG_ADD = 6364136223846793005, 1442695040888963407


class Phase(NamedTuple):
    """One blk-bench phase: its number (the marker value), kind and request size."""

    number: int
    kind: str                   # seq-read, seq-write, rand-read
    size: int

    @property
    def metric(self) -> str:
        return f"{self.kind}-{label(self.size)}"


def label(size: int) -> str:
    return f"{size // MiB}M" if size >= MiB else f"{size // KiB}K"


PHASES = tuple(Phase(2 * i + 1 + w, "seq-write" if w else "seq-read", size)
               for i, size in enumerate((4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB))
               for w in (0, 1)) + (Phase(11, "rand-read", RAND_SIZE),)


def disk_size(text: str) -> int:
    v = _common.positive(text)
    if v < MiB or v % (4 * KiB):
        raise argparse.ArgumentTypeError(
            f"the disk must be a multiple of 4 KiB and at least 1 MiB, got {v}")
    return v


def add_arguments(p) -> None:
    p.add_argument("--disk-size", type=disk_size, default=32 * MiB, metavar="N",
                   help="scratch disk size (default 32M); every phase moves min(16 MiB, N)")
    p.add_argument("--rounds", type=_common.positive, default=3, metavar="R",
                   help="rounds, each runs host, native and python once (default 3)")
    p.add_argument("--dir", type=pathlib.Path, metavar="DIR",
                   help="where to create the scratch disk (default: the system temp dir); "
                        "its file system decides what fdatasync costs")
    p.add_argument("--virtio", choices=("mmio", "pci"), default="mmio",
                   help="the disk's transport in the guest variants: virtio-mmio (default) or virtio-pci")
    p.add_argument("--limits", action="store_true",
                   help="instead: rate-limited disks (iops=, bps=), achieved/limit per limit "
                        "(kvmpy/bench/blk_limits.py; the disk size is chosen per limit, at most --disk-size)")


# --- what the guest does, computed on the host ---------------------------------------
def amount(capacity: int) -> int:
    """Bytes a phase aims at: min(16 MiB, disk), for a disk of ``capacity`` sectors."""
    return min(AMOUNT, capacity * SECTOR)


def phase_bytes(ph: Phase, capacity: int) -> int:
    """Bytes the guest moves in ``ph``: whole requests only."""
    n = amount(capacity)
    if ph.kind == "rand-read":
        return n // RAND_SIZE * RAND_SIZE if capacity // (RAND_SIZE // SECTOR) else 0
    return n // ph.size * ph.size


def random_offsets(capacity: int, count: int) -> list[int]:
    """Byte offsets of blk-bench's random reads: its LCG from x = 1, advanced before each read."""
    blocks = capacity // (RAND_SIZE // SECTOR)
    x, out = 1, []
    for _ in range(count):
        x = (x * LCG_MUL + LCG_ADD) & 0xFFFF_FFFF_FFFF_FFFF
        out.append((x >> 33) % blocks * RAND_SIZE)
    return out


def write_pattern() -> bytes:
    """What blk-bench writes: byte i of its 1 MiB buffer is i * 7 + (i >> 12), mod 256."""
    return bytes((i * 7 + (i >> 12)) & 0xFF for i in range(MiB))


def make_disk(path: pathlib.Path, size: int) -> None:
    """A file of ``size`` bytes, all non-zero (no holes), written and synced once."""
    chunk = (bytes(range(1, 256)) * (MiB // 255 + 1))[:MiB]
    with open(path, "wb") as f:
        for off in range(0, size, MiB):
            f.write(chunk[:min(MiB, size - off)])
        f.flush()
        os.fsync(f.fileno())


# --- the host reference --------------------------------------------------------------
class Host:
    """os.preadv/os.pwritev on the disk file into page-aligned 1 MiB buffers, as the guest's."""

    def __init__(self, path: pathlib.Path, capacity: int):
        self.capacity = capacity
        # mmap, not bytearray: a bytearray's data is 16 bytes past a page boundary, and the
        # kernel's copy into a misaligned buffer is about twice as slow here (README).
        self.rbuf, self.wbuf = mmap.mmap(-1, MiB), mmap.mmap(-1, MiB)
        self.wbuf[:] = write_pattern()
        self.rbuf[:] = self.wbuf                                # touch every page now
        self.offsets = random_offsets(capacity, phase_bytes(PHASES[-1], capacity) // RAND_SIZE)
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)
        self.rbuf.close()
        self.wbuf.close()

    def run(self) -> dict:
        ns, nbytes = {}, {}
        for ph in PHASES:
            n = phase_bytes(ph, self.capacity)
            if ph.kind == "rand-read":
                ns[ph.metric] = self._io(False, RAND_SIZE, self.offsets)
            else:
                ns[ph.metric] = self._io(ph.kind == "seq-write", ph.size, range(0, n, ph.size))
            nbytes[ph.metric] = n
        return {"ns": ns, "bytes": nbytes}

    def _io(self, write: bool, size: int, offsets) -> int:
        with memoryview(self.wbuf if write else self.rbuf) as mv, mv[:size] as view:
            bufs, op, fd = [view], (os.pwritev if write else os.preadv), self.fd
            t0 = time.perf_counter_ns()
            for off in offsets:
                if op(fd, bufs, off) != size:
                    raise BenchError(f"host: short {'write' if write else 'read'} at offset {off}")
            if write:
                os.fdatasync(fd)                    # the guest flushes at the end of a write phase
            t1 = time.perf_counter_ns()
        return t1 - t0


# --- the guest -----------------------------------------------------------------------
class Marks:
    """The benchmark marker port: timestamps each value the guest writes."""

    def __init__(self):
        self.marks: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.marks.append((time.perf_counter_ns(), value))

    def spans(self) -> dict[int, int]:
        """Phase number -> ns between its start and end marks; BenchError if they are out of order."""
        want = [v for ph in PHASES for v in (ph.number, ph.number | PHASE_END)]
        got = [v for _, v in self.marks]
        if got != want:
            raise BenchError(f"the guest's phase marks were {[hex(v) for v in got]}, expected "
                             f"{[hex(v) for v in want]}")
        t = [ns for ns, _ in self.marks]
        return {ph.number: t[2 * i + 1] - t[2 * i] for i, ph in enumerate(PHASES)}


_PHASE_LINE = re.compile(rb"blk-bench: phase (\d+) (seq-read|seq-write|rand-read) (\d+)K: (\d+) bytes\n")


def check_output(out: bytes, capacity: int) -> None:
    """The guest's own report agrees with what the host computed for every phase."""
    if f"blk-bench: {capacity} sectors".encode() not in out:
        raise BenchError(f"the guest did not see a {capacity}-sector disk:\n{out.decode(errors='replace')}")
    got = [(int(n), k.decode(), int(s) * KiB, int(b)) for n, k, s, b in _PHASE_LINE.findall(out)]
    want = [(ph.number, ph.kind, ph.size, phase_bytes(ph, capacity)) for ph in PHASES]
    if got != want:
        raise BenchError(f"the guest reported phases {got}, expected {want}")


def run_guest(image: pathlib.Path, disk: pathlib.Path, capacity: int, native: bool, virtio: str = "mmio") -> dict:
    """One fresh Machine runs blk-bench on ``disk`` behind ``virtio`` (mmio or pci); returns ns
    and bytes per phase, and exit counts."""
    import kvmpy
    from kvmpy.x86 import layout
    guest = kvmpy.images.guests.get(GUEST)
    variant = "native" if native else "python"
    marks = Marks()
    with kvmpy.Machine(disks=[str(disk)], native=native, virtio_transport=virtio) as m:
        m.pio.attach(layout.BENCH_MARK_PORT, 4, marks, "bench-mark")
        m.load(image, user=guest.user)
        t0 = time.perf_counter_ns()
        result = m.run(timeout=RUN_TIMEOUT_S)
        wall = time.perf_counter_ns() - t0
        out, stats = m.serial_output, m.stats
    if result.reason != "exit" or result.status != guest.disk_status:
        raise BenchError(f"{variant}: the guest stopped with {result.reason!r} (status {result.status}, "
                         f"expected {guest.disk_status}):\n{out.decode(errors='replace')}")
    check_output(out, capacity)
    spans = marks.spans()
    return {"ns": {ph.metric: spans[ph.number] for ph in PHASES},
            "bytes": {ph.metric: phase_bytes(ph, capacity) for ph in PHASES},
            "exits": sum(stats.exits.values()), "mmio_writes": stats.exits["mmio-write"],
            "wall_ns": wall, "kvm_ns": stats.kvm_ns, "vmm_ns": stats.vmm_ns}


# --- the run -------------------------------------------------------------------------
def measure(args, progress) -> dict:
    if args.limits:
        from . import blk_limits
        return blk_limits.measure(sys.modules[__name__], args, progress)
    image = _common.guest_image(GUEST)
    from kvmpy.kvm import Kvm
    Kvm().close()                                   # KvmUnavailable (exit 2) before anything long
    capacity = args.disk_size // SECTOR
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-", dir=args.dir) as tmp:
        disk = pathlib.Path(tmp) / "disk.img"
        progress(f"writing a {args.disk_size}-byte disk in {tmp}")
        make_disk(disk, args.disk_size)
        host = Host(disk, capacity)
        try:
            run = {"host": host.run,
                   "native": lambda: run_guest(image, disk, capacity, native=True, virtio=args.virtio),
                   "python": lambda: run_guest(image, disk, capacity, native=False, virtio=args.virtio)}
            for r in range(args.rounds):
                for v in _common.rotate(VARIANTS, r):
                    progress(f"round {r + 1}/{args.rounds}: {v}")
                    samples[v].append(run[v]())
        finally:
            host.close()
    return _result(args, image, capacity, samples)


def _mbps(s: dict, metric: str) -> float:
    return s["bytes"][metric] * 1e3 / s["ns"][metric]          # bytes/ns * 1e9 / 1e6


def _profile(med_ns: dict, capacity: int) -> dict:
    """Per-request time of each phase and, over the sequential reads, a fit us = fixed + per_MiB * MiB."""
    out = {}
    for v, ns in med_ns.items():
        per_req = {ph.metric: ns[ph.metric] / 1e3 / (phase_bytes(ph, capacity) // ph.size) for ph in PHASES}
        reads = [ph for ph in PHASES if ph.kind == "seq-read"]
        fit = statistics.linear_regression([ph.size / MiB for ph in reads], [per_req[ph.metric] for ph in reads])
        out[v] = {"us_per_request": {k: round(x, 2) for k, x in per_req.items()},
                  "seq_read_fit": {"fixed_us": round(fit.intercept, 2), "us_per_MiB": round(fit.slope, 2)}}
    host, native = out["host"]["us_per_request"], out["native"]["us_per_request"]
    out["headline"] = {
        "native_us_per_1M_read": native[HEADLINE], "host_us_per_1M_read": host[HEADLINE],
        "native_minus_host_us": round(native[HEADLINE] - host[HEADLINE], 2),
        "native_minus_host_us_4K_read": round(native["seq-read-4K"] - host["seq-read-4K"], 2)}
    return out


def _result(args, image, capacity, samples) -> dict:
    metrics = [ph.metric for ph in PHASES]
    mbps = {v: {m: [_mbps(s, m) for s in samples[v]] for m in metrics} for v in VARIANTS}
    med = {v: {m: statistics.median(mbps[v][m]) for m in metrics} for v in VARIANTS}
    med_ns = {v: {ph.metric: phase_bytes(ph, capacity) * 1e3 / med[v][ph.metric] for ph in PHASES}
              for v in VARIANTS}
    ratios = {f"{a}/{b}": round(med[a][HEADLINE] / med[b][HEADLINE], 3)
              for a, b in (("native", "host"), ("python", "host"), ("native", "python"))}
    for m in metrics:
        for a, b in (("native", "host"), ("python", "host"), ("native", "python")):
            ratios[f"{a}/{b} {m}"] = round(med[a][m] / med[b][m], 3)
    guest_runs = {v: {**{k: statistics.median(s[k] for s in samples[v]) for k in ("exits", "mmio_writes")},
                      **{f"{k[:-3]}_ms": round(statistics.median(s[k] for s in samples[v]) / 1e6, 1)
                         for k in ("wall_ns", "kvm_ns", "vmm_ns")}}
                  for v in ("native", "python")}
    return {
        "benchmark": NAME,
        "host": _common.host_info(),
        "params": {"disk_size": args.disk_size, "capacity_sectors": capacity, "rounds": args.rounds,
                   "virtio": args.virtio,
                   "dir": str(args.dir or tempfile.gettempdir()), "guest": GUEST, "image": str(image),
                   "phase_bytes": {ph.metric: phase_bytes(ph, capacity) for ph in PHASES},
                   "cache": "page cache: the disk is written once and never dropped",
                   "host_buffers": "page-aligned (mmap), 1 MiB", "order": "rotating per round",
                   "mb": "10^6 bytes"},
        "results": [{"variant": v, "metric": m, "value": round(med[v][m], 1), "unit": "MB/s"}
                    for v in VARIANTS for m in metrics],
        "ratios": ratios,
        "targets": {k: {"at_least": x} for k, x in TARGETS.items()},
        "summary": {v: {m: {k: round(x, 1) for k, x in _common.summarize(mbps[v][m]).items()} for m in metrics}
                    for v in VARIANTS},
        "samples": {v: {m: [round(x, 1) for x in mbps[v][m]] for m in metrics} for v in VARIANTS},
        "guest_runs": guest_runs,       # medians per guest run: exits, and where its time went
        "profile": _profile(med_ns, capacity),
    }


def table(result: dict) -> str:
    if result.get("mode") == "limits":
        from . import blk_limits
        return blk_limits.table(result)
    p, r = result["params"], result["ratios"]
    val = {(x["variant"], x["metric"]): x["value"] for x in result["results"]}
    rows = []
    for ph in PHASES:
        m = ph.metric
        rows.append([f"{ph.number:>2} {ph.kind}", label(ph.size), *(f"{val[v, m]:.0f}" for v in VARIANTS),
                     f"{r[f'native/host {m}']:.3f}", f"{r[f'python/host {m}']:.3f}"])
    prof = result["profile"]
    lines = [f"virtio-blk (virtio-{p.get('virtio', 'mmio')}) I/O, guest {p['guest']}: {p['rounds']} rounds, "
             f"{p['disk_size']}-byte disk in "
             f"{p['dir']} (page cache), {p['phase_bytes'][HEADLINE]} bytes per phase",
             _common.host_line(result["host"]),
             _common.format_table(["phase", "size", "host MB/s", "native MB/s", "python MB/s",
                                   "native/host", "python/host"], rows)]
    for v in VARIANTS:
        f = prof[v]["seq_read_fit"]
        lines.append(f"{v:>6} sequential reads: {prof[v]['us_per_request']['seq-read-4K']:.1f} us per 4K request, "
                     f"{prof[v]['us_per_request'][HEADLINE]:.1f} us per 1M request "
                     f"(fit: {f['fixed_us']:.1f} us + {f['us_per_MiB']:.1f} us/MiB)")
    h = prof["headline"]
    lines.append(f"1 MiB read: native {h['native_us_per_1M_read']:.1f} us = host preadv "
                 f"{h['host_us_per_1M_read']:.1f} us + {h['native_minus_host_us']:.1f} us "
                 f"(at 4K the guest pays {h['native_minus_host_us_4K_read']:.1f} us more per request than the host)")
    lines.append(f"native/python = {r['native/python']:.3f} ({HEADLINE})")
    for k, limit in TARGETS.items():
        got = r[k]
        lines.append(f"{k} = {got:.3f} for 1 MiB sequential reads "
                     f"(target >= {limit}: {'met' if got >= limit else 'NOT met'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str | None = None, results: pathlib.Path | None = None) -> int:
    """``kvmpy bench NAME [argv]``; ``results`` is where the JSON goes without --out."""
    return _common.run_main(sys.modules[__name__], argv, prog, results)
