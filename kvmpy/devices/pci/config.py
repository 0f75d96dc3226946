"""The configuration space of one PCI function: a type-0 header, BARs and a capability list
(PCI Local Bus 3.0, chapter 6; PCI Express Base 4.0, 7.5 and 7.7).

A function's configuration space is 4 KiB (PCI Express; the first 256 bytes are what
configuration mechanism #1 reaches). It is kept as bytes with a *write mask* per byte,
the way real hardware behaves: a guest write changes exactly the writable bits and
nothing else, so identity fields (vendor, device, class, capability pointers) can never
be changed by a guest, nor by an edited snapshot (``load_state`` goes through the mask).

- **BAR sizing** falls out of the mask: a memory BAR of size S (a power of two) has its
  address bits below S read-only zero, so writing all ones and reading back gives
  ``~(S - 1) | type bits``, which is how an OS learns the size. A 64-bit BAR takes two
  registers; the high one is fully writable. Unused BARs and the expansion ROM BAR read 0.
- **Command**: I/O space, memory space, bus master, SERR# and INTx disable are writable;
  the rest read 0. **Status** is read-only: bit 4 (capabilities list) when there are
  capabilities, bit 3 (interrupt status) while the function asserts INTx.
- **Capabilities** are appended from offset 0x40, each dword-aligned, linked through
  their next pointers; their writable bits are the caller's mask.
- **Accesses**: widths 1, 2 and 4, naturally aligned, inside the 4 KiB. Anything else
  reads all ones and is ignored on write (what a master abort gives), so no offset,
  width or value can raise out of here.
"""
from __future__ import annotations

from dataclasses import dataclass

CONFIG_SPACE_SIZE = 0x1000      # PCI Express configuration space of one function
LEGACY_CONFIG_SIZE = 0x100      # what configuration mechanism #1 reaches

# --- type-0 header offsets (PCI 3.0, 6.1) ------------------------------------------------
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09               # programming interface, then sub-class, then base class
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
FIRST_CAPABILITY = 0x40
NUM_BARS = 6

# --- Command and Status bits ------------------------------------------------------------------
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | COMMAND_INTX_DISABLE
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4

# --- BAR type bits ------------------------------------------------------------------------------
BAR_MEM_64 = 0b100
BAR_MEM_PREFETCH = 0b1000

INTX_PIN_A = 1                  # Interrupt Pin: 1 = INTA#
_WIDTHS = (1, 2, 4)


@dataclass(frozen=True)
class Bar:
    """A memory BAR: its size (a power of two, at least 16) and its kind."""

    size: int
    is64: bool = False
    prefetchable: bool = False


def all_ones(size: int) -> int:
    """What a read nobody answers gives (a master abort): all ones of the access width
    (an MMIO exit is at most 8 bytes wide)."""
    return (1 << (8 * size)) - 1 if 1 <= size <= 8 else 0xFFFF_FFFF


def access_ok(offset: int, size: int, limit: int) -> bool:
    """A naturally aligned access of width 1, 2 or 4 inside ``[0, limit)``."""
    return size in _WIDTHS and 0 <= offset and offset % size == 0 and offset + size <= limit


class PciFunction:
    """A type-0 function's configuration space (see the module docstring).

    ``intx`` is the function's INTx# line (a Trigger, or None when it has none); the owner
    asserts it with :meth:`set_intx`, which honours Command's INTx disable.
    """

    def __init__(self, vendor: int, device: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem: int = 0, intx=None):
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.bars: list[Bar | None] = [None] * NUM_BARS
        self.intx = intx
        self._intx_level = False        # what the function asks for
        self._intx_out = False          # what the line carries (after INTx disable)
        self._next_cap = FIRST_CAPABILITY
        self._last_cap = 0
        self._put(VENDOR_ID, 2, vendor)
        self._put(DEVICE_ID, 2, device)
        self._put(REVISION_ID, 1, revision)
        self._put(CLASS_PROG, 3, class_code)
        self._put(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
        self._put(SUBSYSTEM_ID, 2, subsystem)
        self._put(COMMAND, 2, 0, wmask=COMMAND_WRITABLE)
        self._put(INTERRUPT_LINE, 1, 0, wmask=0xFF)
        self._put(INTERRUPT_PIN, 1, INTX_PIN_A if intx is not None else 0)

    # --- building -----------------------------------------------------------------------
    def _put(self, offset: int, size: int, value: int, wmask: int = 0) -> None:
        self.data[offset:offset + size] = value.to_bytes(size, "little")
        self.wmask[offset:offset + size] = wmask.to_bytes(size, "little")

    def add_bar(self, index: int, bar: Bar) -> None:
        """Declare memory BAR ``index`` (a 64-bit BAR also takes ``index + 1``)."""
        if bar.size < 16 or bar.size & (bar.size - 1) or bar.size > (1 << 40 if bar.is64 else 1 << 31):
            raise ValueError(f"BAR size must be a power of two >= 16, got {bar.size:#x}")
        if not 0 <= index < NUM_BARS - bar.is64 or self.bars[index] is not None or \
                (bar.is64 and self.bars[index + 1] is not None):
            raise ValueError(f"BAR {index} is taken or out of range")
        kind = (BAR_MEM_64 if bar.is64 else 0) | (BAR_MEM_PREFETCH if bar.prefetchable else 0)
        low_mask = ~(bar.size - 1) & 0xFFFF_FFF0
        self._put(BAR0 + 4 * index, 4, kind, wmask=low_mask)
        self.bars[index] = bar
        if bar.is64:
            self._put(BAR0 + 4 * index + 4, 4, 0, wmask=~((bar.size - 1) >> 32) & 0xFFFF_FFFF)
            self.bars[index + 1] = bar      # the high half: not a BAR of its own

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes = b"") -> int:
        """Append a capability (``body`` after the ID and next-pointer bytes); returns its offset.
        ``wmask`` gives the writable bits of ``body`` (missing bytes: read-only)."""
        offset = self._next_cap
        end = offset + 2 + len(body)
        if end > LEGACY_CONFIG_SIZE or len(wmask) > len(body):
            raise ValueError("the capabilities do not fit in the first 256 bytes")
        self.data[offset] = cap_id
        self.data[offset + 2:end] = body
        self.wmask[offset + 2:offset + 2 + len(wmask)] = wmask
        if self._last_cap:
            self.data[self._last_cap + 1] = offset
        else:
            self.data[CAPABILITIES_POINTER] = offset
            self._put(STATUS, 2, STATUS_CAP_LIST)
        self._last_cap = offset
        self._next_cap = (end + 3) & ~3
        return offset

    # --- accesses -------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if not access_ok(offset, size, CONFIG_SPACE_SIZE):
            return all_ones(size)
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_ok(offset, size, CONFIG_SPACE_SIZE):
            return
        value &= (1 << (8 * size)) - 1
        for i in range(size):
            m = self.wmask[offset + i]
            if m:
                b = value >> (8 * i) & 0xFF
                self.data[offset + i] = (self.data[offset + i] & ~m) | (b & m)
        if offset <= COMMAND + 1 and offset + size > COMMAND:
            self._drive_intx()

    def word(self, offset: int, size: int = 2) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    @property
    def command(self) -> int:
        return self.word(COMMAND)

    def bar_address(self, index: int) -> int | None:
        """Where memory BAR ``index`` decodes now: None if it is not a BAR, memory decoding is
        off (Command bit 1), or the guest has not placed it (address 0)."""
        bar = self.bars[index]
        if bar is None or not self.command & COMMAND_MEMORY:
            return None
        if index > 0 and self.bars[index - 1] is bar and self.word(BAR0 + 4 * index - 4, 4) & BAR_MEM_64:
            return None                     # the high half of a 64-bit BAR
        addr = self.word(BAR0 + 4 * index, 4) & ~0xF
        if bar.is64:
            addr |= self.word(BAR0 + 4 * index + 4, 4) << 32
        return addr or None

    def set_bar_address(self, index: int, addr: int) -> None:
        """Firmware's assignment (the guest may move it)."""
        bar = self.bars[index]
        if bar is None or addr % bar.size:
            raise ValueError(f"BAR {index} cannot be placed at {addr:#x}")
        low = BAR0 + 4 * index
        self._put(low, 4, (self.word(low, 4) & 0xF) | (addr & 0xFFFF_FFF0), wmask=self.word_mask(low))
        if bar.is64:
            self._put(low + 4, 4, addr >> 32, wmask=self.word_mask(low + 4))

    def word_mask(self, offset: int) -> int:
        return int.from_bytes(self.wmask[offset:offset + 4], "little")

    # --- INTx ---------------------------------------------------------------------------------
    def set_intx(self, level: bool) -> None:
        """Assert (True) or deassert INTx#; Status bit 3 follows, the line obeys INTx disable."""
        self._intx_level = bool(level)
        status = self.word(STATUS) & ~STATUS_INTERRUPT | (STATUS_INTERRUPT if level else 0)
        self.data[STATUS:STATUS + 2] = status.to_bytes(2, "little")
        self._drive_intx()

    def _drive_intx(self) -> None:
        out = self._intx_level and not self.command & COMMAND_INTX_DISABLE
        if out != self._intx_out:
            self._intx_out = out
            if self.intx is not None:
                self.intx.set_level(out)

    # --- state --------------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The first 256 bytes as hex (the rest is read-only zeros)."""
        return {"config": self.data[:LEGACY_CONFIG_SIZE].hex(), "intx": self._intx_level}

    def check_state(self, state) -> bytes:
        """ValueError unless ``state`` is a :meth:`save_state` dict; returns the bytes."""
        if not isinstance(state, dict) or set(state) != {"config", "intx"} or type(state["intx"]) is not bool:
            raise ValueError("pci state: expected the keys 'config' and 'intx'")
        try:
            raw = bytes.fromhex(state["config"]) if isinstance(state["config"], str) else b""
        except ValueError:
            raw = b""
        if len(raw) != LEGACY_CONFIG_SIZE:
            raise ValueError("pci state: 'config' must be 256 bytes in hex")
        return raw

    def load_state(self, state: dict) -> None:
        """Take the writable bits of a saved configuration space (the read-only ones, the
        function's identity, stay ours: an edited snapshot cannot change them). The INTx
        level is recorded, not driven: the irqchip's state already has it."""
        raw = self.check_state(state)
        for i in range(LEGACY_CONFIG_SIZE):
            m = self.wmask[i]
            self.data[i] = (self.data[i] & ~m) | (raw[i] & m)
        self._intx_level = state["intx"]
        status = self.word(STATUS) & ~STATUS_INTERRUPT | (STATUS_INTERRUPT if self._intx_level else 0)
        self.data[STATUS:STATUS + 2] = status.to_bytes(2, "little")
        self._intx_out = self._intx_level and not self.command & COMMAND_INTX_DISABLE
