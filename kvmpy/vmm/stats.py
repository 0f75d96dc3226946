"""Run statistics: exits by reason and by device, and where the time went."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    """Counters a Machine keeps while it runs.

    ``kvm_ns`` is wall time spent inside KVM_RUN (guest execution plus the kernel's
    exit handling); ``vmm_ns`` is time between KVM_RUN calls (decoding and device
    emulation in this process). Each vCPU thread's run loop keeps its own clock, from
    its first KVM_RUN to its last exit, and the two are summed over vCPU threads: for
    one vCPU ``kvm_ns + vmm_ns`` is about the wall time of the runs and never more;
    with N vCPUs at most N times that. Time between runs and time parked by
    ``pause()`` is nobody's and is not counted. ``guest_ns`` is the part of kvm_ns the kernel accounted
    as guest time (``guest_time`` in /proc/<pid>/task/<tid>/stat, clock-tick resolution,
    read at the end of a run of a tick or more: a shorter run's share counts at its
    thread's next such run, vcpu_loop.GuestClock); it stays 0 on hosts whose KVM does not
    account guest time (kvm_pvm), and then the guest/kernel split is unknown.
    """

    exits: Counter = field(default_factory=Counter)
    devices: Counter = field(default_factory=Counter)
    unclaimed_writes: int = 0
    kvm_ns: int = 0
    vmm_ns: int = 0
    guest_ns: int = 0
    serial_dropped: int = 0          # guest serial output the output stream did not take in time

    @property
    def total_exits(self) -> int:
        return sum(self.exits.values())

    def as_dict(self) -> dict:
        return {"exits": dict(self.exits), "devices": dict(self.devices),
                "unclaimed_writes": self.unclaimed_writes, "kvm_ns": self.kvm_ns,
                "vmm_ns": self.vmm_ns, "guest_ns": self.guest_ns, "serial_dropped": self.serial_dropped, "total_exits": self.total_exits}

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
        if self.serial_dropped:
            lines.append(f"serial output dropped: {self.serial_dropped} bytes (the output stream did not keep up)")
        if t:
            lines.append(f"time (summed over vCPUs): {t / 1e9:.3f} s, {100 * self.kvm_ns / t:.1f}% in KVM_RUN (guest + kernel), "
                         f"{100 * self.vmm_ns / t:.1f}% in the VMM"
                         + (f"; {self.vmm_ns / total / 1000:.2f} us VMM per exit" if total else ""))
            guest = min(self.guest_ns, self.kvm_ns)
            if guest:
                lines.append(f"  of which guest {100 * guest / t:.1f}%, kernel {100 * (self.kvm_ns - guest) / t:.1f}% "
                             "(kernel's guest_time accounting, 10 ms ticks)")
            else:
                lines.append("  guest vs kernel: not accounted by this host's KVM (guest_time stays 0)")
        return "\n".join(lines)

    def to_svg(self, title: str = "kvmpy run") -> str:
        """The same numbers as a small self-contained SVG chart: a bar per exit reason and
        per device, and one bar splitting the time between KVM_RUN and the VMM."""
        from html import escape                 # only --stats-svg pays for it
        rows = [("exits by reason", self.exits.most_common()), ("exits by device", self.devices.most_common())]
        width, left, bar_w, line = 640, 170, 380, 22
        y, parts = 40, []
        parts.append(f'<text x="10" y="24" font-size="16" font-weight="bold">{escape(title)}</text>')
        for heading, items in rows:
            parts.append(f'<text x="10" y="{y + 14}" font-size="13" font-weight="bold">{heading}</text>')
            y += line
            top = max((n for _, n in items), default=1) or 1
            for name, n in items:
                w = max(1, round(bar_w * n / top))
                parts.append(f'<text x="{left - 8}" y="{y + 14}" font-size="12" text-anchor="end">{escape(str(name))}</text>')
                parts.append(f'<rect x="{left}" y="{y + 3}" width="{w}" height="14" fill="#4a7fb5"/>')
                parts.append(f'<text x="{left + w + 6}" y="{y + 14}" font-size="12">{n}</text>')
                y += line
            y += 8
        total = self.kvm_ns + self.vmm_ns
        if total:
            k = round(bar_w * self.kvm_ns / total)
            parts.append(f'<text x="10" y="{y + 14}" font-size="13" font-weight="bold">time</text>')
            y += line
            parts.append(f'<rect x="{left}" y="{y + 3}" width="{k}" height="14" fill="#5a9e5a"/>')
            parts.append(f'<rect x="{left + k}" y="{y + 3}" width="{bar_w - k}" height="14" fill="#d08c3a"/>')
            parts.append(f'<text x="{left - 8}" y="{y + 14}" font-size="12" text-anchor="end">'
                         f'{total / 1e9:.3f} s</text>')
            y += line
            parts.append(f'<text x="{left}" y="{y + 12}" font-size="12" fill="#5a9e5a">'
                         f'KVM_RUN (guest + kernel) {100 * self.kvm_ns / total:.1f}%</text>')
            parts.append(f'<text x="{left + 230}" y="{y + 12}" font-size="12" fill="#d08c3a">'
                         f'VMM {100 * self.vmm_ns / total:.1f}%</text>')
            y += line
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 10}" '
                f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
                + "\n".join(parts) + "\n</svg>\n")
