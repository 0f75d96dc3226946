"""The ``kvmpy`` command: inspect KVM, list and run the bundled micro-VMs, run your own images.

Exit status of ``run`` (documented in ``kvmpy run --help``): the guest's isa-debug-exit
status when it used that device (always odd), 0 for a clean HLT, and even codes of our
own otherwise, so the two never collide. ``demo`` instead says whether the guest kept
the promise its description makes (``images.guests``: an exit status and a line of
output): 0 if it did, else non-zero with the reason in one line, the last on stderr.
"""
from __future__ import annotations

import argparse
import os
import re
import select
import signal
import sys
import threading
import time

EXIT_OK = 0
EXIT_DEMO_FAILED = 1        # kvmpy demo: the guest ended, but not as its description promises
EXIT_USAGE = 2
EXIT_VMM_ERROR = 4          # bad image, KVM unavailable, bad option value
EXIT_RESET = 120
EXIT_TRIPLE_FAULT = 122
EXIT_TIMEOUT = 124
EXIT_INTERNAL_ERROR = 126   # KVM internal error, entry failure, unsupported exit
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""exit status:
  odd N      the guest wrote v to isa-debug-exit (port 0xf4): N = ((v << 1) | 1) & 0xff
  {EXIT_OK:<10} the guest halted (HLT; only with --no-irqchip: by default HLT waits for interrupts)
  {EXIT_USAGE:<10} bad command line
  {EXIT_VMM_ERROR:<10} kvmpy could not start the guest (bad image, KVM unavailable)
  {EXIT_RESET:<10} the guest reset the machine (i8042 0xFE)
  {EXIT_TRIPLE_FAULT:<10} the guest triple-faulted (register dump and code on stderr)
  {EXIT_TIMEOUT:<10} --timeout expired
  {EXIT_INTERNAL_ERROR:<10} KVM internal error, entry failure or unsupported exit
  {EXIT_INTERRUPTED:<10} interrupted with Ctrl-C
  {EXIT_OK:<10} (also) the guest was migrated away or stopped through --control"""

DEMO_CODES_HELP = f"""exit status of kvmpy demo:
  {EXIT_OK:<10} the guest did what its description promises (its exit value and output line)
  {EXIT_DEMO_FAILED:<10} it exited otherwise, or stopped without exiting (HLT, --control stop)
  other      it never got to its exit: {EXIT_VMM_ERROR}, {EXIT_RESET}, {EXIT_TRIPLE_FAULT}, {EXIT_TIMEOUT}, {EXIT_INTERNAL_ERROR}, {EXIT_INTERRUPTED} as for kvmpy run
  the reason why not is the last line on stderr: 'kvmpy: demo NAME failed: ...'

""" + EXIT_CODES_HELP.replace("exit status:", "exit status of kvmpy run:", 1)

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.I)


def parse_size(text: str) -> int:
    """'64M', '1G', '512k', '2MiB' or plain bytes -> bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 64M, 1G, 2097152)")
    return int(m.group(1)) << (10 * " kmgt".index((m.group(2) or " ").lower()))


def _positive(convert, what: str):
    """An argparse type: ``convert(text)`` that must be a finite number > 0."""
    def check(text: str):
        try:
            n = convert(text)
        except (ValueError, argparse.ArgumentTypeError):
            n = None
        if n is None or not (0 < n < float("inf")):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return n
    return check


positive_size = _positive(parse_size, "a positive size such as 64M or 1G")
positive_int = _positive(int, "a positive number")
seconds = _positive(float, "a positive number of seconds")


def parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r} (examples: 0x100000, 4096)") from None


def _run_options(p: argparse.ArgumentParser) -> None:
    from .loader import FORMATS, MODES
    g = p.add_argument_group("machine")
    g.add_argument("--mem", type=positive_size, default=None, metavar="SIZE",
                   help="guest RAM, e.g. 64M or 1G (default 64M)")
    g.add_argument("--cpus", type=positive_int, default=None, metavar="N",
                   help="number of vCPUs (default 1; a demo may ask for more); the others wait for INIT/SIPI")
    g.add_argument("--disk", action="append", default=[], metavar="PATH[,ro]",
                   help="attach a file as a virtio-blk disk (repeatable; ',ro' for read-only)")
    g.add_argument("--python", action="store_true",
                   help="serve every exit and the UART in Python (the readable path) instead of the C loop")
    g.add_argument("--no-irqchip", dest="irqchip", action="store_false",
                   help="no in-kernel PIC/IOAPIC/LAPIC and PIT: HLT exits to the VMM (teaching guests); "
                        "by default the machine is PC-like and HLT waits for interrupts")
    g = p.add_argument_group("image")
    g.add_argument("--format", choices=FORMATS,
                   default=None, help="image format (default auto: multiboot if it has the header, Linux "
                                      "bzImage or PVH vmlinux, ELF by its magic, else raw)")
    g.add_argument("--mode", choices=MODES, default=None,
                   help="CPU mode for a raw image (default real; ELF32 -> protected, ELF64 -> long); "
                        "for a bzImage, its 32-bit (protected) or 64-bit (long) entry")
    g.add_argument("--load-addr", type=parse_int, default=None, metavar="ADDR",
                   help="where a raw image goes (default 0x7c00 in real mode, else 0x100000)")
    g.add_argument("--entry", type=parse_int, default=None, metavar="ADDR",
                   help="entry point of a raw image (default: its load address)")
    g.add_argument("--cmdline", default="", metavar="TEXT",
                   help="kernel command line for Linux or multiboot (also fw_cfg's), e.g. "
                        "'console=ttyS0 earlyprintk=serial'")
    g.add_argument("--initrd", default=None, metavar="FILE", help="initial ramdisk for a Linux kernel")
    g.add_argument("--module", action="append", default=[], metavar="FILE[,ARGS]",
                   help="a multiboot module, with an optional argument string (repeatable)")
    g.add_argument("--fw-cfg", action="append", default=[], metavar="NAME=FILE",
                   help="expose FILE to the guest as fw_cfg file NAME, e.g. opt/my/config (repeatable)")
    g.add_argument("--user", action="store_true",
                   help="start a long-mode guest in ring 3 (user segments and pages, all I/O ports allowed)")
    g = p.add_argument_group("run")
    g.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                   help="stop the guest after this many seconds (exit status 124)")
    g.add_argument("--trace", choices=("exits", "steps"), default=None,
                   help="exits: print every VM exit on stderr (time, vCPU, kind, port/address, data, RIP, "
                        "the guest instruction; the run takes the Python loop so no exit is hidden). "
                        "steps: single-step the guest and print each instruction with the registers it "
                        "changed (slow: one exit per instruction)")
    g.add_argument("--trace-json", metavar="FILE", default=None, help="write the exit trace as JSON lines to FILE")
    g.add_argument("--replay", metavar="FILE", default=None,
                   help="replay a run recorded with --trace-json: the guest's IN and MMIO reads are answered "
                        "from the recording (serial input included), its writes are checked against it")
    g.add_argument("--trace-kinds", metavar="K[,K]", default=None,
                   help="only these exit kinds, e.g. io-out,mmio-write (io-in, mmio-read, hlt, ...)")
    g.add_argument("--trace-ports", metavar="LO[-HI]", default=None, help="only I/O exits on these ports")
    g.add_argument("--trace-addrs", metavar="LO[-HI]", default=None, help="only MMIO exits at these addresses")
    g.add_argument("--gdb", type=int, default=None, metavar="PORT",
                   help="wait for gdb (target remote 127.0.0.1:PORT) and let it drive the guest: registers, "
                        "memory through the page tables, continue, stepi, hardware breakpoints and "
                        "watchpoints (software breakpoints become hardware ones), Ctrl-C, vCPUs as threads")
    g.add_argument("--stats-svg", metavar="FILE", default=None,
                   help="also draw the statistics as an SVG chart in FILE")
    g.add_argument("--stats", action="store_true",
                   help="print exits by reason and device and the time split on stderr at the end")
    g.add_argument("--inspect", action="store_true",
                   help="when the run stops, print the stopping vCPU's mode, registers, segments, GDT, "
                        "IDT, page walks of RIP and RSP and the code at RIP on stderr")
    _control_option(g)


def _control_option(g) -> None:
    g.add_argument("--control", metavar="PATH", default=None,
                   help="serve a control socket at PATH (mode 0600) for 'kvmpy ctl PATH pause|resume|"
                        "snapshot DIR|migrate HOST:PORT|stats|inspect|stop'")


def _host_options(p: argparse.ArgumentParser) -> None:
    """Options of commands that continue a saved or migrated guest: host side only."""
    g = p.add_argument_group("host options")
    g.add_argument("--disk", action="append", default=None, metavar="PATH[,ro]",
                   help="the file for the guest's next disk (repeat, in order; each the size of the "
                        "original). restore: instead of the saved paths. receive: required when the "
                        "guest has disks (the same files, for shared storage)")
    g.add_argument("--python", action="store_true", help="all-Python run loop and devices")
    g.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                   help="stop the guest after this many seconds (exit status 124)")
    g.add_argument("--stats", action="store_true", help="print exit statistics on stderr at the end")
    g.add_argument("--inspect", action="store_true", help="print the stopping vCPU's state on stderr at the end")
    _control_option(g)


class _Unbuilt:
    """Stands in for the parser of a command that is not on this command line: its options
    are not built (building every command's parser costs ~4 ms of each run's start-up)."""

    def add_argument(self, *args, **kwargs) -> None:
        pass

    def add_argument_group(self, *args, **kwargs) -> "_Unbuilt":
        return self


class _Commands:
    """The subparsers action, building in full only the command ``wanted`` (None: all).
    Every command is still listed in ``kvmpy --help`` and accepted by name."""

    def __init__(self, subparsers, wanted: str | None):
        self.subparsers, self.wanted = subparsers, wanted

    def add_parser(self, name: str, *, help: str, **kwargs):
        if self.wanted in (None, name):
            return self.subparsers.add_parser(name, help=help, **kwargs)
        self.subparsers.add_parser(name, help=help, add_help=False)
        return _Unbuilt()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``kvmpy`` parser; with ``command``, only that command's options are built."""
    p = argparse.ArgumentParser(
        prog="kvmpy",
        description="kvmpy: a minimal KVM hypervisor in Python. Boots tiny guests on /dev/kvm; "
                    "the guest's serial port (COM1) is your terminal.",
        epilog="examples:\n  kvmpy info\n  kvmpy demos\n  kvmpy demo hello-long --stats\n"
               "  kvmpy run guest.elf --mem 128M --timeout 10\n"
               "  kvmpy run boot.bin --format raw --mode real --load-addr 0x7c00\n"
               "  kvmpy run guest.elf --control /tmp/vm.sock    then: kvmpy ctl /tmp/vm.sock snapshot /tmp/snap\n"
               "  kvmpy restore /tmp/snap\n\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = _Commands(p.add_subparsers(dest="command", metavar="COMMAND"), command)
    sub.add_parser("info", help="is KVM usable here? API version, capabilities, CPUID, backend")
    sub.add_parser("demos", help="list the bundled micro-VM demos")
    d = sub.add_parser("demo", help="run a bundled demo guest and check that it does what it says",
                       epilog=DEMO_CODES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a bundled guest (see 'kvmpy demos') and check that it did what "
                                   "its description promises: its exit value and a line of its output. "
                                   "Works without a terminal: a demo that reads input gets its sample "
                                   "input when stdin has none.")
    d.add_argument("name", help="demo name, e.g. hello-long")
    _run_options(d)
    r = sub.add_parser("run", help="run a guest image (raw, ELF, multiboot kernel, Linux bzImage/vmlinux)",
                       epilog=EXIT_CODES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a guest image. Its COM1 output goes to stdout and stdin feeds "
                                   "its COM1 input. It ends when the guest writes to isa-debug-exit "
                                   "(port 0xf4), resets, faults, halts (with --no-irqchip), or the timeout expires.")
    r.add_argument("image", help="path of a raw binary or ELF32/ELF64 executable")
    _run_options(r)
    s = sub.add_parser("restore", help="continue a guest from a snapshot directory",
                       epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Continue a guest saved with 'kvmpy ctl PATH snapshot DIR' or "
                                   "Machine.snapshot(DIR): its serial output goes on where it stopped. "
                                   "The snapshot is checked first (magic, version, checksums, disk "
                                   "sizes); a bad one is refused and nothing starts.")
    s.add_argument("snapshot", help="snapshot directory")
    s.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reading the RAM files for their checksums (faster for big guests)")
    _host_options(s)
    v = sub.add_parser("receive", help="wait for a live migration and continue the guest here",
                       epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Listen for one incoming live migration ('kvmpy ctl PATH migrate "
                                   "HOST:PORT' on the source), then run the guest here. If the stream "
                                   "breaks, what arrived is discarded and the source keeps running. "
                                   "Give the guest's disks with --disk (the stream does not choose "
                                   "files here). The stream is not authenticated: listen on loopback "
                                   "or a trusted network.")
    v.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to listen on, e.g. 127.0.0.1:4444 (port 0: pick one and print it)")
    v.add_argument("--wait", type=seconds, default=None, metavar="SECONDS",
                   help="give up if no migration arrives within this time")
    _host_options(v)
    c = sub.add_parser("ctl", help="control a VM started with --control PATH",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Send one command to the control socket of a running kvmpy.",
                       epilog="commands:\n  status              running? paused?\n"
                              "  pause | resume      stop the vCPUs where they are / let them go on\n"
                              "  snapshot DIR        save the VM to DIR (it pauses for the copy, then goes on)\n"
                              "  migrate HOST:PORT   live-migrate to a 'kvmpy receive --listen HOST:PORT'\n"
                              "  stats               exits and time so far\n"
                              "  inspect [VCPU]      registers, mode, page walks (pause first)\n"
                              "  stop                end the run")
    c.add_argument("socket", metavar="PATH", help="the --control socket")
    c.add_argument("cmd", choices=("status", "pause", "resume", "snapshot", "migrate", "stats", "inspect", "stop"),
                   metavar="COMMAND", help="status, pause, resume, snapshot, migrate, stats, inspect, stop")
    c.add_argument("arg", nargs="?", help="DIR for snapshot, HOST:PORT for migrate, VCPU for inspect")
    i = sub.add_parser("inspect", help="show a running VM's vCPU: mode, registers, segments, page walks, code",
                       description="Pause the VM behind a --control socket for a moment, print one vCPU's "
                                   "CPU mode, registers, segments, GDT/IDT, the page walks of RIP and RSP, "
                                   "the stack and the code at RIP (docs/inspect.md), and let it go on. "
                                   "A VM paused with 'kvmpy ctl PATH pause' stays paused.")
    i.add_argument("socket", metavar="PATH", help="the VM's --control socket")
    i.add_argument("vcpu", nargs="?", type=int, default=0, help="vCPU number (default 0)")
    b = sub.add_parser("bench", help="run a benchmark (exits, serial, blk, boot, snapshot); 'kvmpy bench NAME --help'",
                       add_help=False)
    b.add_argument("name", nargs="?", help="benchmark name")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    return p


# --- commands -----------------------------------------------------------------------
def cmd_info(args) -> int:
    from .kvm.abi import Cap
    from .kvm import Kvm
    with Kvm() as kvm:
        print("KVM: usable (/dev/kvm)")
        print(f"API version: {kvm.api_version()}")
        print(f"backend module: {_kvm_backend()}")
        print(f"vCPU mmap size: {kvm.vcpu_mmap_size()} bytes")
        print(f"supported CPUID leaves: {len(kvm.supported_cpuid())}; MSRs to save: {len(kvm.msr_index_list())}")
        print("capabilities:")
        for cap in Cap:
            print(f"  {cap.name:<28} {kvm.check_extension(cap)}")
    return EXIT_OK


def _kvm_backend() -> str:
    """Which KVM module serves /dev/kvm (kvm_intel, kvm_amd, kvm_pvm, ...)."""
    try:
        found = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm_"))
    except OSError:
        return "unknown"
    return ", ".join(found) or "unknown"


def cmd_demos(args) -> int:
    from .images import guests
    width = max(len(g.name) for g in guests.all() if g.demo)
    for g in guests.all():
        if g.demo:
            print(f"  {g.name:<{width}}  {g.description}")
    print("\nrun one with: kvmpy demo NAME   (options: kvmpy demo --help)")
    return EXIT_OK


def cmd_demo(args) -> int:
    from .images import guests
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
    # a guest that promises nothing (spin, triple-fault: test guests) ends with the run's status
    output = bytearray() if g.demo_status is not None else None
    if g.needs_disk and not args.disk:          # a disk demo without a disk: lend it a scratch one
        import tempfile
        with tempfile.NamedTemporaryFile(prefix="kvmpy-demo-", suffix=".img") as scratch:
            scratch.truncate(1 << 20)
            print(f"kvmpy: {g.name} drives a disk; using a scratch 1 MiB file of zeros "
                  "(pass --disk FILE[,ro] to use your own)", file=sys.stderr)
            args.disk = [scratch.name]
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


def cmd_run(args) -> int:
    load = dict(format=args.format or "auto", mode=args.mode, load_addr=args.load_addr,
                entry=args.entry, user=args.user, cmdline=args.cmdline, modules=_modules(args.module),
                initrd=args.initrd)
    return _run(args, args.image, load, sample_input=None)


def _modules(specs: list[str]) -> list[tuple[str, str]]:
    """--module FILE[,ARGS]: the module's file and its argument string."""
    return [tuple(s.split(",", 1)) if "," in s else (s, "") for s in specs]


def _fw_cfg_files(specs: list[str]) -> dict[str, str]:
    from .devices.fwcfg import parse_file_spec
    return dict(parse_file_spec(s) for s in specs)


class _Console:
    """Guest serial output to our stdout, flushed at each newline so prompts appear; with
    ``keep`` (a bytearray) also its last KEEP bytes, for ``kvmpy demo`` to check."""

    KEEP = 1 << 20

    def __init__(self, out, keep: bytearray | None = None):
        self.out, self.keep = out, keep

    def write(self, data: bytes) -> int:
        self.out.write(data)
        if b"\n" in data:
            self.out.flush()
        if self.keep is not None:
            self.keep += data
            if len(self.keep) > 2 * self.KEEP:
                del self.keep[:-self.KEEP]
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def _stdin_has_data(timeout: float = 0.05) -> bool:
    try:
        return bool(select.select([0], [], [], timeout)[0])
    except (OSError, ValueError):
        return False


def _feed_stdin(machine, done: threading.Event, first: bytes = b"") -> None:
    """Copy stdin to the guest's UART, waiting while its FIFO is full."""
    data = first
    while not done.is_set():
        if not data:
            try:
                data = os.read(0, 4096)
            except OSError:
                return
            if not data:
                return
        n = machine.feed_serial(data)
        data = data[n:]
        if data:
            time.sleep(0.005)


def _run(args, image, load: dict, sample_input: bytes | None, keep: bytearray | None = None) -> int:
    from .errors import KvmpyError
    from .vmm.machine import Machine
    try:
        tracer = _tracer(args)
    except (ValueError, OSError) as e:
        print(f"kvmpy: bad trace option: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        machine = Machine(mem_size=64 << 20 if args.mem is None else args.mem,
                          cpus=1 if args.cpus is None else args.cpus, irqchip=args.irqchip,
                          serial=_Console(sys.stdout.buffer, keep), native=not args.python, disks=args.disk,
                          fw_cfg=_fw_cfg_files(args.fw_cfg))
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
            return _drive(args, machine, tracer, sample_input)
        finally:
            if args.trace_json:
                tracer.stream.close()


def _drive(args, machine, tracer=None, sample_input: bytes | None = None, started: bool = False) -> int:
    """Run ``machine`` to its end (or wait for it, if ``started``), with stdin as its serial
    input, Ctrl-C, the control socket, and the end-of-run reports; returns the exit status."""
    from .errors import GuestError
    done = threading.Event()
    control = None
    if not getattr(args, "replay", None):       # a replay's input comes from the recording
        _start_input(machine, done, sample_input)
    old = signal.signal(signal.SIGINT, lambda *_: machine.request_stop("interrupted")) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        if getattr(args, "gdb", None) is not None:
            result = _serve_gdb(machine, args.gdb)
            if result is None:
                return EXIT_OK              # gdb detached before the guest stopped
        else:
            if not started:
                machine.start(timeout=args.timeout, trace=tracer)
            if getattr(args, "control", None):      # once the run is under way: ctl pause works at once
                from .lifecycle.control import ControlServer
                control = ControlServer(machine, args.control)
                print(f"kvmpy: control socket at {args.control} (kvmpy ctl {args.control} --help)",
                      file=sys.stderr, flush=True)
            result = machine.wait()
    except GuestError as e:
        print(f"kvmpy: {e.args[0] if args.inspect else e}", file=sys.stderr)
        _print_inspect(args, machine)
        _print_stats(args, machine)
        return EXIT_TRIPLE_FAULT if getattr(e, "reason", "") == "triple-fault" else EXIT_INTERNAL_ERROR
    except BaseException:
        if machine.running:                 # a bad --control path, Ctrl-C before the handler...
            machine.request_stop("interrupted")
            machine.wait()
        raise
    finally:
        done.set()
        if old is not None:
            signal.signal(signal.SIGINT, old)
        if control is not None:
            control.close()
    _print_inspect(args, machine)
    _print_stats(args, machine)
    return _exit_code(result, args)


def cmd_restore(args) -> int:
    from .errors import KvmpyError
    from .vmm.machine import Machine
    try:
        machine = Machine.restore(args.snapshot, verify=args.verify, disks=args.disk,
                                  serial=_Console(sys.stdout.buffer), native=not args.python)
    except (KvmpyError, ValueError) as e:
        print(f"kvmpy: cannot restore: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    with machine:
        return _drive(args, machine)


def cmd_receive(args) -> int:
    from .errors import KvmpyError
    from .lifecycle.migration import parse_address, receive
    try:
        listen = parse_address(args.listen)
    except ValueError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return EXIT_USAGE

    def listening(addr):
        print(f"kvmpy: waiting for a migration on {addr[0]}:{addr[1]}", file=sys.stderr, flush=True)

    try:
        machine, pages = receive(listen, disks=args.disk, timeout=args.wait, on_listen=listening,
                                 run_timeout=args.timeout, progress=_progress,
                                 serial=_Console(sys.stdout.buffer), native=not args.python)
    except (KvmpyError, OSError, ValueError) as e:
        print(f"kvmpy: migration failed: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    with machine:
        return _drive(args, machine, started=True)


def _ask(socket_path: str, cmd: str, **extra) -> dict | None:
    """One control request; its answer if it succeeded, else None after saying why."""
    from .lifecycle.control import ControlError, request
    try:
        answer = request(socket_path, cmd, progress=_progress, **extra)
    except ControlError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return None
    if not answer.get("ok"):
        print(f"kvmpy: {cmd}: {answer.get('error')}", file=sys.stderr)
        return None
    return answer


def cmd_inspect(args) -> int:
    answer = _ask(args.socket, "inspect", vcpu=args.vcpu, pause=True)
    if answer is None:
        return EXIT_VMM_ERROR
    print(answer["text"])
    return EXIT_OK


def _progress(text: str) -> None:
    print(f"kvmpy: {text}", file=sys.stderr, flush=True)


def cmd_ctl(args) -> int:
    extra = {}
    if args.cmd in ("snapshot", "migrate"):
        if not args.arg:
            print(f"kvmpy: ctl {args.cmd} needs {'DIR' if args.cmd == 'snapshot' else 'HOST:PORT'}",
                  file=sys.stderr)
            return EXIT_USAGE
        extra = {"path": os.path.abspath(args.arg)} if args.cmd == "snapshot" else {"to": args.arg}
    elif args.cmd == "inspect" and args.arg is not None:
        try:
            extra = {"vcpu": int(args.arg)}
        except ValueError:
            print(f"kvmpy: inspect takes a vCPU number, got {args.arg!r}", file=sys.stderr)
            return EXIT_USAGE
    elif args.arg is not None:
        print(f"kvmpy: ctl {args.cmd} takes no argument", file=sys.stderr)
        return EXIT_USAGE
    answer = _ask(args.socket, args.cmd, **extra)
    if answer is None:
        return EXIT_VMM_ERROR
    if "text" in answer:
        print(answer["text"])
    elif args.cmd in ("status", "pause", "resume"):
        print("paused" if answer.get("paused") else "running" if answer.get("running", True) else "stopped")
    elif args.cmd == "snapshot":
        print(f"saved {answer['path']}")
    return EXIT_OK


def _serve_gdb(machine, port: int):
    """Wait for gdb on 127.0.0.1:PORT and let it drive the guest (kvmpy.debug.gdbstub)."""
    from .debug.gdbstub import GdbStub
    stub = GdbStub(machine, port=port)
    print(f"kvmpy: waiting for gdb on 127.0.0.1:{stub.port} "
          f"(gdb -ex 'target remote 127.0.0.1:{stub.port}' IMAGE)", file=sys.stderr, flush=True)
    return stub.serve()


def _tracer(args):
    """The Tracer the --trace options ask for, or None."""
    if not (args.replay or args.trace or args.trace_json):
        return None
    from .debug.trace import Replayer, Tracer, parse_filter
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


def _start_input(machine, done: threading.Event, sample_input: bytes | None) -> None:
    first = b""
    if sample_input is not None and not sys.stdin.isatty():
        first = os.read(0, 4096) if _stdin_has_data() else b""
        if not first:                       # no input of our own: the demo's sample input
            machine.feed_serial(sample_input)
            return
    threading.Thread(target=_feed_stdin, args=(machine, done, first), daemon=True, name="stdin").start()


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


def cmd_bench(args) -> int:
    try:
        from . import bench
    except ImportError as e:
        print(f"kvmpy: benchmarks are not available in this installation ({e})", file=sys.stderr)
        return EXIT_VMM_ERROR
    if args.name in (None, "-h", "--help") or args.name not in bench.BENCHMARKS:
        print("usage: kvmpy bench NAME [options]   (kvmpy bench NAME --help)\n\nbenchmarks:")
        for name, mod in bench.BENCHMARKS.items():
            print(f"  {name:<8} {mod.DESCRIPTION}")
        return EXIT_OK if args.name in (None, "-h", "--help") else EXIT_USAGE
    return bench.BENCHMARKS[args.name].main(args.bench_args)


COMMANDS = {"info": cmd_info, "demos": cmd_demos, "demo": cmd_demo, "run": cmd_run, "restore": cmd_restore,
            "receive": cmd_receive, "ctl": cmd_ctl, "inspect": cmd_inspect, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:           # the benchmark parses its own options (and --help)
        name = argv[1] if len(argv) > 1 else None
        return cmd_bench(argparse.Namespace(name=name, bench_args=argv[2:]))
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .errors import KvmpyError
    try:
        return COMMANDS[args.command](args)
    except KvmpyError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    except KeyboardInterrupt:            # before the run installed its own handler
        print("kvmpy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:              # our stdout's reader went away (kvmpy ... | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def entry() -> None:
    """The ``kvmpy`` command (console script and ``python -m kvmpy``): ``main()``, then exit.

    When a command returns, its machine is closed and its files are written, so the
    interpreter's own teardown (freeing every module, a last garbage collection: ~10-15 ms,
    a tenth of a small guest's whole run) does nothing we need: flush our output and leave
    at once. ``kvmpy bench`` exits the ordinary way (it is not timed from outside).
    """
    code = main()
    if sys.argv[1:2] == ["bench"]:
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:              # our stdout's reader went away (kvmpy ... | head)
        pass
    os._exit(code)
