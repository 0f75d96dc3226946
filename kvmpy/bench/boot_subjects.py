"""boot's subjects: what each ``--subject`` boots, how kvmpy and each QEMU machine boot it,
and how a run is checked and where its timing ends (kvmpy/bench/boot.py's docstring has
the details of each: multiboot, linux, linux-init)."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Callable, NamedTuple

from . import _common
from ._common import BenchError

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Subject:
    """One kernel to boot, and how each variant boots it and checks the run."""

    name: str
    title: str                              # for the table: what the image is
    image: pathlib.Path
    load: dict                              # Machine.load() keyword arguments (kvmpy-lib)
    cli: tuple[str, ...]                    # `kvmpy run` options before IMAGE (kvmpy-cli)
    qemu: dict[str, tuple[str, ...]]        # QEMU variant -> its arguments after QEMU_COMMON and -m
    banner: bytes                           # the kernel's first output
    end: str = "exit"                       # "exit": time to the guest's exit; "banner": to the banner;
                                            # "marker": to ``marker``
    expect_status: int | None = None        # exit status of every run (end == "exit")
    expect_output: bytes = b""              # kvmpy's output (checked after normalize)
    normalize: Callable[[bytes], bytes] = bytes            # maps an output to what must agree
    differences: str = ""                   # what normalize hides, for the JSON
    marker: bytes = b""                     # end == "marker": the output that ends the timing
    splits: tuple[tuple[str, bytes], ...] = ()   # (name, output) timed on the way, besides the banner
    note: str = ""                          # how the machines were made alike, for the JSON

    @property
    def metric(self) -> str:
        return {"exit": "to_exit", "banner": "to_banner", "marker": "to_marker"}[self.end]

    @property
    def marks(self) -> dict[str, bytes]:
        """Every output whose first arrival is timed, in boot order: the banner, the splits,
        and the marker (end == "marker")."""
        marks = {"banner": self.banner, **dict(self.splits)}
        return {**marks, "marker": self.marker} if self.end == "marker" else marks

    @property
    def stop_at(self) -> str | None:
        """The mark that ends a run (None: the guest's exit does)."""
        return None if self.end == "exit" else self.end


# --- subjects ------------------------------------------------------------------------
def _normalize_multiboot(out: bytes) -> bytes:
    """multiboot-hello's output with what differs between boot loaders blanked out.

    Anything before the banner (firmware chatter) goes; mem_upper, the memory map
    (QEMU's lists reserved ranges that kvmpy's does not) and the boot loader's name
    differ between kvmpy and QEMU, between QEMU's machine types and with --mem.
    """
    i = out.find(b"multiboot-hello: magic")
    text = (out[i:] if i >= 0 else out).replace(b"\r\n", b"\n")
    text = re.sub(rb"mem_upper \d+K", b"mem_upper ?K", text)
    text = re.sub(rb"(?m)^mmap .*\n", b"", text)
    return re.sub(rb"(?m)^boot loader: .*$", b"boot loader: ?", text)


def multiboot(args) -> Subject:
    """The bundled multiboot v1 kernel multiboot-hello, booted to its exit (0x2B, status 87)."""
    from kvmpy import guests
    g = guests.get("multiboot-hello")
    image = _common.guest_image(g.name)
    return Subject(
        name="multiboot", title=f"guests/multiboot-hello.c (multiboot v1, ELF32), {args.mem // MiB} MiB",
        image=image, load={"format": "multiboot"}, cli=("--format", "multiboot"),
        qemu={"qemu": ("-M", "pc", "-kernel", str(image)),
              "qemu-microvm": ("-M", "microvm", "-kernel", str(image))},
        banner=b"multiboot-hello: magic", end="exit", expect_status=g.expect_status & 0xFF,
        expect_output=g.expect_output, normalize=_normalize_multiboot,
        differences="mem_upper, the memory map (mmap lines) and the boot loader's name; "
                    "anything before the banner")


LINUX_CMDLINE = "console=ttyS0 earlyprintk=serial"   # earlyprintk: without it nothing shows before the host dies
LINUX_BANNER = b"Linux version "


def _linux_files(subject: str = "linux"):
    """Debian's kernel from kvmpy.images.linuxkernel: fetched (apt) or, failing that, whatever is cached."""
    from kvmpy import linuxkernel
    from kvmpy.errors import KvmpyError
    try:
        return linuxkernel.fetch()
    except (KvmpyError, OSError) as e:
        found = linuxkernel.cached()
        if found is not None and found.vmlinux.is_file():
            return found
        raise BenchError(f"subject {subject} skipped: no kernel in the cache {linuxkernel.cache_dir()} and "
                         f"fetching one failed ({e}); run 'python -m kvmpy.images.linuxkernel' once online") from None


def linux(args) -> Subject:
    """Debian's cloud kernel, the uncompressed vmlinux through its PVH entry, to "Linux version "."""
    files = _linux_files()
    image = str(files.vmlinux)
    cmdline = f"{LINUX_CMDLINE} {args.append}".strip()
    kernel = ("-kernel", image, "-append", cmdline)
    return Subject(
        name="linux", title=f"Debian {files.kernel_package} vmlinux (PVH entry), {args.mem // MiB} MiB, "
                            f"cmdline {cmdline!r}",
        image=files.vmlinux, load={"format": "pvh", "cmdline": cmdline},
        cli=("--format", "pvh", "--cmdline", cmdline),
        qemu={"qemu": ("-M", "pc", *kernel), "qemu-microvm": ("-M", "microvm", *kernel)},
        banner=LINUX_BANNER, end="banner",
        differences="only the banner's presence is checked (the run is stopped there)")


#: linux-init: the kernel's command line. earlyprintk=serial as for ``linux`` (the banner split
#: then times early setup_arch(), not console_init()); panic=-1 makes a kernel that cannot run
#: /init reset at once (QEMU's -no-reboot then exits) instead of waiting for the timeout.
LINUX_INIT_CMDLINE = "console=ttyS0 earlyprintk=serial panic=-1"
LINUX_INIT_MARKER = b"kvmpy-init: 42"
#: linux-init's /init: the marker is computed by the shell, so only a running user space prints it;
#: then the machine resets (the run is stopped at the marker before that matters).
LINUX_INIT_SCRIPT = """#!/bin/sh
# /init of kvmpy bench boot --subject linux-init: prove that user space runs, then leave.
echo "kvmpy-init: $((6 * 7))"
exec /bin/busybox reboot -f
"""
LINUX_INIT_SPLITS = (("run_init", b"Run /init"),)
#: Why linux-init gives microvm an RTC by default (--microvm-rtc on).
MICROVM_RTC_NOTE = ("under KVM, -M microvm has no CMOS RTC unless rtc=on, and Linux (no ACPI or PNP word "
                    "that it is absent) probes it anyway: rtc_cmos polls the missing chip's update flag for "
                    "a second of udelay(100), ~40,000 port exits (measured 4-6 s of QEMU's boot in the "
                    "nested testbed); kvmpy has an RTC, so the default compares machines with the same "
                    "legacy devices")
#: KVM backends that emulate guest ring 0: Linux stops after its banner there (docs/host-notes.md).
RING0_EMULATING = ("kvm_pvm",)


def ring0_emulated() -> list[str]:
    """The loaded KVM backends that emulate guest ring 0 (empty on VMX/SVM hosts)."""
    from kvmpy.kvm.system import backend_modules
    return [m for m in backend_modules() if m in RING0_EMULATING]


def _linux_init_initrd(files) -> pathlib.Path:
    """linux-init's initramfs as a file (kvmpy-cli and QEMU take paths), kept in the kernel cache
    under its content's hash: the archive is reproducible, so every run boots the same bytes."""
    import hashlib
    from kvmpy import linuxkernel
    data = files.initramfs(LINUX_INIT_SCRIPT)
    path = linuxkernel.cache_dir() / "bench" / f"linux-init-{hashlib.sha256(data).hexdigest()[:16]}.cpio"
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def linux_init_subject(files, initrd: pathlib.Path, mem: int, append: str = "", microvm_rtc: str = "on") -> Subject:
    """linux-init's Subject for a kernel and an initrd file (no host check: see linux_init).

    ``microvm_rtc``: "on" gives QEMU's microvm the CMOS RTC that kvmpy has (MICROVM_RTC_NOTE);
    "auto" is microvm's own default (none under KVM)."""
    cmdline = f"{LINUX_INIT_CMDLINE} {append}".strip()
    kernel = ("-cpu", "host", "-kernel", str(files.vmlinux), "-initrd", str(initrd), "-append", cmdline)
    microvm = "microvm" if microvm_rtc == "auto" else f"microvm,rtc={microvm_rtc}"
    return Subject(
        name="linux-init", title=f"Debian {files.kernel_package} vmlinux (PVH entry) + busybox initramfs, "
                                 f"{mem // MiB} MiB, cmdline {cmdline!r}",
        image=files.vmlinux, load={"format": "pvh", "cmdline": cmdline, "initrd": str(initrd)},
        cli=("--format", "pvh", "--cmdline", cmdline, "--initrd", str(initrd)),
        qemu={"qemu": ("-M", "pc", *kernel), "qemu-microvm": ("-M", microvm, *kernel)},
        banner=LINUX_BANNER, end="marker", marker=LINUX_INIT_MARKER, splits=LINUX_INIT_SPLITS,
        differences="only the marks' presence is checked (the run is stopped at the marker)",
        note=f"qemu-microvm has rtc={microvm_rtc}: {MICROVM_RTC_NOTE}; QEMU gets -cpu host, as kvmpy "
             "passes KVM's supported CPUID on")


def linux_init(args) -> Subject:
    """Debian's PVH vmlinux with a busybox initramfs whose /init prints "kvmpy-init: 42"; timed to
    that marker. Refused (exit 2) where KVM emulates ring 0: Linux never reaches init there."""
    emulating = ring0_emulated()
    if emulating:
        raise BenchError(f"subject linux-init cannot run here: this host's KVM ({', '.join(emulating)}) "
                         "emulates guest ring 0, and Linux stops after its banner, long before init "
                         "(docs/host-notes.md); run it where KVM has VMX or SVM, e.g. in the nested "
                         "testbed: python tests/nested/testbed.py --steps bench")
    files = _linux_files("linux-init")
    return linux_init_subject(files, _linux_init_initrd(files), args.mem, args.append, args.microvm_rtc)


class SubjectSpec(NamedTuple):
    make: Callable[..., Subject]            # the parsed arguments (--mem resolved) -> Subject
    mem: int                                # default --mem
    rounds: int                             # default --rounds


#: --subject NAME -> how to make its Subject, and its defaults.
SUBJECTS: dict[str, SubjectSpec] = {
    "multiboot": SubjectSpec(multiboot, mem=64 * MiB, rounds=10),
    "linux": SubjectSpec(linux, mem=512 * MiB, rounds=3),   # ~15 s a run without VMX/SVM, < 1 s with
    "linux-init": SubjectSpec(linux_init, mem=512 * MiB, rounds=3),   # VMX/SVM only; ~10 s a run nested
}
