"""kvmpy's benchmarks, runnable as ``kvmpy bench NAME`` or ``python benchmarks/NAME.py``.

Each module in :data:`BENCHMARKS` has ``DESCRIPTION`` and ``main(argv) -> int``;
it measures kvmpy against a reference in the same run, prints a table, and with
``--json`` prints one JSON object ``{"benchmark", "host", "params", "results":
[{variant, metric, value, unit}], "ratios": {...}}``. See benchmarks/README.md.
"""
from . import blk, boot, exits, fuzz, linux, reset, sandbox, serial, snapshot

BENCHMARKS = {"exits": exits, "serial": serial, "blk": blk, "boot": boot, "snapshot": snapshot,
              "reset": reset, "fuzz": fuzz, "sandbox": sandbox,
              "linux": linux}
