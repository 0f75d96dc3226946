"""Shared pieces of kvmpy's benchmarks: host facts, run-time builds, numbers and output.

Every benchmark measures kvmpy against a reference run in the same invocation
(rounds interleaved, medians reported), prints a table on stdout, and writes its
result object as JSON: ``{"benchmark", "host", "params", "results": [{variant,
metric, value, unit}], "ratios": {...}, ...}``. Absolute numbers depend heavily on
the host (a VM exit costs ~1 us on bare metal, ~8 us on a host whose KVM has no
hardware virtualisation behind it); ratios measured in one run compare across hosts.

A benchmark module provides ``NAME``, ``DESCRIPTION``, ``add_arguments(parser)``,
``measure(args, progress) -> dict`` and ``table(result) -> str``; :func:`run_main`
turns those into the ``main(argv) -> int`` that ``kvmpy bench NAME`` calls.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys

from ..kvm.system import backend_modules

EXIT_OK = 0
EXIT_CANNOT_RUN = 2          # no KVM, no compiler/assembler, guests not built (argparse errors are 2 too)

#: A source checkout: kvmpy/ next to benchmarks/ and pyproject.toml.
_ROOT = pathlib.Path(__file__).resolve().parents[2]


class BenchError(RuntimeError):
    """The benchmark cannot run here, or a run went wrong; the message says which and why."""


# --- host ---------------------------------------------------------------------------
def _cpuinfo_field(prefix: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def tool_version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def host_info() -> dict:
    """What a reader needs to judge the numbers: kernel, CPU, KVM backend, toolchain."""
    u = platform.uname()
    flags = set((_cpuinfo_field("flags") or "").split())
    info = {
        "system": u.system, "release": u.release, "version": u.version, "machine": u.machine,
        "cpu_model": _cpuinfo_field("model name") or platform.processor() or None,
        "cpus": os.cpu_count(), "hw_virt_flags": sorted(flags & {"vmx", "svm"}),
        "kvm_backends": backend_modules(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cc": tool_version([os.environ.get("CC", "gcc"), "--version"]),
    }
    import kvmpy
    info["kvmpy"] = {"version": kvmpy.__version__, "path": str(pathlib.Path(kvmpy.__file__).parent)}
    return info


def host_line(host: dict) -> str:
    return (f"host: {host['cpu_model']}, kernel {host['release']}, "
            f"KVM backend {', '.join(host['kvm_backends']) or '?'}")


# --- building references and guests at run time ---------------------------------------
def _tool(name: str, why: str) -> str:
    if shutil.which(name) is None:
        raise BenchError(f"{name!r} not found: {why}")
    return name


@contextlib.contextmanager
def source(name: str):
    """A file shipped in this package (pio_ref.c, *.S) as a real path."""
    with importlib.resources.as_file(importlib.resources.files(__package__) / name) as p:
        if not p.is_file():
            raise BenchError(f"{name} is missing from {p.parent}: reinstall kvmpy")
        yield p


def _check_call(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed:\n{r.stderr.strip()}")


def compile_c(name: str, outdir: pathlib.Path, cflags: tuple[str, ...] = ("-O2",)) -> pathlib.Path:
    """Compile the packaged C file ``name`` into ``outdir`` with $CC (default gcc); returns the executable."""
    cc = _tool(os.environ.get("CC", "gcc"), "the benchmark compiles its C reference at run time "
               "(install gcc, or set CC)")
    exe = outdir / pathlib.Path(name).stem
    with source(name) as src:
        _check_call([cc, *cflags, "-Wall", "-Wextra", "-o", str(exe), str(src)])
    return exe


def assemble_raw(name: str, outdir: pathlib.Path, base: int) -> bytes:
    """Assemble the packaged GNU as file ``name`` and link it at ``base`` into a flat binary."""
    why = "the benchmark assembles its guest at run time (install binutils)"
    as_, ld = _tool("as", why), _tool("ld", why)
    stem = outdir / pathlib.Path(name).stem
    with source(name) as src:
        _check_call([as_, "--64", "-o", f"{stem}.o", str(src)])
    _check_call([ld, "-static", "-nostdlib", f"-Ttext={base:#x}", "-e", "_start", "--oformat=binary",
                 "-o", f"{stem}.bin", f"{stem}.o"])
    return pathlib.Path(f"{stem}.bin").read_bytes()


def guest_image(name: str) -> pathlib.Path:
    """A bundled guest's image, or BenchError saying how to build it."""
    from kvmpy import guests
    try:
        return guests.path(name)
    except (KeyError, FileNotFoundError) as e:
        raise BenchError(str(e).strip("'\"")) from None


# --- numbers and output -----------------------------------------------------------------
def summarize(samples: list[float]) -> dict:
    """median, min, mean and max of per-round samples."""
    return {"median": statistics.median(samples), "min": min(samples),
            "mean": statistics.fmean(samples), "max": max(samples)}


def rotate(seq: tuple, r: int) -> tuple:
    """``seq`` rotated by ``r``: round r runs the variants in this order (drift hits all alike)."""
    k = r % len(seq)
    return seq[k:] + seq[:k]


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def default_results_path(name: str) -> pathlib.Path | None:
    """benchmarks/results/<name>.json when kvmpy runs from a source checkout, else None."""
    if (_ROOT / "benchmarks").is_dir() and (_ROOT / "pyproject.toml").is_file():
        return _ROOT / "benchmarks" / "results" / f"{name}.json"
    return None


def write_json(path: pathlib.Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


class Progress:
    """One status line on stderr, rewritten in place on a terminal."""

    def __init__(self, name: str, stream=sys.stderr):
        self.name, self.stream = name, stream
        self.tty = stream.isatty()
        self.width = 0

    def __call__(self, text: str) -> None:
        text = f"{self.name}: {text}"
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


# --- the common command line and main ---------------------------------------------------
def integer(text: str, least: int) -> int:
    """An integer option: 20000, 0x4000, or with a binary suffix: 64K, 1M."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        v = int(t[:-1] if scale > 1 else t, 0) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r} (examples: 20000, 64K, 1M)") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {v}")
    return v


def positive(text: str) -> int:
    return integer(text, 1)


def nonnegative(text: str) -> int:
    return integer(text, 0)


def build_parser(mod, prog: str | None) -> argparse.ArgumentParser:
    doc = sys.modules[mod.__name__].__doc__ or ""
    p = argparse.ArgumentParser(prog=prog or f"kvmpy bench {mod.NAME}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(p)
    p.add_argument("--json", action="store_true",
                   help="print only the JSON result object on stdout (the table goes to stderr)")
    p.add_argument("--out", type=pathlib.Path, metavar="PATH",
                   help="also write the JSON here (default: benchmarks/results/NAME.json in a "
                        "source checkout, nowhere in an installed kvmpy)")
    p.add_argument("--cpu", type=int, metavar="N",
                   help="pin this process and its children to CPU N (steadier on a busy host)")
    return p


def run_main(mod, argv: list[str] | None, prog: str | None = None, results: pathlib.Path | None = None) -> int:
    """Parse ``argv``, measure, print the table (or JSON), write the JSON file; returns the exit status."""
    parser = build_parser(mod, prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:                     # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_CANNOT_RUN
    if args.cpu is not None:
        if args.cpu not in os.sched_getaffinity(0):
            print(f"{parser.prog}: --cpu {args.cpu}: not one of the CPUs this process may use "
                  f"{sorted(os.sched_getaffinity(0))}", file=sys.stderr)
            return EXIT_CANNOT_RUN
        os.sched_setaffinity(0, {args.cpu})     # inherited by child processes (the C reference)
    from kvmpy.errors import KvmpyError
    progress = Progress(mod.NAME)
    try:
        result = mod.measure(args, progress)
    except (KvmpyError, BenchError, OSError) as e:
        progress.done()
        print(f"{parser.prog}: {e}", file=sys.stderr)   # kvmpy's errors carry a hint at the fix
        return EXIT_CANNOT_RUN
    progress.done()
    result["params"]["cpu"] = args.cpu
    path = args.out or results or default_results_path(mod.NAME)
    if path is not None:
        write_json(path, result)
    out = sys.stderr if args.json else sys.stdout
    print(mod.table(result), file=out)
    if path is not None:
        print(f"JSON: {path}", file=out)
    if args.json:
        print(json.dumps(result, indent=2))
    return EXIT_OK
