"""Run statistics: exits by reason and by device, and where the time went."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    """Counters a Machine keeps while it runs.

    ``kvm_ns`` is wall time spent inside KVM_RUN (guest execution plus the kernel's
    exit handling); ``vmm_ns`` is time between KVM_RUN calls (decoding and device
    emulation in this process).
    """

    exits: Counter = field(default_factory=Counter)
    devices: Counter = field(default_factory=Counter)
    unclaimed_writes: int = 0
    kvm_ns: int = 0
    vmm_ns: int = 0

    @property
    def total_exits(self) -> int:
        return sum(self.exits.values())

    def as_dict(self) -> dict:
        return {"exits": dict(self.exits), "devices": dict(self.devices),
                "unclaimed_writes": self.unclaimed_writes, "kvm_ns": self.kvm_ns,
                "vmm_ns": self.vmm_ns, "total_exits": self.total_exits}

    def __str__(self) -> str:
        total = self.total_exits
        t = self.kvm_ns + self.vmm_ns
        lines = [f"exits: {total}"]
        for name, n in self.exits.most_common():
            lines.append(f"  {name:<20} {n:>10}")
        if self.devices:
            lines.append("by device:")
            for name, n in self.devices.most_common():
                lines.append(f"  {name:<20} {n:>10}")
        if self.unclaimed_writes:
            lines.append(f"unclaimed writes dropped: {self.unclaimed_writes}")
        if t:
            lines.append(f"time: {t / 1e9:.3f} s, {100 * self.kvm_ns / t:.1f}% in KVM_RUN (guest + kernel), "
                         f"{100 * self.vmm_ns / t:.1f}% in the VMM"
                         + (f"; {self.vmm_ns / total / 1000:.2f} us VMM per exit" if total else ""))
        return "\n".join(lines)
