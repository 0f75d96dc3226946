"""QEMU's firmware configuration device (fw_cfg), port-I/O flavour, without DMA.

The guest-side interface is QEMU's docs/specs/fw_cfg.rst; item numbers and the file
directory layout are Linux's include/uapi/linux/qemu_fw_cfg.h; what the ports do
with odd accesses follows QEMU's hw/nvram/fw_cfg.c. On x86 the device claims two
ports: the 16-bit selector at 0x510 and the 8-bit data port at 0x511 (offsets 0
and 1 here). Writing a key to the selector picks an item and rewinds its data
offset to 0; each data-port read returns the next byte of the item, and 0 once
past its end (the offset then stops growing). Keys with nothing behind them read
as an empty item. Items and their byte order::

    0x00 FW_CFG_SIGNATURE     b"QEMU"
    0x01 FW_CFG_ID            le32 feature bits: 1 = traditional interface (no DMA)
    0x03 FW_CFG_RAM_SIZE      le64 bytes of guest RAM
    0x05 FW_CFG_NB_CPUS       le16 vCPUs at boot
    0x14 FW_CFG_CMDLINE_SIZE  le32 len(cmdline) + 1 (QEMU's x86_load_linux counts the NUL)
    0x15 FW_CFG_CMDLINE_DATA  the command line and a terminating NUL
    0x19 FW_CFG_FILE_DIR      be32 count, then per file: be32 size, be16 select,
                              be16 reserved (0), char name[56] (NUL-padded)
    0x20...                   the files, sorted by name as QEMU does, keys 0x20 + index

Selector bits as in QEMU: bit 15 (FW_CFG_ARCH_LOCAL) picks the architecture's
table, which is empty here; bit 14 (the old write channel) is ignored, so 0x4000
reads the signature.

Access widths, as QEMU's combined 2-port region ("fw_cfg_comb_mem_ops") treats
them: a byte read of either port reads a data byte; a 16-bit write at the
selector port selects; a byte write to either port is a data write, which QEMU
>= 2.4 ignores (every item here is read-only). QEMU rejects 16-bit reads (they
read 0, nothing advances), and its memory core cuts an access at the end of the
region, so ``outl`` to 0x510 selects with its low 16 bits, a word read of 0x511
reads one data byte, and the bytes of an access beyond our two ports read as all
ones (unclaimed ISA ports).

The guest is hostile: the selector is 16 bits, the offset is bounded by the
selected item's length, every item is an immutable ``bytes`` built on the host
side, and no access sequence allocates or raises. Configuration errors (bad file
names, duplicates, too many files, oversized items) raise DeviceError.
"""
from __future__ import annotations

import struct
from typing import Mapping, NamedTuple

from ..errors import DeviceError

# Selector keys (include/uapi/linux/qemu_fw_cfg.h).
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NB_CPUS = 0x05
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF          # ~(FW_CFG_WRITE_CHANNEL | FW_CFG_ARCH_LOCAL), 16 bits

# FW_CFG_ID feature bits.
FW_CFG_VERSION = 0x01               # the traditional selector/data interface, always set
FW_CFG_VERSION_DMA = 0x02           # the DMA interface at 0x514: not implemented

FW_CFG_SIG = b"QEMU"
FW_CFG_MAX_FILE_PATH = 56           # name[56], NUL included
FILE_ENTRY = struct.Struct(">IHH56s")   # one FWCfgFile, 64 bytes, big-endian
FILE_COUNT = struct.Struct(">I")
MAX_FILES = 0x20                    # QEMU's default file slots (FW_CFG_FILE_SLOTS_DFLT)
MAX_ITEM_SIZE = 0xFFFF_FFFF         # sizes are be32 in the directory, le32 for the cmdline

# Register offsets from the base port.
SELECTOR = 0
DATA = 1
PORT_COUNT = 2


class FileEntry(NamedTuple):
    """One row of the file directory, as the guest decodes it."""

    name: str
    select: int
    size: int


def check_file_name(name: str) -> bytes:
    """The UTF-8 bytes of a valid fw_cfg file name; DeviceError saying what is wrong otherwise."""
    if not isinstance(name, str):
        raise DeviceError(f"fw_cfg file name must be a str, got {type(name).__name__}")
    raw = name.encode("utf-8", "surrogateescape")
    if not raw:
        raise DeviceError("fw_cfg file name is empty")
    if b"\0" in raw:
        raise DeviceError(f"fw_cfg file name {name!r} contains a NUL byte")
    if len(raw) > FW_CFG_MAX_FILE_PATH - 1:
        raise DeviceError(
            f"fw_cfg file name {name!r} is {len(raw)} bytes; the directory holds at most "
            f"{FW_CFG_MAX_FILE_PATH - 1} plus a NUL (QEMU recommends 'opt/<your.domain>/...')")
    return raw


def parse_file_spec(spec: str) -> tuple[str, str]:
    """``"NAME=FILE"`` (the ``--fw-cfg`` argument) -> ``(name, path)``; the name is checked."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise DeviceError(f"--fw-cfg expects NAME=FILE (e.g. opt/kvmpy/greeting=hello.txt), "
                          f"got {spec!r}")
    check_file_name(name)
    return name, path


def _as_bytes(what: str, data) -> bytes:
    if isinstance(data, str) or not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_ITEM_SIZE:
        raise DeviceError(f"{what} is {len(data)} bytes; fw_cfg items hold at most {MAX_ITEM_SIZE}")
    return data


class FwCfg:
    """fw_cfg over two ports: offset 0 = selector (16-bit write), 1 = data (8-bit read)."""

    def __init__(self, ram_size: int, cpus: int, cmdline: bytes | str = b"",
                 files: Mapping[str, bytes] | None = None):
        if not 0 <= ram_size < 1 << 64:
            raise DeviceError(f"fw_cfg RAM size must fit in 64 bits, got {ram_size}")
        if not 1 <= cpus <= 0xFFFF:
            raise DeviceError(f"fw_cfg CPU count must be between 1 and 65535, got {cpus}")
        self.ram_size = ram_size
        self.cpus = cpus
        self._cmdline = b""
        self._files: dict[bytes, bytes] = {}      # name -> contents
        self._items: dict[int, bytes] = {}        # key & FW_CFG_ENTRY_MASK -> item
        self._selector = FW_CFG_SIGNATURE
        self._data = b""                          # the selected item
        self._offset = 0                          # 0 <= _offset <= len(_data) after a select
        self.set_cmdline(cmdline)
        for name, data in (files or {}).items():
            self.add_file(name, data)
        self._rebuild()

    # --- host side -------------------------------------------------------

    def set_cmdline(self, cmdline: bytes | str) -> None:
        """Set the kernel command line (str is UTF-8 encoded); it must not contain NUL."""
        raw = cmdline.encode() if isinstance(cmdline, str) else _as_bytes("command line", cmdline)
        if b"\0" in raw:
            raise DeviceError("the fw_cfg command line contains a NUL byte")
        if len(raw) + 1 > MAX_ITEM_SIZE:
            raise DeviceError(f"the fw_cfg command line is {len(raw)} bytes, too long")
        self._cmdline = raw
        self._rebuild()

    def add_file(self, name: str, data: bytes) -> None:
        """Add a read-only file item; names are unique, at most ``MAX_FILES`` files.

        Files get keys 0x20, 0x21, ... in name order (QEMU sorts its directory by name),
        so adding one may move the others: find keys with :attr:`files`.
        """
        raw = check_file_name(name)
        data = _as_bytes(f"fw_cfg file {name!r}", data)
        if raw in self._files:
            raise DeviceError(f"duplicate fw_cfg file name {name!r}")
        if len(self._files) >= MAX_FILES:
            raise DeviceError(f"cannot add fw_cfg file {name!r}: at most {MAX_FILES} files")
        self._files[raw] = data
        self._rebuild()

    @property
    def cmdline(self) -> bytes:
        """The command line, without its terminating NUL."""
        return self._cmdline

    @property
    def files(self) -> list[FileEntry]:
        """The file directory in order: name, select key, size."""
        return [FileEntry(raw.decode("utf-8", "surrogateescape"), FW_CFG_FILE_FIRST + i,
                          len(self._files[raw]))
                for i, raw in enumerate(sorted(self._files))]

    def item(self, key: int) -> bytes:
        """Everything a guest reads after selecting ``key`` (before the trailing zeros)."""
        key &= 0xFFFF
        if key & FW_CFG_ARCH_LOCAL:
            return b""
        return self._items.get(key & FW_CFG_ENTRY_MASK, b"")

    def reset(self) -> None:
        """What a machine reset does in QEMU: select the signature."""
        self.select(FW_CFG_SIGNATURE)

    def state(self) -> dict:
        """The registers and the configuration (file sizes, not contents), for snapshots."""
        return {"selector": self._selector, "offset": self._offset,
                "ram_size": self.ram_size, "cpus": self.cpus, "cmdline": self._cmdline,
                "files": [e._asdict() for e in self.files]}

    def save_state(self) -> dict:
        """Everything, contents included, as JSON-able values (for snapshots and migration)."""
        return {"selector": self._selector, "offset": self._offset, "cmdline": self._cmdline.hex(),
                "files": {raw.hex(): data.hex() for raw, data in self._files.items()}}

    def load_state(self, state: dict) -> None:
        """The inverse of save_state(); a bad state raises DeviceError and changes nothing."""
        try:
            cmdline = bytes.fromhex(state["cmdline"])
            files = {bytes.fromhex(k).decode("utf-8", "surrogateescape"): bytes.fromhex(v)
                     for k, v in state["files"].items()}
            selector, offset = int(state["selector"]), int(state["offset"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DeviceError(f"bad fw_cfg state: {e!r}") from None
        fresh = FwCfg(self.ram_size, self.cpus, cmdline, files)    # checks names, sizes, count
        fresh.select(selector)
        if not 0 <= offset <= len(fresh._data):
            raise DeviceError(f"bad fw_cfg state: offset {offset} outside the selected item")
        fresh._offset = offset
        self.__dict__.update(fresh.__dict__)

    def prepare_load(self, state: dict):
        """``load_state(state)`` now, and a call that puts that state back cheaply (a reset
        checkpoint's): its attributes, the file table copied so later additions are undone."""
        self.load_state(state)
        saved = {k: dict(v) if isinstance(v, dict) else v for k, v in self.__dict__.items()}

        def load() -> None:
            self.__dict__.update({k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()})
        return load

    def _rebuild(self) -> None:
        names = sorted(self._files)
        directory = [FILE_COUNT.pack(len(names))]
        items = {
            FW_CFG_SIGNATURE: FW_CFG_SIG,
            FW_CFG_ID: struct.pack("<I", FW_CFG_VERSION),
            FW_CFG_RAM_SIZE: struct.pack("<Q", self.ram_size),
            FW_CFG_NB_CPUS: struct.pack("<H", self.cpus),
            FW_CFG_CMDLINE_SIZE: struct.pack("<I", len(self._cmdline) + 1),
            FW_CFG_CMDLINE_DATA: self._cmdline + b"\0",
        }
        for i, raw in enumerate(names):
            data = self._files[raw]
            directory.append(FILE_ENTRY.pack(len(data), FW_CFG_FILE_FIRST + i, 0, raw))
            items[FW_CFG_FILE_FIRST + i] = data
        items[FW_CFG_FILE_DIR] = b"".join(directory)
        self._items = items
        self._data = self.item(self._selector)    # the guest keeps its selection and offset

    # --- guest side ------------------------------------------------------

    def select(self, key: int) -> None:
        """A selector write: pick item ``key`` (16 bits) and rewind to its first byte."""
        self._selector = key & 0xFFFF
        self._data = self.item(self._selector)
        self._offset = 0

    def read(self, offset: int, size: int) -> int:
        inside = PORT_COUNT - offset              # how many of the accessed ports are ours
        if size <= 0:
            return 0
        if offset < 0 or inside <= 0:
            return (1 << (8 * size)) - 1
        ours = min(size, inside)
        value = self._next_byte() if ours == 1 else 0   # QEMU: 16-bit reads are invalid, read 0
        return value | (((1 << (8 * size)) - 1) ^ ((1 << (8 * ours)) - 1))

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or size <= 0 or offset >= PORT_COUNT:
            return
        if min(size, PORT_COUNT - offset) == 2:
            self.select(value & 0xFFFF)
        # A byte write to either port is a data write: ignored (QEMU >= 2.4).

    def _next_byte(self) -> int:
        off = self._offset
        if off < len(self._data):
            self._offset = off + 1
            return self._data[off]
        return 0
