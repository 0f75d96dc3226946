#!/usr/bin/env python3
"""A pytest test on kvmpy's plugin fixture vs the same test booting a fresh machine (docs/pytest.md).

Writes a throwaway project with N tests of each kind and runs pytest on it in a child process
twice: "grouped" (the plugin's tests in a row, then the fresh ones, as a module's tests on one
fixture run) and "interleaved" (plugin, fresh, plugin...: another VM is built and closed
between two resets). A hook wrapper in its conftest times each test's whole run protocol
(setup, call, teardown and their reports). Every test
runs the same case on the reset-case guest (CPL 3, 16 MiB, a 256 KiB disk): dirty 16 pages,
print 4 bytes, write a disk sector, change registers. The plugin's tests get the machine
from ``machine_fixture("reset-case", ready=0x52, ...)`` (booted once, reset in place before
each test); the fresh ones build the Machine, load the guest, run it to its ready point and
close it. Medians; the plugin's first test pays the boot.

    python3 benchmarks/pytest_plugin.py [--tests N] [--out PATH]

Writes benchmarks/results/pytest_plugin.json (or --out). Needs /dev/kvm and the guests.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "kvmpy").glob("_native*.so")):      # built in place: use this checkout, not an installed kvmpy
    sys.path.insert(0, str(ROOT))

import kvmpy  # noqa: E402

CONFTEST = '''
import json, os, struct, time
import pytest
import kvmpy
from kvmpy.testing import machine_fixture

OPTIONS = dict(mem_size=16 << 20)
vm = machine_fixture("reset-case", ready=0x52, disks=[256 << 10], **OPTIONS)


def case(m, seed):
    m.memory.write(0x300000, struct.pack("<8Q", 16, seed, 1, seed, 4, 1, 0, 1))
    r = m.run(timeout=10)
    assert (r.reason, r.status) == ("exit", (0x44 << 1) | 1)


def fresh(tmp_path):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(256 << 10)
    m = kvmpy.Machine(disks=[str(disk)], **OPTIONS)
    m.load(kvmpy.guests.path("reset-case"), user=True)
    assert m.run(timeout=10).status == (0x52 << 1) | 1
    return m


TIMES = []

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t = time.perf_counter()
    yield
    TIMES.append((item.name, time.perf_counter() - t))


def pytest_sessionfinish(session):
    with open("times.json", "w") as f:
        json.dump(TIMES, f)
'''
PLUGIN_TEST = '''
def test_{i:03d}_plugin(vm):
    case(vm, {i})
'''
FRESH_TEST = '''
def test_{i:03d}_fresh(tmp_path):
    with fresh(tmp_path) as m:
        case(m, {i})
'''


def module(n: int, order: str) -> str:
    if order == "grouped":
        tests = [PLUGIN_TEST.format(i=i) for i in range(n)] + [FRESH_TEST.format(i=i + n) for i in range(n)]
    else:
        tests = [t.format(i=i) for i in range(n) for t in (PLUGIN_TEST, FRESH_TEST)]
    return "from conftest import case, fresh\n" + "".join(tests)


def measure(n: int, order: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="kvmpy-pytest-bench-") as d:
        d = pathlib.Path(d)
        (d / "conftest.py").write_text(CONFTEST)
        (d / "test_bench.py").write_text(module(n, order))
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(kvmpy.__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)}
        plugin = [] if _entry_point() else ["-p", "kvmpy.testing.plugin"]
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, str(d)],
                           cwd=d, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"the benchmark's pytest run failed:\n{r.stdout[-3000:]}{r.stderr[-2000:]}")
        times = {"plugin": [], "fresh": []}
        for name, t in json.loads((d / "times.json").read_text()):
            times[name.rsplit("_", 1)[1]].append(t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"tests": n, "median_ms": med, "first_plugin_test_ms": times["plugin"][0] * 1e3,
            "ratio_plugin_over_fresh": med["plugin"] / med["fresh"], "samples_ms": {
                k: [round(t * 1e3, 3) for t in v] for k, v in times.items()}}


def _entry_point() -> bool:
    from importlib.metadata import entry_points
    return any(ep.value == "kvmpy.testing.plugin" for ep in entry_points(group="pytest11"))


def main() -> int:
    ap = argparse.ArgumentParser(prog="pytest_plugin.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", type=int, default=40, help="tests of each kind (default 40)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pytest_plugin.json"))
    args = ap.parse_args()
    res = {}
    for order in ("grouped", "interleaved"):
        res[order] = r = measure(args.tests, order)
        m = r["median_ms"]
        print(f"{order}, {args.tests} tests each: median {m['plugin']:.2f} ms with the plugin, {m['fresh']:.2f} ms "
              f"booting a fresh machine: {r['ratio_plugin_over_fresh']:.3f} (1/{1 / r['ratio_plugin_over_fresh']:.0f}); "
              f"the plugin's first test (the boot): {r['first_plugin_test_ms']:.1f} ms")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
