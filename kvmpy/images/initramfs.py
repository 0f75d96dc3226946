"""Initramfs images: "newc" cpio archives, written (and read back) in pure Python.

Linux unpacks a cpio archive handed to it as its initrd into a tmpfs and runs
``/init`` from it (Documentation/driver-api/early-userspace/buffer-format.rst). The
format it reads is SVR4 "newc": each member is a 110-byte ASCII header (magic
"070701" and thirteen 8-digit hex fields: ino, mode, uid, gid, nlink, mtime,
filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check), the path
name with its NUL, padding to a multiple of 4, the data, padding to 4 again; the
member named "TRAILER!!!" ends the archive.

:func:`build_busybox_initramfs` makes the smallest useful Linux userland: one
static busybox binary, the directories and device nodes the kernel and busybox
expect, and an ``/init`` shell script. Writing the archive ourselves means device
nodes need no root and the output is byte-for-byte reproducible (all times 0).
"""
from __future__ import annotations

import stat
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
           "rdevmajor", "rdevminor", "namesize", "check")
U32 = 1 << 32

#: What /init prints once user space runs; docs/linux.md tells people to look for it.
INIT_READY_MARKER = "kvmpy-initramfs: ready"

DEFAULT_INIT = f"""#!/bin/sh
# /init of a kvmpy busybox initramfs: mount the kernel's filesystems, say hello, start a shell.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "{INIT_READY_MARKER} (Linux $(uname -r), $(nproc) CPU(s))"
echo "type 'reboot -f' to leave (kvmpy exits with status 120)"
exec setsid cttyhack sh
"""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``mode`` includes the file type (``stat.S_IFREG | 0o755``);
    a symlink's ``data`` is its target; device nodes use ``rdevmajor``/``rdevminor``."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _clean_name(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts and name.strip("/") in ("", "."):
        return "."
    if ".." in parts:
        raise ValueError(f"cpio member name {name!r} contains '..'")
    clean = "/".join(parts)
    if "\0" in clean:
        raise ValueError(f"cpio member name {name!r} contains a NUL byte")
    return clean


def _header(ino: int, e: CpioEntry, name: bytes, size: int) -> bytes:
    values = dict(ino=ino, mode=e.mode, uid=e.uid, gid=e.gid,
                  nlink=2 if stat.S_ISDIR(e.mode) else 1, mtime=e.mtime, filesize=size,
                  devmajor=0, devminor=0, rdevmajor=e.rdevmajor, rdevminor=e.rdevminor,
                  namesize=len(name) + 1, check=0)
    for field, value in values.items():
        if not 0 <= value < U32:
            raise ValueError(f"cpio field {field}={value} of {e.name!r} does not fit in 32 bits")
    return NEWC_MAGIC + b"".join(b"%08X" % values[f] for f in _FIELDS)


def newc_archive(entries) -> bytes:
    """A newc cpio archive of ``entries`` (in order), ending with the trailer.

    Names are made relative ("/bin/sh" -> "bin/sh"); "..", NUL, duplicate names and the
    trailer's own name are refused with ValueError, since the kernel would unpack them
    surprisingly (a member named "TRAILER!!!" would end the archive there).
    """
    out, seen = [], set()
    for ino, e in enumerate(entries, start=1):
        name = _clean_name(e.name)
        if name in seen:
            raise ValueError(f"duplicate cpio member {name!r}")
        if name == TRAILER:
            raise ValueError(f"a cpio member named {e.name!r} would mark the end of the archive "
                             "and hide every member after it")
        seen.add(name)
        if not (stat.S_ISREG(e.mode) or stat.S_ISLNK(e.mode)) and e.data:
            raise ValueError(f"{name!r}: only regular files and symlinks carry data")
        raw = name.encode("utf-8")
        head = _header(ino, e, raw, len(e.data))
        out += [head, raw, b"\0", _pad4(HEADER_SIZE + len(raw) + 1), e.data, _pad4(len(e.data))]
    trailer = CpioEntry(TRAILER, 0)
    raw = TRAILER.encode()
    out += [_header(0, trailer, raw, 0), raw, b"\0", _pad4(HEADER_SIZE + len(raw) + 1)]
    return b"".join(out)


def read_newc(data) -> list[CpioEntry]:
    """Parse a newc archive back into entries (up to the trailer); ValueError if malformed.

    Used by the tests and to inspect an initramfs; hostile input is bounds-checked.
    """
    buf = memoryview(data).cast("B")
    off, entries = 0, []
    while True:
        if len(buf) - off < HEADER_SIZE:
            raise ValueError(f"truncated cpio header at offset {off:#x}")
        head = bytes(buf[off:off + HEADER_SIZE])
        if head[:6] != NEWC_MAGIC:
            raise ValueError(f"bad cpio magic {head[:6]!r} at offset {off:#x}, expected {NEWC_MAGIC!r}")
        try:
            f = {name: int(head[6 + 8 * i:14 + 8 * i], 16) for i, name in enumerate(_FIELDS)}
        except ValueError:
            raise ValueError(f"non-hex field in the cpio header at offset {off:#x}") from None
        if f["namesize"] == 0:
            raise ValueError(f"cpio member at offset {off:#x} has namesize 0")
        name_end = off + HEADER_SIZE + f["namesize"]
        data_at = name_end + (-(HEADER_SIZE + f["namesize"]) % 4)
        data_end = data_at + f["filesize"]
        if data_end > len(buf):
            raise ValueError(f"cpio member at offset {off:#x} (namesize {f['namesize']}, filesize "
                             f"{f['filesize']}) runs past the end of the archive ({len(buf)} bytes)")
        raw_name = bytes(buf[off + HEADER_SIZE:name_end])
        if raw_name[-1:] != b"\0":
            raise ValueError(f"cpio member name at offset {off:#x} is not NUL-terminated")
        name = raw_name[:-1].decode("utf-8", "surrogateescape")
        if name == TRAILER:
            return entries
        entries.append(CpioEntry(name=name, mode=f["mode"], data=bytes(buf[data_at:data_end]), uid=f["uid"],
                                 gid=f["gid"], mtime=f["mtime"], rdevmajor=f["rdevmajor"],
                                 rdevminor=f["rdevminor"]))
        off = data_end + (-f["filesize"] % 4)


def _dir(name: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | 0o755)


def build_busybox_initramfs(busybox_path, init_script: str | None = None, files: dict | None = None) -> bytes:
    """An initramfs (newc cpio bytes) with a static busybox and ``init_script`` as /init.

    ``busybox_path`` must be a statically linked busybox (Debian's busybox-static);
    the default /init mounts /proc, /sys and /dev, prints :data:`INIT_READY_MARKER`
    and starts a shell on the console. /bin/sh links to busybox, so a script
    starting ``#!/bin/sh`` works before ``busybox --install`` has run. ``files`` adds
    regular files (archive path -> bytes, mode 0644; kernel modules, say), with the
    directories they need.
    """
    with open(busybox_path, "rb") as f:
        busybox = f.read()
    if busybox[:4] != b"\x7fELF":
        raise ValueError(f"{busybox_path}: not an ELF executable")
    script = DEFAULT_INIT if init_script is None else init_script
    entries = [_dir(d) for d in ("bin", "sbin", "dev", "etc", "proc", "sys", "tmp", "root",
                                 "usr", "usr/bin", "usr/sbin")]
    entries += [
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        # The kernel opens /dev/console for init's stdin/stdout before /init can mount devtmpfs.
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdevmajor=5, rdevminor=1),
        CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdevmajor=1, rdevminor=3),
        CpioEntry("dev/ttyS0", stat.S_IFCHR | 0o660, rdevmajor=4, rdevminor=64),
        CpioEntry("etc/passwd", stat.S_IFREG | 0o644, b"root:x:0:0:root:/root:/bin/sh\n"),
        CpioEntry("init", stat.S_IFREG | 0o755, script.encode("utf-8")),
    ]
    have = {e.name for e in entries}
    for path, data in sorted((files or {}).items()):
        path = _clean_name(path)
        parts = path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in have:
                entries.append(_dir(d))
                have.add(d)
        if path in have:
            raise ValueError(f"initramfs file {path!r} is already in the archive")
        entries.append(CpioEntry(path, stat.S_IFREG | 0o644, bytes(data)))
        have.add(path)
    return newc_archive(entries)
