"""QEMU's ``pc-testdev``: the ports and the memory window that kernels written for
``qemu -device pc-testdev -kernel`` (kvm-unit-tests above all) poke at.

Every number and rule here is QEMU's hw/misc/pc-testdev.c, with QEMU's memory core
(``memory_access_size``: an access is cut into naturally aligned pieces no wider than the
region allows) applied, which makes every range act byte by byte:

* **Ports 0xe0-0xe3** (``IOPORT``): a 32-bit latch. Port 0xe0 + k is byte lane k, in
  either direction and at any width: a 1-byte write at 0xe1 sets bits 8-15, a 2-byte read
  at 0xe2 returns bits 16-31, a 4-byte write at 0xe0 sets all of it.
* **Ports 0xe8-0xeb** (``IOPORT_BYTE``): the *same* latch again. QEMU's "ioport-byte"
  region has the same handlers and the same ``ioport_data`` as 0xe0 and differs only in
  being served one byte at a time, which gives the same bytes; so 0xe8 + k is lane k too.
* **Ports 0xe4-0xe7** (``FLUSH_PAGE``): a 4-byte write at 0xe4 names a guest-physical
  address; its page's host mapping changes protection and back (``flush_page``), so KVM
  drops its mapping and the guest's next access faults the page in again, contents kept.
  Only that access counts (QEMU: exactly 4 bytes, aligned); any other write here is
  dropped, every read is 0.
* **Ports 0x2000-0x2017** (``IRQ_LINE``): a write of ``v`` to 0x2000 + n drives interrupt
  line n to ``v != 0``; each byte of a wider write is its own line. Every write reaches the
  line (no filtering of repeats: QEMU's ``qemu_set_irq`` does the same, and a level-triggered
  IOAPIC pin may want the repeat). Reads are 0. QEMU itself only has ISA lines 0-15 there
  and aborts (an assert in ``isa_get_irq``) on a write to 0x2010-0x2017; kvmpy drives GSIs
  16-23 of the in-kernel IOAPIC with them, as qemu-kvm's original test device did.
* **Guest-physical 0xff000000-0xff00ffff** (``IOMEM``): 64 KiB that read back what was
  written, little-endian, at any width and alignment.

Bytes of an access that run past the end of a range belong to whatever lies beyond it,
which here is nothing: port bytes read 0xFF (an empty ISA bus), window bytes read 0, and
writes to them are dropped, which is what kvmpy's buses do for unclaimed addresses.

The latch and the window are the device's state (``save_state``); line levels live in
KVM's irqchip and flush counts are statistics.
"""
from __future__ import annotations

import base64
import binascii
import zlib
from typing import Callable, Sequence

from ..errors import DeviceError
from .irq import Trigger

# Port I/O: one range of 12 ports from PORT_BASE, QEMU's three 4-port regions side by side.
PORT_BASE = 0xE0
PORT_COUNT = 12
IOPORT = 0x0                # 0xe0-0xe3: the latch, byte lane = port & 3
FLUSH_PAGE = 0x4            # 0xe4: 4-byte write of a guest-physical address; reads 0
IOPORT_BYTE = 0x8           # 0xe8-0xeb: the same latch
LATCH_PORTS = frozenset(range(IOPORT, IOPORT + 4)) | frozenset(range(IOPORT_BYTE, IOPORT_BYTE + 4))

# Interrupt lines: one port per line from IRQ_PORT_BASE.
IRQ_PORT_BASE = 0x2000
IRQ_LINES = 24
IRQ_LINE = 0x0              # 0x2000 + n: line n

# The read-back window, in the hole below 4 GiB (no RAM there: RAM stops at 3 GiB).
IOMEM_BASE = 0xFF00_0000
IOMEM_SIZE = 0x10000
IOMEM = 0x0

PAGE_MASK = ~0xFFF
MAX_ACCESS = 8              # the widest access KVM hands over (an 8-byte MMIO)


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class Window:
    """One bus range of the device: ``read``/``write`` bound to its handlers for that range."""

    def __init__(self, read: Callable[[int, int], int], write: Callable[[int, int, int], None]):
        self.read, self.write = read, write


class PcTestdev:
    """QEMU's pc-testdev. ``flush_page(gpa)`` flushes one page of guest RAM and returns
    False if ``gpa`` is not RAM (``GuestMemory.flush_page``); ``lines`` are the 24
    interrupt lines' triggers. ``ports``, ``irq`` and ``window`` are what the three bus
    ranges attach (at ``PORT_BASE``, ``IRQ_PORT_BASE`` and ``IOMEM_BASE``)."""

    def __init__(self, flush_page: Callable[[int], bool], lines: Sequence[Trigger]):
        if len(lines) != IRQ_LINES:
            raise ValueError(f"pc-testdev drives {IRQ_LINES} interrupt lines, got {len(lines)}")
        self.flush_page, self.lines = flush_page, tuple(lines)
        self.latch = 0
        self.iomem = bytearray(IOMEM_SIZE)
        self.flushed = 0            # pages flushed
        self.flush_ignored = 0      # flush requests for an address that is not RAM
        self.flush_failed = 0       # flush requests the host kernel refused (OSError)
        self.ports = Window(self.port_read, self.port_write)
        self.irq = Window(self.irq_read, self.irq_write)
        self.window = Window(self.mem_read, self.mem_write)

    # --- ports 0xe0-0xeb ------------------------------------------------------------------
    def port_read(self, offset: int, size: int) -> int:
        if not 1 <= size <= MAX_ACCESS:
            return 0
        value = 0
        for i in range(size):
            value |= self._port_byte(offset + i) << (8 * i)
        return value

    def _port_byte(self, port: int) -> int:
        if port in LATCH_PORTS:
            return self.latch >> (8 * (port & 3)) & 0xFF
        if FLUSH_PAGE <= port < FLUSH_PAGE + 4:
            return 0
        return 0xFF                         # not one of our ports: nobody claims it

    def port_write(self, offset: int, size: int, value: int) -> None:
        if not 1 <= size <= MAX_ACCESS:
            return
        value &= _ones(size)
        if offset == FLUSH_PAGE and size == 4:
            self._flush(value)
            return
        for i in range(size):
            port = offset + i
            if port in LATCH_PORTS:
                shift = 8 * (port & 3)
                self.latch = self.latch & ~(0xFF << shift) | (value >> (8 * i) & 0xFF) << shift

    def _flush(self, gpa: int) -> None:
        try:
            done = self.flush_page(gpa & PAGE_MASK)
        except OSError:
            self.flush_failed += 1
            return
        if done:
            self.flushed += 1
        else:
            self.flush_ignored += 1

    # --- ports 0x2000-0x2017 ----------------------------------------------------------------
    def irq_read(self, offset: int, size: int) -> int:
        if not 1 <= size <= MAX_ACCESS:
            return 0
        value = 0
        for i in range(size):
            if not 0 <= offset + i < IRQ_LINES:
                value |= 0xFF << (8 * i)    # beyond the 24 ports: unclaimed
        return value

    def irq_write(self, offset: int, size: int, value: int) -> None:
        if not 1 <= size <= MAX_ACCESS:
            return
        for i in range(size):
            line = offset + i
            if 0 <= line < IRQ_LINES:
                self.lines[line].set_level(bool(value >> (8 * i) & 0xFF))

    # --- the window at 0xff000000 ----------------------------------------------------------------
    def mem_read(self, offset: int, size: int) -> int:
        if not 1 <= size <= MAX_ACCESS or not 0 <= offset < IOMEM_SIZE:
            return 0
        return int.from_bytes(self.iomem[offset:offset + size], "little")     # short past the end: 0s

    def mem_write(self, offset: int, size: int, value: int) -> None:
        if not 1 <= size <= MAX_ACCESS or not 0 <= offset < IOMEM_SIZE:
            return
        n = min(size, IOMEM_SIZE - offset)
        self.iomem[offset:offset + n] = (value & _ones(size)).to_bytes(size, "little")[:n]

    # --- state -------------------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The latch and the window (deflated: it is mostly zeros)."""
        return {"latch": self.latch, "iomem": base64.b64encode(zlib.compress(bytes(self.iomem))).decode()}

    def load_state(self, state: dict) -> None:
        """The inverse of save_state(); a bad state raises DeviceError and changes nothing."""
        try:
            latch, packed = state["latch"], base64.b64decode(state["iomem"], validate=True)
            inflate = zlib.decompressobj()
            iomem = inflate.decompress(packed, IOMEM_SIZE + 1)    # bounded: no zip bomb
        except (KeyError, TypeError, ValueError, binascii.Error, zlib.error) as e:
            raise DeviceError(f"bad pc-testdev state: {e!r}") from None
        if type(latch) is not int or not 0 <= latch <= 0xFFFF_FFFF:
            raise DeviceError(f"bad pc-testdev state: latch {latch!r}")
        if len(iomem) != IOMEM_SIZE or not inflate.eof or inflate.unused_data:
            raise DeviceError(f"bad pc-testdev state: the window is not {IOMEM_SIZE} bytes")
        self.latch, self.iomem = latch, bytearray(iomem)
