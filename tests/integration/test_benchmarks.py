"""The benchmark scripts run end to end and write the JSON they promise (no speed asserted)."""
import json
import os
import pathlib
import subprocess
import sys

import kvmpy

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(kvmpy.__file__)))}


def test_exit_roundtrip_benchmark_smoke():
    """exit_roundtrip builds its C reference, runs every variant, and prints results and ratios as JSON."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "exit_roundtrip.py"), "--exits", "300",
                        "--rounds", "1", "--warmup", "50", "--json"],
                       capture_output=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    variants = {x["variant"] for x in data["results"]}
    assert {"c", "vcpu.run", "machine"} <= variants
    assert all(x["value"] > 0 and x["unit"] == "ns" for x in data["results"])
    assert data["ratios"]["machine/c"] > 0
