"""What a loader hands back: where an image landed and how to enter it.

Loaders only load (rust-vmm linux-loader's habit): they write guest memory and
return a :class:`LoadedImage` describing what they placed where. Setting up the
vCPU for ``mode`` at ``entry`` is a separate, pure step in ``kvmpy.x86``.

This module also holds the placement check every loader shares: a range must
lie in guest RAM and stay clear of the ranges the host reserved for itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LoaderError
from ..x86 import layout
from ..x86.boottables import BootTables
from ..x86.modes import MODES     # the CPU modes an image can be entered in: their one home


@dataclass(frozen=True)
class LoadedImage:
    """An image placed in guest RAM.

    ``entry`` is the guest-physical address to start at, ``mode`` one of
    :data:`MODES`, ``format`` the loader that placed it (one of ``loader.LOADERS``), and
    ``segments`` the ``(gpa, size)`` ranges written, in file order.
    ``registers`` are general-purpose register values the boot protocol hands the
    image at entry, e.g. ``(("rax", 0x2BADB002), ("rbx", info_gpa))`` for multiboot;
    ``control_registers`` the control registers it fixes where kvmpy's ``mode`` set-up
    would differ, e.g. ``(("cr0", 0x11), ("cr4", 0))`` for multiboot (``x86.modes.setup``).
    ``cmdline`` is the command line :func:`kvmpy.loader.load` booted the image with
    (for Linux, with its extra entries), which the VMM also offers through fw_cfg.
    ``tables`` is where the VMM writes the boot GDT, TSS and page tables for this image,
    clear of it (``x86.boottables.place``, called by :func:`kvmpy.loader.load` or by a
    loader that must know before it writes, like multiboot's); None before that.
    """

    entry: int
    mode: str
    format: str
    segments: tuple[tuple[int, int], ...]
    registers: tuple[tuple[str, int], ...] = ()
    cmdline: str = ""
    control_registers: tuple[tuple[str, int], ...] = ()
    tables: BootTables | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")

    @property
    def end(self) -> int:
        """One past the highest guest-physical byte the image occupies."""
        return max((gpa + size for gpa, size in self.segments), default=0)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise LoaderError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


#: What the default reserved ranges (``loader.default_reserved``) hold, for error messages.
RESERVED_WHY = {
    layout.LEGACY_HOLE: "the PC's legacy hole: the EBDA, where the VMM writes the MP table, the VGA "
                        "window and the BIOS; no memory map calls it RAM",
    layout.LOW_RESERVED: "the first MiB: a Linux kernel stays above the boot information the VMM writes there",
}


def check_placement(mem, gpa: int, size: int, reserved, what: str) -> None:
    """Raise LoaderError unless ``[gpa, gpa+size)`` is in RAM and clear of ``reserved``.

    ``reserved`` is an iterable of ``(start, end)`` guest-physical ranges, end
    exclusive. ``what`` names the range in the message ("image", "segment 2").
    """
    end = gpa + size
    if gpa < 0 or not mem.contains(gpa, size):
        raise LoaderError(f"{what} at {gpa:#x}..{end:#x} (size {size:#x}) does not fit in "
                          f"guest RAM (ends at {mem.end:#x})")
    for start, stop in reserved:
        if gpa < stop and start < end:
            why = RESERVED_WHY.get((start, stop))
            raise LoaderError(f"{what} at {gpa:#x}..{end:#x} overlaps the reserved range "
                              f"{start:#x}..{stop:#x}" + (f" ({why})" if why else ""))
