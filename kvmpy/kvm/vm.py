"""``Vm``: a VM fd from KVM_CREATE_VM (api.rst, "VM ioctls"): memory slots, the
in-kernel irqchip and PIT, interrupt lines, eventfds, the clock, and new vCPUs.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import KvmError
from .abi import IoeventfdFlag, IrqfdFlag, MemFlag, ffi, lib
from .fd import Fd, cdata_bytes, cdata_from, ioctl
from .memory import PAGE_SIZE, GuestMemory, MemoryRegion
from .vcpu import Vcpu

if TYPE_CHECKING:
    from .system import Kvm


class Vm(Fd):
    """One virtual machine: guest memory slots, interrupt controllers and vCPUs."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self.memory = GuestMemory()
        self.vcpus: list[Vcpu] = []
        self._next_slot = 0
        self.has_irqchip = False         # KVM_CREATE_IRQCHIP (and the PIT with it) done
        self.manual_protect = False      # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 on (enable_manual_protect)

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        super().close()
        self.memory.close()     # unmap only after KVM no longer refers to it

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, lib.KVM_CHECK_EXTENSION, int(cap))

    # --- memory -------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, userspace_addr: int,
                               flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION; ``size`` 0 deletes the slot."""
        r = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa,
            "memory_size": size, "userspace_addr": userspace_addr})
        ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, r)

    def add_memory(self, gpa: int, size: int, readonly: bool = False,
                   log_dirty: bool = False, backing: str | None = None) -> MemoryRegion:
        """Map ``size`` bytes at guest-physical ``gpa``: fresh anonymous memory, or with
        ``backing`` a private copy-on-write mapping of that file (pages are read when the
        guest first touches them; its writes never reach the file)."""
        if backing is None:
            region = MemoryRegion.anonymous(gpa, size, readonly=readonly, slot=self._next_slot)
        else:
            region = MemoryRegion.from_file(backing, gpa, size, readonly=readonly, slot=self._next_slot)
        self.memory.add(region)
        try:
            self._set_slot(region, log_dirty)
        except KvmError:
            self.memory.regions.remove(region)
            region.close()
            raise
        self._next_slot += 1
        return region

    def _set_slot(self, region: MemoryRegion, log_dirty: bool) -> None:
        """KVM_SET_USER_MEMORY_REGION for ``region``'s slot, with its flags."""
        buf = ffi.from_buffer(region.mm)
        addr = int(ffi.cast("uintptr_t", buf))
        ffi.release(buf)        # the mapping stays; only the buffer export ends
        flags = (MemFlag.READONLY if region.readonly else 0) | (MemFlag.LOG_DIRTY_PAGES if log_dirty else 0)
        self.set_user_memory_region(region.slot, region.gpa, region.size, addr, int(flags))

    def log_dirty_pages(self, enable: bool) -> None:
        """Turn KVM's dirty-page log on or off for every RAM slot (KVM_MEM_LOG_DIRTY_PAGES)."""
        for r in self.memory.regions:
            self._set_slot(r, enable)

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: one bit per page of the slot, set if written since the last call.

        With manual protection on (``enable_manual_protect``: a reset checkpoint's
        KVM_CLEAR_DIRTY_LOG), GET alone would leave the pages writable and dirty; the pages
        it returned are then cleared too, so every caller (live migration) sees the same."""
        region = next(r for r in self.memory.regions if r.slot == slot)
        npages = region.size // PAGE_SIZE
        bitmap = ffi.new("uint64_t[]", (npages + 63) // 64)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": bitmap})
        ioctl(self.fd, lib.KVM_GET_DIRTY_LOG, log)
        out = bytes(ffi.buffer(bitmap))[:(npages + 7) // 8]
        if self.manual_protect:
            err = lib.kvmpy_clear_dirty_log(self.fd, slot, bitmap, npages)
            if err < 0:
                raise KvmError(-err, "KVM_CLEAR_DIRTY_LOG")
        return out

    def enable_manual_protect(self) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: reading the dirty log no longer protects the pages
        again; KVM_CLEAR_DIRTY_LOG does, page by page. Stays on for the VM's life."""
        err = lib.kvmpy_reset_enable_manual_protect(self.fd)
        if err < 0:
            raise KvmError(-err, "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)")
        self.manual_protect = True

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, lib.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", addr))

    # --- interrupts ------------------------------------------------------------------
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and per-vCPU local APICs."""
        ioctl(self.fd, lib.KVM_CREATE_IRQCHIP)
        self.has_irqchip = True

    def get_irqchip(self, chip_id: int) -> bytes:
        p = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        ioctl(self.fd, lib.KVM_GET_IRQCHIP, p)
        return cdata_bytes(p)

    def set_irqchip(self, data: bytes) -> None:
        ioctl(self.fd, lib.KVM_SET_IRQCHIP, cdata_from("struct kvm_irqchip *", data))

    def create_pit2(self, flags: int = 0) -> None:
        ioctl(self.fd, lib.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def get_pit2(self) -> bytes:
        p = ffi.new("struct kvm_pit_state2 *")
        ioctl(self.fd, lib.KVM_GET_PIT2, p)
        return cdata_bytes(p)

    def set_pit2(self, data: bytes) -> None:
        ioctl(self.fd, lib.KVM_SET_PIT2, cdata_from("struct kvm_pit_state2 *", data))

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: drive GSI ``irq`` to ``level`` (needs the in-kernel irqchip)."""
        ioctl(self.fd, lib.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level}))

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write to ``addr`` signals eventfd ``fd`` without exiting."""
        flags = ((IoeventfdFlag.DATAMATCH if datamatch is not None else 0)
                 | (IoeventfdFlag.PIO if pio else 0) | (IoeventfdFlag.DEASSIGN if deassign else 0))
        p = ffi.new("struct kvm_ioeventfd *", {"datamatch": datamatch or 0, "addr": addr,
                                               "len": length, "fd": fd, "flags": int(flags)})
        ioctl(self.fd, lib.KVM_IOEVENTFD, p)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False, resamplefd: int | None = None) -> None:
        """KVM_IRQFD: a write to eventfd ``fd`` raises GSI ``gsi`` in the in-kernel irqchip."""
        flags = (IrqfdFlag.DEASSIGN if deassign else 0) | (IrqfdFlag.RESAMPLE if resamplefd is not None else 0)
        p = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": int(flags),
                                           "resamplefd": resamplefd or 0})
        ioctl(self.fd, lib.KVM_IRQFD, p)

    def set_gsi_routing(self, routes) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole GSI routing table with ``routes``, each
        ``(gsi, "irqchip", chip, pin)`` or ``(gsi, "msi", address, data)``. The table
        replaces KVM's default one, so a caller keeping the irqchip's lines passes them too
        (``default_gsi_routes``)."""
        p = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for e, (gsi, kind, a, b) in zip(p.entries, routes):
            e.gsi = gsi
            if kind == "msi":
                e.type = lib.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data = a & 0xFFFF_FFFF, a >> 32, b
            else:
                e.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip, e.u.irqchip.pin = a, b
        ioctl(self.fd, lib.KVM_SET_GSI_ROUTING, p)

    # --- clock -----------------------------------------------------------------------
    def get_clock(self) -> int:
        """KVM_GET_CLOCK: the guest's kvmclock in nanoseconds."""
        p = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, lib.KVM_GET_CLOCK, p)
        return p.clock

    def set_clock(self, ns: int) -> None:
        ioctl(self.fd, lib.KVM_SET_CLOCK, ffi.new("struct kvm_clock_data *", {"clock": ns}))

    # --- state -----------------------------------------------------------------------
    def save_state(self) -> dict:
        """The VM-wide state a saved machine needs besides RAM and vCPUs: the kvmclock and,
        with the in-kernel irqchip, the PIC pair and IOAPIC and the PIT, as the kernel's
        own structs (hex), so they go back exactly as they came."""
        state = {"clock": self.get_clock()}
        if self.has_irqchip:
            state["irqchip"] = [self.get_irqchip(i).hex() for i in range(3)]
            state["pit2"] = self.get_pit2().hex()
        return state

    def load_state_irqchip(self, state: dict) -> None:
        """The irqchips and PIT from ``save_state()`` (before the vCPUs' LAPICs)."""
        if self.has_irqchip:
            for blob in state["irqchip"]:
                self.set_irqchip(bytes.fromhex(blob))
            self.set_pit2(bytes.fromhex(state["pit2"]))

    def load_state_clock(self, state: dict) -> None:
        """The kvmclock from ``save_state()`` (last, once the vCPUs are in place)."""
        self.set_clock(state["clock"])

    # --- vCPUs -----------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        fd = ioctl(self.fd, lib.KVM_CREATE_VCPU, vcpu_id)
        try:
            vcpu = Vcpu(self, vcpu_id, fd, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu
