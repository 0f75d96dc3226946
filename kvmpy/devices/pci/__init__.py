"""PCI: a host bridge with bus 0 (``host``) and the configuration space of a function
(``config``). docs/devices.md, "PCI", says what a guest sees."""
from .config import Bar, PciFunction
from .host import BarAllocator, HostBridge, PciHost

__all__ = ["Bar", "BarAllocator", "HostBridge", "PciFunction", "PciHost"]
