"""``kvmpy fuzz run``: one input in a kvmpy.fuzz harness, or, started by afl-fuzz (its
pipes on fds 198/199 and ``$__AFL_SHM_ID``), AFL++'s fork server (kvmpy.fuzz.afl).
``kvmpy fuzz replay``: one input again, explained: the exception, the registers and the
faulting code (kvmpy.fuzz.replay), with a trace, the full inspection or gdb."""
from __future__ import annotations

import sys

from .status import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, EXIT_VMM_ERROR

REPLAY_EPILOG = """\
examples:
  kvmpy fuzz replay --report 0x43=assert out/default/crashes/id:000000*
  kvmpy fuzz replay --report 0x43=assert --trace exits CRASH     every VM exit of the case
  kvmpy fuzz replay --report 0x43=assert --inspect CRASH         page walks, segments, stack
  kvmpy fuzz replay --report 0x43=assert --gdb /tmp/g CRASH      then: gdb -ex 'target remote /tmp/g'

Give replay the harness options the campaign's 'kvmpy fuzz run' had (--image, --report,
--timeout...): the same guest, checkpoint and crash rules make the same outcome.
Under --gdb the case first runs once (so kvmpy can say where it ends), then again
from the checkpoint with gdb in charge: 'hbreak *RIP' stops before the faulting
instruction (breakpoints are hardware ones), 'continue' runs to the case's end.

exit status: 1 the case crashed, 0 it ended cleanly, 2 a usage error (no such input,
longer than the guest's buffer, bad option), 4 the harness could not start (bad image,
missing symbol), 130 interrupted."""


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


def _harness(args):
    """The Harness the options describe, or an exit status after saying what is wrong."""
    from ..fuzz import Harness
    reports = _reports(args.report)
    if reports is None:
        print("kvmpy: --report takes VALUE=NAME (e.g. 0x43=assert)", file=sys.stderr)
        return EXIT_USAGE
    if not args.timeout > 0:
        print("kvmpy: --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    length = None if args.length.lower() == "none" else _where(args.length)
    return Harness(args.image, input=_where(args.input), input_size=args.input_size, length=length,
                   coverage=_where(args.coverage), coverage_size=args.coverage_size, ready=args.ready,
                   done=args.done, reports=reports, timeout=args.timeout, mem_size=args.mem,
                   user=not args.ring0, end_at=[_where(e) for e in args.end_at])


def cmd_fuzz(args) -> int:
    h = _harness(args)
    if isinstance(h, int):
        return h
    with h:
        return _replay(args, h) if args.action == "replay" else _run(args, h)


def _read_input(path: str | None, limit: int, what: str) -> bytes | int:
    """At most ``limit`` + 1 bytes of ``path`` (None or '-': stdin), or an exit status."""
    try:
        if path in (None, "-"):
            return sys.stdin.buffer.read(limit + 1)
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        print(f"kvmpy: fuzz {what}: cannot read the input: {e.strerror or e}: {path}", file=sys.stderr)
        return EXIT_USAGE


def _too_long(data: bytes, h, what: str) -> bool:
    if len(data) <= h.input_size:
        return False
    print(f"kvmpy: fuzz {what}: the input is longer than the guest's {h.input_size}-byte buffer", file=sys.stderr)
    return True


def _run(args, h) -> int:
    from ..fuzz import afl
    if afl.in_afl():
        try:
            afl.serve(h, input_path=args.file, log=sys.stderr)
        except afl.AflError as e:
            print(f"kvmpy: fuzz run: {e}", file=sys.stderr)
            return EXIT_VMM_ERROR
        return EXIT_OK
    data = _read_input(args.file, h.input_size, "run")
    if isinstance(data, int):
        return data
    if _too_long(data, h, "run"):
        return EXIT_USAGE
    o = h.run(data)
    if o.crashed:
        where = "".join(f" {k}={v:#x}" for k, v in (("rip", o.fault_rip), ("address", o.fault_address),
                                                    ("error_code", o.error_code)) if v is not None)
        print(f"crash: {o.kind}{where}")
    elif o.reached is not None:
        print(f"ok: reached {o.reached:#x}")
    else:
        print(f"ok: exit {o.exit:#x}" if o.exit is not None else f"ok: {o.stop}")
    print(f"edges: {o.edges}  time: {o.time * 1e3:.2f} ms  stop: {o.stop}")
    return 1 if o.crashed else EXIT_OK


def _replay(args, h) -> int:
    from ..fuzz import replay
    data = _read_input(args.input_file, h.input_size, "replay")
    if isinstance(data, int):
        return data
    if _too_long(data, h, "replay"):
        return EXIT_USAGE
    try:
        drive = _driver(args, h, data)
    except (ValueError, OSError) as e:
        print(f"kvmpy: fuzz replay: {e}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(drive, int):
        return drive
    try:
        o = h.replay(data, drive)
    except _Interrupted:
        print("kvmpy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if getattr(drive, "stream", None) is not None:
            drive.stream.close()
    print(replay.report(h, o))
    if args.trace == "steps" and o.kind == "#DB" and not args.ring0 and _ring3_debug_blind():
        print("kvmpy: note: on this host (kvm_pvm) single-stepping CPL-3 code hands the step's #DB to the "
              "guest (the #DB above is the tracer's): replay with --ring0 to step through the case", file=sys.stderr)
    if args.inspect:
        print("\n" + replay.inspection(h, o))
    return 1 if o.crashed else EXIT_OK


PVM_NOTE = ("kvmpy: note: on this host (kvm_pvm) breakpoints and single steps do not stop CPL-3 code: "
            "replay with --ring0 to break and step (docs/fuzzing.md)")


def _ring3_debug_blind() -> bool:
    """Is this a host where guest debugging misses CPL-3 code (kvm_pvm, docs/host-notes.md)?"""
    from ..kvm.system import backend_modules
    return "kvm_pvm" in backend_modules()


class _Interrupted(Exception):
    """The gdb session was interrupted (Ctrl-C) before the case ended."""


def _driver(args, h, data: bytes):
    """How the replayed case runs: plain, traced (--trace/--trace-json), or under gdb."""
    if args.gdb is not None:
        if args.trace or args.trace_json:
            raise ValueError("--gdb cannot be combined with --trace/--trace-json (gdb can stepi)")
        return _gdb_driver(args, h, data)
    if not (args.trace or args.trace_json):
        return None
    from ..debug.trace import Tracer
    steps = args.trace == "steps"
    stream = open(args.trace_json, "w") if args.trace_json else None
    tracer = (Tracer.to_stream(stream, json_lines=True, steps=steps) if stream is not None
              else Tracer.to_stream(sys.stderr, steps=steps))

    def drive(machine):
        return machine.run(timeout=h.timeout, trace=tracer)
    drive.stream = stream
    return drive


def _gdb_driver(args, h, data: bytes):
    """Run the case once to learn its end, reset, and return a driver that lets gdb run it."""
    from ..debug.gdbstub import GdbStub, GdbStubError
    from ..fuzz import replay
    first = h.replay(data)
    h.reset()
    print(f"first run: {replay.headline(first)}", file=sys.stderr)
    try:
        stub = GdbStub(h.machine, args.gdb)
    except GdbStubError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    hint = f"; 'hbreak *{first.fault_rip:#x}' stops before the fault" if first.fault_rip is not None else ""
    print(f"kvmpy: waiting for gdb on {stub.address} (gdb -ex 'target remote {stub.address}' "
          f"{h.image_path}){hint}", file=sys.stderr, flush=True)
    if args.ring0 is False and _ring3_debug_blind():
        print(PVM_NOTE, file=sys.stderr)

    def drive(machine):
        result = stub.serve(timeout=args.gdb_wait)
        if stub.stopping == "interrupted" or stub.stopped_waiting == "interrupted":
            raise _Interrupted()
        if stub.stopped_waiting == "timeout":
            print(f"kvmpy: no debugger connected within {args.gdb_wait:g} s: the case runs on its own",
                  file=sys.stderr)
        if result is None or result.reason not in ("exit", "halt", "reset", "timeout"):
            result = machine.run(timeout=h.timeout)     # gdb left before the case ended: finish it
        return result
    return drive
