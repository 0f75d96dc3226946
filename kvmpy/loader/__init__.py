"""Guest image loaders: put an image's bytes in guest RAM and say how to enter it.

Loaders only load: they write guest memory and return a :class:`LoadedImage`
(entry, mode, format, segments); they never touch a vCPU. Formats:

* ``"raw"``: a flat binary at one address (:mod:`.raw`);
* ``"elf"``: an ELF32/ELF64 x86 executable (:mod:`.elf`);
* ``"auto"``: ELF if the data starts with ``\\x7fELF``, else raw.

Linux kernels (a bzImage, or a vmlinux through PVH) take a command line and an
initrd and go through :func:`load_linux` (:mod:`.linux`).
"""
from __future__ import annotations

import os

from ..errors import LoaderError
from .elf import ELFMAG, load_elf
from .image import MODES, LoadedImage
from .linux import load_linux
from .multiboot import is_multiboot, load_multiboot
from .raw import load_raw

__all__ = ["FORMATS", "MODES", "LoadedImage", "is_multiboot", "load", "load_elf", "load_linux",
           "load_multiboot", "load_path", "load_raw"]

FORMATS = ("auto", "raw", "elf")


def load(mem, data, format: str = "auto", *, load_addr: int | None = None,
         entry: int | None = None, mode: str | None = None, reserved=()) -> LoadedImage:
    """Load ``data`` into ``mem`` as ``format``; see the module docstring.

    ``load_addr`` and ``entry`` apply to raw images only (an ELF file says
    where it goes and where it starts). ``mode`` picks a raw image's CPU mode,
    and for an ELF image must match its class if given.
    """
    if format == "auto":
        format = "elf" if bytes(data[:4]) == ELFMAG else "raw"
    if format == "raw":
        return load_raw(mem, data, load_addr=load_addr, entry=entry, mode=mode, reserved=reserved)
    if format == "elf":
        if load_addr is not None or entry is not None:
            raise LoaderError("load_addr and entry apply to raw images only; an ELF image is placed "
                              "at its p_paddr and entered at its e_entry")
        return load_elf(mem, data, mode=mode, reserved=reserved)
    raise LoaderError(f"unknown image format {format!r}; expected one of {', '.join(FORMATS)}")


def load_path(mem, path, format: str = "auto", **kw) -> LoadedImage:
    """Read the file at ``path`` and :func:`load` it; errors name the file."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise LoaderError(f"cannot read image {name!r}: {e.strerror or e}") from e
    try:
        return load(mem, data, format, **kw)
    except LoaderError as e:
        raise LoaderError(f"{name}: {e}") from e
