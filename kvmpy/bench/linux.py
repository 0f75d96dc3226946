"""linux: Debian's kernel on a root disk, kvmpy against QEMU: boot, disk, network and vsock.

Both VMMs boot the same files: Debian's cloud kernel (the uncompressed vmlinux, PVH entry),
the root disk's initramfs and a fresh copy of one root disk (kvmpy.images.rootfs with
Debian's python3 and iperf3), 512 MiB and 1 vCPU unless --mem/--cpus say otherwise, the same
kernel command line, and the same virtio-mmio devices: the root disk, a data disk
(--disk-mib MiB, a new sparse file each run), virtio-net through passt (Debian's; kvmpy
starts its own, QEMU gets one started here through ``-netdev stream``), and vsock (kvmpy:
its UNIX socket; QEMU: ``vhost-vsock-device``, which needs /dev/vhost-vsock and AF_VSOCK
here). The variants:

  kvmpy   a fresh ``python -m kvmpy run VMLINUX --disk ... --net passt --vsock PATH``
  qemu    a fresh ``qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host ...``
          (microvm's firmware runs the PVH option ROM, as in ``kvmpy bench boot``)

In each run the disk's rc.local (kvmpy/bench/linux_guest.py) measures, and the host reads
its console lines:

  boot_to_shell       seconds from spawning the VMM to the line a shell command of rc.local
                      prints (rc.local runs at the end of the disk's rcS: modules loaded,
                      udhcpc has its lease)
  disk_write/read     MB/s of ``dd bs=1M oflag=direct`` / ``iflag=direct`` over the data disk,
                      timed in the guest
  net_guest_to_host   Mbit/s of ``iperf3 -c GATEWAY`` in the guest, received by an
                      ``iperf3 -s`` on this host's loopback (passt maps the gateway there)
  net_host_to_guest   the same with ``-R``
  vsock_rtt           microseconds per round trip of 64 bytes between this host and an echo
                      server in the guest (Python, the same in both), median of --pings

Rounds (--rounds, default 3) run both variants in an order that rotates each round; the
table shows medians, the ratio kvmpy/QEMU and whether it meets the target (boot at or below
1.0, throughput at or above 0.8; vsock has none). A measurement that cannot be made says
"n/a" and why, in the table and the JSON; nothing is estimated. Where KVM emulates guest
ring 0 (kvm_pvm) Linux stops after its banner, so the benchmark refuses to start (exit 2);
``python tests/nested/testbed.py --steps linuxbench`` runs it on kvm_amd in QEMU's TCG.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from . import _common, linux_guest
from ._common import BenchError
from .boot_subjects import ring0_emulated

NAME = "linux"
DESCRIPTION = ("Debian's kernel on a root disk, kvmpy vs QEMU microvm on the same KVM: boot to a shell "
               "command, dd, iperf3 through passt, vsock round trips (needs VMX or SVM)")
VARIANTS = ("kvmpy", "qemu")
QEMU = "qemu-system-x86_64"
MiB = 1 << 20
DISK_SIZE = 160 * MiB           # python3 (~25 MB) and iperf3 with room to spare
GUEST_CID = 3
CMDLINE = "console=ttyS0 root=/dev/vda rw panic=-1 quiet"


def add_arguments(p) -> None:
    p.add_argument("--rounds", type=_common.positive, default=3, metavar="R",
                   help="interleaved rounds, each boots both variants once (default 3)")
    p.add_argument("--mem", type=_common.positive, default=512 * MiB, metavar="SIZE",
                   help="guest RAM (default 512M)")
    p.add_argument("--cpus", type=_common.positive, default=1, metavar="N", help="vCPUs (default 1)")
    p.add_argument("--disk-mib", type=_common.positive, default=256, metavar="MIB",
                   help="MiB that dd writes and reads on the data disk (default 256)")
    p.add_argument("--iperf-seconds", type=_common.positive, default=5, metavar="S",
                   help="seconds of each iperf3 direction (default 5)")
    p.add_argument("--pings", type=_common.positive, default=500, metavar="N",
                   help="vsock round trips per run (default 500, after 20 untimed)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds one run may take before it is killed (default 600)")
    p.add_argument("--vmm-stats", action="store_true",
                   help="run kvmpy with --stats and keep its report (its stderr's end) in each kvmpy run's "
                        "record as vmm_report")
    p.add_argument("--qemu", default=QEMU, metavar="PATH", help=f"the QEMU to compare with (default {QEMU})")


# --- what every run shares ------------------------------------------------------------------
class Setup:
    """The disk, the kernel, the ports, and the host's iperf3 server, for every run."""

    def __init__(self, args, progress):
        emulating = ring0_emulated()
        if emulating:
            raise BenchError(f"cannot run here: this host's KVM ({', '.join(emulating)}) emulates guest ring 0, "
                             "and Linux stops after its banner, long before a shell (docs/host-notes.md); run "
                             "it where KVM has VMX or SVM, e.g. in the nested testbed: "
                             "python tests/nested/testbed.py --steps linuxbench")
        self.args = args
        self.qemu = _need(args.qemu, "the reference (apt-get install qemu-system-x86)")
        self.iperf3 = _need("iperf3", "the host's side of the network test (apt-get install iperf3)")
        self.passt = _need("passt", "the network backend of both variants (apt-get install passt)")
        progress("building the root disk (python3, iperf3; cached)")
        self.disk = build_disk(progress)
        self.iperf_port, self.vsock_port = _free_port(), 5000
        params = linux_guest.cmdline_parameter(args.disk_mib, args.iperf_seconds, self.iperf_port, self.vsock_port)
        self.cmdline = f"{CMDLINE} {params}"
        self.qemu_vsock = _qemu_vsock_problem()      # None, or why QEMU's vsock cannot run here
        self.server = None

    def __enter__(self):
        self.server = subprocess.Popen([self.iperf3, "-s", "-p", str(self.iperf_port)], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        self.server.terminate()
        self.server.wait()


def _need(tool: str, why: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise BenchError(f"{tool!r} not found: {why}")
    return found


def build_disk(progress):
    """The benchmark's root disk: rootfs with python3, iperf3 and the guest's script (cached)."""
    from kvmpy.images import rootfs
    return rootfs.build(python=True, packages=linux_guest.PACKAGES, files=linux_guest.guest_files(),
                        size=DISK_SIZE, progress=progress)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _qemu_vsock_problem() -> str | None:
    """Why QEMU's vhost-vsock cannot run here (None: it can)."""
    if not pathlib.Path("/dev/vhost-vsock").exists():
        return "no /dev/vhost-vsock on this host (modprobe vhost_vsock)"
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except (OSError, AttributeError) as e:
        return f"no AF_VSOCK on this host ({e})"
    return None


# --- the two variants' command lines ---------------------------------------------------------
def kvmpy_argv(setup: Setup, root: pathlib.Path, data: pathlib.Path, vsock: pathlib.Path) -> list[str]:
    a = setup.args
    return [sys.executable, "-m", "kvmpy", "run", str(setup.disk.kernel.vmlinux), "--mem", str(a.mem),
            "--cpus", str(a.cpus), "--initrd", str(setup.disk.initrd), "--cmdline", setup.cmdline,
            "--disk", str(root), "--disk", str(data), "--net", "passt", "--vsock", str(vsock),
            *(["--stats"] if a.vmm_stats else [])]


def qemu_argv(setup: Setup, root: pathlib.Path, data: pathlib.Path, net: int) -> list[str]:
    """microvm with the same devices in the same order: root disk, data disk, net, vsock (when
    this host has vhost-vsock), each on the next virtio-mmio transport. ``net``: the file
    descriptor of QEMU's end of the stream to passt."""
    a = setup.args
    argv = [setup.qemu, "-M", "microvm,rtc=on", "-enable-kvm", "-cpu", "host", "-smp", str(a.cpus),
            "-m", f"{a.mem // MiB}M", "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-kernel", str(setup.disk.kernel.vmlinux), "-initrd", str(setup.disk.initrd),
            "-append", setup.cmdline]
    for i, path in enumerate((root, data)):
        argv += ["-drive", f"id=d{i},file={path},format=raw,if=none",
                 "-device", f"virtio-blk-device,drive=d{i}"]
    argv += ["-netdev", f"stream,id=n0,server=off,addr.type=fd,addr.str={net}",
             "-device", "virtio-net-device,netdev=n0"]
    if setup.qemu_vsock is None:
        argv += ["-device", f"vhost-vsock-device,guest-cid={GUEST_CID}"]
    return argv


def start_passt(passt: str, log) -> tuple[subprocess.Popen, socket.socket]:
    """Debian's passt on one end of a socket pair, as kvmpy starts its own (``--fd``, the same
    MTU, the same socket buffers); returns it and the other end, which QEMU gets as its
    ``-netdev stream`` socket."""
    from kvmpy.net.passt import size_buffers
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    size_buffers(ours)
    size_buffers(theirs)
    try:
        child = subprocess.Popen([passt, "--foreground", "--quiet", "--mtu", "1500", "--fd", str(theirs.fileno())],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=[theirs.fileno()])
    finally:
        theirs.close()
    return child, ours


# --- the host's end of vsock -------------------------------------------------------------------
def vsock_connect(variant: str, path: pathlib.Path, port: int) -> socket.socket:
    """A stream to the guest's port: through kvmpy's UNIX socket (``CONNECT port``), or AF_VSOCK."""
    if variant == "qemu":
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect((GUEST_CID, port))
        return s
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    s.sendall(b"CONNECT %d\n" % port)
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            raise BenchError(f"kvmpy's vsock closed after {answer!r}")
        answer += chunk
    if not answer.startswith(b"OK "):
        raise BenchError(f"kvmpy's vsock answered {answer!r}")
    return s


def round_trips(s: socket.socket, count: int, warmup: int = 20, size: int = 64) -> list[float]:
    """Microseconds of each of ``count`` round trips of ``size`` bytes (``warmup`` more first)."""
    msg = bytes(range(size))
    times = []
    for i in range(warmup + count):
        t = time.perf_counter()
        s.sendall(msg)
        got = b""
        while len(got) < size:
            chunk = s.recv(size - len(got))
            if not chunk:
                raise BenchError("the guest's vsock echo closed the connection")
            got += chunk
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e6)
    return times


#: A kernel message's start ("[   12.345678] "): one that begins inside a line cut a line the
#: guest's script was printing in two, and the console rejoins it (the script's markers stay whole).
_KERNEL_LINE = re.compile(r"\[\s*\d+\.\d{6}\] ")
#: Console lines that say the guest's kernel crashed (a run that ends early says so).
_CRASH = re.compile(r"Kernel panic|BUG: |Oops|general protection fault|Call Trace")


# --- a VMM process and its console -------------------------------------------------------------
class Console:
    """A VMM started with its serial console on stdout: every line, with when it arrived."""

    def __init__(self, argv: list[str], log, timeout: float, pass_fds=()):
        self.lines: list[str] = []
        self.arrived = threading.Condition()
        self.deadline = time.monotonic() + timeout
        self.start = time.monotonic()
        self.log = log
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                     pass_fds=pass_fds, env=_child_env())
        self.times: list[float] = []
        threading.Thread(target=self._read, daemon=True, name="console").start()

    def _read(self) -> None:
        cut = ""                                # a line's start, before a kernel message broke in
        for raw in self.proc.stdout:
            t = time.monotonic() - self.start
            line = cut + raw.decode("utf-8", "replace").rstrip("\r\n")
            m = _KERNEL_LINE.search(line, 1)
            cut, line = (line[:m.start()], line[m.start():]) if m else ("", line)
            with self.arrived:
                self.lines.append(line)
                self.times.append(t)
                self.arrived.notify_all()
        with self.arrived:
            self.proc.wait()
            self.arrived.notify_all()

    def wait_for(self, text: str) -> tuple[float, str]:
        """(seconds from the start, the line) of the first line holding ``text``;
        BenchError when the process ends or the run's time is up first."""
        seen = 0
        with self.arrived:
            while True:
                for i in range(seen, len(self.lines)):
                    if text in self.lines[i]:
                        return self.times[i], self.lines[i]
                seen = len(self.lines)
                if self.proc.poll() is not None or time.monotonic() > self.deadline:
                    break
                self.arrived.wait(max(0.0, min(1.0, self.deadline - time.monotonic())))
        ended = "timed out" if self.proc.returncode is None else f"exited with status {self.proc.returncode}"
        crash = next((line for line in self.lines if _CRASH.search(line)), None)
        if crash is not None:
            ended += f" after the guest's kernel crashed ({crash.strip()[:200]})"
        tail = " | ".join(self.lines[-12:])[-1200:]
        self.log.seek(0)
        said = self.log.read().decode(errors="replace").strip()[-800:]
        raise BenchError(f"waiting for {text!r}: the VMM {ended}; its console's last lines: {tail or 'none'}; "
                         f"its stderr (and passt's): {said or 'nothing'}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _child_env() -> dict:
    """Our environment, with this kvmpy first on the path (``python -m kvmpy`` runs the same one)."""
    import kvmpy
    here = str(pathlib.Path(kvmpy.__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))


# --- one run -----------------------------------------------------------------------------------
def run_once(setup: Setup, variant: str, tmp: pathlib.Path, progress) -> dict:
    """Boot ``variant`` once and measure: the run's record, {"values", "n_a", "guest_tcp"} (see
    _drive), with "failed" (why) when the run ended early, and kvmpy's "vmm_report" with
    --vmm-stats. A run that fails keeps what it measured; the rest is n/a with the reason."""
    root, data = tmp / "root.img", tmp / "data.img"
    setup.disk.copy_to(root)
    with open(data, "wb") as f:
        f.truncate(setup.args.disk_mib * MiB)
    passt, net, keep = None, None, ()
    record = {"values": {}, "n_a": {}, "guest_tcp": {}}
    with open(tmp / f"{variant}.log", "w+b") as log:
        try:
            if variant == "qemu":
                passt, net = start_passt(setup.passt, log)
                argv, keep = qemu_argv(setup, root, data, net.fileno()), (net.fileno(),)
            else:
                argv = kvmpy_argv(setup, root, data, tmp / "vsock")
            console = Console(argv, log, setup.args.timeout, keep)
            try:
                _drive(setup, variant, console, tmp / "vsock", progress, record)
                if setup.args.vmm_stats:
                    _wait_quietly(console.proc, 30)     # the guest reboots: kvmpy prints its report
            except BenchError as e:
                record["failed"] = str(e)
                progress(f"{variant}: the run failed: {e}")
                for metric in linux_guest.METRICS:
                    if metric not in record["values"]:
                        record["n_a"].setdefault(metric, f"the run failed: {e}"[:400])
            finally:
                console.stop()
            if setup.args.vmm_stats and variant == "kvmpy":
                log.seek(0)
                record["vmm_report"] = log.read().decode(errors="replace")[-4000:]
            return record
        finally:
            _stop_passt(passt, net)


def _wait_quietly(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        pass


def _stop_passt(passt: subprocess.Popen | None, net: socket.socket | None) -> None:
    if net is not None:
        net.close()
    if passt is not None:
        passt.kill()
        passt.wait()


def _drive(setup: Setup, variant: str, console: Console, vsock: pathlib.Path, progress, record: dict) -> None:
    """Read the console to the end of the guest's script, answering its vsock listener; fills
    ``record``: "values" {metric: value}, "n_a" {metric: why}, "guest_tcp" (the guest's TCP
    counters during each transfer). BenchError when the VMM ends or hangs first (what was
    measured by then stays in ``record``)."""
    values, missing = record["values"], record["n_a"]
    boot, _ = console.wait_for(f"{linux_guest.MARK} boot {linux_guest.BOOT_VALUE}")
    values["boot_to_shell"] = boot
    progress(f"{variant}: shell command after {boot:.2f} s")
    try:
        _, line = console.wait_for(f"{linux_guest.MARK} vsock-")
    finally:                                    # what came before the vsock phase counts anyway
        _parse_results(console.lines, values, missing)
        record["guest_tcp"] = linux_guest.tcp_deltas(console.lines)
    if "vsock-listening" in line:
        if variant == "qemu" and setup.qemu_vsock:
            missing["vsock_rtt"] = setup.qemu_vsock
        else:
            try:
                with vsock_connect(variant, vsock, setup.vsock_port) as s:
                    values["vsock_rtt"] = _median(round_trips(s, setup.args.pings))
            except (OSError, BenchError) as e:
                missing["vsock_rtt"] = f"the round trips failed: {e}"
    else:
        missing["vsock_rtt"] = setup.qemu_vsock if variant == "qemu" and setup.qemu_vsock else line.strip()
    console.wait_for(f"{linux_guest.MARK} done")


def _median(xs: list[float]) -> float:
    import statistics
    return statistics.median(xs)


def _parse_results(lines: list[str], values: dict, missing: dict) -> None:
    parsers = {"disk_write": lambda: linux_guest.parse_timed(_one(lines, "dd-write")),
               "disk_read": lambda: linux_guest.parse_timed(_one(lines, "dd-read")),
               "net_guest_to_host": lambda: linux_guest.parse_iperf3(linux_guest.tagged(lines, "iperf-up |")),
               "net_host_to_guest": lambda: linux_guest.parse_iperf3(linux_guest.tagged(lines, "iperf-down |"))}
    for metric, parse in parsers.items():
        try:
            values[metric] = parse()
        except linux_guest.ParseError as e:
            missing[metric] = str(e)


def _one(lines: list[str], tag: str) -> str:
    found = linux_guest.tagged(lines, tag)
    if not found:
        raise linux_guest.ParseError(f"the guest printed no {tag} line")
    return found[-1]


# --- the benchmark -------------------------------------------------------------------------------
def measure(args, progress) -> dict:
    samples: dict = {m: {v: [] for v in VARIANTS} for m in linux_guest.METRICS}
    missing: dict = {m: {} for m in linux_guest.METRICS}
    runs = []
    with Setup(args, progress) as setup:
        for r in range(args.rounds):
            for variant in _common.rotate(VARIANTS, r):
                progress(f"round {r + 1}/{args.rounds}: {variant}")
                with tempfile.TemporaryDirectory(prefix="kvmpy-bench-linux-") as tmp:
                    record = run_once(setup, variant, pathlib.Path(tmp), progress)
                runs.append({"round": r, "variant": variant, **record})
                for metric, value in record["values"].items():
                    samples[metric][variant].append(value)
                for metric, reason in record["n_a"].items():
                    missing[metric][variant] = reason
        return _result(setup, runs, samples, missing)


def _result(setup: Setup, runs: list, samples: dict, missing: dict) -> dict:
    a = setup.args
    summary = linux_guest.summarize(samples, missing, VARIANTS)
    results = [{"variant": run["variant"], "metric": m, "value": v, "unit": linux_guest.METRICS[m][0],
                "round": run["round"]} for run in runs for m, v in run["values"].items()]
    return {"benchmark": NAME, "host": _common.host_info(),
            "params": {"rounds": a.rounds, "mem": a.mem, "cpus": a.cpus, "disk_mib": a.disk_mib,
                       "iperf_seconds": a.iperf_seconds, "pings": a.pings, "cmdline": setup.cmdline,
                       "kernel": setup.disk.kernel.kernel_package, "qemu": _common.tool_version([setup.qemu, "--version"]),
                       "iperf3": _common.tool_version([setup.iperf3, "--version"]), "variants": list(VARIANTS)},
            "results": results, "runs": runs, "summary": summary,
            "ratios": {f"kvmpy/qemu {m}": row["ratio"] for m, row in summary.items()},
            "targets_met": {m: row["met"] for m, row in summary.items()}}


def table(result: dict) -> str:
    p = result["params"]
    head = (f"Debian {p['kernel']} on a root disk, {p['cpus']} vCPU(s), {p['mem'] // MiB} MiB: "
            f"{p['rounds']} interleaved rounds, medians; dd {p['disk_mib']} MiB, iperf3 {p['iperf_seconds']} s, "
            f"{p['pings']} vsock round trips a run")
    rows = linux_guest.table_rows(result["summary"], tuple(p["variants"]))
    body = _common.format_table(["metric", *p["variants"], "kvmpy/qemu", "target", "met"], rows)
    return "\n".join([head, _common.host_line(result["host"]), body, *tcp_lines(result.get("runs", []))])


def tcp_lines(runs: list[dict]) -> list[str]:
    """One line per variant and transfer: the guest's TCP counters in each round (informative)."""
    lines = []
    for variant in VARIANTS:
        for way in ("up", "down"):
            per_run = [run.get("guest_tcp", {}).get(way) for run in runs if run["variant"] == variant]
            if any(per_run):
                shown = "; ".join(" ".join(f"{k}={v}" for k, v in c.items()) for c in per_run if c)
                lines.append(f"guest TCP, {variant} {way}: {shown}")
    return lines


def main(argv: list[str] | None = None, *, prog: str | None = None, results: pathlib.Path | None = None) -> int:
    """``kvmpy bench linux [argv]``; ``results`` is where the JSON goes without --out."""
    return _common.run_main(sys.modules[__name__], argv, prog, results)
