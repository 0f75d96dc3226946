"""Interrupt lines as seen by a device: a ``Trigger`` it drives high or low.

A device never knows how its line reaches the guest. The Machine hands it a
trigger that calls ``KVM_IRQ_LINE`` (or signals an irqfd); a test hands it a
:class:`RecordingTrigger`. Devices call ``set_level`` only when the level changes,
so a recording is exactly the sequence of edges (level-triggered, like the ISA
lines the 8259/IOAPIC see).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Trigger(Protocol):
    """One interrupt line a device can raise (True) or lower (False)."""

    def set_level(self, level: bool) -> None: ...


class NullTrigger:
    """A line connected to nothing: a device without an IRQ."""

    def set_level(self, level: bool) -> None:
        pass


class RecordingTrigger:
    """Remembers every level change in ``.levels``, for tests."""

    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.levels.append(bool(level))

    @property
    def level(self) -> bool:
        """The current level (low until first raised)."""
        return self.levels[-1] if self.levels else False
