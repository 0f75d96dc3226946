"""MSI messages into the guest through KVM's GSI routing and irqfds.

A PCI function's MSI-X vector is a message: an address (which local APIC, how) and a
data word (which vector). KVM delivers messages for the VMM when a GSI is routed to one
(``KVM_SET_GSI_ROUTING`` with an MSI entry) and an eventfd is bound to that GSI
(``KVM_IRQFD``): writing the eventfd injects the interrupt without another ioctl.

``MsiRoutes`` gives each (function, vector) its own GSI (from ``layout.MSI_GSI_BASE``)
and eventfd bound to it when the function is created (so a sandboxed run, which may not
create eventfds, needs none), and routes it to the vector's current message.
The routing table is only rewritten when a message changes (a driver reprogramming its
table): KVM_SET_GSI_ROUTING replaces the whole table, so it always carries KVM's default
routes for the PIC and IOAPIC inputs (GSI 0-15 to both, 16-23 to the IOAPIC) too.
A restored or migrated machine starts with no routes; each vector gets its route again
on its first message.
"""
from __future__ import annotations

import os
import threading

from ..x86 import layout

IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IRQCHIP_IOAPIC = 0, 1, 2
IOAPIC_PINS = 24
MAX_MSI_ROUTES = 1024           # well under KVM_MAX_IRQ_ROUTES (4096)


def default_gsi_routes() -> list[tuple]:
    """KVM's default table with an in-kernel irqchip (virt/kvm/irqchip.c, x86's default_routing)."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        if gsi < 16:
            routes.append((gsi, "irqchip", IRQCHIP_PIC_MASTER if gsi < 8 else IRQCHIP_PIC_SLAVE, gsi % 8))
        routes.append((gsi, "irqchip", IRQCHIP_IOAPIC, gsi))
    return routes


class MsiRoutes:
    """Every MSI route of one VM (thread-safe: vCPU threads and the disk timer fire)."""

    def __init__(self, vm):
        self.vm = vm
        self.lock = threading.Lock()
        self.routes: dict[tuple[int, int], list] = {}     # (owner, vector) -> [gsi, eventfd, address, data]
        self.owners = 0

    def sink(self, vectors: int) -> "MsiSinkFor":
        """A sink for one function's ``vectors`` vectors, each with its GSI and irqfd."""
        from ..errors import DeviceError
        with self.lock:
            if len(self.routes) + vectors > MAX_MSI_ROUTES:
                raise DeviceError(f"more than {MAX_MSI_ROUTES} MSI vectors")
            self.owners += 1
            for v in range(vectors):
                gsi = layout.MSI_GSI_BASE + len(self.routes)
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self.routes[(self.owners, v)] = [gsi, fd, None, None]
                self.vm.irqfd(fd, gsi)      # no route yet: a signal before the first message goes nowhere
            return MsiSinkFor(self, self.owners)

    def send(self, owner: int, vector: int, address: int, data: int) -> None:
        with self.lock:
            r = self.routes.get((owner, vector))
            if r is None:
                return
            if (r[2], r[3]) != (address, data):
                r[2], r[3] = address, data
                self._commit()
            fd = r[1]
        os.eventfd_write(fd, 1)

    def _commit(self) -> None:
        msi = [(gsi, "msi", a, d) for gsi, _, a, d in self.routes.values() if a is not None]
        self.vm.set_gsi_routing(default_gsi_routes() + msi)

    def close(self) -> None:
        with self.lock:
            for _, fd, _, _ in self.routes.values():
                os.close(fd)
            self.routes.clear()


class MsiSinkFor:
    """``send(vector, address, data)`` for one function (devices/pci/msix.py's MsiSink)."""

    def __init__(self, routes: MsiRoutes, owner: int):
        self.routes, self.owner = routes, owner

    def send(self, vector: int, address: int, data: int) -> None:
        self.routes.send(self.owner, vector, address, data)
