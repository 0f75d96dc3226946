"""MSI-X (PCI 3.0, 6.8.2): a function's table of message vectors and its pending bits.

The capability (ID 0x11) says how many vectors there are and where the table and the
Pending Bit Array (PBA) live in a BAR; Message Control bit 15 enables MSI-X, bit 14
masks every vector. Each 16-byte table entry is Message Address (low, high), Message
Data and Vector Control (bit 0: masked).

An event on a vector is sent as its (address, data) through the ``sink``
(``sink.send(vector, address, data)``; the Machine's routes it through KVM's GSI routing
and an irqfd). While the vector or the whole function is masked, the event sets the
vector's pending bit instead; unmasking sends it then and clears the bit (6.8.2.9).

Table accesses: aligned dwords, and aligned qwords for the address. The PBA is read-only.
Anything else reads 0 and is ignored, so no guest access raises out of here.
"""
from __future__ import annotations

import struct
from typing import Protocol

MSIX_CAP_ID = 0x11
CONTROL_ENABLE = 1 << 15
CONTROL_FUNCTION_MASK = 1 << 14
ENTRY_SIZE = 16
ENTRY_MASKED = 1
MAX_VECTORS = 2048


class MsiSink(Protocol):
    def send(self, vector: int, address: int, data: int) -> None: ...


class NullMsiSink:
    """Messages to nowhere (a machine without an in-kernel irqchip; tests)."""

    def send(self, vector: int, address: int, data: int) -> None:
        pass


class RecordingMsiSink:
    """Remembers every message as ``(vector, address, data)``, for tests."""

    def __init__(self):
        self.sent: list[tuple[int, int, int]] = []

    def send(self, vector: int, address: int, data: int) -> None:
        self.sent.append((vector, address, data))


class Msix:
    """The vectors of one function. ``config`` is the PciFunction holding the capability;
    :meth:`add_to` puts the capability there."""

    def __init__(self, vectors: int, sink: MsiSink | None = None):
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X has 1..{MAX_VECTORS} vectors, not {vectors}")
        self.vectors = vectors
        self.sink = sink if sink is not None else NullMsiSink()
        self.table = bytearray(ENTRY_SIZE * vectors)
        for v in range(vectors):        # every vector starts masked (6.8.2.9)
            self.table[v * ENTRY_SIZE + 12] = ENTRY_MASKED
        self.pending = 0
        self.config = None
        self.cap = 0

    def add_to(self, config, bar: int, table_offset: int, pba_offset: int) -> int:
        body = struct.pack("<HII", self.vectors - 1, table_offset | bar, pba_offset | bar)
        self.config = config
        self.cap = config.add_capability(MSIX_CAP_ID, body, wmask=struct.pack("<H", CONTROL_ENABLE | CONTROL_FUNCTION_MASK))
        return self.cap

    @property
    def table_size(self) -> int:
        return len(self.table)

    @property
    def pba_size(self) -> int:
        return (self.vectors + 63) // 64 * 8

    # --- state the capability holds ----------------------------------------------------------
    @property
    def control(self) -> int:
        return self.config.word(self.cap + 2) if self.config is not None else 0

    @property
    def enabled(self) -> bool:
        return bool(self.control & CONTROL_ENABLE)

    def _masked(self, vector: int) -> bool:
        return bool(self.control & CONTROL_FUNCTION_MASK or self.table[vector * ENTRY_SIZE + 12] & ENTRY_MASKED)

    # --- events ------------------------------------------------------------------------------------
    def fire(self, vector: int) -> None:
        """An event on ``vector`` (out of range: dropped)."""
        if not 0 <= vector < self.vectors:
            return
        if self._masked(vector):
            self.pending |= 1 << vector
            return
        self._send(vector)

    def _send(self, vector: int) -> None:
        lo, hi, data, _ = struct.unpack_from("<IIII", self.table, vector * ENTRY_SIZE)
        self.sink.send(vector, hi << 32 | lo, data)

    def release_pending(self) -> None:
        """Send what unmasking (a vector, the function mask, or enabling) let through."""
        if not self.enabled:
            return
        for v in range(self.vectors):
            if self.pending >> v & 1 and not self._masked(v):
                self.pending &= ~(1 << v)
                self._send(v)

    # --- BAR accesses ----------------------------------------------------------------------------
    def table_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size or not 0 <= offset <= len(self.table) - size:
            return 0
        return int.from_bytes(self.table[offset:offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset % size or not 0 <= offset <= len(self.table) - size:
            return
        if offset % ENTRY_SIZE + size > 12 and offset % ENTRY_SIZE != 12:
            return                      # a qword only over the address; control alone as a dword
        self.table[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if offset % ENTRY_SIZE == 12:
            self.table[offset] &= ENTRY_MASKED          # reserved bits read 0
            self.table[offset + 1:offset + 4] = bytes(3)
            self.release_pending()

    def pba_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size or not 0 <= offset <= self.pba_size - size:
            return 0
        return self.pending >> (8 * offset) & ((1 << (8 * size)) - 1)

    # --- state --------------------------------------------------------------------------------------
    def save_state(self) -> dict:
        return {"table": self.table.hex(), "pending": self.pending}

    def check_state(self, state) -> bytes:
        if not isinstance(state, dict) or set(state) != {"table", "pending"}:
            raise ValueError("msix state: expected the keys 'table' and 'pending'")
        p = state["pending"]
        if type(p) is not int or not 0 <= p < 1 << self.vectors:
            raise ValueError(f"msix state: pending must be {self.vectors} bits, got {p!r}")
        try:
            raw = bytes.fromhex(state["table"]) if isinstance(state["table"], str) else b""
        except ValueError:
            raw = b""
        if len(raw) != len(self.table) or any(raw[v * ENTRY_SIZE + 12] & ~ENTRY_MASKED or
                                              raw[v * ENTRY_SIZE + 13:v * ENTRY_SIZE + 16] != bytes(3)
                                              for v in range(self.vectors)):
            raise ValueError(f"msix state: the table must be {len(self.table)} bytes in hex with only bit 0 "
                             "of each Vector Control")
        return raw

    def load_state(self, state: dict) -> None:
        raw = self.check_state(state)
        self.table[:] = raw
        self.pending = state["pending"]
