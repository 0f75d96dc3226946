#!/usr/bin/env python3
"""Runs kvmpy's `blk` benchmark (kvmpy/bench/blk.py; also `kvmpy bench blk`).

Writes the JSON to benchmarks/results/blk.json (or --out PATH). Options: `python3 benchmarks/blk.py --help`.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "kvmpy").glob("_native*.so")):      # built in place: use this checkout, not an installed kvmpy
    sys.path.insert(0, str(ROOT))

from kvmpy.bench import blk  # noqa: E402

if __name__ == "__main__":
    sys.exit(blk.main(prog="blk.py", results=ROOT / "benchmarks" / "results" / "blk.json"))
