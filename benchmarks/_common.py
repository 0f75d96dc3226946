"""Shared pieces of kvmpy's benchmarks: host facts, building C references, output.

Every benchmark measures kvmpy against a reference built and run in the same
invocation, prints a table and writes ``benchmarks/results/<name>.json``. The
absolute numbers depend heavily on the host (HOST-NOTES.md: a VM exit costs
~8 us on the development machines, ~1 us on bare metal); the ratios against the
reference are what compares across hosts.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys

BENCH_DIR = pathlib.Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def use_source_tree() -> None:
    """Import kvmpy from this checkout (not an installed copy) when it is built in place."""
    built = any((ROOT / "kvmpy").glob("_native*.so"))
    if built and (ROOT / "kvmpy" / "__init__.py").is_file() and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# --- host ---------------------------------------------------------------------------
def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _hw_virt_flags() -> list[str]:
    """Which of vmx/svm the (possibly virtual) CPU advertises."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"vmx", "svm"})
    except OSError:
        pass
    return []


def kvm_backends() -> list[str]:
    """Loaded KVM vendor modules (kvm_intel, kvm_amd, kvm_pvm, ...), from /proc/modules or /sys/module."""
    names: set[str] = set()
    try:
        with open("/proc/modules") as f:
            names = {line.split()[0] for line in f if line.strip()}
    except OSError:
        try:
            names = set(os.listdir("/sys/module"))
        except OSError:
            pass
    return sorted(n for n in names if n.startswith("kvm_"))


def _tool_version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def host_info() -> dict:
    """What a reader needs to judge the numbers: kernel, CPU, KVM backend, toolchain."""
    u = platform.uname()
    info = {
        "system": u.system, "release": u.release, "version": u.version, "machine": u.machine,
        "cpu_model": _cpu_model(), "cpus": os.cpu_count(), "hw_virt_flags": _hw_virt_flags(),
        "kvm_backends": kvm_backends(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cc": _tool_version([os.environ.get("CC", "gcc"), "--version"]),
    }
    try:
        import kvmpy
        info["kvmpy"] = {"version": kvmpy.__version__, "path": str(pathlib.Path(kvmpy.__file__).parent)}
    except ImportError:
        pass
    return info


# --- building the C reference -----------------------------------------------------------
class BuildError(RuntimeError):
    pass


def compile_c(source: pathlib.Path, outdir: pathlib.Path, cflags: tuple[str, ...] = ("-O2",)) -> pathlib.Path:
    """Compile one C file into ``outdir`` with $CC (default gcc); returns the executable."""
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise BuildError(f"C compiler {cc!r} not found: the benchmark builds its C reference at run "
                         "time (install gcc, or set CC)")
    exe = outdir / source.stem
    argv = [cc, *cflags, "-Wall", "-Wextra", "-o", str(exe), str(source)]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed:\n{r.stderr.strip()}")
    return exe


# --- numbers and output -----------------------------------------------------------------
def summarize(samples: list[float]) -> dict:
    """median, min, mean and max of per-round samples."""
    return {"median": statistics.median(samples), "min": min(samples),
            "mean": statistics.fmean(samples), "max": max(samples)}


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def write_results(name: str, obj: dict) -> pathlib.Path:
    """Write ``obj`` to benchmarks/results/<name>.json; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
    return path


class Progress:
    """One status line on stderr, rewritten in place on a terminal."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.width = 0

    def update(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
        self.width = 0
