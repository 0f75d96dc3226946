#!/usr/bin/env python3
"""Runs kvmpy's `boot` benchmark (kvmpy/bench/boot.py; also `kvmpy bench boot`).

Writes the JSON to benchmarks/results/boot.json (or --out PATH). Options: `python3 benchmarks/boot.py --help`.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "kvmpy").glob("_native*.so")):      # built in place: use this checkout, not an installed kvmpy
    sys.path.insert(0, str(ROOT))

from kvmpy.bench import boot  # noqa: E402

if __name__ == "__main__":
    sys.exit(boot.main(prog="boot.py", results=ROOT / "benchmarks" / "results" / "boot.json"))
