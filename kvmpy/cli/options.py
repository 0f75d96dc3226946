"""The ``kvmpy`` command line: the argparse parser, one function per command's arguments.

``build_parser(command)`` builds in full only the command given (``_Commands``): the
others are listed in ``kvmpy --help`` but their options are never built, which saves a
few milliseconds of every run's start-up. The loader's tables (formats, CPU modes) are
imported only when the ``run`` or ``demo`` options are built.
"""
from __future__ import annotations

import argparse
import re

from .status import DEMO_CODES_HELP, EXIT_CODES_HELP

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.I)


def disk_spec(text: str):
    """'PATH[,ro][,iops=N][,bps=N][,fps=N]' -> a Disk (vmm/platform.py)."""
    from ..vmm.platform import Disk
    try:
        return Disk.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def net_spec(text: str):
    """'passt', 'passt:SOCKET' or 'tap:NAME' [,mac=MAC] -> a Net (kvmpy/net)."""
    from ..net import Net
    try:
        return Net.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def vsock_spec(text: str):
    """'PATH[,cid=N]' -> a Vsock (vmm/platform.py)."""
    from ..vmm.platform import Vsock
    try:
        return Vsock.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def gdb_address(text: str) -> str | int:
    """--gdb PATH (a Unix socket, the default) or tcp:PORT (on 127.0.0.1): what
    kvmpy.debug.gdbstub.GdbStub listens on, a str path or an int port."""
    if text.startswith("tcp:"):
        port = text[4:]
        if not port.isdigit() or int(port) > 65535:
            raise argparse.ArgumentTypeError(f"expected tcp:PORT with a port number up to 65535, got {text!r}")
        return int(port)
    if not text or text.isdigit():
        raise argparse.ArgumentTypeError(f"expected the path of a Unix socket to create, got {text!r}"
                                         + (f" (for TCP on 127.0.0.1 say tcp:{text})" if text else ""))
    return text


def parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r} (examples: 0x100000, 4096)") from None


# --- the parser ---------------------------------------------------------------------
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
    # the other commands, one function each, in the order ``kvmpy --help`` lists them
    for add_command in (_demo_parser, _run_parser, _restore_parser, _receive_parser, _ctl_parser,
                        _inspect_parser, _bench_parser, _fuzz_parser):
        add_command(sub)
    return p


LINUX_DEMO_HELP = """\
kvmpy demo linux is different: it boots a real Linux to a shell on your terminal.
  - fetches Debian's cloud kernel, busybox-static and the kernel's virtio modules
    (apt-get download; cached in $KVMPY_CACHE or ~/.cache/kvmpy)
  - builds an ext4 root disk and its initramfs (mke2fs -d; cached by content)
  - boots the kernel (PVH) with 2 vCPUs, 512 MiB, the virtio-rng and its root on
    /dev/vda: a scratch copy of the disk, so writes are gone after the run
  - 'reboot' in the guest leaves (status 120), or Ctrl-A x
  --cpus, --mem, --disk (more disks: /dev/vdb...), --cmdline (appended) and --timeout
  apply. Commands on a pipe wait until the shell is up:
      printf 'uname -a\\nreboot\\n' | kvmpy demo linux
  It needs a KVM that runs guest ring 0 (VMX or SVM in /proc/cpuinfo): elsewhere
  Linux stops after its banner, and the demo says so before it starts. To boot the
  same disk with kvmpy run: python -m kvmpy.images.rootfs --help; docs/linux.md."""


# --- one function per command -------------------------------------------------------
def _demo_parser(sub: _Commands) -> None:
    d = sub.add_parser("demo", help="run a bundled demo guest and check that it does what it says",
                       epilog=DEMO_CODES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a bundled guest (see 'kvmpy demos') and check that it did what "
                                   "its description promises: its exit value and a line of its output. "
                                   "Works without a terminal: a demo that reads input gets its sample "
                                   "input when stdin has none.\n\n" + LINUX_DEMO_HELP)
    d.add_argument("name", help="demo name, e.g. hello-long, or linux")
    d.add_argument("--offline", action="store_true",
                   help="demo linux: use only what the cache holds (never run apt)")
    _run_options(d)


def _run_parser(sub: _Commands) -> None:
    r = sub.add_parser("run", help="run a guest image (raw, ELF, multiboot kernel, Linux bzImage/vmlinux)",
                       epilog=EXIT_CODES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a guest image. Its COM1 output goes to stdout and stdin feeds "
                                   "its COM1 input. It ends when the guest writes to isa-debug-exit "
                                   "(port 0xf4), resets, faults, halts (with --no-irqchip), or the timeout expires.")
    r.add_argument("image", help="path of a raw binary or ELF32/ELF64 executable")
    _run_options(r)


def _restore_parser(sub: _Commands) -> None:
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


def _receive_parser(sub: _Commands) -> None:
    v = sub.add_parser("receive", help="wait for a live migration and continue the guest here",
                       epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Listen for one incoming live migration ('kvmpy ctl PATH migrate "
                                   "HOST:PORT' on the source), then run the guest here. If the stream "
                                   "breaks, what arrived is discarded and the source keeps running. "
                                   "Give the guest's disks with --disk (the stream does not choose "
                                   "files here). With a key (--key-file, or $KVMPY_MIGRATION_KEY) every "
                                   "frame must carry a MAC made with it; without one, only a loopback "
                                   "address may be listened on.")
    v.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to listen on, e.g. 127.0.0.1:4444 (port 0: pick one and print it); "
                        "beyond loopback only with a key")
    v.add_argument("--key-file", default=None, metavar="PATH",
                   help="the migration key, shared with the source (a file only its owner may read, "
                        "e.g. made with 'openssl rand -hex 32 > PATH; chmod 600 PATH')")
    v.add_argument("--wait", type=seconds, default=None, metavar="SECONDS",
                   help="give up if no migration arrives within this time")
    v.add_argument("--deadline", type=seconds, default=600.0, metavar="SECONDS",
                   help="the whole migration must be done within this time (default 600)")
    v.add_argument("--frame-timeout", type=seconds, default=60.0, metavar="SECONDS",
                   help="each frame of the stream must arrive whole within this time (default 60)")
    v.add_argument("--max-mem", type=positive_size, default=None, metavar="SIZE",
                   help="the most guest RAM a source may bring (default: half this host's RAM, "
                        "at most 8G)")
    _host_options(v)


def _ctl_parser(sub: _Commands) -> None:
    c = sub.add_parser("ctl", help="control a VM started with --control PATH",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Send one command to the control socket of a running kvmpy.",
                       epilog="commands:\n  status              running? paused?\n"
                              "  pause | resume      stop the vCPUs where they are / let them go on\n"
                              "  snapshot DIR        save the VM to DIR (it pauses for the copy, then goes on)\n"
                              "  migrate HOST:PORT   live-migrate to a 'kvmpy receive --listen HOST:PORT'\n"
                              "                      (--key-file PATH: the key the target was given)\n"
                              "  stats               exits and time so far\n"
                              "  inspect [VCPU]      registers, mode, page walks (pause first)\n"
                              "  stop                end the run")
    c.add_argument("socket", metavar="PATH", help="the --control socket")
    c.add_argument("cmd", choices=("status", "pause", "resume", "snapshot", "migrate", "stats", "inspect", "stop"),
                   metavar="COMMAND", help="status, pause, resume, snapshot, migrate, stats, inspect, stop")
    c.add_argument("arg", nargs="?", help="DIR for snapshot, HOST:PORT for migrate, VCPU for inspect")
    c.add_argument("--key-file", default=None, metavar="PATH",
                   help="migrate: the key the target was given (kvmpy receive --key-file); "
                        "else $KVMPY_MIGRATION_KEY if set")


def _inspect_parser(sub: _Commands) -> None:
    i = sub.add_parser("inspect", help="show a running VM's vCPU: mode, registers, segments, page walks, code",
                       description="Pause the VM behind a --control socket for a moment, print one vCPU's "
                                   "CPU mode, registers, segments, GDT/IDT, the page walks of RIP and RSP, "
                                   "the stack and the code at RIP (docs/inspect.md), and let it go on. "
                                   "A VM paused with 'kvmpy ctl PATH pause' stays paused.")
    i.add_argument("socket", metavar="PATH", help="the VM's --control socket")
    i.add_argument("vcpu", nargs="?", type=int, default=0, help="vCPU number (default 0)")


def _bench_parser(sub: _Commands) -> None:
    """Listed only: ``main`` hands ``kvmpy bench ...`` to the benchmark before parsing."""
    b = sub.add_parser("bench", help="run a benchmark (exits, serial, blk, boot, snapshot, reset, sandbox, fuzz, linux); 'kvmpy bench NAME --help'",
                       add_help=False)
    b.add_argument("name", nargs="?", help="benchmark name")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="options passed to the benchmark")


def _fuzz_parser(sub: _Commands) -> None:
    f = sub.add_parser("fuzz", help="run fuzz cases in a guest (kvmpy.fuzz): 'kvmpy fuzz run' (also as afl-fuzz's "
                                    "target), 'kvmpy fuzz replay' (one crash, explained)",
                       description="kvmpy fuzz run [OPTIONS] [FILE]: run one input (FILE, or stdin) in the harness "
                                   "and print the outcome; started by afl-fuzz "
                                   "(afl-fuzz -i seeds -o out -- kvmpy fuzz run [OPTIONS] @@), be its fork server. "
                                   "kvmpy fuzz replay [OPTIONS] INPUT: re-run one input and show the crash: the "
                                   "exception, the registers, the code (docs/fuzzing.md)")
    if isinstance(f, _Unbuilt):         # another command was given: fuzz is only listed
        return
    actions = f.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = actions.add_parser("run", help="one input, or AFL++'s fork server",
                           description="Run one input (FILE, or stdin) and print the outcome; under afl-fuzz "
                                       "be its fork server (docs/fuzzing.md)")
    f.add_argument("file", nargs="?", help="the input file (afl-fuzz: @@); default stdin")
    _harness_options(f)
    from .fuzzing import REPLAY_EPILOG
    r = actions.add_parser("replay", help="re-run one input from the checkpoint and explain how it ended",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=REPLAY_EPILOG,
                           description="Re-run INPUT (a file afl-fuzz saved, e.g. out/default/crashes/id:000000...)\n"
                                       "in the same harness as 'kvmpy fuzz run' (give it the same harness options)\n"
                                       "and print how the case ended: the exception by name, the registers of the\n"
                                       "code that faulted, and that code disassembled (docs/fuzzing.md).")
    r.add_argument("input_file", metavar="INPUT", help="the input to replay ('-': stdin)")
    _harness_options(r)
    g = r.add_argument_group("looking closer")
    g.add_argument("--trace", choices=("exits", "steps"), default=None,
                   help="print the case's VM exits (exits) or every instruction it runs with the registers "
                        "each changed (steps: one exit per instruction) on stderr")
    g.add_argument("--trace-json", metavar="FILE", default=None, help="write the trace as JSON lines to FILE")
    g.add_argument("--inspect", action="store_true",
                   help="also print the full vCPU report of the code the case ended in: mode, segments, GDT, IDT, "
                        "page walks of RIP and RSP, the stack")
    g.add_argument("--gdb", type=gdb_address, default=None, metavar="PATH|tcp:PORT",
                   help="run the case once to learn where it ends, then again from the checkpoint under gdb: "
                        "kvmpy waits for gdb -ex 'target remote PATH' (a 0600 Unix socket; tcp:PORT for "
                        "127.0.0.1) at most --gdb-wait seconds. On kvm_pvm hosts add --ring0: breakpoints "
                        "and steps do not stop CPL-3 code there")
    g.add_argument("--gdb-wait", type=seconds, default=60.0, metavar="SECONDS",
                   help="how long to wait for gdb to connect (default 60)")


def _harness_options(f) -> None:
    """The harness a case runs in (kvmpy.fuzz.Harness's arguments): fuzz run and fuzz replay."""
    g = f.add_argument_group("the harness (kvmpy.fuzz.Harness; the same for run and replay)")
    g.add_argument("--image", default="fuzz-target", help="the guest: an ELF path or a bundled guest name (default fuzz-target)")
    g.add_argument("--input", default="fuzz_input", help="symbol or address of the input buffer")
    g.add_argument("--input-size", type=parse_int, metavar="BYTES", help="the buffer's size, when --input is an address")
    g.add_argument("--length", default="fuzz_input_len", help="symbol or address of the input's length ('none': no length)")
    g.add_argument("--coverage", default="__fuzz_cov_map", help="symbol or address of the coverage map")
    g.add_argument("--coverage-size", type=parse_int, metavar="BYTES", help="the map's size, when --coverage is an address")
    g.add_argument("--ready", type=parse_int, default=0x52, metavar="VALUE", help="the guest's ready exit value (default 0x52)")
    g.add_argument("--done", type=parse_int, default=0x44, metavar="VALUE", help="the exit value of a case without a crash (default 0x44)")
    g.add_argument("--report", action="append", default=[], metavar="VALUE=NAME",
                   help="an exit value that is a crash, and its name (repeatable; e.g. 0x43=assert)")
    g.add_argument("--timeout", type=float, default=1.0, metavar="SECONDS",
                   help="one case's budget in seconds (default 1); under afl-fuzz keep it at or above its -t")
    g.add_argument("--mem", type=parse_int, default=16 << 20, metavar="BYTES", help="guest RAM in bytes (default 16 MiB)")
    g.add_argument("--ring0", action="store_true", help="start the guest at CPL 0 (default CPL 3)")
    g.add_argument("--end-at", action="append", default=[], metavar="SYMBOL|ADDRESS",
                   help="end a case (not a crash) when the guest reaches this code address; repeatable")


# --- the options of run and demo, by argument group ---------------------------------
def _run_options(p: argparse.ArgumentParser) -> None:
    """The options of ``run`` and ``demo``, in the three groups ``--help`` shows."""
    if isinstance(p, _Unbuilt):         # another command's line: skip importing the loader too
        return
    _machine_options(p.add_argument_group("machine"))
    _image_options(p.add_argument_group("image"))
    _running_options(p.add_argument_group("run"))
    _sandbox_options(p)


def _machine_options(g) -> None:
    """The machine's shape: RAM, vCPUs, disks, run loop, interrupt controllers."""
    g.add_argument("--mem", type=positive_size, default=None, metavar="SIZE",
                   help="guest RAM, e.g. 64M or 1G (default 64M)")
    g.add_argument("--cpus", type=positive_int, default=None, metavar="N",
                   help="number of vCPUs (default 1; a demo may ask for more); the others wait for INIT/SIPI")
    g.add_argument("--disk", action="append", default=[], type=disk_spec, metavar="PATH[,ro][,iops=N,bps=N,fps=N]",
                   help="attach a file as a virtio-blk disk (repeatable; ',ro' for read-only; iops=, bps=, "
                        "fps= limit requests, bytes and flushes per second, e.g. bps=10M)")
    g.add_argument("--serial-bps", type=positive_size, default=None, metavar="N",
                   help="write at most N bytes per second of serial output (e.g. 64K); beyond a 1 MiB "
                        "backlog output is dropped and counted")
    g.add_argument("--python", action="store_true",
                   help="serve every exit and the UART in Python (the readable path) instead of the C loop")
    g.add_argument("--no-irqchip", dest="irqchip", action="store_false",
                   help="no in-kernel PIC/IOAPIC/LAPIC and PIT: HLT exits to the VMM (teaching guests); "
                        "by default the machine is PC-like and HLT waits for interrupts")
    g.add_argument("--no-acpi", dest="acpi", action="store_false", default=None,
                   help="give a Linux kernel no ACPI tables (CPUs, IOAPIC, devices): the disks go on its command "
                        "line as virtio_mmio.device= instead (by default ACPI describes them, with --no-irqchip never)")
    g.add_argument("--test-devices", action="store_true",
                   help="add QEMU's pc-testdev (ports 0xe0-0xeb, IRQ-line ports 0x2000-0x2017, MMIO "
                        "0xff000000), for kernels written for 'qemu -device pc-testdev' such as kvm-unit-tests")
    g.add_argument("--rng", action="store_true",
                   help="add a virtio-rng entropy device fed from the host's getrandom, in the virtio-mmio "
                        "window after the disks (at most 1 MiB and 4096 requests per second)")
    g.add_argument("--net", type=net_spec, default=None, metavar="passt|passt:SOCKET|tap:NAME[,mac=MAC]",
                   help="add a virtio-net network device (after the disks and the rng): 'passt' starts "
                        "passt (Debian package passt; no privileges): DHCP, DNS and NAT to the host, and the "
                        "gateway address reaches the host's 127.0.0.1; 'passt:SOCKET' connects to a running "
                        "'passt -s SOCKET'; 'tap:NAME' uses the TAP interface NAME (CAP_NET_ADMIN to create "
                        "it; bring it up and address it yourself). docs/net.md")
    g.add_argument("--vsock", type=vsock_spec, default=None, metavar="PATH[,cid=N]",
                   help="add a virtio-vsock device (guest CID N, default 3) whose host side is the UNIX "
                        "socket PATH: a host program connects to PATH and writes 'CONNECT <port>\\n' to "
                        "reach a guest port (the answer is 'OK <hostport>\\n'); a guest connecting to "
                        "CID 2 port P reaches a listener on PATH_P. docs/vsock.md")
    g.add_argument("--virtio", choices=("mmio", "pci"), default="mmio", dest="virtio_transport",
                   help="the transport of the virtio devices (disks, rng, network, vsock): 'mmio' (default; "
                        "virtio-mmio windows at 0xd0000000, one IRQ each) or 'pci' (a PCI host bridge at 0xcf8 "
                        "and ECAM 0xe0000000, one virtio-pci function per device with MSI-X, INTx as fallback; "
                        "docs/virtio.md)")


def _image_options(g) -> None:
    """How the image boots: format, CPU mode, addresses, kernel command line, modules, fw_cfg files."""
    from ..loader import FORMATS, MODES
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


def _running_options(g) -> None:
    """The run itself: its time limit, traces and replay, gdb, the end-of-run reports, control."""
    g.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                   help="stop the guest after this many seconds (exit status 124)")
    _trace_options(g)
    g.add_argument("--gdb", type=gdb_address, default=None, metavar="PATH|tcp:PORT",
                   help="wait for gdb and let it drive the guest: registers, memory through the page tables, "
                        "continue, stepi, hardware breakpoints and watchpoints (software breakpoints become "
                        "hardware ones), Ctrl-C, vCPUs as threads. PATH: a Unix socket only you can use "
                        "(mode 0600, the peer's user checked); connect with gdb -ex 'target remote PATH'. "
                        "tcp:PORT: TCP on 127.0.0.1 instead (only your user's connections are accepted). "
                        "--timeout bounds the wait for gdb to connect")
    g.add_argument("--stats-svg", metavar="FILE", default=None,
                   help="also draw the statistics as an SVG chart in FILE")
    g.add_argument("--stats", action="store_true",
                   help="print exits by reason and device and the time split on stderr at the end")
    g.add_argument("--inspect", action="store_true",
                   help="when the run stops, print the stopping vCPU's mode, registers, segments, GDT, "
                        "IDT, page walks of RIP and RSP and the code at RIP on stderr")
    _control_option(g)


def _trace_options(g) -> None:
    """--trace, --trace-json and its filters, --replay (kvmpy.debug.trace)."""
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


def _control_option(g) -> None:
    g.add_argument("--control", metavar="PATH", default=None,
                   help="serve a control socket at PATH (mode 0600) for 'kvmpy ctl PATH pause|resume|"
                        "snapshot DIR|migrate HOST:PORT|stats|inspect|stop'")
    g.add_argument("--paused", action="store_true",
                   help="pause the guest as soon as its vCPUs have started (within milliseconds; QEMU's -S), "
                        "before the control socket opens: 'kvmpy ctl PATH resume' lets it run (needs --control)")


def _host_options(p: argparse.ArgumentParser) -> None:
    """Options of commands that continue a saved or migrated guest: host side only."""
    g = p.add_argument_group("host options")
    g.add_argument("--disk", action="append", default=None, type=disk_spec,
                   metavar="PATH[,ro][,iops=N,bps=N,fps=N]",
                   help="the file for the guest's next disk (repeat, in order; each the size of the "
                        "original). restore: instead of the saved paths. receive: required when the "
                        "guest has disks (the same files, for shared storage)")
    g.add_argument("--net", type=net_spec, default=None, metavar="passt|passt:SOCKET|tap:NAME[,mac=MAC]",
                   help="the backend of the guest's network card, if it has one (default: the saved spec "
                        "made again: a new passt, the same TAP); docs/net.md")
    g.add_argument("--python", action="store_true", help="all-Python run loop and devices")
    g.add_argument("--vsock", default=None, metavar="PATH",
                   help="the host socket of the guest's vsock device (its CID comes from the saved "
                        "machine); its connections did not survive, and the guest is told so "
                        "(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET). Without it the guest's connections are refused")
    g.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                   help="stop the guest after this many seconds (exit status 124)")
    g.add_argument("--stats", action="store_true", help="print exit statistics on stderr at the end")
    g.add_argument("--inspect", action="store_true", help="print the stopping vCPU's state on stderr at the end")
    _control_option(g)
    _sandbox_options(p)


def _sandbox_options(p: argparse.ArgumentParser) -> None:
    """The sandbox the machine runs in once built (kvmpy.vmm.confine, docs/security.md)."""
    g = p.add_argument_group("sandbox", "On by default: once the machine is built and before the "
                             "guest runs, kvmpy confines itself: a seccomp filter allowing only the "
                             "system calls a running VM needs (a refused one ends the run with an "
                             "error naming it), no_new_privs, no core files, a cap on open files. "
                             "--control and --gdb widen the filter (sockets, snapshot files); see "
                             "docs/security.md")
    g.add_argument("--no-sandbox", dest="sandbox", action="store_false",
                   help="run unconfined: no seccomp filter, no_new_privs or resource limits "
                        "(for a device or feature the filter refuses, or without libseccomp)")
    g.add_argument("--run-as", metavar="USER[:GROUP]", default=None,
                   help="after /dev/kvm, the disks and the serial streams are open, become this user "
                        "(and group; default its own) for good, e.g. nobody:kvm; needs root. "
                        "A --control socket is then created by that user, and 'kvmpy ctl' must run as it")
