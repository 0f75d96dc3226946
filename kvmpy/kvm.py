"""The thin layer over /dev/kvm: one method per ioctl (Documentation/virt/kvm/api.rst).

Three objects, three kinds of file descriptor, as in the kernel API:

* ``Kvm``  - the system fd from opening /dev/kvm: capabilities, supported CPUID/MSRs.
* ``Vm``   - a VM fd from KVM_CREATE_VM: memory slots, irqchip, PIT, irq lines, eventfds.
* ``Vcpu`` - a vCPU fd from KVM_CREATE_VCPU, plus its mmap'ed ``kvm_run`` page.

Each is a context manager; ``close()`` is idempotent and closes children first.
Every ioctl goes through ``_ioctl``, which turns -errno into ``KvmError`` naming the
ioctl. Request numbers and struct layouts come from the compiled extension.
"""
from __future__ import annotations

import errno
import mmap
import os
import signal
import threading

from . import exits
from .abi import Cap, GuestDebug, IoeventfdFlag, IrqfdFlag, MemFlag, ffi, lib
from .errors import KvmError, KvmUnavailable
from .memory import GuestMemory, MemoryRegion
from .x86.cpuid import CpuidEntry
from .x86.regs import REGS_FIELDS, SEGMENT_FIELDS, DTable, Regs, Segment, Sregs

MAX_CPUID_ENTRIES = 256
_KVM_RUN = lib.KVM_RUN

_REQUEST_NAMES = {getattr(lib, n): n for n in dir(lib) if n.startswith("KVM_") and n[4:8] in
                  ("GET_", "SET_", "CREA", "RUN", "CHEC", "IRQ_", "IOEV", "IRQF", "INTE", "NMI")}


def _ioctl(fd: int, request: int, arg=None, hint: str = "") -> int:
    """ioctl(fd, request, arg); ``arg`` is a cdata pointer, an int or None."""
    if arg is None or isinstance(arg, int):
        r = lib.kvmpy_ioctl_int(fd, request, arg or 0)
    else:
        r = lib.kvmpy_ioctl_ptr(fd, request, arg)
    if r < 0:
        raise KvmError(-r, _REQUEST_NAMES.get(request, hex(request)), hint)
    return r


def _cdata_bytes(p) -> bytes:
    return bytes(ffi.buffer(p))


def _cdata_from(ctype: str, data: bytes):
    p = ffi.new(ctype)
    if len(data) != ffi.sizeof(p[0]):
        raise ValueError(f"{ctype}: expected {ffi.sizeof(p[0])} bytes, got {len(data)}")
    ffi.buffer(p)[:] = data
    return p


class _Fd:
    """An owned file descriptor with idempotent close and ``with`` support."""

    fd: int = -1

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Kvm(_Fd):
    """The KVM subsystem (/dev/kvm)."""

    def __init__(self, path: str = "/dev/kvm"):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"'{path}' not found. Load the KVM module (modprobe kvm_intel or kvm_amd), check that "
                "the kernel has CONFIG_KVM, and inside a VM enable nested virtualisation.") from None
        except PermissionError:
            raise KvmUnavailable(
                f"permission denied opening '{path}'. Add your user to the 'kvm' group "
                "(usermod -aG kvm $USER, then log in again) or run as root.") from None
        except OSError as e:
            if e.errno in (errno.ENXIO, errno.ENODEV):
                raise KvmUnavailable(
                    f"'{path}' exists but no KVM module serves it: load kvm_intel or kvm_amd "
                    "(modprobe), and check that virtualisation is enabled in the firmware.") from None
            raise KvmUnavailable(f"cannot open '{path}': {e.strerror}") from None
        version = self.api_version()
        if version != lib.KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(f"KVM API version {version}, kvmpy needs {lib.KVM_API_VERSION}")

    def api_version(self) -> int:
        return _ioctl(self.fd, lib.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if unsupported, else a positive (often meaningful) value."""
        return _ioctl(self.fd, lib.KVM_CHECK_EXTENSION, int(cap))

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[CpuidEntry]:
        return _get_cpuid(self.fd, lib.KVM_GET_SUPPORTED_CPUID)

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs a VMM should save and restore."""
        return self._msr_list(lib.KVM_GET_MSR_INDEX_LIST)

    def feature_msr_index_list(self) -> list[int]:
        return self._msr_list(lib.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def _msr_list(self, request: int) -> list[int]:
        n = 64
        while True:
            p = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            try:
                _ioctl(self.fd, request, p)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 65536:
                    n = max(p.nmsrs, n * 2)
                    continue
                raise
            return list(p.indices[0:p.nmsrs])

    def create_vm(self) -> "Vm":
        return Vm(self, _ioctl(self.fd, lib.KVM_CREATE_VM, 0))


def _get_cpuid(fd: int, request: int) -> list[CpuidEntry]:
    p = ffi.new("struct kvm_cpuid2 *", {"nent": MAX_CPUID_ENTRIES, "entries": MAX_CPUID_ENTRIES})
    _ioctl(fd, request, p)
    return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in p.entries[0:p.nent]]


class Vm(_Fd):
    """One virtual machine: guest memory slots, interrupt controllers and vCPUs."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self.memory = GuestMemory()
        self.vcpus: list[Vcpu] = []
        self._next_slot = 0

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        super().close()
        self.memory.close()     # unmap only after KVM no longer refers to it

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, lib.KVM_CHECK_EXTENSION, int(cap))

    # --- memory -------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, userspace_addr: int,
                               flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION; ``size`` 0 deletes the slot."""
        r = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa,
            "memory_size": size, "userspace_addr": userspace_addr})
        _ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, r)

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
        """KVM_GET_DIRTY_LOG: one bit per page of the slot, set if written since the last call."""
        region = next(r for r in self.memory.regions if r.slot == slot)
        npages = region.size // mmap.PAGESIZE
        bitmap = ffi.new("uint64_t[]", (npages + 63) // 64)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": bitmap})
        _ioctl(self.fd, lib.KVM_GET_DIRTY_LOG, log)
        return bytes(ffi.buffer(bitmap))[:(npages + 7) // 8]

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, lib.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", addr))

    # --- interrupts ------------------------------------------------------------------
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and per-vCPU local APICs."""
        _ioctl(self.fd, lib.KVM_CREATE_IRQCHIP)

    def get_irqchip(self, chip_id: int) -> bytes:
        p = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        _ioctl(self.fd, lib.KVM_GET_IRQCHIP, p)
        return _cdata_bytes(p)

    def set_irqchip(self, data: bytes) -> None:
        _ioctl(self.fd, lib.KVM_SET_IRQCHIP, _cdata_from("struct kvm_irqchip *", data))

    def create_pit2(self, flags: int = 0) -> None:
        _ioctl(self.fd, lib.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def get_pit2(self) -> bytes:
        p = ffi.new("struct kvm_pit_state2 *")
        _ioctl(self.fd, lib.KVM_GET_PIT2, p)
        return _cdata_bytes(p)

    def set_pit2(self, data: bytes) -> None:
        _ioctl(self.fd, lib.KVM_SET_PIT2, _cdata_from("struct kvm_pit_state2 *", data))

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: drive GSI ``irq`` to ``level`` (needs the in-kernel irqchip)."""
        _ioctl(self.fd, lib.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level}))

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write to ``addr`` signals eventfd ``fd`` without exiting."""
        flags = ((IoeventfdFlag.DATAMATCH if datamatch is not None else 0)
                 | (IoeventfdFlag.PIO if pio else 0) | (IoeventfdFlag.DEASSIGN if deassign else 0))
        p = ffi.new("struct kvm_ioeventfd *", {"datamatch": datamatch or 0, "addr": addr,
                                               "len": length, "fd": fd, "flags": int(flags)})
        _ioctl(self.fd, lib.KVM_IOEVENTFD, p)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False, resamplefd: int | None = None) -> None:
        """KVM_IRQFD: a write to eventfd ``fd`` raises GSI ``gsi`` in the in-kernel irqchip."""
        flags = (IrqfdFlag.DEASSIGN if deassign else 0) | (IrqfdFlag.RESAMPLE if resamplefd is not None else 0)
        p = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": int(flags),
                                           "resamplefd": resamplefd or 0})
        _ioctl(self.fd, lib.KVM_IRQFD, p)

    # --- clock -----------------------------------------------------------------------
    def get_clock(self) -> int:
        """KVM_GET_CLOCK: the guest's kvmclock in nanoseconds."""
        p = ffi.new("struct kvm_clock_data *")
        _ioctl(self.fd, lib.KVM_GET_CLOCK, p)
        return p.clock

    def set_clock(self, ns: int) -> None:
        _ioctl(self.fd, lib.KVM_SET_CLOCK, ffi.new("struct kvm_clock_data *", {"clock": ns}))

    # --- vCPUs -----------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        fd = _ioctl(self.fd, lib.KVM_CREATE_VCPU, vcpu_id)
        try:
            vcpu = Vcpu(self, vcpu_id, fd, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu


class Vcpu(_Fd):
    """One virtual CPU: its fd and the shared ``kvm_run`` page."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int, run_size: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._run_mm = mmap.mmap(fd, run_size, flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buf = ffi.from_buffer(self._run_mm)
        self.run_page = ffi.cast("struct kvm_run *", self._run_buf)
        self.run_size = run_size
        self.thread_id: int | None = None     # the thread running this vCPU, see set_thread()
        self._thread_lock = threading.Lock()

    def close(self) -> None:
        with self._thread_lock:             # kick() writes through run_page under this lock
            if self.fd >= 0 and self.run_page is not None:
                self.run_page = None
                ffi.release(self._run_buf)
                self._run_mm.close()
        super().close()

    # --- running ---------------------------------------------------------------------
    def run(self) -> exits.Exit:
        """KVM_RUN until the next exit; returns the decoded exit."""
        return self.exit_value(self.enter())

    def enter(self) -> int:
        """KVM_RUN alone: 0, or -errno (-EINTR after a kick). Decode with exit_value()."""
        return lib.kvmpy_ioctl_int(self.fd, _KVM_RUN, 0)

    def exit_value(self, rc: int = 0) -> exits.Exit:
        """The exit KVM_RUN (which returned ``rc``) left in the kvm_run page, decoded."""
        if rc < 0:
            if rc == -errno.EINTR or rc == -errno.EAGAIN:
                return exits.Interrupted()
            raise KvmError(-rc, "KVM_RUN")
        return exits.decode(self.run_page, self.run_size, self._run_mm)

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_page.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.run_page.immediate_exit = 1 if value else 0

    def set_thread(self, ident: int | None) -> None:
        """Record (or clear, with None) the thread that runs this vCPU, for kick()."""
        with self._thread_lock:
            self.thread_id = ident

    def kick(self) -> None:
        """Make a running (or about to run) KVM_RUN return: immediate_exit plus a signal.

        The signal goes out under the same lock the vCPU thread takes to clear its
        ident on the way out, so it never targets a thread that has already exited
        (pthread_kill on a finished, detached thread is undefined: it can crash).
        """
        with self._thread_lock:
            if self.run_page is None:
                return                      # closed: nothing runs any more
            self.run_page.immediate_exit = 1
            tid = self.thread_id
            if tid is not None and tid != threading.get_ident():
                try:
                    signal.pthread_kill(tid, lib.kvmpy_kick_signal())
                except ProcessLookupError:
                    pass

    def complete_io_in(self, exit: exits.IoIn, data: bytes) -> None:
        """Supply the bytes an IN/INS exit asked for; KVM hands them to the guest on re-entry."""
        n = exit.size * exit.count
        if len(data) != n or exit.data_offset + n > self.run_size:
            raise ValueError(f"IoIn needs {n} bytes at offset {exit.data_offset}, got {len(data)}")
        ffi.buffer(ffi.cast("char *", self.run_page) + exit.data_offset, n)[:] = data

    def io_data(self, exit: exits.IoIn | exits.IoOut) -> bytes:
        """The bytes of an I/O exit as they are in the kvm_run page now (after complete_io_in)."""
        off = exit.data_offset if isinstance(exit, exits.IoIn) else None
        if off is None:
            return exit.data
        n = exit.size * exit.count
        return self._run_mm[off:off + n] if off + n <= self.run_size else b""

    def mmio_data(self, size: int) -> bytes:
        """The MMIO data bytes in the kvm_run page (what a completed read returned)."""
        return bytes(self.run_page.mmio.data[0:min(size, 8)])

    def complete_mmio_read(self, data: bytes) -> None:
        """Supply the bytes an MMIO read exit asked for."""
        ffi.memmove(self.run_page.mmio.data, data[:8], min(len(data), 8))

    # --- registers -------------------------------------------------------------------
    def get_regs(self) -> Regs:
        p = ffi.new("struct kvm_regs *")
        _ioctl(self.fd, lib.KVM_GET_REGS, p)
        return Regs(*(getattr(p, n) for n in REGS_FIELDS))

    def set_regs(self, regs: Regs) -> None:
        p = ffi.new("struct kvm_regs *", {n: getattr(regs, n) for n in REGS_FIELDS})
        _ioctl(self.fd, lib.KVM_SET_REGS, p)

    def get_sregs(self) -> Sregs:
        p = ffi.new("struct kvm_sregs *")
        _ioctl(self.fd, lib.KVM_GET_SREGS, p)
        s = Sregs(**{n: Segment(*(getattr(getattr(p, n), f) for f in SEGMENT_FIELDS)) for n in Sregs.SEGMENTS})
        s.gdt, s.idt = DTable(p.gdt.base, p.gdt.limit), DTable(p.idt.base, p.idt.limit)
        for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            setattr(s, n, getattr(p, n))
        s.interrupt_bitmap = tuple(p.interrupt_bitmap)
        return s

    def set_sregs(self, s: Sregs) -> None:
        p = ffi.new("struct kvm_sregs *")
        for n in Sregs.SEGMENTS:
            seg, src = getattr(p, n), getattr(s, n)
            for f in SEGMENT_FIELDS:
                setattr(seg, f, getattr(src, f))
        p.gdt.base, p.gdt.limit = s.gdt.base, s.gdt.limit
        p.idt.base, p.idt.limit = s.idt.base, s.idt.limit
        for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            setattr(p, n, getattr(s, n))
        for i, v in enumerate(s.interrupt_bitmap[:len(p.interrupt_bitmap)]):
            p.interrupt_bitmap[i] = v
        _ioctl(self.fd, lib.KVM_SET_SREGS, p)

    def get_fpu(self) -> bytes:
        return self._get_blob("struct kvm_fpu *", lib.KVM_GET_FPU)

    def set_fpu(self, data: bytes) -> None:
        self._set_blob("struct kvm_fpu *", lib.KVM_SET_FPU, data)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: values of the given MSRs (those KVM does not know are left out)."""
        p = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, idx in enumerate(indices):
            p.entries[i].index = idx
        n = _ioctl(self.fd, lib.KVM_GET_MSRS, p)
        return {p.entries[i].index: p.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were set (KVM stops at the first it rejects)."""
        p = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        for i, (idx, val) in enumerate(values.items()):
            p.entries[i].index, p.entries[i].data = idx, val
        return _ioctl(self.fd, lib.KVM_SET_MSRS, p)

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        p = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, e in enumerate(entries):
            d = p.entries[i]
            d.function, d.index, d.flags = e.function, e.index, e.flags
            d.eax, d.ebx, d.ecx, d.edx = e.eax, e.ebx, e.ecx, e.edx
        _ioctl(self.fd, lib.KVM_SET_CPUID2, p)

    def get_cpuid2(self) -> list[CpuidEntry]:
        return _get_cpuid(self.fd, lib.KVM_GET_CPUID2)

    def get_lapic(self) -> bytes:
        return self._get_blob("struct kvm_lapic_state *", lib.KVM_GET_LAPIC)

    def set_lapic(self, data: bytes) -> None:
        self._set_blob("struct kvm_lapic_state *", lib.KVM_SET_LAPIC, data)

    def get_mp_state(self) -> int:
        p = ffi.new("struct kvm_mp_state *")
        _ioctl(self.fd, lib.KVM_GET_MP_STATE, p)
        return p.mp_state

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, lib.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": int(state)}))

    def get_vcpu_events(self) -> bytes:
        return self._get_blob("struct kvm_vcpu_events *", lib.KVM_GET_VCPU_EVENTS)

    def set_vcpu_events(self, data: bytes) -> None:
        self._set_blob("struct kvm_vcpu_events *", lib.KVM_SET_VCPU_EVENTS, data)

    def get_xsave(self) -> bytes:
        return self._get_blob("struct kvm_xsave *", lib.KVM_GET_XSAVE)

    def set_xsave(self, data: bytes) -> None:
        self._set_blob("struct kvm_xsave *", lib.KVM_SET_XSAVE, data)

    def get_xcrs(self) -> bytes:
        return self._get_blob("struct kvm_xcrs *", lib.KVM_GET_XCRS)

    def set_xcrs(self, data: bytes) -> None:
        self._set_blob("struct kvm_xcrs *", lib.KVM_SET_XCRS, data)

    def get_debugregs(self) -> dict[str, object]:
        p = ffi.new("struct kvm_debugregs *")
        _ioctl(self.fd, lib.KVM_GET_DEBUGREGS, p)
        return {"db": list(p.db), "dr6": p.dr6, "dr7": p.dr7, "flags": p.flags}

    def set_debugregs(self, db: list[int], dr6: int, dr7: int) -> None:
        p = ffi.new("struct kvm_debugregs *", {"db": list(db), "dr6": dr6, "dr7": dr7})
        _ioctl(self.fd, lib.KVM_SET_DEBUGREGS, p)

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        """KVM_SET_GUEST_DEBUG: ``control`` from GuestDebug (ENABLE|SINGLESTEP|USE_HW_BP)."""
        p = ffi.new("struct kvm_guest_debug *", {"control": int(control)})
        for i, v in enumerate((debugreg or [])[:8]):
            p.arch.debugreg[i] = v
        _ioctl(self.fd, lib.KVM_SET_GUEST_DEBUG, p)

    def single_step(self, on: bool = True) -> None:
        self.set_guest_debug(GuestDebug.ENABLE | GuestDebug.SINGLESTEP if on else 0)

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: queue an external interrupt (only without the in-kernel irqchip)."""
        _ioctl(self.fd, lib.KVM_INTERRUPT, ffi.new("uint32_t *", vector))

    def _get_blob(self, ctype: str, request: int) -> bytes:
        p = ffi.new(ctype)
        _ioctl(self.fd, request, p)
        return _cdata_bytes(p)

    def _set_blob(self, ctype: str, request: int, data: bytes) -> None:
        _ioctl(self.fd, request, _cdata_from(ctype, data))


__all__ = ["Kvm", "Vm", "Vcpu", "Cap"]
