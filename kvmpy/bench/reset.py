"""reset: Machine.reset() to an in-memory checkpoint, against Machine.restore() and a fresh boot.

The bundled ``reset-case`` guest (guests/reset-case.c) runs at CPL 3 (``user=True``:
ring-0 code is emulated on hosts without hardware virtualisation) with one virtio-blk
disk (a 1 MiB scratch file: its overlay is part of every reset). It stops at its ready
point, where the machine is snapshotted (for the restore reference) and checkpointed.
Then, for each dirty-page count (--pages, default 1,16,64,1024, and ``all``), --cases
times: the host writes the case into the guest's mailbox, the guest dirties that many
pages of its array (stride 7) and exits, and the machine is reset; ``all`` has the host
write every page of RAM instead (the guest is not run: the VMM's dirty bitmap has every
page). Measured, over the cases of each count:

  reset         the wall time of one ``Machine.reset()`` call: median and p99 (every
                other case; the others measure the split)
  split         where one reset's time goes (medians): pages (KVM's dirty log and the
                copy), vcpu (every vCPU's KVM_SET_* calls), irqchip (PIC/IOAPIC/PIT and
                the clock), devices (each slot's load_state), disks (the overlay's
                written blocks); with --ops also each vCPU ioctl on its own
  copied        the pages the reset copied back (the case's, plus the guest's stack
                and the mailbox page the host wrote)

Three modes, each on its own machine: ``get`` (KVM_GET_DIRTY_LOG, which re-protects the
pages it returns; regs, sregs and events through the kvm_run page with KVM_CAP_SYNC_REGS
and one KVM_RUN that does not enter the guest), ``clear`` (the same with
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG, then KVM_CLEAR_DIRTY_LOG of just those
pages) and ``ioctls`` (``get`` with KVM_SET_REGS, KVM_SET_SREGS and KVM_SET_VCPU_EVENTS
instead of the kvm_run page). References in the same run: ``restore`` (``Machine.restore(verify=False)``
of the snapshot of the ready point, --restores times) and ``fresh boot`` (Machine(),
load, run to the ready point, --boots times); ratios are over the 16-page reset.
The issue's target (issue 14): a median of at most 50 us for 16 dirty pages at CPL 3.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import statistics
import struct
import sys
import tempfile
import time

from . import _common
from ._common import BenchError

NAME = "reset"
DESCRIPTION = "Machine.reset() (in place) for 1..1024 dirty pages and all RAM vs restore() and a fresh boot"
GUEST = "reset-case"
MiB = 1 << 20
MAILBOX = 0x300000
READY, DONE = (0x52 << 1) | 1, (0x44 << 1) | 1
NO_SECTOR = (1 << 64) - 1
PARTS = ("pages", "vcpu", "irqchip", "devices", "disks")
MODES = ("get", "clear", "ioctls")
TARGET_US = 50.0


def _counts(text: str) -> list:
    out = []
    for t in (t.strip() for t in text.split(",") if t.strip()):
        out.append("all" if t == "all" else _common.positive(t))
    if not out:
        raise ValueError("no page counts")
    return out


def add_arguments(p) -> None:
    p.add_argument("--pages", type=_counts, default=[1, 16, 64, 1024, "all"], metavar="LIST",
                   help="dirty-page counts, comma-separated; 'all' = every page of RAM (default 1,16,64,1024,all)")
    p.add_argument("--cases", type=_common.positive, default=None, metavar="N",
                   help="cases (resets) per count (default 400, 'all' a tenth; --quick: 20)")
    p.add_argument("--mem", type=lambda t: _common.integer(t, 16 * MiB), default=64 * MiB, metavar="BYTES",
                   help="guest RAM (default 64M)")
    p.add_argument("--restores", type=_common.positive, default=None, metavar="R",
                   help="Machine.restore() timings (default 10; --quick: 2)")
    p.add_argument("--boots", type=_common.positive, default=None, metavar="B",
                   help="fresh-boot timings (default 10; --quick: 2)")
    p.add_argument("--modes", type=lambda t: [m for m in t.split(",") if m], default=list(MODES), metavar="LIST",
                   help="modes to measure: get, clear, ioctls (default all three)")
    p.add_argument("--quick", action="store_true", help="20 cases per count, 2 restores and boots (a smoke test)")


# --- one machine at the ready point -------------------------------------------------------
def _ready_machine(image, mem: int, disk: str):
    from ..vmm.machine import Machine
    m = Machine(mem_size=mem, disks=[disk])
    try:
        m.load(image, user=True)
        r = m.run(timeout=30)
        if (r.reason, r.status) != ("exit", READY):
            raise BenchError(f"{GUEST} did not reach its ready point: {r.reason} {r.status}: "
                             f"{m.serial_output[-200:]!r}")
    except BaseException:
        m.close()
        raise
    return m


def _case(m, pages: int) -> None:
    m.memory.write(MAILBOX, struct.pack("<8Q", pages, 0, 7, len(m.serial_output), 0, NO_SECTOR, 0, 0))
    r = m.run(timeout=30)
    if (r.reason, r.status) != ("exit", DONE):
        raise BenchError(f"a {pages}-page case ended with {r.reason} {r.status}")


def _dirty_all(m, stamp: int) -> None:
    for reg in m.memory.regions:
        m.memory.write(reg.gpa, bytes([stamp & 0xFF or 1]) * reg.size)


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


def _measure_count(m, count, cases: int) -> dict:
    walls, copied, split = [], [], {k: [] for k in PARTS}
    for i in range(cases):
        if count == "all":
            _dirty_all(m, i + 1)
        else:
            _case(m, count)
        if i % 2 == 0:
            t0 = time.perf_counter_ns()
            n = m.reset()
            walls.append((time.perf_counter_ns() - t0) / 1000)
            copied.append(n)
        else:
            times: dict = {}
            m.reset(times)
            for k in PARTS:
                split[k].append(times[k] / 1000)
    return {"median_us": statistics.median(walls), "p99_us": _p99(walls), "samples": len(walls),
            "copied": statistics.median(copied), "split_us": {k: statistics.median(v) for k, v in split.items()}}


def _op_split(m, rounds: int = 200) -> dict:
    """Each vCPU ioctl of a reset on its own (median ns -> us), from the machine at its checkpoint."""
    cp = m.reset_point
    per: dict = {}
    for _ in range(rounds):
        for part in ("irqchip", "vcpu", "clock"):
            for name, ns in cp.op_times(part).items():
                per.setdefault(name, []).append(ns / 1000)
    return {k: statistics.median(v) for k, v in per.items()}


def _mode(image, args, disk: str, mode: str, progress) -> dict:
    m = _ready_machine(image, args.mem, disk)
    try:
        m.checkpoint(clear_dirty_log=mode == "clear", sync_regs=None if mode != "ioctls" else False)
        out = {"counts": {}, "ops_us": _op_split(m)}
        for count in args.pages:
            n = max(2, args.cases // 10) if count == "all" else args.cases
            progress(f"{mode}: {count} pages x {n}")
            before = m.reset_point.page_times()
            d = _measure_count(m, count, n)
            after = m.reset_point.page_times()
            timed = max(n // 2, 1)
            d["pages_mean_us"] = {"dirty_log": (after["log_ns"] - before["log_ns"]) / 1000 / timed,
                                  "copy": (after["copy_ns"] - before["copy_ns"]) / 1000 / timed}
            out["counts"][str(count)] = d
        return out
    finally:
        m.close()


def _references(image, args, disk: str, workdir: pathlib.Path, progress) -> dict:
    from ..vmm.machine import Machine
    m = _ready_machine(image, args.mem, disk)
    try:
        m.snapshot(workdir / "snap")
    finally:
        m.close()
    restores, boots = [], []
    Machine.restore(workdir / "snap", verify=False).close()     # warm up (imports)
    for i in range(args.restores):
        progress(f"restore {i + 1}/{args.restores}")
        t0 = time.perf_counter()
        r = Machine.restore(workdir / "snap", verify=False)
        restores.append((time.perf_counter() - t0) * 1e6)
        r.close()
    for i in range(args.boots):
        progress(f"fresh boot {i + 1}/{args.boots}")
        t0 = time.perf_counter()
        b = _ready_machine(image, args.mem, disk)
        boots.append((time.perf_counter() - t0) * 1e6)
        b.close()
    return {"restore_us": statistics.median(restores), "fresh_boot_us": statistics.median(boots)}


def measure(args, progress) -> dict:
    bad = [x for x in args.modes if x not in MODES]
    if bad:
        raise BenchError(f"--modes: unknown {', '.join(bad)} (known: {', '.join(MODES)})")
    args.cases = args.cases or (20 if args.quick else 400)
    args.restores = args.restores or (2 if args.quick else 10)
    args.boots = args.boots or (2 if args.quick else 10)
    image = _common.guest_image(GUEST)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="kvmpy-bench-reset-"))
    try:
        disk = str(workdir / "disk.img")
        with open(disk, "wb") as f:
            f.write(os.urandom(MiB))
        _ready_machine(image, args.mem, disk).close()            # warm up
        modes = {mode: _mode(image, args, disk, mode, progress) for mode in args.modes}
        refs = _references(image, args, disk, workdir, progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _result(args, modes, refs)


def _result(args, modes: dict, refs: dict) -> dict:
    results, ratios = [], {}
    for mode, data in modes.items():
        for count, d in data["counts"].items():
            variant = f"{mode} {count}"
            results += [{"variant": variant, "metric": "reset_median", "value": round(d["median_us"], 2), "unit": "us"},
                        {"variant": variant, "metric": "reset_p99", "value": round(d["p99_us"], 2), "unit": "us"}]
            results += [{"variant": variant, "metric": f"split_{k}", "value": round(v, 2) or 0.01, "unit": "us"}
                        for k, v in d["split_us"].items()]
        if "16" in data["counts"]:
            r16 = data["counts"]["16"]["median_us"]
            ratios[f"restore/reset {mode} 16"] = round(refs["restore_us"] / r16, 1)
            ratios[f"fresh_boot/reset {mode} 16"] = round(refs["fresh_boot_us"] / r16, 1)
    results += [{"variant": "reference", "metric": "restore", "value": round(refs["restore_us"], 1), "unit": "us"},
                {"variant": "reference", "metric": "fresh_boot", "value": round(refs["fresh_boot_us"], 1), "unit": "us"}]
    params = {"pages": [str(c) for c in args.pages], "cases": args.cases, "mem": args.mem, "restores": args.restores,
              "boots": args.boots, "modes": args.modes, "quick": args.quick, "guest": GUEST, "cpl": 3,
              "target_us_16": TARGET_US}
    return {"benchmark": NAME, "host": _common.host_info(), "params": params, "results": results,
            "ratios": ratios, "modes": modes, "references": refs}


def table(result: dict) -> str:
    p, refs = result["params"], result["references"]
    lines = [f"reset in place: {p['guest']} at CPL 3, {p['mem'] // MiB} MiB RAM, one 1 MiB disk; "
             f"{p['cases']} cases per count (medians; p99 of every other case)",
             _common.host_line(result["host"])]
    rows = []
    for mode, data in result["modes"].items():
        for count, d in data["counts"].items():
            s = d["split_us"]
            pm = d["pages_mean_us"]
            rows.append([f"{mode} {count}", f"{d['median_us']:.1f}", f"{d['p99_us']:.1f}", f"{d['copied']:.0f}",
                         *(f"{s[k]:.1f}" for k in PARTS), f"{pm['dirty_log']:.1f} + {pm['copy']:.1f}"])
    lines.append(_common.format_table(["mode, dirty pages", "median us", "p99 us", "copied", *PARTS,
                                       "pages: log + copy (mean)"], rows))
    lines.append(f"references: Machine.restore(verify=False) {refs['restore_us']:.0f} us, "
                 f"fresh boot to the ready point {refs['fresh_boot_us']:.0f} us")
    for key, v in result["ratios"].items():
        lines.append(f"  {key}: {v:g}x")
    for mode, data in result["modes"].items():
        ops = ", ".join(f"{k.removeprefix('KVM_SET_')} {v:.1f}" for k, v in data["ops_us"].items())
        lines.append(f"{mode}: one reset's ioctls on their own (us): {ops}")
        d16 = data["counts"].get("16")
        if d16 is not None:
            verdict = "met" if d16["median_us"] <= TARGET_US else "not met"
            lines.append(f"{mode}: target median <= {TARGET_US:g} us at 16 pages: {verdict} ({d16['median_us']:.1f} us)")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str | None = None, results: pathlib.Path | None = None) -> int:
    """``kvmpy bench reset [argv]``; ``results`` is where the JSON goes without --out."""
    return _common.run_main(sys.modules[__name__], argv, prog, results)
