#!/usr/bin/env python3
"""Runs kvmpy's `reset` benchmark (kvmpy/bench/reset.py; also `kvmpy bench reset`).

Writes the JSON to benchmarks/results/reset.json (or --out PATH). Options: `python3 benchmarks/reset.py --help`.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "kvmpy").glob("_native*.so")):      # built in place: use this checkout, not an installed kvmpy
    sys.path.insert(0, str(ROOT))

from kvmpy.bench import reset  # noqa: E402

if __name__ == "__main__":
    sys.exit(reset.main(prog="reset.py", results=ROOT / "benchmarks" / "results" / "reset.json"))
