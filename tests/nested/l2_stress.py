"""Boot Debian's kernel to its /init many times, in L1, and count how the boots end.

Run inside the nested testbed's L1 (``python tests/nested/testbed.py --steps stress
--stress-args '...'``), where KVM is kvm_amd: it is the experiment behind the L2
instability of issue 13 (an L2 vCPU that triple-faults, or a boot that stops, now and
then with 2 vCPUs). Each round boots the same PVH vmlinux and busybox initramfs (the
``linux-init`` subject of ``kvmpy bench boot``: /init prints "kvmpy-init: 42") once per
variant, interleaved:

- ``kvmpy:N``  kvmpy's Machine with N vCPUs, in this process;
- ``disk:N``   kvmpy with N vCPUs, test_linux_disk.py's machine: the root disk of
  kvmpy.images.rootfs behind ACPI-described virtio-mmio and the rng, to its ready line;
- ``qdisk:N``  QEMU's microvm with the same root disk (virtio-mmio, which microvm's ACPI
  tables describe too) and a virtio-rng, to the same ready line;
- ``qemu:N``   ``qemu-system-x86_64 -enable-kvm -M microvm -cpu host -smp N`` on the same
  kernel, initramfs and command line (needs QEMU in L1: the testbed adds it for this step).

A boot is ``ok`` when the marker appears, ``triple`` on a triple fault (kvmpy's GuestError,
or QEMU exiting on its own under -no-reboot), ``panic`` when the console shows one,
``hang`` at the timeout. With ``--trace`` the last KVM exits of every vCPU before a failure
(tracefs, kvm:kvm_exit and friends) are printed too: on kvm_amd a triple fault is reported
as a SHUTDOWN exit whose trace line still has the guest's RIP. Each boot prints one
``stress:`` line and the end a table; failed boots print their console's tail.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MARKER = b"kvmpy-init: 42"
TRACEFS = Path("/sys/kernel/tracing")
TRACE_EVENTS = ("kvm/kvm_exit", "kvm/kvm_pic_set_irq", "kvm/kvm_apic", "kvm/kvm_inj_virq", "kvm/kvm_ioapic_set_irq", "kvm/kvm_inj_exception", "kvm/kvm_apic_ipi", "kvm/kvm_nested_vmexit",
                "kvm/kvm_apic_accept_irq")


def say(msg: str) -> None:
    print(f"stress: {msg}", flush=True)


class Sink:
    def __init__(self, marker: bytes = MARKER):
        self.marker = marker
        self.buf = bytearray()
        self.seen = threading.Event()
        self.machine = None

    def write(self, data) -> int:
        self.buf += data
        if not self.seen.is_set() and self.marker in self.buf[-len(data) - len(self.marker):]:
            self.seen.set()
            if self.machine is not None:
                self.machine.request_stop("marker")
        return len(data)

    def flush(self) -> None:
        pass


def pic_state(m) -> str:
    """The 8259 pair's IRR/IMR/ISR/vector base and vCPU 0's LVT0: whether KVM's PIC passed
    ExtINT interrupts to the guest (an ISR bit) during the run."""
    import struct
    out = []
    for chip in (0, 1):
        b = m.vm.get_irqchip(chip)[8:24]
        out.append(f"pic{chip} irr={b[1]:#04x} imr={b[2]:#04x} isr={b[3]:#04x} base={b[5]:#04x} init={b[9]}")
    lvt0 = struct.unpack_from("<I", m.vcpus[0].get_lapic(), 0x350)[0]
    return " ".join(out) + f" lvt0={lvt0:#x}"


def classify(out: bytes, seen: bool, why: str) -> str:
    if seen:
        return "ok"
    if b"Kernel panic" in out:
        return "panic"
    if "triple" in why or "shutdown" in why:
        return "triple"
    if "timeout" in why:
        return "hang"
    return "other"


def _boot(sink, load, timeout: float, **machine) -> tuple[str, str, bytes]:
    """A 512 MiB machine with ``machine``'s options, ``load(m)``, one run: (class, why, console)."""
    import kvmpy
    from kvmpy.errors import GuestError
    with kvmpy.Machine(mem_size=512 << 20, serial=sink, **machine) as m:
        sink.machine = m
        load(m)
        try:
            why = f"run ended: {m.run(timeout=timeout).reason}"
        except GuestError as e:
            why = f"guest error: {e}"
        why = f"[{pic_state(m)}] {why}"
    return classify(bytes(sink.buf), sink.seen.is_set(), why), why, bytes(sink.buf)


def boot_kvmpy(files, initrd: bytes, cpus: int, cmdline: str, timeout: float) -> tuple[str, str, bytes]:
    return _boot(Sink(), lambda m: m.load(files.vmlinux.read_bytes(), format="pvh", cmdline=cmdline,
                                          initrd=initrd), timeout, cpus=cpus)


def boot_disk(cpus: int, append: str, timeout: float, tmp: Path) -> tuple[str, str, bytes]:
    from kvmpy.images import rootfs
    disk = rootfs.build()
    image = disk.copy_to(tmp / "rootfs.img")
    try:
        return _boot(Sink(rootfs.READY_MARKER.encode()),
                     lambda m: m.load(disk.kernel.vmlinux.read_bytes(), cmdline=f"{disk.cmdline} {append}".strip(),
                                      initrd=disk.initrd.read_bytes()),
                     timeout, cpus=cpus, disks=[str(image)], rng=True)
    finally:
        image.unlink()


def boot_qdisk(cpus: int, append: str, timeout: float, tmp: Path) -> tuple[str, str, bytes]:
    from kvmpy.images import rootfs
    disk = rootfs.build()
    image = disk.copy_to(tmp / "rootfs-q.img")
    extra = ["-drive", f"file={image},if=none,id=d0,format=raw", "-device", "virtio-blk-device,drive=d0",
             "-device", "virtio-rng-device"]
    try:
        return boot_qemu(disk.kernel, disk.initrd, cpus, f"{disk.cmdline} {append}".strip(), timeout,
                         extra=extra, marker=rootfs.READY_MARKER.encode())
    finally:
        image.unlink()


def boot_qemu(files, initrd_path: Path, cpus: int, cmdline: str, timeout: float, extra=(),
              marker: bytes = MARKER) -> tuple[str, str, bytes]:
    argv = ["qemu-system-x86_64", "-enable-kvm", "-nodefaults", "-no-reboot", "-display", "none",
            "-monitor", "none", "-serial", "stdio", "-M", "microvm,rtc=on", "-cpu", "host",
            "-smp", str(cpus), "-m", "512M", "-kernel", str(files.vmlinux), "-initrd", str(initrd_path),
            "-append", cmdline, *extra]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    buf = bytearray()
    seen = threading.Event()

    def reader():
        while True:
            b = p.stdout.read1(4096)
            if not b:
                return
            buf.extend(b)
            if marker in buf:
                seen.set()
                p.kill()
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        rc = p.wait(timeout)
        why = f"qemu exited {rc}"
        if not seen.is_set() and b"reboot:" not in buf:
            why += " (shutdown: triple fault under -no-reboot)"
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        why = "timeout"
    t.join(5)
    return classify(bytes(buf), seen.is_set(), why), why, bytes(buf)


def trace_on() -> bool:
    if not (TRACEFS / "trace").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=False)
    if not (TRACEFS / "trace").exists():
        say("no tracefs: --trace ignored")
        return False
    (TRACEFS / "buffer_size_kb").write_text("8192")
    for ev in TRACE_EVENTS:
        f = TRACEFS / "events" / ev / "enable"
        if f.exists():
            f.write_text("1")
    return True


def trace_clear() -> None:
    (TRACEFS / "trace").write_text("")


def trace_timeline() -> str:
    """The legacy-interrupt story of one boot: every PIC input change, every write to a local
    APIC's LVT0 or SVR, and every vector below 32 injected as an interrupt (an ExtINT
    from the PIC with vector base 0 is one)."""
    keep = []
    for t in (TRACEFS / "trace").read_text(errors="replace").splitlines():
        if "kvm_pic_set_irq" in t or ("kvm_apic:" in t and "apic_write" in t and ("LVT0" in t or "SPIV" in t)):
            keep.append(t)
        elif "kvm_inj_virq" in t:         # "kvm_inj_virq: IRQ 0xec [reinjected]"
            try:
                vec = int(t.split("IRQ ", 1)[1].split()[0], 0)
            except (IndexError, ValueError):
                vec = -1
            if vec < 32:
                keep.append(t)
    return "\n".join(keep[:200])


def trace_tail(lines: int) -> str:
    text = (TRACEFS / "trace").read_text(errors="replace").splitlines()
    text = [t for t in text if not t.startswith("#")]
    # the last lines per vCPU thread (the task name and pid start each line)
    by_task: dict[str, list[str]] = {}
    for t in text:
        by_task.setdefault(t.split()[0], []).append(t)
    out = []
    for task, ls in by_task.items():
        out.append(f"--- {task}: {len(ls)} events, last {lines}")
        out += ls[-lines:]
    shutdowns = [t for t in text if "SHUTDOWN" in t.upper() or "shutdown" in t]
    if shutdowns:
        out.append("--- shutdown exits:")
        out += shutdowns[-8:]
    return "\n".join(out)


def churn(stop: threading.Event, period: float) -> None:
    """Make L1 move guest pages while the boots run: compact memory (page migration) every
    ``period`` s, and let khugepaged scan without pause. Each move makes L1's KVM zap the
    page's nested page-table entry (an MMU notifier) while the L2 vCPU may be running."""
    khp = Path("/sys/kernel/mm/transparent_hugepage/khugepaged")
    for name, value in (("scan_sleep_millisecs", "0"), ("alloc_sleep_millisecs", "0"), ("pages_to_scan", "65536")):
        try:
            (khp / name).write_text(value)
        except OSError as e:
            say(f"churn: {name}: {e}")
    n = 0
    while not stop.wait(period):
        try:
            Path("/proc/sys/vm/compact_memory").write_text("1")
            n += 1
        except OSError as e:
            say(f"churn: compact_memory: {e}")
            return


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--variants", default="kvmpy:2,qemu:2", help="comma-separated kvmpy:N / qemu:N")
    p.add_argument("--append", default="", help="more kernel parameters")
    p.add_argument("--timeout", type=float, default=150.0)
    p.add_argument("--trace", action="store_true", help="KVM tracepoints, shown for failed boots")
    p.add_argument("--budget", type=float, default=0, help="stop starting rounds after this many seconds")
    p.add_argument("--timeline", action="store_true", help="with --trace: every boot's PIC/LVT0 timeline")
    p.add_argument("--ram-4k", action="store_true",
                   help="kvmpy's guest RAM as before 2afa2a1: not 2 MiB-aligned, no MADV_HUGEPAGE (so "
                        "L1 backs it with 4 KiB pages and KVM maps L2's memory with 4 KiB entries)")
    p.add_argument("--show-first", action="store_true", help="print each variant's first console in full")
    p.add_argument("--churn", type=float, default=0, metavar="S",
                   help="compact L1's memory every S seconds and make khugepaged eager (page moves under L2)")
    args = p.parse_args(argv)
    if args.churn:
        threading.Thread(target=churn, args=(threading.Event(), args.churn), daemon=True).start()

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    if args.ram_4k:
        from kvmpy.kvm import memory
        memory.HUGE_PAGE = 1 << 62          # no region is "2 MiB or more": plain, unaligned mmap
    from kvmpy.bench.boot_subjects import LINUX_INIT_CMDLINE, _linux_init_initrd
    from kvmpy.images import linuxkernel
    files = linuxkernel.fetch(offline=True)
    initrd_path = _linux_init_initrd(files)
    initrd = initrd_path.read_bytes()
    cmdline = f"{LINUX_INIT_CMDLINE} {args.append}".strip()
    variants = [(v.split(":")[0], int(v.split(":")[1])) for v in args.variants.split(",")]
    tracing = args.trace and trace_on()
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "?"
    say(f"L1 transparent_hugepage: {thp}; ram_4k={args.ram_4k}")
    say(f"kernel {files.kernel_package}, cmdline {cmdline!r}, variants {args.variants}, rounds {args.rounds}")
    counts = {v: {} for v in variants}
    times = {v: [] for v in variants}
    t_start = time.monotonic()
    for rnd in range(args.rounds):
        if args.budget and time.monotonic() - t_start > args.budget:
            say(f"budget reached after {rnd} rounds")
            break
        for kind, cpus in variants:
            if tracing:
                trace_clear()
            t0 = time.monotonic()
            try:
                if kind == "kvmpy":
                    outcome, why, out = boot_kvmpy(files, initrd, cpus, cmdline, args.timeout)
                elif kind == "qdisk":
                    outcome, why, out = boot_qdisk(cpus, args.append, args.timeout, Path(os.environ.get("TMPDIR", "/tmp")))
                elif kind == "disk":
                    outcome, why, out = boot_disk(cpus, args.append, args.timeout, Path(os.environ.get("TMPDIR", "/tmp")))
                else:
                    outcome, why, out = boot_qemu(files, initrd_path, cpus, cmdline, args.timeout)
            except Exception as e:        # noqa: BLE001 - an experiment: record and go on
                outcome, why, out = "error", f"{type(e).__name__}: {e}", b""
            took = time.monotonic() - t0
            n_cpus = b"Brought up 1 node, %d CPU" % cpus in out
            counts[(kind, cpus)][outcome] = counts[(kind, cpus)].get(outcome, 0) + 1
            times[(kind, cpus)].append(took)
            say(f"round {rnd} {kind}:{cpus} {outcome} {took:.1f}s cpus_up={n_cpus} {why.splitlines()[0][:300]}")
            if tracing and args.timeline:
                print(f"=== {kind}:{cpus} round {rnd} timeline:\n{trace_timeline()}\n=== end", flush=True)
            if args.show_first and rnd == 0:
                print(f"=== {kind}:{cpus} first console:\n{out.decode('utf-8', 'replace')}\n=== end", flush=True)
            if outcome != "ok":
                text = out.decode("utf-8", "replace")
                print(f"=== {kind}:{cpus} round {rnd} {outcome}: {why}\n--- console tail:\n{text[-6000:]}", flush=True)
                if tracing:
                    print(trace_tail(40), flush=True)
                print("=== end", flush=True)
    say("summary:")
    for v in variants:
        n = sum(counts[v].values())
        bad = n - counts[v].get("ok", 0)
        med = sorted(times[v])[len(times[v]) // 2] if times[v] else 0
        say(f"  {v[0]}:{v[1]}  {bad}/{n} failed  {dict(sorted(counts[v].items()))}  median {med:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
