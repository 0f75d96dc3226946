"""vmm/msi.py against a recording VM: each vector gets its GSI and irqfd up front, the routing
table always carries KVM's default irqchip routes, and it is rewritten only when a message changes."""
import os

import pytest

from kvmpy.errors import DeviceError
from kvmpy.vmm import msi
from kvmpy.x86 import layout


class FakeVm:
    def __init__(self):
        self.irqfds, self.tables = [], []

    def irqfd(self, fd, gsi):
        self.irqfds.append((fd, gsi))

    def set_gsi_routing(self, routes):
        self.tables.append(list(routes))


def test_default_routes_are_kvm_s_pic_and_ioapic_lines():
    routes = msi.default_gsi_routes()
    assert len(routes) == 16 * 2 + 8
    assert (0, "irqchip", 0, 0) in routes and (0, "irqchip", 2, 0) in routes
    assert (9, "irqchip", 1, 1) in routes and (23, "irqchip", 2, 23) in routes
    assert not any(r[0] == 16 and r[2] != 2 for r in routes)


def test_vectors_get_gsis_and_irqfds_and_routes_follow_their_messages():
    vm = FakeVm()
    routes = msi.MsiRoutes(vm)
    a, b = routes.sink(2), routes.sink(3)
    assert [g for _, g in vm.irqfds] == list(range(layout.MSI_GSI_BASE, layout.MSI_GSI_BASE + 5))
    assert vm.tables == []                                  # nothing routed before a message
    b.send(1, 0xFEE0_0000, 0x41)
    b.send(1, 0xFEE0_0000, 0x41)                            # the same message: no rewrite
    assert len(vm.tables) == 1
    assert vm.tables[0] == msi.default_gsi_routes() + [(layout.MSI_GSI_BASE + 3, "msi", 0xFEE0_0000, 0x41)]
    fd = routes.routes[(2, 1)][1]
    assert os.eventfd_read(fd) == 2                         # each message signalled the irqfd
    a.send(0, 0xFEE0_1000, 0x42)
    b.send(1, 0xFEE0_0000, 0x43)                            # reprogrammed: rewritten
    assert len(vm.tables) == 3 and vm.tables[-1][-2:] == [(layout.MSI_GSI_BASE, "msi", 0xFEE0_1000, 0x42),
                                                          (layout.MSI_GSI_BASE + 3, "msi", 0xFEE0_0000, 0x43)]
    a.send(7, 0, 0)                                         # a vector the function does not have
    assert len(vm.tables) == 3
    routes.close()
    assert routes.routes == {}


def test_the_number_of_routes_is_bounded():
    routes = msi.MsiRoutes(FakeVm())
    routes.sink(msi.MAX_MSI_ROUTES)
    with pytest.raises(DeviceError, match="MSI vectors"):
        routes.sink(1)
    routes.close()
