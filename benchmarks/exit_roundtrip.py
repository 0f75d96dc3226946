#!/usr/bin/env python3
"""Runs kvmpy's `exits` benchmark (kvmpy/bench/exits.py; also `kvmpy bench exits`).

Writes the JSON to benchmarks/results/exit_roundtrip.json (or --out PATH). Options: `python3 benchmarks/exit_roundtrip.py --help`.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "kvmpy").glob("_native*.so")):      # built in place: use this checkout, not an installed kvmpy
    sys.path.insert(0, str(ROOT))

from kvmpy.bench import exits  # noqa: E402

if __name__ == "__main__":
    sys.exit(exits.main(prog="exit_roundtrip.py", results=ROOT / "benchmarks" / "results" / "exit_roundtrip.json"))
