"""snapshot: save, restore, clone and live-migrate a guest, against booting it fresh, same size, same run.

For each RAM size (--sizes, default 64M,256M,1G) one source machine is prepared:
the bundled ``counter`` guest (guests/counter.c) at CPL 3 (``user=True``: ring-0
code is emulated on hosts without hardware virtualisation) with
``pages=--pages`` (default 2048: an 8 MiB array it rewrites every 8 iterations,
from 2 MiB up), plus --data bytes (default 16 MiB) of non-zero pseudo-random
data the host writes into guest RAM above the array, so the RAM files are not
all holes. The guest runs until it has printed --warm ``count`` lines, then is
paused. Measured, each a median over --rounds (fresh machines every time):

  fresh-boot    reference: Machine(mem_size=SIZE), load the counter guest and run
                it to its first serial line (Machine construction included)
  snapshot      Machine.snapshot(dir) of the paused source: time, and the files'
                allocated size on disk (st_blocks, not the apparent size)
  restore       Machine.restore(dir, verify=True) and (verify=False) until it
                returns a machine ready to run
  restore+line  Machine.restore(verify=False), start(), until the guest prints
                its next line (it touches --pages pages of the mapped snapshot)
  clones        --clones machines restored (verify=False) from one snapshot: VMs
                per second; then each runs until it has printed two lines (one whole
                iteration: --pages/8 pages written) and stays paused;
                Private_Dirty of this process (/proc/self/smaps_rollup) before
                and after, against clones x RAM size (copy-on-write sharing)
  migration     --migrations (default 3) times in a chain, each target the next
                source: kvmpy.lifecycle.migration.send of the running source to receive() in a
                thread of this process over loopback TCP, the guest dirtying its
                array all along: total time, downtime (pause to target running),
                rounds, pages and MiB sent; the target must print a further line

Serial output is collected in memory; to see a line as soon as the native UART
has it the benchmark drains the UART every 0.2 ms while it waits (the run
loop's own flusher runs every 20 ms). Two untimed fresh boots warm the process
up first. Ratios ``KEY/fresh_boot SIZE`` are over the fresh-boot reference of
the same size; ``KEY LARGEST/SMALLEST`` (e.g. ``restore 1G/64M``) show how a cost
grows with the RAM size. Every Machine is closed; the JSON records the open file
descriptors before and after (``fds_leaked``).
"""
from __future__ import annotations

import os
import pathlib
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time

from ..kvm.memory import PAGE_SIZE as PAGE
from . import _common
from ._common import BenchError

NAME = "snapshot"
DESCRIPTION = "snapshot/restore/clone/live-migration times vs a fresh boot, 64 MiB to 1 GiB of RAM"
GUEST = "counter"
MiB, GiB = 1 << 20, 1 << 30
ARRAY_BASE = 0x200000           # counter.c's ARRAY_BASE
LINE_TIMEOUT_S = 30.0           # waiting this long for one serial line means the guest is stuck
POLL_S = 0.0002


def _sizes(text: str) -> list[int]:
    out = [_common.integer(t, 16 * MiB) for t in text.split(",") if t.strip()]
    if not out:
        raise ValueError("no sizes")
    return out


def add_arguments(p) -> None:
    p.add_argument("--sizes", type=_sizes, default=None, metavar="LIST",
                   help="RAM sizes, comma-separated (default 64M,256M,1G; --quick: 64M)")
    p.add_argument("--rounds", type=_common.positive, default=None, metavar="R",
                   help="rounds of each timing (default 5; --quick: 2)")
    p.add_argument("--clones", type=_common.positive, default=None, metavar="N",
                   help="clones restored from one snapshot (default 20; --quick: 4)")
    p.add_argument("--migrations", type=_common.positive, default=None, metavar="M",
                   help="live migrations per size, in a chain (default 3; --quick: 1)")
    p.add_argument("--pages", type=_common.positive, default=2048, metavar="P",
                   help="the counter guest's array in 4 KiB pages (default 2048 = 8 MiB)")
    p.add_argument("--data", type=_common.nonnegative, default=16 * MiB, metavar="BYTES",
                   help="non-zero bytes the host writes into guest RAM (default 16M)")
    p.add_argument("--warm", type=_common.positive, default=30, metavar="LINES",
                   help="count lines the source prints before it is paused (default 30)")
    p.add_argument("--dir", type=pathlib.Path, default=None,
                   help="where the snapshots go (a temporary directory under it; default $TMPDIR)")
    p.add_argument("--quick", action="store_true",
                   help="64 MiB only, 2 rounds, 4 clones (a smoke test)")


# --- serial output and waiting for lines ------------------------------------------------
class Lines:
    """A machine's serial= stream: keeps the bytes and counts newlines."""

    def __init__(self):
        self.buf = bytearray()
        self.count = 0

    def write(self, data) -> int:
        self.buf += data
        self.count += bytes(data).count(b"\n")
        return len(data)

    def flush(self) -> None:
        pass

    def last_line(self) -> str:
        """The last complete line: a running guest may be in the middle of the next one."""
        end = self.buf.rfind(b"\n")
        return "" if end < 0 else self.buf[:end].rsplit(b"\n", 1)[-1].decode(errors="replace")


def wait_lines(m, out: Lines, n: int, timeout: float = LINE_TIMEOUT_S) -> None:
    """Until ``out`` has ``n`` lines; drains the native UART as it polls. BenchError if the
    run ends or nothing comes within ``timeout``."""
    deadline = time.perf_counter() + timeout
    while out.count < n:
        if m.native:
            m.console.drain()
        if not m.running:
            m.console.drain()
            if out.count >= n:
                return
            raise BenchError(f"the guest stopped before line {n}: {out.last_line()!r}")
        if time.perf_counter() > deadline:
            raise BenchError(f"no line {n} from the guest within {timeout} s: {out.last_line()!r}")
        time.sleep(POLL_S)


def stop(m) -> None:
    """End a machine's background run (if any) and close it."""
    try:
        if m.running:
            m.request_stop("benchmark")
            try:
                m.wait(LINE_TIMEOUT_S)
            except Exception:       # noqa: BLE001 - a stopped run's error is not what we measure
                pass
    finally:
        m.close()


# --- host facts -----------------------------------------------------------------------
def private_dirty() -> int:
    """This process's Private_Dirty in bytes (/proc/self/smaps_rollup)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Private_Dirty:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise BenchError("cannot read Private_Dirty from /proc/self/smaps_rollup (needs Linux >= 4.14)")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def allocated(path: pathlib.Path) -> tuple[int, int]:
    """(bytes allocated on disk, apparent bytes) of the files in a snapshot directory."""
    blocks = apparent = 0
    for f in path.iterdir():
        st = f.stat()
        blocks += st.st_blocks * 512
        apparent += st.st_size
    return blocks, apparent


def label(size: int) -> str:
    return f"{size // GiB}G" if size % GiB == 0 else f"{size // MiB}M"


# --- one size ---------------------------------------------------------------------------
class Sizer:
    """Every measurement of one RAM size."""

    def __init__(self, args, image, size: int, tmp: pathlib.Path, progress):
        self.args, self.image, self.size, self.tmp = args, image, size, tmp
        self.progress = lambda text: progress(f"{label(size)}: {text}")
        self.cmdline = f"n=1000000000 pages={args.pages}"
        array_end = ARRAY_BASE + args.pages * PAGE
        self.data_gpa = -(-array_end // MiB) * MiB + MiB
        if self.data_gpa + args.data > size:
            raise BenchError(f"{label(size)} of RAM cannot hold the {args.pages}-page array and "
                             f"--data {args.data}: use a larger size or less data")

    def machine(self, out: Lines):
        from kvmpy import Machine
        m = Machine(mem_size=self.size, serial=out)
        try:
            m.load(self.image, "elf", mode="long", user=True, cmdline=self.cmdline)
        except BaseException:
            m.close()
            raise
        return m

    def fresh_boot(self) -> float:
        out = Lines()
        t0 = time.perf_counter()
        m = self.machine(out)
        try:
            m.start()
            wait_lines(m, out, 1)
            return time.perf_counter() - t0
        finally:
            stop(m)

    def source(self, out: Lines):
        """The prepared machine: data written, counter run --warm lines, paused."""
        m = self.machine(out)
        try:
            data = random.Random(self.size).randbytes(self.args.data)
            m.memory.write(self.data_gpa, data)
            m.start()
            wait_lines(m, out, 2 + self.args.warm)     # the two header lines, then count lines
            m.pause()
        except BaseException:
            stop(m)
            raise
        return m

    def restore(self, snap, verify: bool) -> float:
        from kvmpy import Machine
        t0 = time.perf_counter()
        m = Machine.restore(snap, verify=verify, serial=Lines())
        t = time.perf_counter() - t0
        m.close()
        return t

    def restore_to_line(self, snap) -> float:
        from kvmpy import Machine
        out = Lines()
        t0 = time.perf_counter()
        m = Machine.restore(snap, verify=False, serial=out)
        try:
            m.start()
            wait_lines(m, out, 1)
            t = time.perf_counter() - t0
        finally:
            stop(m)
        if not out.last_line().strip():
            raise BenchError(f"the restored guest printed an empty line: {bytes(out.buf)!r}")
        return t

    def clones(self, snap) -> dict:
        from kvmpy import Machine
        n = self.args.clones
        clones, outs = [], [Lines() for _ in range(n)]
        before = private_dirty()
        try:
            t0 = time.perf_counter()
            for out in outs:
                clones.append(Machine.restore(snap, verify=False, serial=out))
            t = time.perf_counter() - t0
            restored = private_dirty()
            for m, out in zip(clones, outs):
                m.start()
                wait_lines(m, out, 2)                   # so at least one whole iteration
                m.pause()
            ran = private_dirty()
        finally:
            for m in clones:
                stop(m)
        return {"count": n, "seconds": t, "per_s": n / t, "private_dirty_restored": restored - before,
                "private_dirty_ran": ran - before, "ram_total": n * self.size}

    def migrate(self, m, out: Lines):
        """Migrate running ``m`` to a receive() in a thread; returns (report dict, the target
        machine, running, and its Lines) once the target has printed a whole line."""
        from kvmpy import migration
        box: dict = {}
        ready = threading.Event()
        tout = Lines()

        def target():
            try:
                box["m"], box["pages"] = migration.receive(
                    ("127.0.0.1", 0), timeout=LINE_TIMEOUT_S,
                    on_listen=lambda addr: (box.__setitem__("addr", addr), ready.set()), serial=tout)
            except BaseException as e:      # noqa: BLE001 - reported below
                box["error"] = e
                ready.set()

        t = threading.Thread(target=target, daemon=True, name="migration-target")
        t.start()
        ready.wait(LINE_TIMEOUT_S)
        if "addr" not in box:
            t.join(LINE_TIMEOUT_S)
            raise BenchError(f"the migration target did not listen: {box.get('error')}")
        try:
            wait_lines(m, out, out.count + 2)       # dirtying its array
            report = migration.send(m, *box["addr"])
        finally:
            t.join(LINE_TIMEOUT_S)
        if "error" in box:
            raise BenchError(f"migration target: {box['error']}")
        tm = box["m"]
        try:
            wait_lines(tm, tout, 2)                 # goes on there (the first may end a line begun here)
            result = m.wait(LINE_TIMEOUT_S)
            if result.reason != "migrated":
                raise BenchError(f"the source run ended with {result.reason!r}, not 'migrated'")
        except BaseException:
            stop(tm)
            raise
        r = report.as_dict()
        r.update(received_pages=box["pages"], target_line=tout.last_line(), mib=report.bytes / MiB)
        return r, tm, tout

    def migrations(self, m, out: Lines) -> list:
        """--migrations migrations in a chain (each target is the next source); closes them all."""
        reports = []
        try:
            m.resume()
            for i in range(self.args.migrations):
                self.progress(f"live migration {i + 1}/{self.args.migrations}")
                r, tm, tout = self.migrate(m, out)
                stop(m)
                m, out = tm, tout
                reports.append(r)
        finally:
            stop(m)
        return reports

    def measure(self) -> dict:
        rounds = self.args.rounds
        res: dict = {"fresh_boot": [], "snapshot": [], "restore_verify": [], "restore": [],
                     "restore_to_line": []}
        out = Lines()
        self.progress("preparing the source (counter guest + host data)")
        src = self.source(out)
        try:
            snaps = []
            for r in range(rounds):
                self.progress(f"round {r + 1}/{rounds}: fresh boot, snapshot, restores")
                res["fresh_boot"].append(self.fresh_boot())
                snap = self.tmp / f"{label(self.size)}-{r}"
                t0 = time.perf_counter()
                src.snapshot(snap)
                res["snapshot"].append(time.perf_counter() - t0)
                snaps.append(snap)
                res["restore_verify"].append(self.restore(snap, True))
                res["restore"].append(self.restore(snap, False))
                res["restore_to_line"].append(self.restore_to_line(snap))
            disk, apparent = allocated(snaps[0])
            self.progress(f"{self.args.clones} clones")
            clones = self.clones(snaps[0])
            for s in snaps:
                shutil.rmtree(s)
            mig = self.migrations(src, out)
        finally:
            stop(src)
        return {"samples": res, "snapshot_disk": disk, "snapshot_apparent": apparent,
                "source_line": out.last_line(), "clones": clones, "migration": mig}


# --- the benchmark ------------------------------------------------------------------------
METRICS = (  # key, table label, unit
    ("fresh_boot", "fresh boot to 1st line", "ms"),
    ("snapshot", "snapshot (paused)", "ms"),
    ("restore_verify", "restore verify=True", "ms"),
    ("restore", "restore verify=False", "ms"),
    ("restore_to_line", "restore + next line", "ms"),
    ("clone", "clone (per VM)", "ms"),
    ("migration_total", "migration total", "ms"),
    ("migration_downtime", "migration downtime", "ms"),
)


def measure(args, progress) -> dict:
    if args.quick:
        args.sizes = args.sizes or [64 * MiB]
        args.rounds = args.rounds or 2
        args.clones = args.clones or 4
        args.migrations = args.migrations or 1
    args.sizes = args.sizes or [64 * MiB, 256 * MiB, GiB]
    args.rounds = args.rounds or 5
    args.clones = args.clones or 20
    args.migrations = args.migrations or 3
    image = _common.guest_image(GUEST)
    from kvmpy.kvm import Kvm
    Kvm().close()                                   # KvmUnavailable (exit 2) before anything long
    fds = open_fds()
    t0 = time.perf_counter()
    per_size = {}
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-snapshot-", dir=args.dir) as tmp:
        progress("warm-up: two fresh boots (untimed)")
        for _ in range(2):              # the first machines of a process cost more (imports, caches)
            Sizer(args, image, args.sizes[0], pathlib.Path(tmp), progress).fresh_boot()
        for size in args.sizes:
            per_size[label(size)] = Sizer(args, image, size, pathlib.Path(tmp), progress).measure()
    fds_after = open_fds()
    return _result(args, image, per_size, fds, fds_after, time.perf_counter() - t0)


def _result(args, image, per_size: dict, fds: int, fds_after: int, seconds: float) -> dict:
    results, ratios, medians = [], {}, {}
    for size, d in per_size.items():
        med = {k: statistics.median(v) * 1e3 for k, v in d["samples"].items()}
        c, migs = d["clones"], d["migration"]
        med["clone"] = c["seconds"] / c["count"] * 1e3
        med["migration_total"] = statistics.median(x["total_s"] for x in migs) * 1e3
        med["migration_downtime"] = statistics.median(x["downtime_s"] for x in migs) * 1e3
        mig = {k: statistics.median(x[k] for x in migs) for k in ("rounds", "pages", "mib")}
        medians[size] = med
        for key, _, unit in METRICS:
            results.append({"variant": size, "metric": key, "value": round(med[key], 3), "unit": unit})
        results += [
            {"variant": size, "metric": "snapshot_disk", "value": round(d["snapshot_disk"] / MiB, 2), "unit": "MiB"},
            {"variant": size, "metric": "clone_rate", "value": round(c["per_s"], 1), "unit": "VMs/s"},
            {"variant": size, "metric": "migration_rounds", "value": mig["rounds"], "unit": "rounds"},
            {"variant": size, "metric": "migration_pages", "value": mig["pages"], "unit": "pages"},
            {"variant": size, "metric": "migration_sent", "value": round(mig["mib"], 2), "unit": "MiB"}]
        for key, _, _ in METRICS[1:]:
            ratios[f"{key}/fresh_boot {size}"] = round(med[key] / med["fresh_boot"], 3)
    first, last = list(per_size)[0], list(per_size)[-1]
    if first != last:                   # how each cost scales with the RAM size
        for key in ("restore", "restore_verify", "snapshot", "fresh_boot"):
            ratios[f"{key} {last}/{first}"] = round(medians[last][key] / medians[first][key], 3)
    return {
        "benchmark": NAME,
        "host": _common.host_info(),
        "params": {"sizes": args.sizes, "rounds": args.rounds, "clones": args.clones, "guest": GUEST,
                   "image": str(image), "pages": args.pages, "data": args.data, "warm": args.warm,
                   "quick": args.quick, "migrations": args.migrations, "dir": str(args.dir or tempfile.gettempdir()),
                   "workload": f"counter guest at CPL 3, pages={args.pages} ({args.pages * PAGE // MiB} MiB "
                               f"array, every page rewritten each 8 iterations), run to {args.warm} count "
                               f"lines; {args.data // MiB} MiB of non-zero random data written by the host"},
        "results": results,
        "ratios": ratios,
        "samples": {s: {k: [round(x * 1e3, 3) for x in v] for k, v in d["samples"].items()}
                    for s, d in per_size.items()},
        "snapshot_disk": {s: {"allocated": d["snapshot_disk"], "apparent": d["snapshot_apparent"]}
                          for s, d in per_size.items()},
        "clones": {s: d["clones"] for s, d in per_size.items()},
        "migration": {s: d["migration"] for s, d in per_size.items()},
        "fds_before": fds, "fds_after": fds_after, "fds_leaked": fds_after - fds,
        "seconds": round(seconds, 1),
    }


def _ms(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def table(result: dict) -> str:
    p, r = result["params"], result["ratios"]
    sizes = list(result["clones"])
    val = {(x["variant"], x["metric"]): x["value"] for x in result["results"]}
    rows = []
    for key, name, _ in METRICS:
        cells = []
        for s in sizes:
            ratio = "" if key == "fresh_boot" else f" ({r[f'{key}/fresh_boot {s}']:.2f}x)"
            cells.append(f"{_ms(val[s, key])} ms{ratio}")
        rows.append([name, *cells])
    rows.append(["snapshot on disk", *(f"{val[s, 'snapshot_disk']:.1f} MiB" for s in sizes)])
    rows.append([f"clone rate ({p['clones']} clones)", *(f"{val[s, 'clone_rate']:.0f} VMs/s" for s in sizes)])
    for what, key in (("restored", "private_dirty_restored"), ("ran 2 lines", "private_dirty_ran")):
        rows.append([f"clones' Private_Dirty, {what}",
                     *(f"{c[key] / MiB:.1f} MiB ({100 * c[key] / c['ram_total']:.1f}%)"
                       for c in result["clones"].values())])
    rows.append(["migration rounds", *(f"{val[s, 'migration_rounds']:g}" for s in sizes)])
    rows.append(["migration pages sent", *(f"{val[s, 'migration_pages']:.0f}" for s in sizes)])
    rows.append(["migration MiB sent", *(f"{val[s, 'migration_sent']:.1f}" for s in sizes)])
    first, last = sizes[0], sizes[-1]
    lines = [f"snapshots, restores, clones, live migration: {p['rounds']} rounds (medians), ratios over a "
             "fresh boot of the same size",
             f"workload: {p['workload']}",
             _common.host_line(result["host"]),
             _common.format_table(["", *(f"{s}iB RAM" for s in sizes)], rows),
             f"migration: medians of {p['migrations']} (a chain: each target is the next source); "
             "(x): over the fresh boot; clones' Private_Dirty: growth of this process's private dirty "
             "memory, and its share of clones x RAM size"]
    if first != last:
        lines.append(f"{last} over {first}: restore verify=False {r[f'restore {last}/{first}']:.2f}x, "
                     f"verify=True {r[f'restore_verify {last}/{first}']:.2f}x, "
                     f"snapshot {r[f'snapshot {last}/{first}']:.2f}x, fresh boot {r[f'fresh_boot {last}/{first}']:.2f}x")
    lines.append(f"file descriptors leaked: {result['fds_leaked']}; run time {result['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str | None = None, results: pathlib.Path | None = None) -> int:
    """``kvmpy bench NAME [argv]``; ``results`` is where the JSON goes without --out."""
    return _common.run_main(sys.modules[__name__], argv, prog, results)
