"""``Vcpu``: a vCPU fd from KVM_CREATE_VCPU and its mmap'ed ``kvm_run`` page (api.rst,
"vCPU ioctls"): KVM_RUN, the exit it leaves, registers and every other per-vCPU state.
"""
from __future__ import annotations

import errno
import mmap
import signal
import threading
from typing import TYPE_CHECKING

from ..errors import KvmError
from . import exits
from .abi import GuestDebug, ffi, lib
from .fd import Fd, cdata_bytes, cdata_from, get_cpuid, ioctl
from .regs import MCG_CAP_BANKS_MASK, MSR_IA32_MC0_CTL, MSR_IA32_MCG_CAP, MSR_IA32_TSC_DEADLINE, REGS_FIELDS, SEGMENT_FIELDS, CpuidEntry, DTable, Regs, Segment, Sregs

if TYPE_CHECKING:
    from .vm import Vm

_KVM_RUN = lib.KVM_RUN


class Vcpu(Fd):
    """One virtual CPU: its fd and the shared ``kvm_run`` page."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int, run_size: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        #: the kvm_run page as a writable buffer: what decode() and a run loop's fast path read
        self.run_buffer = mmap.mmap(fd, run_size, flags=mmap.MAP_SHARED,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buf = ffi.from_buffer(self.run_buffer)
        self.run_page = ffi.cast("struct kvm_run *", self._run_buf)
        self.run_size = run_size
        self.thread_id: int | None = None     # the thread running this vCPU, see set_thread()
        self.mcg_cap = 0                      # IA32_MCG_CAP given to setup_mce(); 0: no machine-check banks
        self._thread_lock = threading.Lock()

    def close(self) -> None:
        with self._thread_lock:             # kick() writes through run_page under this lock
            if self.fd >= 0 and self.run_page is not None:
                self.run_page = None
                ffi.release(self._run_buf)
                self.run_buffer.close()
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
        return exits.decode(self.run_page, self.run_size, self.run_buffer)

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
        return self.run_buffer[off:off + n] if off + n <= self.run_size else b""

    def mmio_data(self, size: int) -> bytes:
        """The MMIO data bytes in the kvm_run page (what a completed read returned)."""
        return bytes(self.run_page.mmio.data[0:min(size, 8)])

    def complete_mmio_read(self, data: bytes) -> None:
        """Supply the bytes an MMIO read exit asked for."""
        ffi.memmove(self.run_page.mmio.data, data[:8], min(len(data), 8))

    # --- registers -------------------------------------------------------------------
    def get_regs(self) -> Regs:
        p = ffi.new("struct kvm_regs *")
        ioctl(self.fd, lib.KVM_GET_REGS, p)
        return Regs(*(getattr(p, n) for n in REGS_FIELDS))

    def set_regs(self, regs: Regs) -> None:
        p = ffi.new("struct kvm_regs *", {n: getattr(regs, n) for n in REGS_FIELDS})
        ioctl(self.fd, lib.KVM_SET_REGS, p)

    def get_sregs(self) -> Sregs:
        p = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, lib.KVM_GET_SREGS, p)
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
        ioctl(self.fd, lib.KVM_SET_SREGS, p)

    def get_fpu(self) -> bytes:
        return self._get_blob("struct kvm_fpu *", lib.KVM_GET_FPU)

    def set_fpu(self, data: bytes) -> None:
        self._set_blob("struct kvm_fpu *", lib.KVM_SET_FPU, data)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: values of the given MSRs (those KVM does not know are left out)."""
        p = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, idx in enumerate(indices):
            p.entries[i].index = idx
        n = ioctl(self.fd, lib.KVM_GET_MSRS, p)
        return {p.entries[i].index: p.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were set (KVM stops at the first it rejects)."""
        p = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        for i, (idx, val) in enumerate(values.items()):
            p.entries[i].index, p.entries[i].data = idx, val
        return ioctl(self.fd, lib.KVM_SET_MSRS, p)

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        p = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, e in enumerate(entries):
            d = p.entries[i]
            d.function, d.index, d.flags = e.function, e.index, e.flags
            d.eax, d.ebx, d.ecx, d.edx = e.eax, e.ebx, e.ecx, e.edx
        ioctl(self.fd, lib.KVM_SET_CPUID2, p)

    def get_cpuid2(self) -> list[CpuidEntry]:
        return get_cpuid(self.fd, lib.KVM_GET_CPUID2)

    def setup_mce(self, mcg_cap: int) -> None:
        """KVM_X86_SETUP_MCE: emulate machine-check banks; the guest reads ``mcg_cap`` from
        IA32_MCG_CAP (bits 7:0 the bank count, the rest feature bits KVM must support, see
        ``Kvm.mce_cap_supported``). KVM sets IA32_MCG_CTL and every bank's CTL to all ones.

        ``self.mcg_cap`` is what the vCPU got, read back: kvm_amd drops MCG_SER_P (an Intel
        feature) although KVM_X86_GET_MCE_CAP_SUPPORTED reports it on every host."""
        ioctl(self.fd, lib.KVM_X86_SETUP_MCE, ffi.new("__u64 *", mcg_cap))
        self.mcg_cap = self.get_msrs([MSR_IA32_MCG_CAP]).get(MSR_IA32_MCG_CAP, mcg_cap)

    def mce_bank_msrs(self) -> list[int]:
        """The MSRs of the banks setup_mce() asked for: CTL, STATUS, ADDR, MISC of each."""
        return [MSR_IA32_MC0_CTL + i for i in range(4 * (self.mcg_cap & MCG_CAP_BANKS_MASK))]

    def get_lapic(self) -> bytes:
        return self._get_blob("struct kvm_lapic_state *", lib.KVM_GET_LAPIC)

    def set_lapic(self, data: bytes) -> None:
        self._set_blob("struct kvm_lapic_state *", lib.KVM_SET_LAPIC, data)

    def get_mp_state(self) -> int:
        p = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, lib.KVM_GET_MP_STATE, p)
        return p.mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, lib.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": int(state)}))

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
        ioctl(self.fd, lib.KVM_GET_DEBUGREGS, p)
        return {"db": list(p.db), "dr6": p.dr6, "dr7": p.dr7, "flags": p.flags}

    def set_debugregs(self, db: list[int], dr6: int, dr7: int) -> None:
        p = ffi.new("struct kvm_debugregs *", {"db": list(db), "dr6": dr6, "dr7": dr7})
        ioctl(self.fd, lib.KVM_SET_DEBUGREGS, p)

    # --- the whole state ----------------------------------------------------------------
    def save_state(self, msrs: list[int]) -> dict:
        """Everything KVM holds for this vCPU, as plain data: registers, FPU, XSAVE, XCRs,
        the MSRs listed in ``msrs`` and those of its machine-check banks, mp_state, pending events, debug registers and, with
        the in-kernel irqchip, the LAPIC. Blobs are the kernel's structs in hex."""
        state = {"regs": self.get_regs().to_dict(), "sregs": self.get_sregs().to_dict(),
                 "fpu": self.get_fpu().hex(), "xsave": self.get_xsave().hex(), "xcrs": self.get_xcrs().hex(),
                 "msrs": {str(k): v for k, v in self.get_msrs([*msrs, *self.mce_bank_msrs()]).items()},
                 "mp_state": self.get_mp_state(),
                 "events": self.get_vcpu_events().hex(), "debugregs": self.get_debugregs()}
        if self.vm.has_irqchip:
            state["lapic"] = self.get_lapic().hex()
        return state

    def load_state(self, state: dict) -> None:
        """Put back what ``save_state()`` returned, in the order KVM needs: the LAPIC after
        the MSRs, and the TSC deadline again after the LAPIC (KVM ignores it while the LAPIC
        timer is not in deadline mode); events and mp_state last. Hostile values raise
        (KeyError, TypeError, ValueError, KvmError); ValueError if KVM refuses an MSR."""
        self.set_sregs(Sregs.from_dict(state["sregs"]))
        self.set_regs(Regs(**state["regs"]))
        self.set_fpu(bytes.fromhex(state["fpu"]))
        self.set_xsave(bytes.fromhex(state["xsave"]))
        self.set_xcrs(bytes.fromhex(state["xcrs"]))
        msrs = {int(k): v for k, v in state["msrs"].items()}
        if self.set_msrs(msrs) != len(msrs):
            self._set_msrs_each(msrs)
        if "lapic" in state:
            self.set_lapic(bytes.fromhex(state["lapic"]))
            if MSR_IA32_TSC_DEADLINE in msrs:
                self.set_msrs({MSR_IA32_TSC_DEADLINE: msrs[MSR_IA32_TSC_DEADLINE]})
        self.set_vcpu_events(bytes.fromhex(state["events"]))
        self.set_mp_state(state["mp_state"])
        dr = state["debugregs"]
        self.set_debugregs(dr["db"], dr["dr6"], dr["dr7"])

    def _set_msrs_each(self, msrs: dict[int, int]) -> None:
        """KVM_SET_MSRS stops at the first MSR it refuses. Set them one by one instead: a
        refused MSR that already holds the saved value loses nothing (without the in-kernel
        irqchip KVM refuses e.g. MSR_KVM_POLL_CONTROL, which it reads back as 1); any
        other refusal is a ValueError naming the MSR."""
        current = self.get_msrs(list(msrs))
        for index, value in msrs.items():
            if self.set_msrs({index: value}) != 1 and current.get(index) != value:
                raise ValueError(f"KVM refused the saved MSR {index:#x} = {value:#x}")

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        """KVM_SET_GUEST_DEBUG: ``control`` from GuestDebug (ENABLE|SINGLESTEP|USE_HW_BP)."""
        p = ffi.new("struct kvm_guest_debug *", {"control": int(control)})
        for i, v in enumerate((debugreg or [])[:8]):
            p.arch.debugreg[i] = v
        ioctl(self.fd, lib.KVM_SET_GUEST_DEBUG, p)

    def single_step(self, on: bool = True) -> None:
        self.set_guest_debug(GuestDebug.ENABLE | GuestDebug.SINGLESTEP if on else 0)

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: queue an external interrupt (only without the in-kernel irqchip)."""
        ioctl(self.fd, lib.KVM_INTERRUPT, ffi.new("uint32_t *", vector))

    def _get_blob(self, ctype: str, request: int) -> bytes:
        p = ffi.new(ctype)
        ioctl(self.fd, request, p)
        return cdata_bytes(p)

    def _set_blob(self, ctype: str, request: int, data: bytes) -> None:
        ioctl(self.fd, request, cdata_from(ctype, data))

