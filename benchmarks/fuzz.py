#!/usr/bin/env python3
"""Runs kvmpy's `fuzz` benchmark (kvmpy/bench/fuzz.py; also `kvmpy bench fuzz`).

Writes the JSON to benchmarks/results/fuzz.json (or --out PATH). Options: `python3 benchmarks/fuzz.py --help`.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "kvmpy").glob("_native*.so")):      # built in place: use this checkout, not an installed kvmpy
    sys.path.insert(0, str(ROOT))

from kvmpy.bench import fuzz  # noqa: E402

if __name__ == "__main__":
    sys.exit(fuzz.main(prog="fuzz.py", results=ROOT / "benchmarks" / "results" / "fuzz.json"))
