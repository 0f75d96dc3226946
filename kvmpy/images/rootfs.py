"""A root disk for Debian's stock kernel: a small ext4 image and the initramfs that mounts it.

Debian's cloud kernel has ext4 built in but its virtio drivers are modules, so it cannot
mount a virtio disk by itself. :func:`build` therefore makes two files, both from Debian
packages only (fetched and cached by :mod:`kvmpy.images.linuxkernel`):

``initrd.cpio``
    busybox-static and the root's modules (``virtio``, ``virtio_ring``, ``virtio_mmio``,
    ``virtio_pci`` with its ``_modern_dev``/``_legacy_dev`` halves, ``virtio_blk``). Its
    ``/init`` loads them, waits for ``root=`` (default ``/dev/vda``), mounts it (``ro``/``rw``
    and ``rootfstype=`` from the command line are obeyed) and ``switch_root``s to ``init=``
    (default ``/sbin/init``). If the disk never shows up it says which block devices there
    are and starts a shell instead.
``rootfs.img``
    an ext4 file system written by ``mke2fs -d`` from e2fsprogs (no root, no loop device):
    busybox with a link per applet, busybox ``init`` with an ``/etc/inittab`` whose
    ``rcS`` mounts ``/proc``, ``/sys``, ``/dev``, ``/dev/pts`` and ``/run``, loads the modules
    of each virtio device the kernel found (net: ``virtio_net``; vsock:
    ``vmw_vsock_virtio_transport``; entropy: ``virtio_rng``, read by their device IDs in
    ``/sys/bus/virtio/devices``), runs ``udhcpc`` on every network interface, prints
    :data:`READY_MARKER` and leaves a shell on the console. The modules are also there for
    ``modprobe`` (kvmpy writes their ``modules.dep``: Debian's package has none).
    ``reboot`` unmounts (read-only) and resets the machine: kvmpy exits with status 120.
    With ``python=True`` it also holds Debian's ``python3`` (kvmpy.images.debroot); with
    ``files`` any files of yours (an executable ``/etc/rc.local`` runs at the end of rcS:
    how kvmpy.linuxbox starts its agent).

Both are cached by content under ``$KVMPY_CACHE/rootfs/KEY/`` (the key hashes the
kernel's modules, busybox, the scripts below, the python packages' versions, your files
and the size), so a second build costs a few hashes. The image there is the pristine copy: boot a copy of it (``--output``, or
:meth:`RootDisk.copy_to`), since the guest writes to its disk. Command line::

    python -m kvmpy.images.rootfs [--output rootfs.img] [--size 64M] [--python] [--offline]

prints ``vmlinux=``, ``vmlinuz=``, ``initrd=`` and ``rootfs=`` lines (shell syntax) and
the command line to boot with.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import KvmpyError
from . import debroot, kmod, linuxkernel

#: The modules the root disk needs, loaded by the initramfs in this order's dependency order.
ROOT_MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk")
#: virtio device ID (virtio 1.2 §5) -> the modules its driver needs, loaded by the disk's rcS.
DEVICE_MODULES = {1: ("virtio_net",), 4: ("virtio_rng",), 19: ("vmw_vsock_virtio_transport",)}
#: Every module file fetched from the kernel package: the ones above and their dependencies
#: (read from their .modinfo: a dependency not listed here is a clear error at build time).
MODULE_FILES = ("virtio.ko", "virtio_ring.ko", "virtio_mmio.ko", "virtio_pci.ko", "virtio_pci_modern_dev.ko",
                "virtio_pci_legacy_dev.ko", "virtio_blk.ko", "virtio_net.ko", "net_failover.ko", "failover.ko",
                "vsock.ko", "vmw_vsock_virtio_transport_common.ko", "vmw_vsock_virtio_transport.ko",
                "virtio-rng.ko")
DEFAULT_SIZE = 64 << 20
DEFAULT_PYTHON_SIZE = 96 << 20  # with Debian's python3 (~25 MB with its byte code)
MIN_SIZE = 8 << 20
MAX_SIZE = 64 << 30
FAKE_TIME = 1700000000          # every time stamp in the image (2023-11-14)
FORMAT = 2                      # bump when the layout changes in a way the scripts do not show

#: What the disk's rcS prints once the system is up; tests and docs look for it.
READY_MARKER = "kvmpy-rootfs: ready"
#: The kernel command line that boots this disk (add earlyprintk=serial to watch early boot).
CMDLINE = "console=ttyS0 root=/dev/vda rw panic=-1"

INITRAMFS_INIT = """#!/bin/sh
# /init of kvmpy's root-disk initramfs: load the virtio modules, mount root=, switch to it.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/kvmpy-modules); do
  insmod /lib/modules/$m.ko || echo "kvmpy-initramfs: insmod $m failed"
done
root=/dev/vda fstype=ext4 mode=rw init=/sbin/init
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root="${arg#root=}" ;;
    rootfstype=*) fstype="${arg#rootfstype=}" ;;
    init=*) init="${arg#init=}" ;;
    ro|rw) mode=$arg ;;
  esac
done
give_up() {
  echo "kvmpy-initramfs: $*"
  echo "kvmpy-initramfs: block devices: $(ls /sys/class/block | tr '\\n' ' ')"
  echo "kvmpy-initramfs: starting a shell in the initramfs ('reboot -f' leaves)"
  exec setsid cttyhack sh
}
n=0
while [ ! -b "$root" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
[ -b "$root" ] || give_up "no root device $root after 10 s (is there a --disk? is the kernel's ACPI on?)"
mkdir -p /newroot
mount -t "$fstype" -o "$mode" "$root" /newroot || give_up "cannot mount $root ($fstype, $mode)"
[ -x "/newroot$init" ] || give_up "$root has no $init"
mount --move /dev /newroot/dev
umount /sys /proc
exec switch_root /newroot "$init"
"""

INITTAB = """# busybox init: rcS once, a shell on the console, read-only root before reboot/poweroff
::sysinit:/etc/init.d/rcS
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/umount -a -r
::restart:/sbin/init
"""

RCS = f"""#!/bin/sh
# kvmpy root disk: mount the kernel's file systems, load the drivers of the virtio
# devices present, configure the network, say ready.
[ -e /proc/mounts ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
hostname -F /etc/hostname
rel=$(uname -r)
for dev in /sys/bus/virtio/devices/*; do
  [ -r "$dev/device" ] || continue
  list=/lib/modules/$rel/kvmpy-load/$(($(cat "$dev/device")))
  [ -r "$list" ] || continue
  for m in $(cat "$list"); do
    [ -d "/sys/module/$(echo "$m" | tr - _)" ] || insmod "/lib/modules/$rel/$m.ko" || echo "rcS: insmod $m failed"
  done
done
ip link set lo up
for net in /sys/class/net/*; do
  ifname=${{net##*/}}
  [ "$ifname" = lo ] && continue
  ip link set "$ifname" up
  udhcpc -i "$ifname" -s /etc/udhcpc.script -t 3 -T 2 -b -q -S
done
[ -x /etc/rc.local ] && /etc/rc.local
echo "{READY_MARKER} (Linux $rel, $(nproc) CPU(s), root $(awk '$2 == "/" {{print $1}}' /proc/mounts | tail -1))"
echo "type 'reboot' to leave (kvmpy exits with status 120)"
"""

UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc's hook: configure $interface from the lease (busybox passes it in the environment).
case "$1" in
  deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    prefix=${mask:-$(ipcalc -p "$ip" "$subnet" | cut -d= -f2)}
    ip addr flush dev "$interface"
    ip addr add "$ip/$prefix" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    : > /etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    echo "udhcpc: $interface is $ip/$prefix"
    ;;
esac
exit 0
"""

ETC_FILES = {
    "etc/inittab": (INITTAB, 0o644),
    "etc/init.d/rcS": (RCS, 0o755),
    "etc/udhcpc.script": (UDHCPC_SCRIPT, 0o755),
    "etc/hostname": ("kvmpy\n", 0o644),
    "etc/passwd": ("root:x:0:0:root:/root:/bin/sh\n", 0o644),
    "etc/group": ("root:x:0:\n", 0o644),
    "etc/profile": ('export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root\nPS1="$(hostname):\\w# "\n', 0o644),
    "etc/fstab": ("/dev/root / ext4 rw 0 1\nproc /proc proc defaults 0 0\n", 0o644),
}
DIRS = ("dev", "proc", "sys", "run", "tmp", "root", "mnt", "var", "var/log", "usr/bin", "usr/sbin", "sbin")


class RootfsError(KvmpyError):
    """The root disk could not be built; the message says what to install or do."""


@dataclass(frozen=True)
class RootDisk:
    """A built root disk: the pristine image, its initramfs, the kernel they were made for."""

    image: Path
    initrd: Path
    kernel: linuxkernel.LinuxFiles
    release: str
    size: int
    cmdline: str = CMDLINE

    def copy_to(self, path) -> Path:
        """A writable copy of the image at ``path`` (holes stay holes)."""
        copy_sparse(self.image, path)
        return Path(path)


def copy_sparse(src, dst) -> None:
    """Copy file ``src`` to ``dst``, skipping runs of zeros (the image is mostly empty)."""
    block = 1 << 16
    zero = bytes(block)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(block):
            if chunk == zero[:len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
        fout.truncate()


def find_mke2fs() -> str:
    """e2fsprogs' mke2fs (looked for on PATH, then in /usr/sbin and /sbin, off a user's PATH).
    busybox's mke2fs applet is passed over: it cannot write a directory into an image (-d)."""
    seen = set()
    for path in (os.environ.get("PATH", ""), "/usr/sbin:/sbin"):
        found = shutil.which("mke2fs", path=path)
        if found is None or os.path.realpath(found) in seen:
            continue
        seen.add(os.path.realpath(found))
        try:
            version = subprocess.run([found, "-V"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if "EXT2FS Library" in version.stdout + version.stderr:
            return found
    raise RootfsError("mke2fs from e2fsprogs not found: building the root disk needs it "
                      "(apt-get install e2fsprogs)" + (" (busybox's mke2fs cannot write a directory into an image)"
                                                      if seen else ""))


def _modules(linux: linuxkernel.LinuxFiles, offline: bool) -> dict[str, Path]:
    slot = Path(linux.vmlinuz).parent / "modules"
    if offline and not all((slot / f).is_file() for f in MODULE_FILES):
        raise linuxkernel.FetchError(f"the kernel's virtio modules are not in the cache {slot}; "
                                     "run 'python -m kvmpy.images.rootfs' once online")
    return linuxkernel.kernel_modules(linux, MODULE_FILES)


def _plan(modules: dict[str, Path]):
    """Read every module's .modinfo: (infos by name, file by name, root load order, per-device orders)."""
    infos, files = {}, {}
    for filename, path in modules.items():
        info = kmod.read_modinfo(path.read_bytes(), filename)
        infos[info.name], files[info.name] = info, filename
    root = kmod.load_order(infos, ROOT_MODULES)
    devices = {dev: [m for m in kmod.load_order(infos, wanted) if m not in root]
               for dev, wanted in DEVICE_MODULES.items()}
    return infos, files, root, devices


def _stem(filename: str) -> str:
    return filename[:-3] if filename.endswith(".ko") else filename


def _key(linux, busybox: bytes, modules: dict[str, Path], size: int, python: list[Path], extra: dict,
         packages: list[Path] = ()) -> str:
    h = hashlib.sha256(f"kvmpy-rootfs {FORMAT} {size} {linux.kernel_package}\n".encode())
    if python:                  # Debian's versions name the packages' contents
        h.update(f"python {debroot.bytecode_tag()} {' '.join(p.name for p in python)}\n".encode())
    if packages:                # absent for a disk without them: its key is what it always was
        h.update(f"packages {' '.join(p.name for p in packages)}\n".encode())
    for rel in sorted(extra):
        data, mode = extra[rel]
        h.update(f"file {rel} {mode:o} ".encode() + hashlib.sha256(data).digest())
    for text in (INITRAMFS_INIT, INITTAB, RCS, UDHCPC_SCRIPT, repr(sorted(ETC_FILES.items())), repr(DIRS)):
        h.update(hashlib.sha256(text.encode()).digest())
    h.update(hashlib.sha256(busybox).digest())
    for name in sorted(modules):
        h.update(name.encode() + hashlib.sha256(modules[name].read_bytes()).digest())
    return h.hexdigest()[:20]


def build(linux: linuxkernel.LinuxFiles | None = None, *, size: int | None = None, cache: Path | None = None,
          offline: bool = False, progress=None, python: bool = False, files: dict | None = None,
          packages: tuple[str, ...] = ()) -> RootDisk:
    """The root disk and initramfs for Debian's cloud kernel, built once per content.

    ``linux`` defaults to :func:`linuxkernel.fetch` (``offline``: the cache only);
    ``progress(text)`` hears what is being fetched or built. ``python`` adds Debian's
    python3 (kvmpy.images.debroot); ``packages`` more Debian packages unpacked the same way
    (their dependencies are not looked up: name them too, e.g. ``("iperf3", "libiperf0",
    "libsctp1")`` beside python's libc6 and libssl3); ``files`` maps paths in the image to bytes or
    ``(bytes, mode)``, added last (an executable ``etc/rc.local`` runs at the end of rcS).
    ``size`` defaults to DEFAULT_SIZE, DEFAULT_PYTHON_SIZE with python. Raises FetchError
    (nothing to fetch from, empty cache), RootfsError (no mke2fs, mke2fs failed, a bad
    ``files`` path) or ModuleError.
    """
    say = progress or (lambda text: None)
    size = size if size is not None else DEFAULT_PYTHON_SIZE if python else DEFAULT_SIZE
    extra = _extra_files(files or {})
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise RootfsError(f"root disk size {size} is outside {MIN_SIZE >> 20} MiB .. {MAX_SIZE >> 30} GiB")
    cache = Path(cache) if cache is not None else linuxkernel.cache_dir()
    if linux is None:
        say(f"fetching Debian's cloud kernel and busybox-static (cached in {cache}/debian)")
        linux = linuxkernel.fetch(cache, offline=offline)
    say("fetching the kernel's virtio modules (cached)")
    modules = _modules(linux, offline)
    busybox = Path(linux.busybox).read_bytes()
    release = (Path(linux.vmlinuz).parent / "release").read_text().strip()
    if python:
        say(f"fetching Debian's python3 ({', '.join(debroot.PYTHON_PACKAGES)}; cached)")
    trees = debroot.fetch(debroot.PYTHON_PACKAGES, cache, offline) if python else []
    if packages:
        say(f"fetching {', '.join(packages)} (cached)")
    more = debroot.fetch(packages, cache, offline) if packages else []
    key = _key(linux, busybox, modules, size, trees, extra, more)
    final = cache / "rootfs" / key
    disk = RootDisk(final / "rootfs.img", final / "initrd.cpio", linux, release, size)
    if disk.image.is_file() and disk.initrd.is_file():
        _touch(final)                   # recently used: the last to be pruned
        return disk
    mke2fs = find_mke2fs()
    infos, files, root, devices = _plan(modules)
    final.parent.mkdir(parents=True, exist_ok=True)
    say(f"building the root disk ({size >> 20} MiB ext4, mke2fs -d) in {final}")
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".build-") as tmp:
        out = Path(tmp, "out")
        out.mkdir()
        stage = Path(tmp, "tree")
        _stage_tree(stage, linux.busybox, release, modules, infos, files, devices)
        if trees or more:
            debroot.install(trees + more, stage)
        for rel, (data, mode) in extra.items():
            path = stage / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            path.write_bytes(data)
            path.chmod(mode)
        for path in sorted(stage.rglob("*"), reverse=True):     # the same inputs, the same image
            os.utime(path, (FAKE_TIME, FAKE_TIME), follow_symlinks=False)
        _mke2fs(mke2fs, stage, out / "rootfs.img", size, key)
        initrd = linux.initramfs(
            INITRAMFS_INIT,
            files={"etc/kvmpy-modules": (" ".join(_stem(files[m]) for m in root) + "\n").encode(),
                   **{f"lib/modules/{files[m]}": modules[files[m]].read_bytes() for m in root}})
        (out / "initrd.cpio").write_bytes(initrd)
        try:
            os.rename(out, final)
        except OSError:
            if not (disk.image.is_file() and disk.initrd.is_file()):   # another build finished first: fine
                raise
    _prune(final)
    return disk


def _extra_files(files: dict) -> dict[str, tuple[bytes, int]]:
    """``build(files=...)`` checked: relative paths inside the image, bytes, a mode."""
    out = {}
    for rel, value in files.items():
        data, mode = value if isinstance(value, tuple) else (value, 0o644)
        parts = str(rel).strip("/").split("/")
        if not parts or "" in parts or ".." in parts or "." in parts:
            raise RootfsError(f"files: {rel!r} is not a path inside the image")
        if not isinstance(data, (bytes, bytearray)) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise RootfsError(f"files: {rel!r} needs bytes or (bytes, mode)")
        out["/".join(parts)] = (bytes(data), mode)
    return out


def _stage_tree(stage: Path, busybox_path, release: str, modules, infos, files, devices) -> None:
    """The disk's files in a directory, for mke2fs -d (no device nodes: devtmpfs provides them)."""
    for d in DIRS:
        (stage / d).mkdir(parents=True, exist_ok=True)
    (stage / "tmp").chmod(0o1777)
    (stage / "root").chmod(0o700)
    bindir = stage / "bin"
    bindir.mkdir()
    shutil.copyfile(busybox_path, bindir / "busybox")
    (bindir / "busybox").chmod(0o755)
    for applet in _applets(bindir / "busybox"):
        link = stage / applet.lstrip("/")
        if link.name == "busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(bindir / "busybox", link.parent))
    for rel, (text, mode) in ETC_FILES.items():
        path = stage / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    mods = stage / "lib" / "modules" / release
    (mods / "kvmpy-load").mkdir(parents=True)
    for filename, path in modules.items():
        shutil.copyfile(path, mods / filename)
    (mods / "modules.dep").write_text(kmod.modules_dep(infos, files))
    for dev, names in devices.items():
        (mods / "kvmpy-load" / str(dev)).write_text(" ".join(_stem(files[m]) for m in names) + "\n")


def _applets(busybox: Path) -> list[str]:
    """busybox's applets with their install paths (``/bin/ls``, ``/sbin/init``...), asked of
    busybox itself (a static x86-64 program: it runs here)."""
    try:
        out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        raise RootfsError(f"cannot run {busybox} --list-full: {e}") from None
    applets = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or "sbin/init" not in applets:
        raise RootfsError(f"{busybox} --list-full gave no init applet: {out.stderr.strip()[:200]}")
    return applets


def _mke2fs(mke2fs: str, stage: Path, image: Path, size: int, key: str) -> None:
    """ext4 from the staged tree; the UUID, hash seed and times come from the key, so the same
    inputs give the same bytes."""
    fs_uuid = str(uuid.UUID(hashlib.sha256(key.encode()).hexdigest()[:32]))
    with open(image, "wb") as f:
        f.truncate(size)
    argv = [mke2fs, "-q", "-F", "-t", "ext4", "-L", "kvmpy-root", "-U", fs_uuid,
            "-E", f"root_owner=0:0,hash_seed={fs_uuid}", "-d", str(stage), str(image)]
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(FAKE_TIME), LC_ALL="C")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RootfsError(f"mke2fs failed (status {proc.returncode}): "
                          f"{(proc.stderr or proc.stdout).strip()[-1000:]}")


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass                            # a read-only cache still serves its disks


def _prune(keep: Path, keep_newest: int = 3) -> None:
    """Keep the ``keep_newest`` most recently built or used disks (each is up to --size of holes
    and ~3 MB): a disk another build or test is using counts as new, so it is not the one to go."""
    built = sorted((p for p in keep.parent.iterdir() if p.is_dir() and not p.name.startswith(".")),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for old in built[keep_newest:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


CLI_HELP = """\
Build a root disk for Debian's cloud kernel from Debian packages only:
  rootfs.img   ext4 (mke2fs -d, from e2fsprogs): busybox, busybox init, an rcS that loads
               the drivers of the virtio devices present (net, vsock, rng) and runs udhcpc,
               the kernel's virtio modules with a modules.dep
  initrd.cpio  busybox and the root's modules (virtio_mmio, virtio_pci, virtio_blk): its
               /init mounts root= (default /dev/vda) and switch_roots to it
The kernel, busybox-static and the modules come with apt-get download (nothing is
installed); everything is cached in $KVMPY_CACHE or ~/.cache/kvmpy, the disk by content.
Prints shell assignments: vmlinux=, vmlinuz=, initrd=, rootfs= and cmdline=."""


def parse_size(text: str) -> int:
    """'64M', '1G', '512K' or bytes -> bytes (argparse type of --size)."""
    units = {"": 0, "K": 10, "M": 20, "G": 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units else ""
    number = t[:len(t) - len(unit)]
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 64M, 1G)")
    return int(number) << units[unit]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kvmpy.images.rootfs", description=CLI_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="then boot it:\n"
               '  eval "$(python -m kvmpy.images.rootfs --output rootfs.img)"\n'
               '  kvmpy run "$vmlinux" --mem 512M --cpus 2 --disk rootfs.img --initrd "$initrd" --rng \\\n'
               f'      --cmdline "$cmdline"\n'
               "(or simply: kvmpy demo linux)")
    p.add_argument("--output", "-o", type=Path, default=None, metavar="FILE",
                   help="write a writable copy of the disk here (the cached one stays pristine); "
                        "without it, rootfs= names the cached image: copy it before booting it")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("--size", type=parse_size, default=None, metavar="SIZE",
                   help=f"size of the ext4 image (default {DEFAULT_SIZE >> 20}M, "
                        f"{DEFAULT_PYTHON_SIZE >> 20}M with --python)")
    p.add_argument("--python", action="store_true",
                   help="add Debian's python3 (python3.11-minimal and the libraries it needs)")
    p.add_argument("--cache", type=Path, default=None, help="cache directory (default $KVMPY_CACHE or ~/.cache/kvmpy)")
    p.add_argument("--offline", action="store_true", help="use only what the cache holds; never run apt")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.output is not None and args.output.exists() and not args.force:
        print(f"kvmpy.images.rootfs: {args.output} exists (--force to overwrite)", file=sys.stderr)
        return 1
    progress = None if args.quiet else (lambda text: print(f"kvmpy.images.rootfs: {text}", file=sys.stderr,
                                                            flush=True))
    try:
        disk = build(size=args.size, cache=args.cache, offline=args.offline, progress=progress, python=args.python)
        image = disk.copy_to(args.output) if args.output is not None else disk.image
    except (KvmpyError, OSError) as e:
        print(f"kvmpy.images.rootfs: {e}", file=sys.stderr)
        return 1
    print(f"vmlinux={disk.kernel.vmlinux}\nvmlinuz={disk.kernel.vmlinuz}\ninitrd={disk.initrd}\n"
          f"rootfs={image}\ncmdline='{disk.cmdline}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
