"""QEMU's ``isa-debug-exit`` device: a port the guest writes to end the run.

QEMU's hw/misc/debugexit.c (``-device isa-debug-exit,iobase=0xf4,iosize=0x01``)
exits with status ``(value << 1) | 1`` on any write, so a guest-chosen status is
always odd and never collides with QEMU's own 0/1. Test harnesses (Linux kselftests,
many hobby OS test runners) rely on it; kvmpy puts it at port 0xf4 and hands the
status to ``on_exit`` instead of exiting. Reads return all ones for the access size
(what an unclaimed ISA port reads).
"""
from __future__ import annotations

from typing import Callable


class DebugExit:
    """``write(v)`` -> ``on_exit((v << 1) | 1)``; ``iosize`` is how many ports it claims."""

    def __init__(self, on_exit: Callable[[int], None], iosize: int = 1):
        self.on_exit = on_exit
        self.iosize = iosize

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        value &= (1 << (8 * size)) - 1
        self.on_exit((value << 1) | 1)
