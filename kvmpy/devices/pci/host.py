"""A PCI host bridge: bus 0, reached through configuration mechanism #1 (ports 0xcf8/0xcfc)
and through ECAM (PCI Express enhanced configuration access), with a window of MMIO
addresses in which the functions' memory BARs decode.

- **Mechanism #1** (PCI 3.0, 3.2.2.3.2): CONFIG_ADDRESS at 0xcf8 takes 32-bit accesses
  only (bit 31 enable, bus in 23:16, device in 15:11, function in 10:8, register in
  7:2); a byte access there is not ours (0xcf9 is the reset control register).
  CONFIG_DATA at 0xcfc-0xcff reads and writes the addressed dword, at byte ``port &
  3`` with width 1, 2 or 4. Enable bit clear, a bus other than 0, or an empty slot:
  reads give all ones, writes vanish.
- **ECAM** (PCIe 4.0, 7.2.2): offset ``bus << 20 | device << 15 | function << 12 |
  register`` into a window; kvmpy's has bus 0 only (1 MiB), which the ACPI MCFG table
  says. Same rules for empty slots.
- **The MMIO window** is one range on the MMIO bus; an access goes to the function
  whose memory BAR holds the address while that function's Command.Memory is set. A
  BAR the guest moves outside the window, or onto another BAR, is simply not reached
  (the first match wins), which is all a misprogrammed bus can expect.
- **Slots**: function 0 of devices 0-31; device 0 is the host bridge itself. Each
  device's INTA# is wired to its own GSI (``intx_gsi``), as the DSDT's _PRT says.

Every access is bounds-checked, so no guest value raises out of here.
"""
from __future__ import annotations

from typing import Protocol

from ...errors import DeviceError
from .config import NUM_BARS, PciFunction, all_ones

MAX_DEVICES = 32
ECAM_BUS_SIZE = 1 << 20
CONFIG_ENABLE = 1 << 31
# The host bridge's identity: Red Hat's "QEMU PCIe host bridge" ID (1b36:0008), class 06/00/00.
HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, CLASS_HOST_BRIDGE = 0x1B36, 0x0008, 0x060000


class PciEndpoint(Protocol):
    """What the host needs of a function on its bus."""

    config: PciFunction

    def config_read(self, offset: int, size: int) -> int: ...

    def config_write(self, offset: int, size: int, value: int) -> None: ...

    def bar_read(self, index: int, offset: int, size: int) -> int: ...

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None: ...


class HostBridge:
    """Device 00:00.0: identity only, no BARs."""

    def __init__(self):
        self.config = PciFunction(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, CLASS_HOST_BRIDGE)

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    def save_state(self) -> dict:
        return self.config.save_state()

    def load_state(self, state: dict) -> None:
        self.config.load_state(state)


class BarAllocator:
    """Hands out naturally aligned ranges of ``[base, base + size)``, lowest first."""

    def __init__(self, base: int, size: int):
        self.base, self.size, self.next = base, size, base

    def allocate(self, size: int) -> int:
        addr = (self.next + size - 1) // size * size
        if addr + size > self.base + self.size:
            raise DeviceError(f"the PCI MMIO window [{self.base:#x}, {self.base + self.size:#x}) "
                              f"has no room for a {size:#x}-byte BAR")
        self.next = addr + size
        return addr


class PciHost:
    """Bus 0 and its three doors (see the module docstring). ``mmio_base``/``mmio_size`` is
    the window the memory BARs are allocated from and decoded in."""

    def __init__(self, mmio_base: int, mmio_size: int):
        self.mmio_base, self.mmio_size = mmio_base, mmio_size
        self.allocator = BarAllocator(mmio_base, mmio_size)
        self.devices: dict[int, PciEndpoint] = {0: HostBridge()}
        self.config_address = 0
        self.cf8, self.cfc = ConfigAddressPort(self), ConfigDataPort(self)
        self.ecam, self.window = Ecam(self), MmioWindow(self)

    def add(self, endpoint: PciEndpoint) -> int:
        """Put ``endpoint`` in the next free slot, placing its BARs; returns the device number."""
        dev = next((d for d in range(1, MAX_DEVICES) if d not in self.devices), None)
        if dev is None:
            raise DeviceError(f"PCI bus 0 is full ({MAX_DEVICES - 1} devices)")
        cfg = endpoint.config
        for i, bar in enumerate(cfg.bars):
            if bar is not None and (i == 0 or cfg.bars[i - 1] is not bar):
                cfg.set_bar_address(i, self.allocator.allocate(bar.size))
        self.devices[dev] = endpoint
        return dev

    # --- configuration space --------------------------------------------------------------
    def config_read(self, bus: int, dev: int, fn: int, offset: int, size: int) -> int:
        ep = self.devices.get(dev) if bus == 0 and fn == 0 else None
        if ep is None:
            return all_ones(size)
        return ep.config_read(offset, size)

    def config_write(self, bus: int, dev: int, fn: int, offset: int, size: int, value: int) -> None:
        ep = self.devices.get(dev) if bus == 0 and fn == 0 else None
        if ep is not None:
            ep.config_write(offset, size, value)

    def _cf8_target(self) -> tuple[int, int, int, int] | None:
        a = self.config_address
        if not a & CONFIG_ENABLE:
            return None
        return a >> 16 & 0xFF, a >> 11 & 0x1F, a >> 8 & 0x7, a & 0xFC

    # --- BARs -----------------------------------------------------------------------------------
    def find_bar(self, addr: int) -> tuple[PciEndpoint, int, int] | None:
        """``(endpoint, BAR index, offset)`` of the BAR decoding ``addr``, or None."""
        for ep in self.devices.values():
            cfg = ep.config
            for i in range(NUM_BARS):
                bar = cfg.bars[i]
                if bar is None:
                    continue
                base = cfg.bar_address(i)
                if base is not None and base <= addr < base + bar.size:
                    return ep, i, addr - base
        return None

    def save_state(self) -> dict:
        """CONFIG_ADDRESS and the host bridge's configuration space (the endpoints save their own)."""
        return {"config_address": self.config_address, "bridge": self.devices[0].save_state()}

    def load_state(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"config_address", "bridge"}:
            raise ValueError("pci host state: expected the keys 'config_address' and 'bridge'")
        a = state["config_address"]
        if type(a) is not int or not 0 <= a < 1 << 32:
            raise ValueError(f"pci host state: bad config_address {a!r}")
        self.devices[0].load_state(state["bridge"])
        self.config_address = a


class ConfigAddressPort:
    """Port 0xcf8 (one port claimed: 0xcf9 is someone else's): CONFIG_ADDRESS, dword only."""

    def __init__(self, host: PciHost):
        self.host = host

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.host.config_address
        return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.host.config_address = value & 0x80FF_FFFC     # reserved bits 30:24 and 1:0 read 0


class ConfigDataPort:
    """Ports 0xcfc-0xcff: CONFIG_DATA."""

    def __init__(self, host: PciHost):
        self.host = host

    def read(self, offset: int, size: int) -> int:
        t = self.host._cf8_target() if size in (1, 2, 4) and offset + size <= 4 else None
        if t is None:
            return all_ones(size)
        bus, dev, fn, reg = t
        return self.host.config_read(bus, dev, fn, reg + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        t = self.host._cf8_target() if size in (1, 2, 4) and offset + size <= 4 else None
        if t is not None:
            bus, dev, fn, reg = t
            self.host.config_write(bus, dev, fn, reg + offset, size, value)


class Ecam:
    """The ECAM window of bus 0 (1 MiB: 32 devices x 8 functions x 4 KiB)."""

    def __init__(self, host: PciHost):
        self.host = host

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or not 0 <= offset < ECAM_BUS_SIZE:
            return all_ones(size)
        return self.host.config_read(0, offset >> 15 & 0x1F, offset >> 12 & 7, offset & 0xFFF, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if size in (1, 2, 4) and 0 <= offset < ECAM_BUS_SIZE:
            self.host.config_write(0, offset >> 15 & 0x1F, offset >> 12 & 7, offset & 0xFFF, size, value)


class MmioWindow:
    """The PCI MMIO window: each access goes to the BAR that decodes it (or reads 0)."""

    def __init__(self, host: PciHost):
        self.host = host

    def read(self, offset: int, size: int) -> int:
        hit = self.host.find_bar(self.host.mmio_base + offset)
        if hit is None:
            return 0
        ep, i, off = hit
        return ep.bar_read(i, off, size)

    def write(self, offset: int, size: int, value: int) -> None:
        hit = self.host.find_bar(self.host.mmio_base + offset)
        if hit is not None:
            ep, i, off = hit
            ep.bar_write(i, off, size, value)

