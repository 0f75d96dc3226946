"""Guest image loaders: put an image's bytes in guest RAM and say how to enter it.

Loaders only load: they write guest memory and return a :class:`LoadedImage`
(entry, mode, format, segments, boot registers); they never touch a vCPU.
:func:`load` is the front door: it reads the files, asks :func:`detect` which
loader the image needs, and hands it over. The loaders:

* ``"multiboot"``: a Multiboot v1 kernel with its modules (:mod:`.multiboot`);
* ``"bzimage"``, ``"pvh"``: a Linux kernel with its command line and initrd
  (:mod:`.linux`; ``"linux"`` picks between the two);
* ``"elf"``: an ELF32/ELF64 x86 executable (:mod:`.elf`);
* ``"raw"``: a flat binary at one address (:mod:`.raw`).
"""
from __future__ import annotations

import dataclasses
import os

from ..errors import LoaderError, read_file
from ..x86 import boottables, layout
from .detect import FORMATS, LOADERS, detect
from .elf import load_elf
from .image import MODES, LoadedImage, check_mode
from .multiboot import is_multiboot, load_multiboot, module_string
from .raw import load_raw

__all__ = ["FORMATS", "LOADERS", "MODES", "LoadedImage", "default_reserved", "detect", "is_multiboot",
           "load", "load_elf", "load_linux", "load_multiboot", "load_path", "load_raw"]

_BYTES = (bytes, bytearray, memoryview)


def load(mem, image, format: str = "auto", *, cmdline: str = "", linux_cmdline_extra: str = "",
         initrd=None, modules=(), load_addr: int | None = None, entry: int | None = None,
         mode: str | None = None, reserved=None, acpi=None) -> LoadedImage:
    """Load ``image`` (a path or bytes) into ``mem`` as ``format`` (see :func:`detect`).

    ``cmdline`` goes to Linux and multiboot kernels and is returned as the image's
    ``cmdline``; ``linux_cmdline_extra`` is appended to it for Linux only (the VMM's
    ``virtio_mmio.device=`` entries). ``initrd`` (path or bytes) is Linux's, and so is
    ``acpi``, the ACPI tables (``x86.acpi.Tables``) a Linux kernel is given, or a function
    that builds them, called only for a Linux kernel (other formats are loaded without them).
    ``modules`` are multiboot's: each a path, or a ``(path, args)`` pair whose string
    is "PATH ARGS" as QEMU passes it, or a ``(bytes, string)`` pair. ``load_addr``
    and ``entry`` place a raw image. ``mode`` picks a raw image's CPU mode (default
    real) and a bzImage's 32- or 64-bit entry; for other images it must be theirs.
    ``reserved``: ``(start, end)`` ranges the image (and what its loader writes) must
    keep clear of (:func:`default_reserved` by default). The returned image's ``tables``
    say where the VMM's boot GDT, TSS and page tables go: their homes, or wherever the
    image leaves room (``x86.boottables.place``).
    Errors name the image. A file larger than guest RAM is refused from its size,
    before it is read.
    """
    name = "image" if isinstance(image, _BYTES) else os.fspath(image)
    ram = mem.size                          # no file larger than guest RAM is read at all
    data = read_file(image, "image", limit=ram)
    rd = None if initrd is None else read_file(initrd, "initrd", limit=ram)
    mods = [_module(m, ram) for m in modules]
    try:
        found = detect(data, format)
        _check_options(found, mode, load_addr, entry, rd, mods)
        if reserved is None:
            reserved = default_reserved(found, mode)
        if found in ("bzimage", "pvh"):
            cmdline = f"{cmdline} {linux_cmdline_extra}".strip()
            acpi = acpi() if callable(acpi) else acpi
        else:
            acpi = None
        img = _load_as(found, mem, data, cmdline=cmdline, initrd=rd, modules=mods, load_addr=load_addr,
                       entry=entry, mode=mode, reserved=tuple(reserved), name=name, acpi=acpi)
        if img.tables is None:
            img = dataclasses.replace(img, tables=_place_tables(mem, img, acpi))
    except LoaderError as e:
        raise LoaderError(f"{name}: {e}") from None
    return dataclasses.replace(img, cmdline=cmdline)


def default_reserved(found: str, mode: str | None) -> tuple[tuple[int, int], ...]:
    """What an image must keep clear of. A Linux kernel: the first MiB (its boot information
    lives there, and its protocol loads it higher anyway). A raw real-mode image: nothing, it
    lives in low memory as a boot sector. Any other: the PC's legacy hole 0x9FC00-0xFFFFF
    (the EBDA with the MP table, the VGA window, the BIOS), which no memory map calls RAM.
    The VMM's GDT, TSS and page tables are not reserved: they move out of the image's way."""
    if found == "raw" and (mode or "real") == "real":
        return ()
    if found in ("bzimage", "pvh"):
        return (layout.LOW_RESERVED,)
    return (layout.LEGACY_HOLE,)


def _place_tables(mem, img: LoadedImage, acpi) -> boottables.BootTables:
    """Where the boot tables go: clear of everything the loader wrote."""
    taken = [(gpa, gpa + size) for gpa, size in img.segments]
    if img.format in ("bzimage", "pvh"):
        from .linux import BOOT_RANGES      # the zero page or start info, and the command line
        taken += BOOT_RANGES
        if acpi is not None:
            taken.append((acpi.base, acpi.end))
    try:
        return boottables.place(img.mode, mem.end, [(r.gpa, r.end) for r in mem.regions], taken)
    except ValueError as e:
        raise LoaderError(str(e)) from None


def load_path(mem, path, format: str = "auto", **kw) -> LoadedImage:
    """:func:`load` the file at ``path`` (kept for callers; :func:`load` takes paths too)."""
    if isinstance(path, _BYTES):
        raise TypeError("load_path() takes a path; pass an image's bytes to load()")
    return load(mem, path, format, **kw)


def _module(m, limit: int) -> tuple[bytes, str]:
    """A multiboot module as (bytes, string), if a file, at most ``limit`` bytes; see :func:`load`."""
    source, args = (m, "") if isinstance(m, (str, os.PathLike, *_BYTES)) else m
    if isinstance(source, _BYTES):
        return bytes(source), args
    return read_file(source, "module", limit=limit), module_string(os.fspath(source), args)


#: The CPU mode each loader other than raw enters its image in; None: the image says.
_ENTRY_MODES = {"elf": None, "multiboot": ("protected",), "pvh": ("protected",),
                "bzimage": ("protected", "long")}


def _check_options(found: str, mode, load_addr, entry, initrd, modules) -> None:
    """Refuse options the image's loader cannot honour, rather than ignore them."""
    if mode is not None:
        check_mode(mode)
        allowed = _ENTRY_MODES.get(found)
        if allowed is not None and mode not in allowed:
            raise LoaderError(f"a {found} kernel enters in {' or '.join(allowed)} mode, not mode={mode!r}")
    if found != "raw" and (load_addr is not None or entry is not None):
        where = ("at its p_paddr and entered at its e_entry" if found == "elf"
                 else "where its boot protocol says")
        raise LoaderError(f"load_addr and entry apply to raw images only; a {found} image is placed {where}")
    if initrd is not None and found not in ("bzimage", "pvh"):
        raise LoaderError(f"an initrd is for Linux kernels, not for {found} images"
                          + ("; a multiboot kernel takes modules" if found == "multiboot" else ""))
    if modules and found != "multiboot":
        raise LoaderError(f"modules are for multiboot kernels, not for {found} images"
                          + ("; Linux takes an initrd" if found in ("bzimage", "pvh") else ""))


def _load_as(found: str, mem, data: bytes, *, cmdline, initrd, modules, load_addr, entry, mode,
             reserved, name, acpi) -> LoadedImage:
    if found == "raw":
        return load_raw(mem, data, load_addr=load_addr, entry=entry, mode=mode, reserved=reserved)
    if found == "elf":
        return load_elf(mem, data, mode=mode, reserved=reserved)
    if found == "multiboot":
        return load_multiboot(mem, data, cmdline=cmdline, modules=modules, reserved=reserved, image_name=name)
    bits = {"protected": 32, "long": 64}.get(mode)
    from .linux import load_linux           # bzImage, PVH and boot_params: loaded for Linux only
    return load_linux(mem, data, cmdline=cmdline, initrd=initrd, reserved=reserved, format=found, bits=bits,
                      acpi=acpi)


def __getattr__(name):
    if name == "load_linux":                # still importable from here, without loading it up front
        from .linux import load_linux
        return load_linux
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
