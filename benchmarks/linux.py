#!/usr/bin/env python3
"""Runs kvmpy's `linux` benchmark (kvmpy/bench/linux.py; also `kvmpy bench linux`).

Writes the JSON to benchmarks/results/linux.json (or --out PATH). Options: `python3 benchmarks/linux.py --help`.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "kvmpy").glob("_native*.so")):      # built in place: use this checkout, not an installed kvmpy
    sys.path.insert(0, str(ROOT))

from kvmpy.bench import linux  # noqa: E402

if __name__ == "__main__":
    sys.exit(linux.main(prog="linux.py", results=ROOT / "benchmarks" / "results" / "linux.json"))
