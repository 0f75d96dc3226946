"""Which loader an image needs: the one place that decides.

The checks are those of QEMU's x86 ``-kernel`` (``x86_load_linux``, hw/i386/x86.c): a
multiboot kernel by the header in its first 8 KiB, a Linux bzImage by the "HdrS"
setup header, an ELF vmlinux by its PVH entry note. QEMU checks HdrS before
multiboot; kvmpy checks multiboot first, which differs only for a file that carries
both headers. Then what ``-kernel`` does not take: any other ELF executable (by its
``\\x7fELF`` magic), else a flat binary.

:func:`detect` only picks a loader; the loader validates the image and explains
what is wrong with it, so detection never rejects an image it cannot place.
"""
from __future__ import annotations

from ..errors import LoaderError
from .elf import ELFMAG
from .multiboot import is_multiboot

#: The loaders :func:`detect` can answer with.
LOADERS = ("raw", "elf", "multiboot", "bzimage", "pvh")

#: Every name :func:`detect` (and so ``load()``) accepts: "auto" decides from the bytes,
#: "linux" picks between bzImage and PVH, the rest name a loader.
FORMATS = ("auto", "raw", "elf", "multiboot", "linux", "bzimage", "pvh")


def detect(data, format: str = "auto") -> str:
    """The loader for ``data`` (bytes-like), one of :data:`LOADERS`.

    ``format="auto"`` never raises: multiboot if a multiboot header is found,
    then "bzimage" or "pvh" for a Linux kernel (an ELF file counts only if it
    carries the PVH note), then "elf" by magic, else "raw". A loader's name is
    returned as given; "linux" picks "bzimage" or "pvh" and raises LoaderError
    if ``data`` is neither. Any other name is a LoaderError listing the choices.
    """
    if format not in FORMATS:
        raise LoaderError(f"unknown image format {format!r}; expected one of {', '.join(FORMATS)}")
    if format == "linux":
        from .linux import detect as linux_detect
        return linux_detect(data)
    if format != "auto":
        return format
    if is_multiboot(data):
        return "multiboot"
    from .linux import linux_format        # Linux's loaders are loaded only when looked for
    linux = linux_format(data)
    if linux is not None:
        return linux
    return "elf" if bytes(memoryview(data)[:4]) == ELFMAG else "raw"
