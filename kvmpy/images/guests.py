"""The bundled guest images and what each one is expected to do.

Sources live in ``guests/`` (assembly and freestanding C, see
``guests/README.md``); ``make -C guests`` builds them into the package
``kvmpy._guests``, where :func:`path` finds them through
:mod:`importlib.resources`.

Every guest follows the ABI in ``docs/CONTRACTS.md``: it prints on COM1
(0x3f8) and ends by writing a byte ``v`` to the isa-debug-exit port 0xf4,
which ends the run with exit status ``(v << 1) | 1``, holding RAX == ``v``
at that write.  Tests assert those values (:attr:`Guest.expect_output`,
:attr:`Guest.expect_status`, :attr:`Guest.expect_rax`), not log prose, and
``kvmpy demo`` checks each demo's promise (:attr:`Guest.demo_status`,
:attr:`Guest.demo_marker`) to decide its own exit status.

Pure Python: importing this module never touches ``/dev/kvm``.
"""
from __future__ import annotations

import importlib.resources
import os
import pathlib
import re
from dataclasses import dataclass

__all__ = ["Guest", "all", "get", "path", "resolve", "names", "GUEST_DIR_ENV", "counter_checksums", "counter_output"]

#: Environment variable naming a directory of built images to use instead
#: of the package's (e.g. after ``make -C guests O=/tmp/g``).
GUEST_DIR_ENV = "KVMPY_GUEST_DIR"

#: Where guests/Makefile puts images by default, and the package holding them.
_PACKAGE = "kvmpy._guests"
_SOURCE_TREE_DIR = pathlib.Path(__file__).resolve().parents[1] / "_guests"

#: Base address of raw real-mode images (the BIOS boot-sector address).
_BOOT_SECTOR = 0x7C00


def _status(v: int) -> int:
    """The run's exit status after the guest writes ``v`` to port 0xf4."""
    return (v << 1) | 1


@dataclass(frozen=True)
class Guest:
    """One bundled guest image and its contract.

    ``file`` is the image's file name inside ``kvmpy._guests``; ``format``,
    ``mode``, ``load_addr`` and ``entry`` are what to pass to the loader
    (None: the loader's default or the ELF header's).  ``user`` asks the host
    to start the guest at CPL 3.  ``stdin`` is the serial input a
    non-interactive demo run feeds it.  ``expect_status`` is the run's exit
    status (``(v << 1) | 1``), ``expect_rax`` RAX at the exit write; None
    means the guest never exits that way.  ``demo`` guests are listed as
    demos; the others exist for tests and benchmarks.

    ``needs_disk`` guests drive virtio-blk disk 0 (virtio-mmio at
    ``layout.VIRTIO_MMIO_BASE``).  What they print depends on the disk, so
    their ``expect_*`` fields describe a run *without* one (the fixed first
    line, then ``no virtio-blk device``); ``disk_status`` is the exit status
    with a suitable disk attached, and the description says what they print.
    ``needs_rng`` guests drive the virtio-rng device (``Machine(rng=True)``) the same
    way: ``expect_*`` without it, ``disk_status`` with it.

    ``cpus`` is how many vCPUs to run the guest with (its ``expect_*`` values are
    for that count); ``needs_irqchip`` guests need the in-kernel PIC/IOAPIC/LAPIC,
    e.g. to send INIT/SIPI, and the MP table the Machine writes when ``cpus > 1``.

    ``marker`` is what ``kvmpy demo`` looks for in the output (a bytes regular
    expression, searched line-wise) as proof that the guest did its work: the line
    printed with the guest's known value, written so that it holds for any input
    the demo's options allow (RAM size, command line, fw_cfg files, disk contents,
    the lines typed to echo).  With :attr:`demo_status` it is the demo's promise.
    """

    name: str
    file: str
    description: str
    format: str = "auto"
    mode: str | None = None
    load_addr: int | None = None
    entry: int | None = None
    user: bool = False
    stdin: bytes | None = None
    expect_output: bytes = b""
    expect_status: int | None = None
    expect_rax: int | None = None
    demo: bool = True
    needs_disk: bool = False
    disk_status: int | None = None
    needs_rng: bool = False
    cpus: int = 1
    needs_irqchip: bool = False
    marker: bytes | None = None

    @property
    def path(self) -> pathlib.Path:
        """The built image on disk (see :func:`path`)."""
        return path(self.name)

    @property
    def demo_status(self) -> int | None:
        """The exit status ``kvmpy demo`` expects: a disk guest always runs with a disk
        (the demo lends it a scratch one) and an rng guest with the rng, so ``disk_status``;
        else ``expect_status``."""
        return self.disk_status if self.needs_disk or self.needs_rng else self.expect_status

    def kept_promise(self, status: int, output: bytes) -> str | None:
        """None if a run that ended with ``status`` and printed ``output`` did what the
        description promises; otherwise why not, in one line."""
        want = self.demo_status
        if want is None:
            raise ValueError(f"guest {self.name!r} promises no exit status")
        if status != want & 0xFF:
            got = f"status {status}"
            if status & 1:                  # an isa-debug-exit status: show the guest's value
                got += f" (the guest's value {status >> 1:#x})"
            return f"it exited with {got}, expected {want & 0xFF} (value {(want & 0xFF) >> 1:#x})"
        if self.marker is not None and not re.search(self.marker, output, re.M):
            return f"its output has no line matching /{self.marker.decode(errors='replace')}/"
        return None


def _line(text: bytes) -> bytes:
    """A marker matching exactly this whole line of output."""
    return b"^" + re.sub(rb"[][(){}?*+|^$\\.]", rb"\\\g<0>", text) + b"$"


def _real(name: str, description: str, **kw) -> Guest:
    return Guest(name, f"{name}.bin", description, format="raw", mode="real",
                 load_addr=_BOOT_SECTOR, entry=_BOOT_SECTOR, **kw)


#: Exit values the virtio-blk guests share: no device found, and any driver or
#: I/O error (it prints "<guest>: <op> error at sector <s>: <reason>").
_BLK_NO_DEVICE = 0x4E
_BLK_IO_ERROR = 0x4D
#: blk-write and blk-bench: a write request came back VIRTIO_BLK_S_IOERR.
_BLK_READ_ONLY = 0x45


def _multiboot(name: str, what: str) -> Guest:
    """A multiboot v1 kernel (multiboot-hello.S + .c) and what it prints with 64 MiB, no
    arguments and no modules: the memory map has the host's GDT and TSS (0x1000-0x4FFF) and
    the multiboot information (0x5000-0x5FFF) reserved; the kernel's path is cut to its name."""
    return Guest(
        name, f"{name}.elf",
        f"multiboot v1 kernel ({what}): checks EAX=0x2BADB002, prints its command line, "
        "mem_lower/mem_upper, the memory map and each module's string and first bytes; exits 0x2B",
        format="multiboot", mode="protected",
        expect_output=(b"multiboot-hello: magic 0x2badb002, flags 0x24f\n"
                       b"cmdline: '" + name.encode() + b".elf '\n"
                       b"mem_lower 639K, mem_upper 64512K\n"
                       b"mmap 0x0 +0x1000 type 1\nmmap 0x1000 +0x5000 type 2\nmmap 0x6000 +0x99c00 type 1\n"
                       b"mmap 0x9fc00 +0x400 type 2\n"
                       b"mmap 0xf0000 +0x10000 type 2\nmmap 0x100000 +0x3f00000 type 1\n"
                       b"mods 0\nboot loader: kvmpy\nmultiboot-hello: done\n"),
        expect_status=_status(0x2B), expect_rax=0x2B,
        marker=_line(b"multiboot-hello: done"))           # whatever --cmdline, --module and --mem say


def _blk(name: str, description: str, first_line: bytes, disk_status: int | None, **kw) -> Guest:
    """A ring-3 guest of disk 0; without a disk it prints ``first_line`` and exits 0x4E."""
    return Guest(name, f"{name}.elf", description, format="elf", mode="long", user=True,
                 expect_output=first_line + b"no virtio-blk device\n",
                 expect_status=_status(_BLK_NO_DEVICE), expect_rax=_BLK_NO_DEVICE,
                 needs_disk=True, disk_status=disk_status, **kw)


#: The counter guest (guests/counter.c): exit value, defaults and constants of its workload.
_COUNTER_EXIT = 0x43
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def counter_checksums(n: int = 200, pages: int = 256) -> tuple[list[int], int]:
    """A Python model of the counter guest's memory workload (see guests/counter.c).

    Returns the checksum it prints after each iteration 1..n and the final
    checksum of its whole array (the ``counter: done`` value).
    """
    a = list(range(pages * 512))
    c = 0xCBF29CE484222325
    slice_ = -(-pages // 8)
    sums = []
    for i in range(1, n + 1):
        start, off = (i - 1) * slice_ % pages, i % 64
        for j in range(slice_):
            base = (start + j) % pages * 512 + off
            for k in range(base, base + 512, 64):
                x = (((a[k] ^ c) * _GOLDEN) + i) & _MASK64
                a[k] = x
                c = ((c ^ x) * 0x100000001B3) & _MASK64
        sums.append(c)
    return sums, sum(map(int.__mul__, a, range(1, len(a) + 1))) & _MASK64


def counter_output(n: int = 200, pages: int = 256, capacity: int | None = None) -> bytes:
    """What the counter guest prints with these parameters; ``capacity`` None: no disk."""
    sums, final = counter_checksums(n, pages)
    disk = b"counter: no disk\n" if capacity is None else b"counter: disk %d sectors\n" % capacity
    return (b"counter: n=%d pages=%d\n" % (n, pages) + disk
            + b"".join(b"count %d %#x\n" % (i, c) for i, c in enumerate(sums, 1))
            + b"counter: done %#x\n" % final)


_GUESTS: tuple[Guest, ...] = (
    _real("hello-real",
          "16-bit real mode at 0x7c00: prints a line, exits",
          expect_output=b"Hello from real mode\n",
          expect_status=_status(0x10), expect_rax=0x10, marker=_line(b"Hello from real mode")),
    Guest("hello-protected", "hello-protected.elf",
          "ELF32 in 32-bit protected mode (flat, paging off): prints a line, exits",
          format="elf", mode="protected",
          expect_output=b"Hello from protected mode\n",
          expect_status=_status(0x20), expect_rax=0x20, marker=_line(b"Hello from protected mode")),
    Guest("smp", "smp.elf",
          "ELF32 on 4 vCPUs: finds the MP table, starts each AP with INIT-SIPI-SIPI "
          "(trampoline at 0x8000); each prints 'AP <apic id> up'; exits 0x58",
          format="elf", mode="protected", cpus=4, needs_irqchip=True,
          expect_output=(b"smp: MP table lists 4 CPUs\nAP 1 up\nAP 2 up\nAP 3 up\n"
                         b"smp: 4 CPUs up\n"),
          expect_status=_status(0x58), expect_rax=0x58,
          marker=rb"^smp: \d+ CPUs up$"),                  # --cpus N: N CPUs
    Guest("testdev", "testdev.elf",
          "ELF32 for QEMU's pc-testdev (Machine(test_devices=True), --test-devices): the latch's "
          "byte lanes, string I/O, page flushes, IRQ lines through the 8259 and the IOAPIC, the "
          "window at 0xff000000; prints a line per feature, exits 0x54 (without the device: "
          "'testdev: absent', 0x55)",
          format="elf", mode="protected", demo=False,
          expect_output=b"testdev: absent\n",             # as run without test devices
          expect_status=_status(0x55), expect_rax=0x55),
    Guest("hello-long", "hello-long.elf",
          "ELF64 in 64-bit long mode (CPL 0): prints a line, exits with RAX=42",
          format="elf", mode="long",
          expect_output=b"Hello from long mode\n",
          expect_status=_status(42), expect_rax=42, marker=_line(b"Hello from long mode")),
    Guest("hello-user", "hello-user.elf",
          "ELF64 started in ring 3: checks CPL 3, sums 1..10^7 natively, exits",
          format="elf", mode="long", user=True,
          expect_output=b"Hello from ring 3 (CPL 3)\nsum(1..10000000) = 0x2d7988896b40\n",
          expect_status=_status(0x30), expect_rax=0x30,
          marker=_line(b"sum(1..10000000) = 0x2d7988896b40")),
    Guest("echo", "echo.elf",
          "ELF64: echoes serial input until the line 'quit'",
          format="elf", mode="long", stdin=b"hello\nquit\n",
          expect_output=b"echo: type lines, 'quit' ends\nhello\nquit\nbye\n",
          expect_status=_status(0x38), expect_rax=0x38, marker=_line(b"bye")),   # any lines, then quit
    Guest("stringio", "stringio.elf",
          "ELF64: one 'rep outsb' line to COM1, 'rep insb' from an unclaimed port",
          format="elf", mode="long",
          expect_output=b"Hello from rep outsb\nrep insb ok\n",
          expect_status=_status(0x3C), expect_rax=0x3C, marker=_line(b"rep insb ok")),
    Guest("fwcfg", "fwcfg.elf",
          "ELF64 in ring 3: reads fw_cfg (ports 0x510/0x511): signature, id, RAM size, CPUs, "
          "command line, file directory, and prints the file opt/kvmpy/greeting if present; "
          "exits 0x50 (0x51 'fw_cfg: no device')",
          format="elf", mode="long", user=True,
          expect_output=(b"fw_cfg: signature QEMU, id 0x1\nfw_cfg: ram 0x4000000\n"
                         b"fw_cfg: cpus 1\nfw_cfg: cmdline \"\"\nfw_cfg: files 0\n"
                         b"fw_cfg: done\n"),                # 64 MiB, 1 CPU, no cmdline, no files
          expect_status=_status(0x50), expect_rax=0x50,
          marker=_line(b"fw_cfg: done")),                  # whatever --mem, --cmdline and --fw-cfg say
    _multiboot("multiboot-hello", "ELF32 at 1 MiB, as for qemu -kernel"),
    _multiboot("multiboot-low", "the same kernel linked at 0x8000, below 1 MiB"),
    _blk("blk-read",
         "virtio-blk: reads all of disk 0 and prints 'blk-read: <n> sectors, checksum 0x<h>' "
         "(h = FNV-1a 64 of the disk's bytes); exits 0x40",
         b"blk-read: reading the whole disk\n", _status(0x40),
         marker=rb"^blk-read: \d+ sectors, checksum 0x[0-9a-f]+$"),     # any disk
    _blk("blk-write",
         "virtio-blk: writes a pattern over the first min(capacity, 256) sectors of disk 0 "
         "(u64 at offset 8k = (k+1) * 0x9e3779b97f4a7c15), flushes, reads back; "
         "'blk-write: <n> sectors ok', exits 0x44 (0x45 'write failed (read-only?)')",
         b"blk-write: pattern, flush, read back\n", _status(0x44),
         marker=rb"^blk-write: \d+ sectors ok$"),
    Guest("rng-read", "rng-read.elf",
          "virtio-rng (--rng): reads 4 KiB from the entropy device twice, checks the two differ "
          "and neither is all zero; 'rng-read: 2 x 4096 random bytes, different and not all zero', "
          "exits 0x52 (0x53 'no virtio-rng device' without it)",
          format="elf", mode="long", user=True,
          expect_output=b"rng-read: reading 4096 random bytes twice\nno virtio-rng device\n",
          expect_status=_status(0x53), expect_rax=0x53, needs_rng=True, disk_status=_status(0x52),
          marker=_line(b"rng-read: 2 x 4096 random bytes, different and not all zero")),
    Guest("net-udp", "net-udp.elf",
          "virtio-net (--net passt): DHCP, then 'hello from the guest' from UDP port 40124 to port 40123 "
          "of the router (behind passt: the host's 127.0.0.1), prints 'net-udp: the host says '<answer>'', "
          "exits 0x62 (0x63 'no virtio-net device' without it, 0x67 'no DHCP offer'/'no answer'); "
          "with 'flood=N' on the command line it then sends N 1400-byte datagrams; "
          "needs a server on the host, so it is no demo",
          format="elf", mode="long", user=True, demo=False,
          expect_output=b"no virtio-net device\n", expect_status=_status(0x63), expect_rax=0x63),
    Guest("vsock-echo", "vsock-echo.elf",
          "virtio-vsock (--vsock PATH): echoes one host connection to port 1234 ('CONNECT 1234' on PATH), "
          "then connects to host port 5678 (a listener on PATH_5678) and prints the line it answers; "
          "'vsock-echo: done', exits 0x60 (0x61 'no virtio-vsock device' without it). A test drives "
          "its host side (tests/integration/test_vsock.py), so it is not a demo",
          format="elf", mode="long", user=True, demo=False,
          expect_output=b"vsock-echo: echo on port 1234, then call host port 5678\nno virtio-vsock device\n",
          expect_status=_status(0x61), expect_rax=0x61, disk_status=_status(0x60)),
    Guest("counter", "counter.elf",
          "deterministic workload for snapshot/migration tests (CPL 0): n iterations (default 200) "
          "each rewrite a slice of a pages-page array (default 256) at 0x200000, print "
          "'count <i> 0x<checksum>', write sector i % 64 of disk 0 and flush every 8th; "
          "'counter: done 0x<array checksum>'; fw_cfg cmdline 'n=N pages=P'; exits 0x43",
          format="elf", mode="long",
          expect_output=counter_output(),           # defaults, no disk: 'counter: no disk' 2nd line
          expect_status=_status(_COUNTER_EXIT), expect_rax=_COUNTER_EXIT,
          needs_disk=True, disk_status=_status(_COUNTER_EXIT),
          marker=rb"^counter: done 0x[0-9a-f]+$"),         # n and pages from the cmdline
    _blk("blk-bench",
         "virtio-blk benchmark, OVERWRITES the first 16 MiB of disk 0: phases 1-10 sequential "
         "read (odd) / write (even) of min(16 MiB, disk) in 4K/16K/64K/256K/1M requests, "
         "phase 11 random 4 KiB reads (LCG); outl P to port 0x5e0 before a phase, "
         "P | 0x80000000 after it; exits 0x48 (0x45 read-only)",
         b"blk-bench: sequential and random I/O, phases marked on port 0x5e0\n", _status(0x48),
         marker=_line(b"blk-bench: done"), demo=False),
    _blk("blk-durable",
         "virtio-blk: writes the blk-write pattern over min(capacity, 64) sectors of disk 0, "
         "flushes, prints 'blk-durable: <n> sectors flushed', then waits forever (kill -9 test)",
         b"blk-durable: writing\n", None, demo=False),
    _blk("blk-selffeed",
         "hostile virtio-blk driver: one IN request whose header sector field is avail.idx inside "
         "its own IN buffer; on a 32 MiB disk where sector s holds s+1 (le16) at offset 0x102 each "
         "request publishes the next, and it notifies forever (tests of the notify bound and of "
         "stopping a run); exits 0x46 for another disk size",
         b"blk-selffeed: one request that republishes itself\n", None, demo=False),
    _blk("blk-smprace",
         "hostile virtio-blk driver on 8 vCPUs: the BSP sets up blk-selffeed's self-republishing "
         "request, starts the 7 APs with INIT-SIPI-SIPI, and all 8 write QueueNotify forever, the "
         "odd APs also flipping avail.flags and republishing head 0 in the ring (tests of stopping "
         "and pausing a run); needs the in-kernel irqchip; exits 0x46 for another disk size",
         b"blk-smprace: 8 vCPUs on one self-feeding queue\n", None, demo=False,
         cpus=8, needs_irqchip=True),
    Guest("reset-case", "reset-case.elf",
          "cases for reset in place (CPL 3): prints 'reset-case: ready', exits 0x52 (the host "
          "checkpoints there), then each run does the case in the mailbox at 0x300000 (dirty pages, "
          "serial, CMOS, a disk sector, registers) and exits 0x44; docs/reset.md",
          format="elf", mode="long", user=True,
          expect_output=b"reset-case: ready\n", expect_status=_status(0x52), expect_rax=0x52,
          demo=False),
    Guest("fuzz-target", "fuzz-target.elf",
          "a parser for kvmpy.fuzz (CPL 3, edge coverage from -fsanitize-coverage=trace-pc): prints "
          "'fuzz-target: ready', exits 0x52 (the harness checkpoints there), then each run parses "
          "fuzz_input and exits 0x44, or crashes on a planted bug; docs/fuzzing.md",
          format="elf", mode="long", user=True,
          expect_output=b"fuzz-target: ready\n", expect_status=_status(0x52), expect_rax=0x52,
          demo=False),
    Guest("sandbox-demo", "sandbox-demo.elf",
          "the demo of kvmpy.Sandbox (CPL 3): prints 'sandbox-demo: ready', exits 0x52 (the sandbox "
          "checkpoints there), then each run calls the exported function the call page names and "
          "exits 0x44 (add, reverse, upper, a host call, a crash, a spin...); docs/sandboxes.md",
          format="elf", mode="long", user=True,
          expect_output=b"sandbox-demo: ready\n", expect_status=_status(0x52), expect_rax=0x52,
          demo=False),
    _real("spin",
          "real mode 'jmp .' forever: for timeout tests",
          demo=False),
    Guest("triple-fault", "triple-fault.elf",
          "ELF64: prints a line, ud2 with a zero-limit IDT -> triple fault (shutdown)",
          format="elf", mode="long",
          expect_output=b"triple-fault: ud2 with an empty IDT\n",
          demo=False),
    _real("pio-loop",
          "real mode endless 'out %al, $0x80; inc %al': one PIO exit per iteration",
          demo=False),
)

_BY_NAME = {g.name: g for g in _GUESTS}


def all() -> list[Guest]:  # noqa: A001 - the brief's name; shadows the builtin here only
    """Every bundled guest, demos first in a stable order."""
    return list(_GUESTS)


def names() -> list[str]:
    """The names of every bundled guest."""
    return [g.name for g in _GUESTS]


def get(name: str) -> Guest:
    """The guest called ``name``; KeyError listing the known names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no bundled guest {name!r}; known guests: "
                       f"{', '.join(_BY_NAME)}") from None


def _candidates(file: str):
    override = os.environ.get(GUEST_DIR_ENV)
    if override:
        yield pathlib.Path(override) / file
    try:
        resource = importlib.resources.files(_PACKAGE) / file
    except (ModuleNotFoundError, TypeError):
        resource = None
    if isinstance(resource, pathlib.Path):  # an unpacked install or the source tree
        yield resource
    yield _SOURCE_TREE_DIR / file


def path(name: str) -> pathlib.Path:
    """The built image of guest ``name`` as a file on disk.

    Looks in ``$KVMPY_GUEST_DIR`` if set, then in the package
    ``kvmpy._guests`` (via importlib.resources), then next to this module.
    Raises KeyError for an unknown name and FileNotFoundError, saying how to
    build the images, when the image was never built.
    """
    return built(get(name).file)


def resolve(image) -> "pathlib.Path | os.PathLike":
    """What a harness or sandbox is given as its image: an existing file (or a path-like) as
    is, else the bundled guest of that name (:func:`path`); KeyError when it is neither."""
    if not isinstance(image, str) or os.path.exists(image):
        return image
    return path(image)


#: Built files that are not guests: Linux programs (guests/linux/) tests put in an initramfs.
LINUX_PROGRAMS = ("vsock-echo-linux", "kvmpy-agent")


def built(file: str) -> pathlib.Path:
    """A file guests/Makefile built (a guest image, or one of LINUX_PROGRAMS), where
    :func:`path` looks; FileNotFoundError, saying how to build it, if it is not there."""
    tried = []
    for candidate in _candidates(file):
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    raise FileNotFoundError(
        f"guest image {file!r} not found (looked in: {', '.join(dict.fromkeys(tried))}); "
        f"build the images with `make -C guests` in the kvmpy source tree, "
        f"or reinstall kvmpy")
