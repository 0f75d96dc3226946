"""Booting Linux: a bzImage through the 32/64-bit boot protocol, or a vmlinux through PVH.

:func:`load_linux` is the one entry point: it recognises the image (an ELF file with
the PVH note, or a bzImage with the "HdrS" header), checks that the kernel, the
command line and the initrd all fit, and only then writes them and the boot
information (zero page or ``hvm_start_info``) into guest memory. It returns a
:class:`LoadedImage` whose ``mode``, ``entry`` and ``registers`` say how to start
the vCPU; like every loader it never touches one.

Where things go (guest-physical; the first MiB is the VMM's, see kvmpy/x86/layout.py):

* ``BOOT_INFO`` 0x7000: the zero page (bzImage) or ``hvm_start_info`` + module list +
  memory map (PVH). The page between the ring-0 stack (0x6000) and the AP trampoline
  (0x8000); Firecracker uses the same page for its zero page.
* ``CMDLINE`` 0x80000-0x8FFFF: the command line, NUL-terminated; just above the
  boot page directories (which end at 0x80000) and below the MP table at 0x9FC00.
* the kernel: a bzImage at its ``pref_address`` (16 MiB for distribution kernels),
  a vmlinux at its segments' physical addresses.
* the initrd: as high as possible in RAM below 4 GiB (and below the bzImage's
  ``initrd_addr_max``), page-aligned, clear of the kernel, as boot.rst advises.

* the ACPI tables (``acpi=``, built by :mod:`kvmpy.x86.acpi`): where they were built for,
  0xE0000 by default, in the BIOS area where Linux also scans for the RSDP; their address
  goes in ``boot_params.acpi_rsdp_addr`` or ``hvm_start_info.rsdp_paddr``.

Linux copies the zero page, the start info and the command line early in boot, so
none of these need to stay reserved; the e820 map reports all RAM except the PC's
legacy hole 0x9FC00-0xFFFFF, and the ACPI tables' pages as ACPI data (type 3).
"""
from __future__ import annotations

from ..errors import LoaderError
from ..x86 import bootparams, layout
from . import bzimage, pvh
from .elf import ELFMAG, load_elf
from .image import LoadedImage, check_placement

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

BOOT_INFO = layout.LINUX_BOOT_INFO   # zero page, or hvm_start_info + modlist + memmap
BOOT_INFO_SIZE = layout.LINUX_BOOT_INFO_SIZE
PVH_MODLIST = BOOT_INFO + 0x40       # after the 56-byte hvm_start_info
PVH_MEMMAP = BOOT_INFO + 0x80        # 24 bytes an entry: room for 165, e820 allows 128
CMDLINE = layout.LINUX_CMDLINE
CMDLINE_MAX = layout.LINUX_CMDLINE_MAX
INITRD_ALIGN = 0x1000
INITRD_LIMIT = 4 * GiB               # hvm_start_info and boot_params.ramdisk_image are read as 32-bit

#: Guest-physical ranges this module writes besides the kernel and initrd (for overlap checks).
BOOT_RANGES = ((BOOT_INFO, BOOT_INFO + BOOT_INFO_SIZE), (CMDLINE, CMDLINE + CMDLINE_MAX))

FORMATS = ("auto", "bzimage", "pvh")


def detect(data) -> str:
    """'pvh' for an ELF file, 'bzimage' for an image with the HdrS magic; else LoaderError."""
    head = bytes(memoryview(data)[:0x206])
    if head[:4] == ELFMAG:
        return "pvh"
    if head[0x202:0x206] == bzimage.HDRS_MAGIC:
        return "bzimage"
    raise LoaderError("not a Linux kernel: neither an ELF vmlinux (\\x7fELF) nor a bzImage "
                      "('HdrS' at offset 0x202)")


def linux_format(data) -> str | None:
    """'bzimage' or 'pvh' when ``data`` is a kernel :func:`load_linux` boots, else None.

    For format auto-detection: never raises; an ELF file counts as 'pvh' only if it
    carries the PVH note, so other ELF guests keep going to the plain ELF loader.
    """
    try:
        found = detect(data)
        if found == "pvh" and pvh.find_pvh_entry(data) is None:
            return None
    except LoaderError:
        return None
    return found


def encode_cmdline(cmdline: str, max_len: int) -> bytes:
    """The command line as NUL-terminated bytes, if it is at most ``max_len`` bytes long."""
    raw = cmdline.encode("utf-8")
    if b"\0" in raw:
        raise LoaderError("the kernel command line contains a NUL byte")
    if len(raw) > max_len:
        raise LoaderError(f"kernel command line is {len(raw)} bytes; this kernel takes at most {max_len}")
    return raw + b"\0"


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def place_initrd(mem_regions, size: int, *, limit: int, avoid) -> int:
    """The highest page-aligned address for ``size`` bytes of initrd: in RAM, ending at or
    below ``limit``, overlapping no ``(start, end)`` range in ``avoid``. LoaderError if none."""
    if size <= 0:
        raise LoaderError("initrd is empty")
    avoid = list(avoid)
    best = None
    for gpa, length in mem_regions:
        top = min(gpa + length, limit)
        while top - size >= gpa:
            start = (top - size) & ~(INITRD_ALIGN - 1)
            if start < gpa:
                break
            clash = [r for r in avoid if _overlaps((start, start + size), r)]
            if not clash:
                best = start if best is None else max(best, start)
                break
            top = min(r[0] for r in clash)       # try again just below the lowest clash
    if best is None:
        raise LoaderError(f"initrd ({size:#x} bytes) does not fit in guest RAM below {limit:#x} "
                          "clear of the kernel; give the machine more memory")
    return best


def _ram(mem, mem_regions):
    if mem_regions is None:
        mem_regions = [(r.gpa, r.size) for r in mem.regions]
    return [(int(a), int(n)) for a, n in mem_regions]


def _check_boot_ranges(mem) -> None:
    for start, end in BOOT_RANGES:
        if not mem.contains(start, end - start):
            raise LoaderError(f"guest RAM (ends at {mem.end:#x}) is too small for the Linux boot "
                              f"information at {start:#x}..{end:#x}")


def load_linux(mem, kernel, *, cmdline: str = "", initrd=None, mem_regions=None, reserved=(),
               format: str = "auto", bits: int | None = None, acpi=None) -> LoadedImage:
    """Load a Linux kernel with its command line and initrd; see the module docstring.

    ``kernel`` and ``initrd`` are bytes-like. ``mem_regions`` are the guest's RAM
    ranges ``(gpa, size)`` for the memory map (default: ``mem``'s regions);
    ``reserved`` are ranges the kernel and initrd must stay out of (the Machine
    passes the first MiB). ``format`` is "auto", "bzimage" or "pvh"; ``bits``
    picks a bzImage's 32- or 64-bit entry (default 64 when the kernel has one).
    ``acpi`` is an ``x86.acpi.Tables`` to install, or None for none.
    """
    if format not in FORMATS:
        raise LoaderError(f"unknown Linux image format {format!r}; expected one of {', '.join(FORMATS)}")
    found = detect(kernel)
    if format != "auto" and format != found:
        raise LoaderError(f"format={format!r} was requested but the image is a {found} kernel")
    ram = _ram(mem, mem_regions)
    reserved = tuple(reserved)
    _check_boot_ranges(mem)
    firmware = Firmware(acpi)
    firmware.check(mem)
    if found == "pvh":
        return _load_pvh(mem, kernel, cmdline, initrd, ram, reserved, firmware)
    return _load_bzimage(mem, kernel, cmdline, initrd, ram, reserved, bits, firmware)


class Firmware:
    """The ACPI tables a kernel gets (or none): their range, e820 entry and RSDP address."""

    def __init__(self, tables):
        self.tables = tables

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return () if self.tables is None else ((self.tables.base, self.tables.end),)

    @property
    def rsdp(self) -> int:
        return 0 if self.tables is None else self.tables.rsdp

    def e820(self) -> list:
        if self.tables is None:
            return []
        start = self.tables.base // layout.PAGE * layout.PAGE
        end = -(-self.tables.end // layout.PAGE) * layout.PAGE
        return [bootparams.E820Entry(start, end - start, bootparams.E820_ACPI)]

    def check(self, mem) -> None:
        for start, end in self.ranges:
            if not mem.contains(start, end - start):
                raise LoaderError(f"the ACPI tables at {start:#x}..{end:#x} are not in guest RAM")
            for lo, hi in BOOT_RANGES:
                if _overlaps((start, end), (lo, hi)):
                    raise LoaderError(f"the ACPI tables at {start:#x}..{end:#x} overlap the boot "
                                      f"information at {lo:#x}..{hi:#x}")

    def write(self, mem) -> None:
        if self.tables is not None:
            mem.write(self.tables.base, self.tables.data)


def _initrd(mem, initrd, ram, limit, avoid) -> tuple[int, int]:
    if initrd is None:
        return 0, 0
    size = len(initrd)
    addr = place_initrd(ram, size, limit=limit, avoid=avoid)
    if not mem.contains(addr, size):
        raise LoaderError(f"initrd slot {addr:#x}..{addr + size:#x} from mem_regions is not in guest RAM")
    return addr, size


def _load_bzimage(mem, data, cmdline, initrd, ram, reserved, bits, firmware) -> LoadedImage:
    h = bzimage.parse_setup_header(data)
    if bits is None:
        bits = 64 if h.has_entry64 else 32
    if bits not in (32, 64):
        raise LoaderError(f"bits={bits!r}: a bzImage has a 32-bit and maybe a 64-bit entry")
    if bits == 64 and not h.has_entry64:
        raise LoaderError("this bzImage has no 64-bit entry point (xloadflags bit XLF_KERNEL_64 clear)")
    load_addr = bzimage.load_address(h)
    start, end = bzimage.kernel_extent(h, load_addr)
    check_placement(mem, start, end - start, reserved,
                    f"kernel (load address {load_addr:#x}, init_size {h.init_size:#x})")
    for lo, hi in (*BOOT_RANGES, *firmware.ranges):
        if _overlaps((start, end), (lo, hi)):
            raise LoaderError(f"kernel at {start:#x}..{end:#x} overlaps the boot information at {lo:#x}..{hi:#x}")
    cmd = encode_cmdline(cmdline, min(h.cmdline_size, CMDLINE_MAX - 1))
    limit = min(h.initrd_addr_max + 1, INITRD_LIMIT)
    rd_addr, rd_size = _initrd(mem, initrd, ram, limit, ((start, end), *BOOT_RANGES, *firmware.ranges, *reserved))
    e820 = _e820(ram, firmware)
    zero_page = bootparams.boot_params(h.header, cmd_line_ptr=CMDLINE, e820=e820, ramdisk_image=rd_addr,
                                       ramdisk_size=rd_size, code32_start=load_addr, acpi_rsdp_addr=firmware.rsdp)
    # Everything validated: only now touch guest memory.
    code = bzimage.kernel_code(data, h)
    firmware.write(mem)
    mem.write(load_addr, code)
    mem.write(BOOT_INFO, zero_page)
    mem.write(CMDLINE, cmd)
    segments = [(load_addr, len(code))]
    if initrd is not None:
        mem.write(rd_addr, initrd)
        segments.append((rd_addr, rd_size))
    if bits == 64:
        return LoadedImage(entry=load_addr + bzimage.ENTRY64_OFFSET, mode="long", format="bzimage",
                           segments=tuple(segments), registers=(("rsi", BOOT_INFO),))
    return LoadedImage(entry=load_addr, mode="protected", format="bzimage", segments=tuple(segments),
                       registers=(("rsi", BOOT_INFO), ("rbp", 0), ("rdi", 0), ("rbx", 0)))


def _e820(ram, firmware: Firmware) -> list:
    try:
        return bootparams.e820_map(ram, extra=firmware.e820())
    except ValueError as e:
        raise LoaderError(f"cannot describe guest RAM to Linux: {e}") from None


def _load_pvh(mem, data, cmdline, initrd, ram, reserved, firmware) -> LoadedImage:
    k = pvh.parse_pvh(data)
    for i, (gpa, size) in enumerate(k.segments):
        check_placement(mem, gpa, size, reserved, f"kernel segment {i}")
        for lo, hi in (*BOOT_RANGES, *firmware.ranges):
            if _overlaps((gpa, gpa + size), (lo, hi)):
                raise LoaderError(f"kernel segment {i} at {gpa:#x}..{gpa + size:#x} overlaps the boot "
                                  f"information at {lo:#x}..{hi:#x}")
    cmd = encode_cmdline(cmdline, CMDLINE_MAX - 1)
    rd_addr, rd_size = _initrd(mem, initrd, ram, INITRD_LIMIT,
                               (*((a, a + n) for a, n in k.segments), *BOOT_RANGES, *firmware.ranges, *reserved))
    e820 = _e820(ram, firmware)
    memmap = pvh.memmap_table(e820)
    if PVH_MEMMAP + len(memmap) > BOOT_INFO + BOOT_INFO_SIZE:
        raise LoaderError(f"{len(e820)} memory map entries do not fit in the PVH boot page")
    info = pvh.start_info(cmdline_paddr=CMDLINE, memmap_paddr=PVH_MEMMAP, memmap_entries=len(e820),
                          modlist_paddr=PVH_MODLIST if initrd is not None else 0,
                          nr_modules=1 if initrd is not None else 0, rsdp_paddr=firmware.rsdp)
    # Everything validated: only now touch guest memory.
    img = load_elf(mem, data, reserved=reserved)
    firmware.write(mem)
    page = bytearray(BOOT_INFO_SIZE)
    page[0:len(info)] = info
    if initrd is not None:
        mod = pvh.modlist_entry(rd_addr, rd_size)
        page[PVH_MODLIST - BOOT_INFO:PVH_MODLIST - BOOT_INFO + len(mod)] = mod
    page[PVH_MEMMAP - BOOT_INFO:PVH_MEMMAP - BOOT_INFO + len(memmap)] = memmap
    mem.write(BOOT_INFO, bytes(page))
    mem.write(CMDLINE, cmd)
    segments = list(img.segments)
    if initrd is not None:
        mem.write(rd_addr, initrd)
        segments.append((rd_addr, rd_size))
    return LoadedImage(entry=k.entry, mode="protected", format="pvh", segments=tuple(segments),
                       registers=(("rbx", BOOT_INFO),))
