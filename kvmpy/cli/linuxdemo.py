"""``kvmpy demo linux``: Debian's stock kernel with its root on a virtio disk, to a shell.

One command does what docs/linux.md shows step by step: fetch Debian's cloud kernel,
busybox-static and the kernel's virtio modules (cached, kvmpy.images.linuxkernel), build
the ext4 root disk and its initramfs (cached by content, kvmpy.images.rootfs), and boot
the uncompressed vmlinux through PVH with the disk as ``/dev/vda`` on a scratch copy of the
image (what the guest writes is gone when the run ends), the virtio-rng, 2 vCPUs and
512 MiB unless ``--cpus``/``--mem`` say otherwise. A terminal on stdin becomes the guest's
console (raw mode, Ctrl-A x quits: kvmpy.cli.terminal); commands on a pipe wait until the
disk's init says it is ready, so ``printf 'uname -a\\nreboot\\n' | kvmpy demo linux`` works.

Where KVM emulates guest ring 0 (kvm_pvm: no VMX or SVM under it) Linux stops after its
banner; the demo says so before it starts, and boots anyway so the banner shows.
"""
from __future__ import annotations

import sys
import tempfile
import threading

from .status import EXIT_VMM_ERROR, progress

DEFAULT_MEM = 512 << 20
DEFAULT_CPUS = 2

RING0_EMULATED_NOTE = (
    "this host's KVM ({backend}) emulates guest ring 0: every instruction of a kernel runs in "
    "software, ~1000x slower, and some (int3, lock cmpxchg16b, xrstor) fail. Debian's kernel will "
    "print its banner (~15-20 s) and then stop with an emulation error, before it reaches the disk. "
    "On a host with VMX or SVM (see 'grep -E \"vmx|svm\" /proc/cpuinfo') it boots to a shell in "
    "seconds (docs/linux.md).")


def devices(args) -> dict:
    """The devices the demo's machine gets beyond the root disk and what its options add
    (``--net``, ``--vsock`` reach the Machine as for ``kvmpy run``; the disk's rcS loads
    virtio_net and runs udhcpc on every interface, and loads vmw_vsock_virtio_transport for a
    vsock device): the rng, always."""
    return {"rng": True}


def demo_linux(args, run) -> int:
    """Build (or find) the disk, then ``run(args, image, load, sample_input, ready=...)``: the
    CLI's way to build a Machine from ``args`` and drive it (kvmpy.cli.running)."""
    from ..errors import KvmpyError
    from ..images import rootfs
    from ..kvm.system import backend_modules
    backends = backend_modules()
    ring0_emulated = "kvm_pvm" in backends
    try:
        disk = rootfs.build(offline=args.offline, progress=progress)
    except KvmpyError as e:
        print(f"kvmpy: demo linux: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    if args.mem is None:
        args.mem = DEFAULT_MEM
    if args.cpus is None:
        args.cpus = DEFAULT_CPUS
    for key, value in devices(args).items():
        setattr(args, key, value)
    cmdline = disk.cmdline + (" earlyprintk=serial" if ring0_emulated else "")
    if args.cmdline:
        cmdline += " " + args.cmdline
    load = dict(format="auto", cmdline=cmdline, initrd=str(disk.initrd))
    if ring0_emulated:
        progress(RING0_EMULATED_NOTE.format(backend=", ".join(backends)))
    with tempfile.TemporaryFile(prefix="kvmpy-rootfs-", suffix=".img") as scratch:
        rootfs.copy_sparse(disk.image, f"/proc/self/fd/{scratch.fileno()}")
        # nameless, so nothing is left to unlink after the run (the sandbox refuses unlink)
        args.disk = [f"/proc/self/fd/{scratch.fileno()}", *args.disk]
        progress(f"booting {disk.kernel.kernel_package.split('_')[0]} ({args.cpus} vCPUs, {args.mem >> 20} MiB) "
                 f"with its root on /dev/vda, a scratch copy of {disk.image}; "
                 "type 'reboot' in the guest to leave (status 120)")
        return run(args, str(disk.kernel.vmlinux), load, sample_input=None,
                    ready=(rootfs.READY_MARKER.encode(), threading.Event()))
