"""Raw (flat binary) images: the bytes are copied to one address, no header.

A raw image carries no metadata, so the caller says where it goes and how to
enter it. The defaults follow the PC conventions:

* real mode: loaded and entered at 0x7c00, where the BIOS puts a boot sector
  (the IBM PC BIOS boot specification; kvmpy enters with CS=DS=ES=SS=0), and
  the entry must be below 1 MiB, the most a real-mode CS:IP can reach;
* protected/long mode: loaded and entered at 1 MiB, above the legacy
  0-1 MiB area where the host keeps its boot structures by default (see
  docs/CONTRACTS.md); ``load_addr`` may be lower, the host's tables move.

Both addresses live in :mod:`kvmpy.x86.layout` with the other fixed addresses.
"""
from __future__ import annotations

from ..errors import LoaderError
from ..x86.layout import KERNEL_START, REAL_MODE_LOAD, MiB
from .image import LoadedImage, check_mode, check_placement

#: Real mode reaches at most 0xFFFF:0xFFFF (just past 1 MiB); the entry must be below 1 MiB.
REAL_MODE_LIMIT = MiB


def load_raw(mem, data, *, load_addr: int | None = None, entry: int | None = None,
             mode: str | None = None, reserved=()) -> LoadedImage:
    """Copy ``data`` to ``load_addr`` in ``mem`` and describe how to enter it."""
    mode = check_mode("real" if mode is None else mode)
    if load_addr is None:
        load_addr = REAL_MODE_LOAD if mode == "real" else KERNEL_START
    if entry is None:
        entry = load_addr
    size = len(data)
    if size == 0:
        raise LoaderError("raw image is empty")
    check_placement(mem, load_addr, size, reserved, "raw image")
    if entry < 0 or not mem.contains(entry, 1):
        raise LoaderError(f"entry point {entry:#x} is outside guest RAM (ends at {mem.end:#x})")
    if mode == "real" and entry >= REAL_MODE_LIMIT:
        raise LoaderError(f"real-mode entry point {entry:#x} is not below 1 MiB "
                          f"({REAL_MODE_LIMIT:#x}); use mode='protected' or 'long'")
    mem.write(load_addr, data)
    return LoadedImage(entry=entry, mode=mode, format="raw", segments=((load_addr, size),))
