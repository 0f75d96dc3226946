"""A real Linux to boot: Debian's cloud kernel and busybox-static, fetched into a cache.

Tests and demos need a stock kernel without building one. This helper asks apt
which ``linux-image-cloud-amd64`` is current, downloads that package and
``busybox-static`` with ``apt-get download`` (nothing is installed on the host),
takes ``/boot/vmlinuz-*`` and ``/bin/busybox`` out of the ``.deb`` files (an ``ar``
archive holding ``data.tar.xz``, read here in Python), and decompresses the
bzImage's payload into an uncompressed ``vmlinux`` for the PVH entry.

The cache is ``$KVMPY_CACHE`` or ``~/.cache/kvmpy``: one directory per package
version, created atomically, so a second call costs one ``apt-cache`` look-up and
an interrupted download leaves nothing behind. Command line::

    python -m kvmpy.images.linuxkernel [--initramfs FILE] [--offline] [--quiet]

prints ``vmlinuz=...``, ``vmlinux=...``, ``busybox=...`` (and ``initramfs=...``).

Debian compresses its kernels with LZ4 (legacy frame), which the standard library
cannot read: the ``lz4`` package from PyPI is used when installed, else the
``lz4`` command (Debian package lz4). gzip, bzip2, lzma and xz payloads need
nothing extra; zstd uses the ``zstandard`` package or the ``zstd`` command.
"""
from __future__ import annotations

import argparse
import bz2
import io
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import KvmpyError, LoaderError
from ..loader import bzimage

KERNEL_PACKAGE = "linux-image-cloud-amd64"      # a metapackage: depends on the current kernel
BUSYBOX_PACKAGE = "busybox-static"
MAX_VMLINUX = 1 << 30                           # refuse to inflate a payload past 1 GiB
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20                      # lz4 -l blocks decompress to at most 8 MiB


class FetchError(KvmpyError):
    """The kernel or busybox could not be fetched; the message says what to do."""


def cache_dir() -> Path:
    """``$KVMPY_CACHE`` or ``~/.cache/kvmpy``."""
    env = os.environ.get("KVMPY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvmpy"


@dataclass(frozen=True)
class LinuxFiles:
    """Paths of a fetched kernel: the bzImage, its uncompressed vmlinux, and busybox."""

    vmlinuz: Path
    vmlinux: Path
    busybox: Path
    kernel_package: str             # e.g. "linux-image-6.1.0-50-cloud-amd64_6.1.176-1"

    def initramfs(self, init_script: str | None = None, files: dict | None = None) -> bytes:
        """A busybox initramfs (see :func:`kvmpy.images.initramfs.build_busybox_initramfs`)."""
        from .initramfs import build_busybox_initramfs
        return build_busybox_initramfs(self.busybox, init_script, files)


# --- decompressing a bzImage payload ---------------------------------------------------
def _inflate_stream(decomp, blob: memoryview, name: str) -> bytes:
    out = decomp.decompress(bytes(blob), MAX_VMLINUX + 1)
    if len(out) > MAX_VMLINUX:
        raise LoaderError(f"{name} payload inflates past {MAX_VMLINUX:#x} bytes")
    return out


def _lz4_legacy(blob: memoryview) -> bytes:
    """LZ4 legacy frame: magic, then (u32 size, block) until the data (or a 4-byte trailer) ends."""
    block = _lz4_block_decoder()
    out, off, size = [], 4, len(blob)
    total = 0
    while size - off >= 4:
        n = struct.unpack_from("<I", blob, off)[0]
        if n == LZ4_LEGACY_MAGIC:           # concatenated frames
            off += 4
            continue
        if off + 4 + n > size:
            if size - off == 4:             # the kernel's size_append trailer
                break
            raise LoaderError(f"truncated lz4 block at payload offset {off:#x} ({n:#x} bytes, "
                              f"{size - off - 4:#x} left)")
        chunk = block(bytes(blob[off + 4:off + 4 + n]))
        total += len(chunk)
        if total > MAX_VMLINUX:
            raise LoaderError(f"lz4 payload inflates past {MAX_VMLINUX:#x} bytes")
        out.append(chunk)
        off += 4 + n
    return b"".join(out)


def _lz4_block_decoder():
    try:
        import lz4.block
    except ImportError:
        lz4_cmd = shutil.which("lz4")
        if lz4_cmd is None:
            raise LoaderError("this kernel is LZ4-compressed: install the Python package 'lz4' "
                              "(pip install lz4) or the 'lz4' command (apt-get install lz4)") from None
        return None

    def block(b: bytes) -> bytes:
        try:
            return lz4.block.decompress(b, uncompressed_size=LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as e:
            raise LoaderError(f"corrupt lz4 block: {e}") from None
    return block


def _via_command(argv: list[str], blob: memoryview, hint: str) -> bytes:
    if shutil.which(argv[0]) is None:
        raise LoaderError(f"decompressing this kernel needs {hint}")
    proc = subprocess.run(argv, input=bytes(blob), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0 and not proc.stdout:
        raise LoaderError(f"{argv[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    if len(proc.stdout) > MAX_VMLINUX:
        raise LoaderError(f"payload inflates past {MAX_VMLINUX:#x} bytes")
    return proc.stdout


def _zstd(blob: memoryview) -> bytes:
    try:
        import zstandard
    except ImportError:
        return _via_command(["zstd", "-dcq"], blob, "the Python package 'zstandard' or the 'zstd' command")
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(bytes(blob))) as reader:
            out = reader.read(MAX_VMLINUX + 1)  # the first frame only: the size trailer follows it
    except zstandard.ZstdError as e:
        raise LoaderError(f"corrupt zstd payload: {e}") from None
    if len(out) > MAX_VMLINUX:
        raise LoaderError(f"zstd payload inflates past {MAX_VMLINUX:#x} bytes")
    return out


def decompress_payload(name: str, blob: memoryview) -> bytes:
    """Inflate a bzImage payload of format ``name`` (see :func:`bzimage.payload`)."""
    if name == "gzip":
        return _inflate_stream(zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), blob, name)
    if name == "bzip2":
        return _inflate_stream(bz2.BZ2Decompressor(), blob, name)
    if name == "lzma":
        return _inflate_stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), blob, name)
    if name == "xz":
        return _inflate_stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), blob, name)
    if name == "lz4":
        if _lz4_block_decoder() is None:
            return _via_command(["lz4", "-dcq"], blob, "the 'lz4' command")
        return _lz4_legacy(blob)
    if name == "zstd":
        return _zstd(blob)
    if name == "lzo":
        return _via_command(["lzop", "-dcq"], blob, "the 'lzop' command (apt-get install lzop)")
    raise LoaderError(f"unknown payload compression {name!r}")


def extract_vmlinux(image) -> bytes:
    """The uncompressed vmlinux (an ELF file) inside bzImage ``image``.

    The payload's last four bytes are the inflated size (the kernel build's
    ``size_append``; gzip's own ISIZE): a mismatch means a damaged image.
    """
    h = bzimage.parse_setup_header(image)
    name, blob = bzimage.payload(image, h)
    try:
        out = decompress_payload(name, blob)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, RuntimeError, MemoryError) as e:
        raise LoaderError(f"cannot decompress the {name} payload: {e}") from None
    if len(blob) >= 4:
        expected = struct.unpack_from("<I", blob, len(blob) - 4)[0]
        if len(out) & 0xFFFF_FFFF != expected:
            raise LoaderError(f"{name} payload inflated to {len(out):#x} bytes, but the image says {expected:#x}")
    if out[:4] != b"\x7fELF":
        raise LoaderError(f"the decompressed payload is not an ELF file (starts {out[:4].hex()})")
    return out


# --- Debian packages -------------------------------------------------------------------
@dataclass(frozen=True)
class DebEntry:
    """A member of a package's file tree (``deb_members(..., tree=True)``): a regular file
    (``data``, permission bits ``mode``) or a symbolic link (``link``: its target)."""

    mode: int
    data: bytes = b""
    link: str | None = None


def deb_members(deb: bytes, wanted, tree: bool = False) -> dict:
    """Regular files of a .deb's data archive whose paths match ``wanted(path)``: {path: bytes};
    with ``tree``, files and symbolic links as {path: DebEntry}.

    A .deb is an ``ar`` archive (magic ``!<arch>\\n``, 60-byte member headers) whose
    ``data.tar.*`` member holds the files; paths come back without the leading "./".
    """
    if deb[:8] != b"!<arch>\n":
        raise FetchError("not a Debian package (no ar magic)")
    off = 8
    while off + 60 <= len(deb):
        name = deb[off:off + 16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(deb[off + 48:off + 58].decode("ascii").strip())
        except ValueError:
            raise FetchError(f"bad ar member header at offset {off}") from None
        body = deb[off + 60:off + 60 + size]
        if name.startswith("data.tar"):
            return _tar_members(name, body, wanted, tree)
        off += 60 + size + (size & 1)
    raise FetchError("no data.tar member in the package")


def _tar_members(name: str, body: bytes, wanted, tree: bool) -> dict:
    if name.endswith(".zst"):
        body = _zstd(memoryview(body))
        mode = "r:"
    else:
        mode = {".xz": "r:xz", ".gz": "r:gz", ".bz2": "r:bz2"}.get(os.path.splitext(name)[1], "r:")
    found = {}
    with tarfile.open(fileobj=io.BytesIO(body), mode=mode) as tar:
        for m in tar:
            path = m.name[2:] if m.name.startswith("./") else m.name
            if m.isfile() and wanted(path):
                data = tar.extractfile(m).read()
                found[path] = DebEntry(m.mode & 0o7777, data) if tree else data
            elif tree and m.issym() and wanted(path):
                found[path] = DebEntry(0o777, link=m.linkname)
    return found


def _run(argv: list[str], cwd: str | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        raise FetchError(f"{argv[0]} not found: fetching Debian's kernel needs apt (a Debian or Ubuntu host)") from None
    if proc.returncode != 0:
        raise FetchError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}"
                         + ("; run 'apt-get update' first" if "Unable to locate" in proc.stderr
                            or "No packages found" in proc.stderr else ""))
    return proc.stdout


def _apt_show(packages: list[str]) -> dict[str, dict[str, str]]:
    """``apt-cache show`` of the candidate versions: {package: {field: value}}."""
    out = _run(["apt-cache", "show", "--no-all-versions", *packages])
    stanzas = {}
    for block in out.split("\n\n"):
        fields = dict(m.groups() for m in re.finditer(r"^([\w-]+): (.*)$", block, re.M))
        if "Package" in fields:
            stanzas[fields["Package"]] = fields
    missing = [p for p in packages if p not in stanzas]
    if missing:
        raise FetchError(f"apt knows no package {', '.join(missing)}; run 'apt-get update'")
    return stanzas


def resolve(kernel_package: str = KERNEL_PACKAGE) -> tuple[tuple[str, str], tuple[str, str]]:
    """((name, version) of the kernel, (name, version) of busybox-static), from one apt-cache call.

    A metapackage such as linux-image-cloud-amd64 is followed to the kernel it depends on:
    its Depends reads "linux-image-6.1.0-NN-cloud-amd64 (= VERSION)".
    """
    info = _apt_show([kernel_package, BUSYBOX_PACKAGE])
    kernel = info[kernel_package]
    m = re.search(r"(linux-image-\d[^\s,(]*) \(= ([^)\s]+)\)", kernel.get("Depends", ""))
    if m:
        kname, kver = m.groups()
    elif kernel_package.startswith("linux-image-"):
        kname, kver = kernel_package, kernel["Version"]
    else:
        raise FetchError(f"{kernel_package} is not a linux-image package")
    return (kname, kver), (BUSYBOX_PACKAGE, info[BUSYBOX_PACKAGE]["Version"])


def _slot(name: str, version: str) -> str:
    return f"{name}_{version.replace(':', '%3a')}"


def _download(cache: Path, name: str, version: str, wanted, outputs, tree: bool = False) -> Path:
    """Download ``name=version``, keep the members ``wanted`` selects, let ``outputs`` write
    the slot's files; the slot directory appears atomically."""
    final = cache / "debian" / _slot(name, version)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".fetch-") as tmp:
        # As root, apt downloads as its _apt user, who cannot write to a private directory.
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        _run(["apt-get", "download", "-qq", *sandbox, f"{name}={version}"], cwd=tmp)
        debs = [p for p in os.listdir(tmp) if p.endswith(".deb")]
        if len(debs) != 1:
            raise FetchError(f"apt-get download {name} left {debs!r} instead of one .deb")
        members = deb_members(Path(tmp, debs[0]).read_bytes(), wanted, tree)
        out = Path(tmp, "slot")
        out.mkdir()
        outputs(members, out)
        try:
            os.rename(out, final)
        except OSError:
            if not final.is_dir():  # somebody else finished first: fine; anything else: an error
                raise
    return final


def _kernel_outputs(members: dict[str, bytes], out: Path) -> None:
    images = [p for p in members if re.fullmatch(r"boot/vmlinuz-.*", p)]
    if len(images) != 1:
        raise FetchError(f"expected one boot/vmlinuz-* in the kernel package, found {images!r}")
    image = members[images[0]]
    (out / "vmlinuz").write_bytes(image)
    (out / "vmlinux").write_bytes(extract_vmlinux(image))
    (out / "release").write_text(images[0].removeprefix("boot/vmlinuz-") + "\n")


def _busybox_outputs(members: dict[str, bytes], out: Path) -> None:
    if "bin/busybox" not in members:
        raise FetchError("busybox-static has no bin/busybox")
    path = out / "busybox"
    path.write_bytes(members["bin/busybox"])
    path.chmod(0o755)


def _prune(cache: Path, keep) -> None:
    """Remove older versions of the cached packages (a kernel update leaves ~70 MB behind)."""
    for prefix, current in (("linux-image-", keep[0]), (BUSYBOX_PACKAGE + "_", keep[1])):
        for slot in (cache / "debian").glob(prefix + "*"):
            if slot != current and slot.is_dir():
                shutil.rmtree(slot, ignore_errors=True)


def _newest(cache: Path, prefix: str) -> Path | None:
    slots = [p for p in (cache / "debian").glob(prefix + "*") if p.is_dir()]
    return max(slots, key=lambda p: p.stat().st_mtime, default=None)


def cached(cache: Path | None = None) -> LinuxFiles | None:
    """The newest kernel and busybox already in the cache, without asking apt; or None."""
    cache = Path(cache) if cache is not None else cache_dir()
    k, b = _newest(cache, "linux-image-"), _newest(cache, BUSYBOX_PACKAGE + "_")
    if k is None or b is None:
        return None
    return LinuxFiles(k / "vmlinuz", k / "vmlinux", b / "busybox", k.name)


def fetch(cache: Path | None = None, *, kernel_package: str = KERNEL_PACKAGE, offline: bool = False) -> LinuxFiles:
    """Debian's current cloud kernel and busybox-static, downloaded on first use.

    ``offline`` never runs apt: it returns what the cache holds (FetchError if empty).
    Otherwise apt-cache names the current versions (cheap) and only a version not yet
    cached is downloaded. If apt cannot answer (no package lists, no apt), a cached
    kernel is used when there is one.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    if offline:
        found = cached(cache)
        if found is None:
            raise FetchError(f"no kernel in the cache {cache}; run 'python -m kvmpy.images.linuxkernel' once online")
        return found
    try:
        (kname, kver), (bname, bver) = resolve(kernel_package)
    except FetchError:
        found = cached(cache)
        if found is not None:
            return found
        raise
    k = _download(cache, kname, kver, lambda p: p.startswith("boot/vmlinuz-"), _kernel_outputs)
    b = _download(cache, bname, bver, lambda p: p == "bin/busybox", _busybox_outputs)
    _prune(cache, keep=(k, b))
    return LinuxFiles(k / "vmlinuz", k / "vmlinux", b / "busybox", k.name)


def fetch_package(name: str, wanted, outputs, cache: Path | None = None, tree: bool = False) -> Path:
    """The cache slot of Debian package ``name`` (its candidate version), made on first use:
    ``wanted(path)`` picks the package's files and ``outputs(members, slot)`` writes what the
    slot keeps (see :func:`fetch`, which does the same for the kernel); with ``tree`` the
    members are DebEntry values, symbolic links included (:func:`deb_members`). If apt cannot answer,
    the newest slot of ``name`` already cached is used; FetchError if there is none."""
    cache = Path(cache) if cache is not None else cache_dir()
    try:
        version = _apt_show([name])[name]["Version"]
    except FetchError:
        found = _newest(cache, name + "_")
        if found is None:
            raise
        return found
    return _download(cache, name, version, wanted, outputs, tree)


def fetch_packages(names, wanted, outputs, cache: Path | None = None, tree: bool = False) -> list[Path]:
    """:func:`fetch_package` for several packages, with one apt-cache call for them all."""
    cache = Path(cache) if cache is not None else cache_dir()
    try:
        info = _apt_show(list(names))
    except FetchError:
        found = [_newest(cache, name + "_") for name in names]
        if None in found:
            raise
        return found
    return [_download(cache, name, info[name]["Version"], wanted, outputs, tree) for name in names]


def kernel_modules(files: LinuxFiles, names, cache: Path | None = None) -> dict[str, Path]:
    """The kernel's own loadable modules ``names`` (file names such as ``"kvm-amd.ko"``).

    They come out of the same ``linux-image`` package as :func:`fetch`'s kernel (its
    ``lib/modules/<release>/`` tree; Debian ships them uncompressed) and are kept in
    that kernel's cache slot under ``modules/``, so the package is downloaded again
    only when a module not yet cached is asked for. Returns ``{name: path}``.
    """
    names = sorted(set(names))
    slot = Path(files.vmlinuz).parent
    have = {n: slot / "modules" / n for n in names}
    if all(p.is_file() for p in have.values()):
        return have
    name, _, version = files.kernel_package.partition("_")
    if not name.startswith("linux-image-") or not version:
        raise FetchError(f"cannot tell the kernel package from {files.kernel_package!r}")
    version = version.replace("%3a", ":")
    with tempfile.TemporaryDirectory(dir=slot, prefix=".modules-") as tmp:
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        _run(["apt-get", "download", "-qq", *sandbox, f"{name}={version}"], cwd=tmp)
        debs = [p for p in os.listdir(tmp) if p.endswith(".deb")]
        if len(debs) != 1:
            raise FetchError(f"apt-get download {name} left {debs!r} instead of one .deb")
        wanted = set(names)
        members = deb_members(Path(tmp, debs[0]).read_bytes(),
                              lambda p: p.startswith("lib/modules/") and p.rsplit("/", 1)[-1] in wanted)
        found = {path.rsplit("/", 1)[-1]: data for path, data in members.items()}
        missing = wanted - set(found)
        if missing:
            raise FetchError(f"{name} has no module {', '.join(sorted(missing))}")
        out = Path(tmp, "modules")
        out.mkdir()
        for n, data in found.items():
            (out / n).write_bytes(data)
        for old in (slot / "modules").glob("*"):   # keep what was cached before
            if not (out / old.name).exists():
                shutil.copyfile(old, out / old.name)
        if (slot / "modules").is_dir():
            shutil.rmtree(slot / "modules")
        os.rename(out, slot / "modules")
    return have


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvmpy.images.linuxkernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=None, help="cache directory (default $KVMPY_CACHE or ~/.cache/kvmpy)")
    p.add_argument("--offline", action="store_true", help="use only what the cache holds; never run apt")
    p.add_argument("--initramfs", type=Path, metavar="FILE", help="also write a busybox initramfs here")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    args = p.parse_args(argv)
    try:
        files = fetch(args.cache, offline=args.offline)
        if args.initramfs:
            args.initramfs.write_bytes(files.initramfs())
    except (KvmpyError, OSError, ValueError) as e:
        print(f"kvmpy.images.linuxkernel: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"vmlinuz={files.vmlinuz}\nvmlinux={files.vmlinux}\nbusybox={files.busybox}")
        if args.initramfs:
            print(f"initramfs={args.initramfs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
