"""A minimal i8042 PS/2 keyboard controller: just enough to reboot.

The PC's 8042 has a data port at 0x60 and a status/command port at 0x64; it is
attached as a 5-byte range at 0x60, so those are offsets 0 and 4. Its one job here
is the classic reset: command 0xFE ("pulse output line 0", wired to the CPU reset
pin) written to the command port, which Linux uses for ``reboot=k`` and as a
fallback reboot method. That calls ``on_reset()``. There is no keyboard: status
reads 0 (output buffer empty, input buffer empty, so a driver waiting to send may
proceed), data reads 0, and everything else is ignored. Firecracker's i8042 is the
same idea. Offsets 1..3 (ports 0x61..0x63) read 0; port 0x61 (system control port
B) is served by KVM itself when the VM has an in-kernel PIT.
"""
from __future__ import annotations

from typing import Callable

DATA = 0x0          # port 0x60
COMMAND = 0x4       # port 0x64 (write: command; read: status)
CMD_RESET = 0xFE    # pulse output port bit 0 low: CPU reset


class I8042:
    """PS/2 controller stub: ``0xFE`` to the command port calls ``on_reset()``."""

    def __init__(self, on_reset: Callable[[], None]):
        self.on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        return 0        # status: no data, input buffer empty; data: nothing to read

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == COMMAND and value & 0xFF == CMD_RESET:
            self.on_reset()
