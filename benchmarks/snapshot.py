#!/usr/bin/env python3
"""Runs kvmpy's `snapshot` benchmark (kvmpy/bench/snapshot.py; also `kvmpy bench snapshot`).

Writes the JSON to benchmarks/results/snapshot.json (or --out PATH). Options: `python3 benchmarks/snapshot.py --help`.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "kvmpy").glob("_native*.so")):      # built in place: use this checkout, not an installed kvmpy
    sys.path.insert(0, str(ROOT))

from kvmpy.bench import snapshot  # noqa: E402

if __name__ == "__main__":
    sys.exit(snapshot.main(prog="snapshot.py", results=ROOT / "benchmarks" / "results" / "snapshot.json"))
