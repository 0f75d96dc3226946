"""Debian's stock cloud kernel starts on kvmpy: through PVH (the uncompressed vmlinux) and through
the bzImage 64-bit boot protocol, it prints its banner, echoes our command line, and reports
the memory map and initrd exactly where the loader put them.

On hosts without hardware virtualisation (docs/host-notes.md) the kernel dies a little later, so these
tests stop the run once the lines they check have appeared. The bzImage test takes about two
minutes there (the decompressor runs emulated) and runs only with KVMPY_SLOW_TESTS=1.

The kernel comes from kvmpy.images.linuxkernel's cache ($KVMPY_CACHE or ~/.cache/kvmpy), downloaded
with apt on first use; without apt the tests skip (with KVMPY_REQUIRE_KVM=1, as in CI, they fail).
"""
import os
import re
import threading
import time

import pytest

import kvmpy
from kvmpy import linuxkernel
from kvmpy.errors import GuestError
from kvmpy.kvm.system import backend_modules
from kvmpy.loader.linux import load_linux
from kvmpy.x86 import layout
from . import lab

SLOW = os.environ.get("KVMPY_SLOW_TESTS") == "1"
MEM = 512 << 20
PVH_TIMEOUT = 150.0          # measured ~15 s to the banner on an emulating host; < 1 s on hardware
BZIMAGE_TIMEOUT = 400.0      # measured ~90-115 s on an emulating host


@pytest.fixture(scope="module")
def linux():
    """Debian's kernel and busybox from the cache (downloaded if needed)."""
    try:
        return linuxkernel.fetch()
    except linuxkernel.FetchError as e:
        if os.environ.get("KVMPY_REQUIRE_KVM") == "1":
            pytest.fail(f"cannot fetch Debian's kernel: {e}")
        pytest.skip(f"cannot fetch Debian's kernel: {e}")


@pytest.fixture(scope="module")
def initrd(linux):
    return linux.initramfs()


class Console:
    """COM1 sink that stops the machine once every wanted pattern has been printed."""

    def __init__(self, want: list[bytes]):
        self.buf = bytearray()
        self.want = want
        self.machine = None
        self.start = time.monotonic()
        self.seen: dict[bytes, float] = {}
        self.lock = threading.Lock()

    def write(self, data) -> int:
        with self.lock:
            self.buf += data
            for w in self.want:
                if w not in self.seen and w in self.buf:
                    self.seen[w] = time.monotonic() - self.start
            if len(self.seen) == len(self.want) and self.machine is not None:
                self.machine.request_stop("seen")
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return self.buf.decode("utf-8", "replace")


def boot(kernel: bytes, *, cmdline: str, initrd: bytes | None, want: list[bytes], timeout: float, **kw):
    """Machine.load the kernel, run until ``want`` is all printed; return (image, console)."""
    console = Console(want)
    with kvmpy.Machine(mem_size=MEM, serial=console) as m:
        img = m.load(kernel, cmdline=cmdline, initrd=initrd, **kw)
        console.machine = m
        console.start = time.monotonic()
        try:
            result = m.run(timeout=timeout)
            stop = result.reason
        except GuestError as e:
            stop = f"guest error: {str(e).splitlines()[0]}"
    missing = [w.decode() for w in want if w not in console.seen]
    assert not missing, (f"run ended ({stop}) before the kernel printed {missing}; "
                         f"console output:\n{console.text[-3000:]}")
    return img, console


def expected_lines(cmdline: str, img) -> list[bytes]:
    """What the kernel must print: its banner, our command line, our e820 map, our initrd
    (whose end Linux rounds up to a page)."""
    rd_addr, rd_size = img.segments[-1]
    rd_end = (rd_addr + rd_size + 4095) & ~4095
    return [b"Linux version ",
            f"Command line: {cmdline}\r\n".encode(),
            b"BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
            f"BIOS-e820: [mem 0x0000000000100000-0x{MEM - 1:016x}] usable".encode(),
            f"RAMDISK: [mem {rd_addr:#010x}-{rd_end - 1:#010x}]".encode()]


def wanted(kernel: bytes, cmdline: str, initrd: bytes) -> list[bytes]:
    """The lines to expect, from a dry load (the initrd's address is only known after loading)."""
    probe = kvmpy.GuestMemory.anonymous(MEM)
    try:
        return expected_lines(cmdline, load_linux(probe, kernel, cmdline=cmdline, initrd=initrd,
                                                  reserved=[layout.LOW_RESERVED]))
    finally:
        probe.close()


def test_pvh_vmlinux_reaches_the_banner_and_echoes_the_command_line(linux, initrd):
    """PVH entry of Debian's vmlinux: banner, our command line, our memory map and initrd."""
    cmdline = "console=ttyS0 earlyprintk=serial kvmpy.test=pvh"
    kernel = linux.vmlinux.read_bytes()
    img, console = boot(kernel, cmdline=cmdline, initrd=initrd, want=wanted(kernel, cmdline, initrd),
                        timeout=PVH_TIMEOUT)
    assert img.format == "pvh" and img.mode == "protected"
    assert re.search(r"Linux version \d+\.\d+\.\d+-\S+-cloud-amd64", console.text)
    print(f"PVH: banner after {console.seen[b'Linux version ']:.1f} s")


@pytest.mark.skipif(not SLOW, reason="bzImage boot takes ~2 minutes without hardware virtualisation; "
                                     "set KVMPY_SLOW_TESTS=1")
def test_bzimage_reaches_the_banner_and_echoes_the_command_line(linux, initrd):
    """64-bit boot protocol of Debian's vmlinuz: the decompressor runs, then the same checks as PVH."""
    cmdline = "console=ttyS0 earlyprintk=serial nokaslr kvmpy.test=bzimage"
    kernel = linux.vmlinuz.read_bytes()
    img, console = boot(kernel, cmdline=cmdline, initrd=initrd, want=wanted(kernel, cmdline, initrd),
                        timeout=BZIMAGE_TIMEOUT)
    assert img.format == "bzimage" and img.mode == "long"
    print(f"bzImage: banner after {console.seen[b'Linux version ']:.1f} s")


RING0_EMULATED = "kvm_pvm" in backend_modules()


def module_files(linux, names, what: str = "the virtio modules") -> dict[str, bytes]:
    """Kernel modules ``names`` of Debian's package as initramfs files (lib/modules/NAME); a
    failed fetch fails the test under KVMPY_REQUIRE_KVM=1 and skips it otherwise."""
    try:
        modules = linuxkernel.kernel_modules(linux, names)
    except linuxkernel.FetchError as e:
        if os.environ.get("KVMPY_REQUIRE_KVM") == "1":
            pytest.fail(f"cannot fetch {what}: {e}")
        pytest.skip(f"cannot fetch {what}: {e}")
    return {f"lib/modules/{n}": p.read_bytes() for n, p in modules.items()}


def with_load_order(init: str, files: dict[str, bytes]) -> str:
    """``init`` with ``__MODULES__`` replaced by the modules of ``files`` in the order insmod
    must take them, each after what its .modinfo says it depends on: Debian's point releases
    move dependencies between the virtio modules (6.1.192's virtio needs virtio_ring)."""
    from kvmpy.images import kmod
    infos = {}
    for path, data in files.items():
        name = path.rsplit("/", 1)[-1].removesuffix(".ko")
        infos[name] = kmod.read_modinfo(data, name)
    return init.replace("__MODULES__", " ".join(kmod.load_order(infos, sorted(infos))))
SHELL_INIT = """#!/bin/sh
/bin/busybox --install -s
mount -t proc proc /proc
echo "kvmpy-shell: $((6 * 7)) from $(uname -r)"
reboot -f
"""


@pytest.mark.skipif(RING0_EMULATED, reason="Linux stops after its banner where KVM emulates guest ring 0 "
                                           "(kvm_pvm, docs/host-notes.md); the nested testbed runs this")
@pytest.mark.parametrize("entry", ["pvh", "bzimage"])
def test_stock_kernel_boots_to_a_shell_command_and_reboots(linux, entry):
    """Debian's kernel runs its init, whose shell computes a line only a working shell prints,
    and `reboot -f` ends the run as a reset (kvmpy's exit status 120)."""
    initrd = linux.initramfs(SHELL_INIT)
    kernel = (linux.vmlinux if entry == "pvh" else linux.vmlinuz).read_bytes()
    console = Console([b"Linux version ", b"Run /init", b"kvmpy-shell: 42 from "])
    with kvmpy.Machine(mem_size=MEM, serial=console) as m:
        img = m.load(kernel, cmdline="console=ttyS0 panic=-1", initrd=initrd)
        console.start = time.monotonic()
        result = m.run(timeout=BZIMAGE_TIMEOUT)
    assert img.format == entry
    assert len(console.seen) == 3, f"run ended ({result.reason}); console:\n{console.text[-3000:]}"
    assert result.reason == "reset", console.text[-2000:]
    print(f"{entry}: " + ", ".join(f"{k.decode().strip()!r} at {t:.1f} s" for k, t in console.seen.items()))


def test_without_acpi_disks_are_announced_on_the_kernel_command_line(linux, initrd, tmp_path):
    """With a disk and the rng attached and acpi=False, Linux's command line carries
    virtio_mmio.device=SIZE@ADDR:IRQ for each, the disk first."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    cmdline = "console=ttyS0 earlyprintk=serial"
    want = [b"Linux version ", f"Command line: {cmdline} virtio_mmio.device=4K@0xd0000000:5 "
                               "virtio_mmio.device=4K@0xd0001000:6\r\n".encode()]
    console = Console(want)
    with kvmpy.Machine(mem_size=MEM, serial=console, disks=[str(disk)], rng=True, acpi=False) as m:
        m.load(linux.vmlinux, cmdline=cmdline, initrd=initrd)
        console.machine = m
        try:
            m.run(timeout=PVH_TIMEOUT)
        except GuestError:
            pass
    assert len(console.seen) == len(want), console.text[-2000:]


ACPI_EARLY = [b"ACPI: RSDP 0x00000000000E0000 000024 (v02 KVMPY )", b"ACPI: XSDT 0x00000000000E0030",
              b"ACPI: FACP ", b"ACPI: APIC ", b"ACPI: DSDT ",
              b"ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])",
              b"IOAPIC[0]: apic_id 4, version 17, address 0xfec00000, GSI 0-23",
              b"ACPI: INT_SRC_OVR (bus 0 bus_irq 5 global_irq 5 high level)",
              b"ACPI: Using ACPI (MADT) for SMP configuration information",
              b"smpboot: Allowing 4 CPUs, 0 hotplug CPUs"]
NO_ACPI_EARLY = [b"ACPI BIOS Error (bug): A valid RSDP was not found", b"smpboot: Allowing 1 CPUs, 0 hotplug CPUs"]
ACPI_COMPLAINTS = ("ACPI Error", "ACPI BIOS Error", "ACPI Warning", "ACPI BIOS Warning", "[Firmware Bug]",
                   "[Firmware Warn]", "Incorrect checksum")


@pytest.mark.parametrize("acpi", [True, False], ids=["acpi", "no-acpi"])
def test_pvh_kernel_reads_the_acpi_tables_and_counts_the_cpus(linux, initrd, tmp_path, acpi):
    """Early boot, so it runs where ring 0 is emulated too: Debian's kernel (no MP-table support)
    finds kvmpy's RSDP, the tables, the IOAPIC, the disk line's override and 4 CPUs in the MADT;
    with acpi=False it finds no RSDP and allows one CPU."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    want = ACPI_EARLY if acpi else NO_ACPI_EARLY
    console = Console([b"Linux version ", *want])
    with kvmpy.Machine(mem_size=MEM, cpus=4, serial=console, disks=[str(disk)], acpi=acpi) as m:
        m.load(linux.vmlinux, cmdline="console=ttyS0 earlyprintk=serial", initrd=initrd)
        console.machine = m
        try:
            result = m.run(timeout=PVH_TIMEOUT)
            stop = result.reason
        except GuestError as e:
            stop = f"guest error: {str(e).splitlines()[0]}"
    missing = [w.decode() for w in want if w not in console.seen]
    assert not missing, f"run ended ({stop}) before the kernel printed {missing}:\n{console.text[-3000:]}"
    if acpi:
        assert not [c for c in ACPI_COMPLAINTS if c in console.text], console.text
        assert "BIOS-e820: [mem 0x00000000000e0000-0x00000000000e0fff] ACPI data" in console.text
    print(f"acpi={acpi}: " + ", ".join(f"{k.decode()[:40]!r} at {t:.1f} s" for k, t in console.seen.items()))


ACPI_INIT = """#!/bin/sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in __MODULES__; do insmod /lib/modules/$m.ko || echo "kvmpy-acpi: insmod $m failed"; done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.5; done
echo "kvmpy-acpi: nproc=$(nproc) online=$(cat /sys/devices/system/cpu/online)" \
     "virtio=$(ls /sys/bus/virtio/devices | tr '\\n' ' ')vda=$(head -c 16 /dev/vda) end"
reboot -f
"""
VIRTIO_MODULES = ("virtio.ko", "virtio_ring.ko", "virtio_mmio.ko", "virtio_blk.ko")
DISK_MARK = b"kvmpy-acpi-disk!"


@pytest.mark.skipif(RING0_EMULATED, reason="Linux stops after its banner where KVM emulates guest ring 0 "
                                           "(kvm_pvm, docs/host-notes.md); the nested testbed runs this")
@pytest.mark.parametrize("entry", ["pvh", "bzimage"])
def test_stock_kernel_finds_every_cpu_and_the_disk_through_acpi(linux, entry, tmp_path):
    """Debian's kernel, built without MP-table parsing and without virtio_mmio.device=, brings up
    all 4 vCPUs from the MADT and binds virtio_mmio to the DSDT's LNRO0005 device: /dev/vda
    holds what the disk file holds. ``reboot -f`` then resets: with a hardware-reduced FADT,
    Linux jumps to the BIOS reset entry, where kvmpy's stub writes the Reset Control Register."""
    files = module_files(linux, VIRTIO_MODULES)
    initrd = linux.initramfs(with_load_order(ACPI_INIT, files), files=files)
    disk = tmp_path / "disk.img"
    disk.write_bytes(DISK_MARK + bytes((1 << 20) - len(DISK_MARK)))
    kernel = (linux.vmlinux if entry == "pvh" else linux.vmlinuz).read_bytes()
    console = Console([b"Run /init", b"kvmpy-acpi: "])
    with kvmpy.Machine(mem_size=MEM, cpus=4, serial=console, disks=[str(disk)]) as m:
        m.load(kernel, cmdline="console=ttyS0 panic=-1", initrd=initrd)
        result = m.run(timeout=BZIMAGE_TIMEOUT)
    text = console.text
    line = re.search(r"kvmpy-acpi: (.*) end", text)
    assert line, f"run ended ({result.reason}); console:\n{text[-4000:]}"
    assert line.group(1) == f"nproc=4 online=0-3 virtio=virtio0 vda={DISK_MARK.decode()}", text[-4000:]
    assert "virtio_mmio" not in text.split("Command line: ", 1)[1].split("\n", 1)[0]
    assert "smpboot: Allowing 4 CPUs" in text and "smp: Brought up 1 node, 4 CPUs" in text
    assert not [c for c in ACPI_COMPLAINTS if c in text], text
    assert result.reason == "reset", text[-2000:]
    print(f"{entry}: " + ", ".join(f"{k.decode().strip()!r} at {t:.1f} s" for k, t in console.seen.items()))


def test_cli_reports_a_bad_kernel_clearly(tmp_path):
    """kvmpy run with a truncated bzImage and --initrd/--cmdline exits 4 naming the problem."""
    import subprocess
    import sys
    kernel = tmp_path / "bzImage"
    image = bytearray(0x300)
    image[0x1F1] = 4                                   # setup_sects
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = (0x205).to_bytes(2, "little")  # protocol 2.05: too old
    kernel.write_bytes(bytes(image))
    rd = tmp_path / "initrd"
    rd.write_bytes(b"x")
    env = lab.CHILD_ENV
    r = subprocess.run([sys.executable, "-m", "kvmpy", "run", str(kernel), "--initrd", str(rd),
                        "--cmdline", "console=ttyS0"], capture_output=True, env=env, cwd="/", timeout=60)
    assert r.returncode == 4, r.stderr
    assert b"Traceback" not in r.stderr
    assert b"boot protocol 2.05 is too old" in r.stderr
