#!/usr/bin/env python3
"""Runs kvmpy's `sandbox` benchmark (kvmpy/bench/sandbox.py; also `kvmpy bench sandbox`).

Writes the JSON to benchmarks/results/sandbox.json (or --out PATH). Options: `python3 benchmarks/sandbox.py --help`.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "kvmpy").glob("_native*.so")):      # built in place: use this checkout, not an installed kvmpy
    sys.path.insert(0, str(ROOT))

from kvmpy.bench import sandbox  # noqa: E402

if __name__ == "__main__":
    sys.exit(sandbox.main(prog="sandbox.py", results=ROOT / "benchmarks" / "results" / "sandbox.json"))
