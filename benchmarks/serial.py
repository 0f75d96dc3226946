#!/usr/bin/env python3
"""Runs kvmpy's `serial` benchmark (kvmpy/bench/serial.py; also `kvmpy bench serial`).

Writes the JSON to benchmarks/results/serial.json (or --out PATH). Options: `python3 benchmarks/serial.py --help`.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if any((ROOT / "kvmpy").glob("_native*.so")):      # built in place: use this checkout, not an installed kvmpy
    sys.path.insert(0, str(ROOT))

from kvmpy.bench import serial  # noqa: E402

if __name__ == "__main__":
    sys.exit(serial.main(prog="serial.py", results=ROOT / "benchmarks" / "results" / "serial.json"))
