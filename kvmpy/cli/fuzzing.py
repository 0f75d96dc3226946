"""``kvmpy fuzz run``: one input in a kvmpy.fuzz harness, or, started by afl-fuzz (its
pipes on fds 198/199 and ``$__AFL_SHM_ID``), AFL++'s fork server (kvmpy.fuzz.afl)."""
from __future__ import annotations

import sys

from .status import EXIT_OK, EXIT_USAGE, EXIT_VMM_ERROR


def _where(value: str):
    """A symbol name, or a number (an address)."""
    try:
        return int(value, 0)
    except ValueError:
        return value


def _reports(items: list[str]) -> dict | None:
    out = {}
    for item in items:
        value, sep, name = item.partition("=")
        try:
            out[int(value, 0)] = name or "report"
        except ValueError:
            return None
    return out


def cmd_fuzz(args) -> int:
    from ..fuzz import Harness
    from ..fuzz import afl
    reports = _reports(args.report)
    if reports is None:
        print("kvmpy: --report takes VALUE=NAME (e.g. 0x43=assert)", file=sys.stderr)
        return EXIT_USAGE
    if not args.timeout > 0:
        print("kvmpy: --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    length = None if args.length.lower() == "none" else _where(args.length)
    with Harness(args.image, input=_where(args.input), input_size=args.input_size, length=length,
                 coverage=_where(args.coverage), coverage_size=args.coverage_size, ready=args.ready,
                 done=args.done, reports=reports, timeout=args.timeout, mem_size=args.mem,
                 user=not args.ring0) as h:
        if afl.in_afl():
            try:
                afl.serve(h, input_path=args.file, log=sys.stderr)
            except afl.AflError as e:
                print(f"kvmpy: fuzz run: {e}", file=sys.stderr)
                return EXIT_VMM_ERROR
            return EXIT_OK
        try:
            if args.file is None:
                data = sys.stdin.buffer.read(h.input_size + 1)
            else:
                with open(args.file, "rb") as f:
                    data = f.read(h.input_size + 1)
        except OSError as e:
            print(f"kvmpy: fuzz run: {e}", file=sys.stderr)
            return EXIT_USAGE
        if len(data) > h.input_size:
            print(f"kvmpy: fuzz run: the input is longer than the guest's {h.input_size}-byte buffer",
                  file=sys.stderr)
            return EXIT_USAGE
        o = h.run(data)
    if o.crashed:
        where = "".join(f" {k}={v:#x}" for k, v in (("rip", o.fault_rip), ("address", o.fault_address),
                                                    ("error_code", o.error_code)) if v is not None)
        print(f"crash: {o.kind}{where}")
    else:
        print(f"ok: exit {o.exit:#x}" if o.exit is not None else f"ok: {o.stop}")
    print(f"edges: {o.edges}  time: {o.time * 1e3:.2f} ms  stop: {o.stop}")
    return 1 if o.crashed else EXIT_OK
