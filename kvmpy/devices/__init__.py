"""Device models: pure-Python register machines behind a :class:`~kvmpy.devices.bus.Bus`.

Every device answers ``read(offset, size) -> int`` and ``write(offset, size, value)``
with offsets relative to its own base, and reaches the outside world only through
what it was given: a :class:`~kvmpy.devices.irq.Trigger` for its interrupt line, a
binary file-like for output, callbacks for run-ending events. Nothing here imports
the KVM layer, so every model is testable with a ``BytesIO`` and a recording trigger.
"""
from .bus import Attachment, Bus, Device
from .debugexit import DebugExit
from .fwcfg import FwCfg
from .i8042 import I8042
from .irq import NullTrigger, RecordingTrigger, Trigger
from .reset import ResetControl, SystemControlA
from .rtc import Rtc
from .serial import Serial16550
from .testdev import PcTestdev

__all__ = [
    "Attachment", "Bus", "Device", "DebugExit", "FwCfg", "I8042",
    "NullTrigger", "RecordingTrigger", "Rtc", "Trigger", "Serial16550",
    "ResetControl", "SystemControlA", "PcTestdev",
]
