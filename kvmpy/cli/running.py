"""The commands that run a guest here: ``run``, ``demo``, ``restore`` and ``receive``.

Each builds (or restores, or receives) a Machine, then ``_drive`` runs it to its end: the
guest's serial port is our stdin and stdout (``_Console``, ``_feed_stdin``; a terminal on
stdin is the guest's console, raw, with Ctrl-A commands: kvmpy.cli.terminal), Ctrl-C
(SIGINT) stops it, ``--gdb``, ``--trace`` and ``--control`` hook into the run, and ``--inspect`` and
``--stats`` report at the end. ``_exit_code`` turns how the run ended into the exit
status (kvmpy.cli.status); ``demo`` then judges it against the guest's promise.

Everything beyond the standard library (the Machine, the tracer, the gdb stub, the
control server, migration) is imported inside the function that uses it, so ``kvmpy
run`` loads only what its options ask for (tests/integration/test_cli.py checks).
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

from .status import (EXIT_DEMO_FAILED, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_RESET,
                     EXIT_TIMEOUT, EXIT_TRIPLE_FAULT, EXIT_USAGE, EXIT_VMM_ERROR, progress)


# --- the commands -------------------------------------------------------------------
def cmd_run(args) -> int:
    load = dict(format=args.format or "auto", mode=args.mode, load_addr=args.load_addr,
                entry=args.entry, user=args.user, cmdline=args.cmdline, modules=_modules(args.module),
                initrd=args.initrd)
    return _run(args, args.image, load, sample_input=None)


def cmd_demo(args) -> int:
    if args.name == "linux":                    # not a bundled guest: Debian's kernel and a root disk
        from .linuxdemo import demo_linux
        return demo_linux(args, _run)
    if getattr(args, "offline", False):
        print("kvmpy: --offline is for 'kvmpy demo linux'", file=sys.stderr)
        return EXIT_USAGE
    from ..images import guests
    try:
        g = guests.get(args.name)
    except KeyError:
        names = ", ".join(x.name for x in guests.all() if x.demo)
        print(f"kvmpy: no demo named {args.name!r}; demos: {names}", file=sys.stderr)
        return EXIT_USAGE
    load = dict(format=args.format or g.format, mode=args.mode or g.mode,
                load_addr=args.load_addr if args.load_addr is not None else g.load_addr,
                entry=args.entry if args.entry is not None else g.entry, user=args.user or g.user,
                cmdline=args.cmdline, modules=_modules(args.module), initrd=args.initrd)
    if args.cpus is None:
        args.cpus = g.cpus
    args.rng = args.rng or g.needs_rng
    # a guest that promises nothing (spin, triple-fault: test guests) ends with the run's status
    output = bytearray() if g.demo_status is not None else None
    if g.needs_disk and not args.disk:          # a disk demo without a disk: lend it a scratch one
        import tempfile
        with tempfile.TemporaryFile(prefix="kvmpy-demo-", suffix=".img") as scratch:
            scratch.truncate(1 << 20)
            print(f"kvmpy: {g.name} drives a disk; using a scratch 1 MiB file of zeros "
                  "(pass --disk FILE[,ro] to use your own)", file=sys.stderr)
            # nameless, so nothing is left to unlink after the run (the sandbox refuses unlink)
            args.disk = [f"/proc/self/fd/{scratch.fileno()}"]
            code = _run(args, g.path, load, sample_input=g.stdin, keep=output)
    else:
        code = _run(args, g.path, load, sample_input=g.stdin, keep=output)
    return code if output is None else _judge(g, code, bytes(output))


#: Why a demo did not reach its exit, by the run's own (even) status.
_ENDINGS = {EXIT_OK: "it stopped before its exit (halted, detached or stopped through --control)",
            EXIT_USAGE: "bad command line", EXIT_VMM_ERROR: "kvmpy could not start it",
            EXIT_RESET: "it reset the machine", EXIT_TRIPLE_FAULT: "it triple-faulted",
            EXIT_TIMEOUT: "the --timeout expired", EXIT_INTERNAL_ERROR: "KVM could not run it",
            EXIT_INTERRUPTED: "interrupted"}


def _judge(g, code: int, output: bytes) -> int:
    """kvmpy demo's status: 0 if the run's status ``code`` and ``output`` keep guest ``g``'s
    promise; else the reason, one line, and non-zero (``code`` itself if the guest never exited)."""
    if code & 1:                                # the guest wrote its value to isa-debug-exit
        why = g.kept_promise(code, output)
        if why is None:
            return EXIT_OK
        code = EXIT_DEMO_FAILED
    else:
        why = _ENDINGS.get(code, f"it ended with status {code}")
        code = code or EXIT_DEMO_FAILED
    print(f"kvmpy: demo {g.name} failed: {why}", file=sys.stderr)
    return code


def cmd_restore(args) -> int:
    from ..errors import KvmpyError
    from ..vmm.machine import Machine
    try:
        machine = Machine.restore(args.snapshot, verify=args.verify, disks=args.disk, vsock=args.vsock,
                                  serial=_Console(sys.stdout.buffer), native=not args.python,
                                  **({"net": args.net} if args.net is not None else {}))
    except (KvmpyError, ValueError) as e:
        print(f"kvmpy: cannot restore: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    with machine:
        return _drive(args, machine)


def cmd_receive(args) -> int:
    from ..errors import KvmpyError
    from ..lifecycle.channel import key_from
    from ..lifecycle.migration import parse_address, receive
    try:
        listen = parse_address(args.listen)
        key = key_from(args.key_file)
    except (ValueError, KvmpyError) as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return EXIT_USAGE

    def listening(addr):
        print(f"kvmpy: waiting for a migration on {addr[0]}:{addr[1]}", file=sys.stderr, flush=True)

    try:
        machine, pages = receive(listen, key=key, disks=args.disk, timeout=args.wait, on_listen=listening,
                                 run_timeout=args.timeout, progress=progress, deadline=args.deadline,
                                 stream_timeout=args.frame_timeout, max_mem=args.max_mem, vsock=args.vsock,
                                 serial=_Console(sys.stdout.buffer), native=not args.python,
                                 **({"net": args.net} if args.net is not None else {}))
    except (KvmpyError, OSError, ValueError) as e:
        print(f"kvmpy: migration failed: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    with machine:
        return _drive(args, machine, started=True)


# --- building and driving a machine ------------------------------------------------
def _run(args, image, load: dict, sample_input: bytes | None, keep: bytearray | None = None,
         ready: tuple[bytes, threading.Event] | None = None) -> int:
    """Build the Machine ``args`` describe, load ``image``, drive it. With ``ready`` (a marker
    and an event), input from a pipe waits until the guest has printed the marker."""
    from ..errors import KvmpyError
    from ..vmm.machine import Machine
    if getattr(args, "paused", False) and not getattr(args, "control", None):
        print("kvmpy: --paused needs --control PATH (nothing else could resume the guest)", file=sys.stderr)
        return EXIT_USAGE
    try:
        tracer = _tracer(args)
    except (ValueError, OSError) as e:
        print(f"kvmpy: bad trace option: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        machine = Machine(mem_size=64 << 20 if args.mem is None else args.mem,
                          cpus=1 if args.cpus is None else args.cpus, irqchip=args.irqchip,
                          serial=_Console(sys.stdout.buffer, keep, ready), native=not args.python, disks=args.disk,
                          fw_cfg=_fw_cfg_files(args.fw_cfg), serial_bps=args.serial_bps,
                          test_devices=args.test_devices, rng=args.rng, acpi=args.acpi,
                          net=getattr(args, "net", None), vsock=getattr(args, "vsock", None),
                          virtio_transport=getattr(args, "virtio_transport", "mmio"))
    except (KvmpyError, ValueError) as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    with machine:
        try:
            machine.load(image, **load)
        except (KvmpyError, ValueError) as e:
            print(f"kvmpy: {e}", file=sys.stderr)
            return EXIT_VMM_ERROR
        try:
            return _drive(args, machine, tracer, sample_input, input_gate=ready[1] if ready else None)
        finally:
            for s in machine.platform.slots:        # a network that failed under the guest: say so
                if s.saved_as == "virtio_net" and s.backend.error:
                    print(f"kvmpy: the network stopped: {s.backend.error}", file=sys.stderr)
            if args.trace_json:
                tracer.stream.close()


def _drive(args, machine, tracer=None, sample_input: bytes | None = None, started: bool = False,
           input_gate: threading.Event | None = None) -> int:
    """Run ``machine`` to its end (or wait for it, if ``started``), with stdin as its serial
    input, Ctrl-C, the control socket, and the end-of-run reports; returns the exit status."""
    from ..errors import GuestError
    from .terminal import RawTerminal
    interactive = RawTerminal.wanted(0)     # asked before the sandbox (which refuses getpgrp)
    status = _confine(args, machine)
    if status is not None:
        return status
    done = threading.Event()
    control = terminal = None
    stop = [machine.request_stop]           # the gdb stub takes over Ctrl-C while it serves
    if not getattr(args, "replay", None):       # a replay's input comes from the recording
        terminal = _start_input(machine, done, sample_input, lambda: stop[0]("interrupted"), interactive,
                                input_gate)
    old = signal.signal(signal.SIGINT, lambda *_: stop[0]("interrupted")) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        if getattr(args, "gdb", None) is not None:
            result = _serve_gdb(machine, args, stop)
            if isinstance(result, int):
                return result               # gdb never came, or detached before the guest stopped
        else:
            if not started:
                machine.start(timeout=args.timeout, trace=tracer)
            if getattr(args, "paused", False):
                machine.pause()
            if getattr(args, "control", None):      # once the run is under way: ctl pause works at once
                from ..lifecycle.control import ControlServer
                control = ControlServer(machine, args.control)
                print(f"kvmpy: control socket at {args.control} (kvmpy ctl {args.control} --help)",
                      file=sys.stderr, flush=True)
            result = _wait(machine)
    except GuestError as e:
        print(f"kvmpy: {e.args[0] if args.inspect else e}", file=sys.stderr)
        _print_inspect(args, machine)
        _print_stats(args, machine)
        return EXIT_TRIPLE_FAULT if getattr(e, "reason", "") == "triple-fault" else EXIT_INTERNAL_ERROR
    except OSError as e:                    # the sandbox refused a call: say which, no traceback
        if not _refused(e, machine):
            raise
        return EXIT_VMM_ERROR
    except BaseException:
        if machine.running:                 # a bad --control path, Ctrl-C before the handler...
            machine.request_stop("interrupted")
            machine.wait()
        raise
    finally:
        done.set()
        if terminal is not None:            # raw mode ends on every way out (SIGTERM: its handler)
            terminal.restore()
        if old is not None:
            signal.signal(signal.SIGINT, old)
        if control is not None:
            control.close()
    _print_inspect(args, machine)
    _print_stats(args, machine)
    return _exit_code(result, args)


def _wait(machine, slice_s: float = 0.25):
    """``machine.wait()``, waking every ``slice_s``: a signal the kernel hands another thread
    (SIGCONT after a stop does) has its Python handler run only when the main thread wakes."""
    while True:
        try:
            return machine.wait(slice_s)
        except TimeoutError:
            continue


def _confine(args, machine) -> int | None:
    """Confine this process before the guest runs (kvmpy.vmm.confine), as the sandbox options
    say; an error status if that fails. Creating files later (--control's snapshots, the gdb
    stub's and the control socket, --stats-svg's chart) widen the filter most; --vsock's UNIX
    sockets alone widen it less (confine.VSOCK)."""
    if not getattr(args, "sandbox", True) and getattr(args, "run_as", None) is None:
        return None
    from ..vmm.confine import ConfineError, confine
    widen = bool(getattr(args, "control", None) or getattr(args, "gdb", None) is not None
                 or getattr(args, "stats_svg", None))
    try:
        confine(machine, control=widen, vsock=getattr(args, "vsock", None) is not None, run_as=args.run_as,
                seccomp=args.sandbox, limits=args.sandbox)
    except ConfineError as e:
        print(f"kvmpy: cannot confine the VMM: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    return None


def _refused(error: OSError, machine) -> bool:
    """If the sandbox refused the call behind ``error``: stop the run, say so, True."""
    from ..vmm.confine import refusal_message
    message = refusal_message(error)
    if message is None:
        return False
    if machine.running:
        machine.request_stop("error")
        machine.wait()
    print(f"kvmpy: {message}", file=sys.stderr)
    return True


def _modules(specs: list[str]) -> list[tuple[str, str]]:
    """--module FILE[,ARGS]: the module's file and its argument string."""
    return [tuple(s.split(",", 1)) if "," in s else (s, "") for s in specs]


def _fw_cfg_files(specs: list[str]) -> dict[str, str]:
    from ..devices.fwcfg import parse_file_spec
    return dict(parse_file_spec(s) for s in specs)


def _tracer(args):
    """The Tracer the --trace options ask for, or None."""
    if not (args.replay or args.trace or args.trace_json):
        return None
    from ..debug.trace import Replayer, Tracer, parse_filter
    if args.replay:
        if args.trace or args.trace_json:
            raise ValueError("--replay cannot be combined with --trace/--trace-json")
        return Replayer.from_file(args.replay)
    filters = dict(kinds=args.trace_kinds.split(",") if args.trace_kinds else None,
                   ports=parse_filter(args.trace_ports), addrs=parse_filter(args.trace_addrs),
                   steps=args.trace == "steps")
    if args.trace_json:
        stream = open(args.trace_json, "w")     # closed in _run when the run ends
        return Tracer.to_stream(stream, json_lines=True, **filters)
    return Tracer.to_stream(sys.stderr, **filters)


def _serve_gdb(machine, args, stop: list):
    """Wait for gdb on ``--gdb``'s socket (at most ``--timeout`` seconds) and let it drive
    the guest (kvmpy.debug.gdbstub). The RunResult, or an exit status if there is none."""
    from ..debug.gdbstub import GdbStub, GdbStubError
    try:
        stub = GdbStub(machine, args.gdb)
    except GdbStubError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    stop[0] = stub.request_stop
    print(f"kvmpy: waiting for gdb on {stub.address} "
          f"(gdb -ex 'target remote {stub.address}' IMAGE)", file=sys.stderr, flush=True)
    result = stub.serve(timeout=args.timeout)
    if stub.stopping == "interrupted" or stub.stopped_waiting == "interrupted":
        print("kvmpy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if stub.stopped_waiting == "timeout":
        print(f"kvmpy: timeout: no debugger connected within {args.timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_OK if result is None else result


# --- the terminal: guest serial output and input ----------------------------------
class _Console:
    """Guest serial output to our stdout, flushed at each newline so prompts appear; with
    ``keep`` (a bytearray) also its last KEEP bytes, for ``kvmpy demo`` to check; with
    ``ready`` (marker, event), the event is set once the output has shown the marker."""

    KEEP = 1 << 20

    def __init__(self, out, keep: bytearray | None = None, ready: tuple[bytes, threading.Event] | None = None):
        self.out, self.ready = out, ready
        self.keep = bytearray() if keep is None and ready is not None else keep

    def write(self, data: bytes) -> int:
        self.out.write(data)
        if b"\n" in data:
            self.out.flush()
        if self.keep is not None:
            self.keep += data
            if self.ready is not None and not self.ready[1].is_set() and self.ready[0] in self.keep[-len(data) - 256:]:
                self.ready[1].set()
            if len(self.keep) > 2 * self.KEEP:
                del self.keep[:-self.KEEP]
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def _start_input(machine, done: threading.Event, sample_input: bytes | None, quit, interactive: bool,
                 gate: threading.Event | None = None):
    """Feed stdin to the guest's UART from a thread. With ``interactive`` (a terminal on stdin,
    ours to change) it becomes the guest's console (kvmpy.cli.terminal: raw mode, Ctrl-A
    commands; ``quit`` ends the run) and is returned, to be restored when the run ends.
    Otherwise, with a ``gate``, nothing is fed before the gate opens (a shell is ready)."""
    first = b""
    if sample_input is not None and not sys.stdin.isatty():
        first = os.read(0, 4096) if _stdin_has_data() else b""
        if not first:                       # no input of our own: the demo's sample input
            machine.feed_serial(sample_input)
            return None
    terminal = keys = None
    if interactive:
        from .terminal import HINT, Escapes, RawTerminal
        terminal = RawTerminal(0)
        if terminal.enter():
            keys = (Escapes(), quit)
            sys.stderr.write(HINT)
            sys.stderr.flush()
        else:
            terminal = None
    gate = gate if keys is None else None   # at a terminal the person typing sees the prompt
    threading.Thread(target=_feed_stdin, args=(machine, done, first, keys, gate), daemon=True, name="stdin").start()
    return terminal


def _stdin_has_data(timeout: float = 0.05) -> bool:
    try:
        return bool(select.select([0], [], [], timeout)[0])
    except (OSError, ValueError):
        return False


def _feed_stdin(machine, done: threading.Event, first: bytes = b"", keys=None,
                gate: threading.Event | None = None) -> None:
    """Copy stdin to the guest's UART, waiting while its FIFO is full (and, with a ``gate``,
    until it opens). With ``keys`` (a terminal's ``(Escapes, quit)``) Ctrl-A commands are
    obeyed instead of sent."""
    from .terminal import HELP, KEYS_HELP, QUIT
    while gate is not None and not gate.wait(0.1):
        if done.is_set():
            return
    queue = [first] if first else []
    while not done.is_set():
        if not queue:
            try:
                data = os.read(0, 4096)
            except OSError:
                return
            if not data:
                return
            queue = keys[0].feed(data) if keys is not None else [data]
            continue
        item = queue[0]
        if item == QUIT:
            keys[1]()
            return
        if item == HELP:
            sys.stderr.write(KEYS_HELP)
            sys.stderr.flush()
            queue.pop(0)
            continue
        n = machine.feed_serial(item)
        if n < len(item):
            queue[0] = item[n:]
            time.sleep(0.005)
        else:
            queue.pop(0)


# --- the end of a run: reports and the exit status ---------------------------------
def _print_inspect(args, machine) -> None:
    if args.inspect:
        print(machine.inspect(), file=sys.stderr)


def _print_stats(args, machine) -> None:
    if args.stats:
        print(f"--- kvmpy stats ---\n{machine.stats}", file=sys.stderr)
    if getattr(args, "stats_svg", None):
        try:
            with open(args.stats_svg, "w") as f:
                f.write(machine.stats.to_svg(title=f"kvmpy: {getattr(args, 'name', None) or args.image}"))
        except OSError as e:
            print(f"kvmpy: cannot write {args.stats_svg}: {e.strerror}", file=sys.stderr)


def _exit_code(result, args) -> int:
    reason = result.reason
    if reason == "exit":
        return result.status & 0xFF
    if reason == "halt":
        return EXIT_OK
    if reason == "reset":
        print("kvmpy: the guest reset the machine", file=sys.stderr)
        return EXIT_RESET
    if reason == "timeout":
        print(f"kvmpy: timeout: stopped the guest after {args.timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    if reason == "interrupted":
        print("kvmpy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if reason == "migrated":
        print("kvmpy: the guest was migrated; it runs on the target now", file=sys.stderr)
        return EXIT_OK
    if reason == "stopped":
        print("kvmpy: stopped through the control socket", file=sys.stderr)
        return EXIT_OK
    print(f"kvmpy: the guest stopped: {reason}", file=sys.stderr)
    return EXIT_INTERNAL_ERROR
