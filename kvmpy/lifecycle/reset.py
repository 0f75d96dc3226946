"""Reset in place: a machine back to an in-memory checkpoint, without building a new VM.

``Machine.checkpoint()`` takes a ``Checkpoint`` of a stopped machine (``run()`` has
returned); ``Machine.reset()`` puts the machine back to it, as often as wanted:

    m.load(image, user=True)
    m.run()                         # the guest stops where cases should start
    m.checkpoint()
    for case in cases:
        m.memory.write(INPUT, case)
        m.run()                     # the case
        m.reset()                   # back to the checkpoint: RAM, vCPUs, devices, disks

What a reset puts back, and how (docs/reset.md has the measurements):

* **RAM**: a copy of every region, taken at checkpoint time. KVM's dirty log
  (``KVM_MEM_LOG_DIRTY_PAGES``, turned on by the checkpoint) says which pages the
  vCPUs wrote, the VMM's own bitmap (``MemoryRegion.dirty``: loaders, devices, host
  writes) which pages kvmpy wrote; csrc/reset.c copies just those pages back.
  ``copy_pages_model`` is the Python model of that copy.
* **vCPUs and the VM**: every ``KVM_SET_*`` that ``vmm.state.apply`` would make (the
  irqchips and PIT; each vCPU's sregs, regs, XSAVE (which holds the FPU), XCRs, MSRs,
  LAPIC, TSC deadline, events, mp_state, debug registers; the kvmclock), with their
  argument structs filled once at checkpoint time and issued by C in one call.
* **devices**: each stateful slot's ``save_state()`` dict, taken once and handed to its
  ``load_state()`` on every reset (no JSON, no hex parsing of RAM). Devices added by
  other parts of kvmpy are covered as long as their slot has ``saved_as``.
* **disks**: a writable disk's I/O goes to an overlay (a memfd holding a copy of the
  disk) while the checkpoint is held; C (and the Python model) mark each 4 KiB block a
  write touches, and a reset copies those blocks back from the disk's file, which
  nothing writes meanwhile. Read-only disks need no overlay.

While a checkpoint is held the machine cannot be snapshotted, cloned or migrated (the
disks' files are not the machine's disks, and the dirty bitmaps belong to the reset);
``Machine.drop_checkpoint()`` resets once more and sends the disks back to their files.
"""
from __future__ import annotations

import functools
import mmap
import os
import time
import weakref

from ..errors import KvmError, KvmpyError
from ..kvm.abi import ffi, lib
from ..kvm.fd import ioctl
from ..kvm.memory import PAGE_SIZE

MSR_IA32_TSC_DEADLINE = 0x6E0
BLOCK = 4096                    # a disk overlay's unit of copying back
PARTS = ("pages", "vcpu", "irqchip", "devices", "disks")
SYNC_ALL = 0x7                  # KVM_SYNC_X86_REGS | _SREGS | _EVENTS


class ResetError(KvmpyError):
    """A checkpoint cannot be taken, or a reset failed (the machine is then unusable)."""


def hot_mask_model(log: bytes, prev: bytearray, hot: bytearray, pages: int, hot_count: int,
                   hot_max: int) -> tuple[bytes, int, int]:
    """Python model of ``kvmpy_reset_hot_mask`` (bit p % 8 of byte p // 8 is page p): a page in
    ``log`` and ``prev`` (dirty at two resets in a row), not in ``hot``, joins ``hot`` while
    ``hot_count < hot_max``, lowest first; ``prev`` becomes ``log``. Returns (the mask of pages
    to protect again: ``log`` but the hot ones, the new hot_count, the pages made hot)."""
    mask, made = bytearray(len(log)), 0
    for p in range(len(log) * 8):
        byte, bit = p >> 3, 1 << (p & 7)
        now = p < pages and log[byte] & bit
        if now and prev[byte] & bit and not hot[byte] & bit and hot_count < hot_max:
            hot[byte] |= bit
            hot_count, made = hot_count + 1, made + 1
        if now and not hot[byte] & bit:
            mask[byte] |= bit
        prev[byte] = prev[byte] | bit if now else prev[byte] & ~bit
    return bytes(mask), hot_count, made


def copy_pages_model(ram, saved, pages: int, log: bytes | None, vmm: bytearray | None) -> int:
    """Python model of ``kvmpy_reset_copy_pages``: copy page p of ``saved`` over page p of
    ``ram`` for every p < ``pages`` set in ``log`` or ``vmm`` (bit p % 8 of byte p // 8);
    ``vmm`` is cleared (taken), ``log`` only read. Returns the number of pages copied."""
    copied = 0
    for p in range(pages):
        bit = 1 << (p & 7)
        in_log = log is not None and log[p >> 3] & bit
        in_vmm = vmm is not None and vmm[p >> 3] & bit
        if in_log or in_vmm:
            ram[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = saved[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
            copied += 1
    if vmm is not None:
        vmm[:] = bytes(len(vmm))
    return copied


def _anon(size: int) -> mmap.mmap:
    return mmap.mmap(-1, max(size, 8), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _ptr(buf, ctype: str = "uint8_t *"):
    """A C pointer into ``buf`` (an mmap kept open by its owner for as long as C uses it)."""
    b = ffi.from_buffer(buf)
    p = ffi.cast(ctype, b)
    ffi.release(b)
    return p


class _Region:
    """One RAM region's checkpoint copy and the C description of it."""

    def __init__(self, region, hot_pages: int = 0):
        self.region = region
        self.pages = region.size // PAGE_SIZE
        self.saved = _anon(region.size)
        self.saved[:region.size] = region.mm[:region.size]
        words = (self.pages + 63) // 64
        self.log = ffi.new("uint64_t[]", words)
        # hot pages (manual protection only): the last reset's log, the pages left writable, the mask
        self.hot = [ffi.new("uint64_t[]", words) for _ in range(3)] if hot_pages else [ffi.NULL] * 3
        self.c = ffi.new("struct kvmpy_reset_region *", {
            "slot": region.slot, "pages": self.pages, "ram": _ptr(region.mm), "saved": _ptr(self.saved),
            "vmm_dirty": ffi.cast("uint64_t *", region.dirty_address) if region.dirty_address else ffi.NULL,
            "log": self.log, "prev": self.hot[0], "hot": self.hot[1], "mask": self.hot[2],
            "hot_max": hot_pages})

    def close(self) -> None:
        self.saved.close()


class _Overlay:
    """A writable disk's overlay while the checkpoint is held: a memfd copy of the disk,
    the bitmap of the 4 KiB blocks written since the last reset, and the file to copy from."""

    def __init__(self, backend):
        blk = getattr(backend, "disk", backend)         # NativeVirtioBlk wraps a VirtioBlk
        self.backend, self.size = backend, blk.file_size
        self.file = os.dup(blk.fd)                      # read only from now on (pread)
        self.fd = -1
        try:
            self.fd = os.memfd_create("kvmpy-reset-overlay", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.size)
            self._copy_all()
        except OSError as e:
            self.close()
            raise ResetError(f"disk {blk.path}: cannot make its reset overlay: {e.strerror or e}") from None
        blocks = -(-self.size // BLOCK)
        self.written = _anon(-(-blocks // 64) * 8)
        self.c_written = _ptr(self.written, "uint64_t *")
        self.buf = ffi.new("uint8_t[]", BLOCK)
        backend.use_overlay(self.fd, self.written)

    def _copy_all(self) -> None:
        """The disk's bytes into the memfd, skipping zero chunks (the memfd stays sparse)."""
        chunk, pos = 1 << 20, 0
        while pos < self.size:
            data = os.pread(self.file, min(chunk, self.size - pos), pos)
            if not data:
                raise OSError(0, "the disk is shorter than when it was opened")
            if data.count(0) != len(data):
                os.pwrite(self.fd, data, pos)
            pos += len(data)

    def reset(self) -> int:
        n = lib.kvmpy_reset_disk(self.file, self.fd, self.c_written, self.size, self.buf)
        if n < 0:
            raise ResetError(f"disk reset: {os.strerror(-n)}")
        return n

    def release(self) -> None:
        """I/O back to the disk's file."""
        self.backend.use_overlay(None)

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self.fd, self.file):
            if fd >= 0:
                os.close(fd)
        self.fd = self.file = -1
        if getattr(self, "written", None) is not None and not self.written.closed:
            self.written.close()


def _op(fd: int, request: int, arg, expect: int = 0) -> tuple:
    return (fd, request, arg, expect)


def _got(fd: int, get: int, set_: int, ctype: str) -> tuple:
    """A set op whose argument is what the matching get returns now."""
    p = ffi.new(ctype)
    ioctl(fd, get, p)
    return _op(fd, set_, p)


def _msr_ops(v, indices: list[int], irqchip: bool) -> list[tuple]:
    """KVM_SET_MSRS of every saved MSR KVM takes back (a refused one must already hold its
    value, as ``Vcpu.load_state`` allows), and after the LAPIC the TSC deadline again."""
    values = v.get_msrs(indices)
    keep = {}
    for index, value in values.items():
        if v.set_msrs({index: value}) == 1:
            keep[index] = value
        elif v.get_msrs([index]).get(index) != value:
            raise ResetError(f"vCPU {v.id}: KVM refuses MSR {index:#x} = {value:#x} back")
    p = ffi.new("struct kvm_msrs *", {"nmsrs": len(keep), "entries": len(keep)})
    for i, (index, value) in enumerate(keep.items()):
        p.entries[i].index, p.entries[i].data = index, value
    deadline = None
    if irqchip and MSR_IA32_TSC_DEADLINE in keep:
        d = ffi.new("struct kvm_msrs *", {"nmsrs": 1, "entries": 1})
        d.entries[0].index, d.entries[0].data = MSR_IA32_TSC_DEADLINE, keep[MSR_IA32_TSC_DEADLINE]
        deadline = _op(v.fd, lib.KVM_SET_MSRS, d, 1)
    return [_op(v.fd, lib.KVM_SET_MSRS, p, len(keep))], deadline


def _vcpu_ops(v, msrs: list[int], irqchip: bool, xsave: bool, sync: list | None) -> list[tuple]:
    """``Vcpu.load_state``'s order: sregs, regs, FPU (inside XSAVE when KVM has it), XSAVE,
    XCRs, MSRs, LAPIC, TSC deadline, events, mp_state, debug registers. With ``sync`` (a
    list), sregs, regs and events are not ops: their structs go into it, for
    KVM_CAP_SYNC_REGS after the ops (kvmpy_reset_sync_regs)."""
    fd = v.fd
    if sync is not None and v.get_mp_state() != lib.KVM_MP_STATE_RUNNABLE:
        sync = None     # KVM_RUN of a vCPU waiting for INIT/SIPI returns before it takes the regs
    first = [_got(fd, lib.KVM_GET_SREGS, lib.KVM_SET_SREGS, "struct kvm_sregs *"),
             _got(fd, lib.KVM_GET_REGS, lib.KVM_SET_REGS, "struct kvm_regs *")]
    events = _got(fd, lib.KVM_GET_VCPU_EVENTS, lib.KVM_SET_VCPU_EVENTS, "struct kvm_vcpu_events *")
    ops = [] if sync is not None else first
    if xsave:
        ops += [_got(fd, lib.KVM_GET_XSAVE, lib.KVM_SET_XSAVE, "struct kvm_xsave *"),
                _got(fd, lib.KVM_GET_XCRS, lib.KVM_SET_XCRS, "struct kvm_xcrs *")]
    else:
        ops.append(_got(fd, lib.KVM_GET_FPU, lib.KVM_SET_FPU, "struct kvm_fpu *"))
    msr_ops, deadline = _msr_ops(v, [*msrs, *v.mce_bank_msrs()], irqchip)
    ops += msr_ops
    if irqchip:
        ops.append(_got(fd, lib.KVM_GET_LAPIC, lib.KVM_SET_LAPIC, "struct kvm_lapic_state *"))
        if deadline is not None:
            ops.append(deadline)
    if sync is None:
        ops.append(events)
    else:
        sync.append((v, first[1][2], first[0][2], events[2]))
    ops.append(_got(fd, lib.KVM_GET_MP_STATE, lib.KVM_SET_MP_STATE, "struct kvm_mp_state *"))
    dr = _got(fd, lib.KVM_GET_DEBUGREGS, lib.KVM_SET_DEBUGREGS, "struct kvm_debugregs *")
    dr[2].flags = 0                     # KVM_SET_DEBUGREGS refuses any flag
    ops.append(dr)
    return ops


def _vm_ops(vm) -> tuple[list[tuple], list[tuple]]:
    """The irqchips and PIT (before the vCPUs), and the clock (after them)."""
    chips = []
    if vm.has_irqchip:
        for i in range(3):
            p = ffi.new("struct kvm_irqchip *", {"chip_id": i})
            ioctl(vm.fd, lib.KVM_GET_IRQCHIP, p)
            chips.append(_op(vm.fd, lib.KVM_SET_IRQCHIP, p))
        chips.append(_got(vm.fd, lib.KVM_GET_PIT2, lib.KVM_SET_PIT2, "struct kvm_pit_state2 *"))
    clock = ffi.new("struct kvm_clock_data *", {"clock": vm.get_clock()})
    return chips, [_op(vm.fd, lib.KVM_SET_CLOCK, clock)]


def _loader(slot):
    """A call that puts the slot's device back to its state now: the model's
    ``prepare_load`` if it has one (the C twins: their struct built once), else
    ``slot.load_state`` of the ``save_state()`` dict taken now."""
    saved = slot.save_state()
    prepare = getattr(slot.model, "prepare_load", None)
    if prepare is not None:
        return prepare(saved["state"] if slot.identity else saved)
    return functools.partial(slot.load_state, saved)


def _op_array(ops: list[tuple]):
    arr = ffi.new("struct kvmpy_reset_op[]", max(len(ops), 1))
    for i, (fd, request, arg, expect) in enumerate(ops):
        arr[i].fd, arr[i].request, arr[i].arg, arr[i].expect = fd, request, arg, expect
    return arr


class Checkpoint:
    """A stopped machine's whole state, kept ready to apply (see the module docstring)."""

    def __init__(self, m, manual_protect: bool = False, sync_regs: bool | None = None, hot_pages: int = 0):
        if m.running:
            raise ResetError("checkpoint() needs a stopped machine: call it after run() returned")
        if lib is None:
            raise ResetError("reset in place needs kvmpy's compiled extension (python csrc/build.py)")
        if not m.migration_lock.acquire(blocking=False):
            raise ResetError("a live migration of this machine is under way")
        self.lock = m.migration_lock                    # held while the checkpoint is
        # a proxy: the Machine holds its checkpoint, which must not keep the Machine alive
        self.m = weakref.proxy(m)
        self.regions, self.overlays, self.manual, self.sync = [], [], False, None
        self._keep: list = []
        try:
            self._take(m, manual_protect, sync_regs, hot_pages)
        except BaseException:
            self.close()
            raise

    def _take(self, m, manual_protect: bool, sync_regs: bool | None, hot_pages: int) -> None:
        m.console.drain()
        vm = m.vm
        # the dirty log: on, then emptied; the VMM's marks so far dropped; then the copy
        if manual_protect:
            try:
                vm.enable_manual_protect()
            except KvmError as e:
                raise ResetError(f"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: {e}") from None
            self.manual = True
        vm.log_dirty_pages(True)
        for r in m.memory.regions:
            vm.get_dirty_log(r.slot)    # emptied (and, with manual protection, cleared: Vm.get_dirty_log)
            r.take_dirty()
            self.regions.append(_Region(r, hot_pages if manual_protect else 0))
        msrs = sorted(m.supported_msrs() & set(m.kvm.msr_index_list()))
        xsave = bool(vm.check_extension(lib.KVM_CAP_XSAVE))
        chips, clock = _vm_ops(vm)
        if sync_regs is None:           # regs, sregs and events through the kvm_run page, if KVM can
            sync_regs = (vm.check_extension(lib.KVM_CAP_SYNC_REGS) & SYNC_ALL) == SYNC_ALL
        self.sync = [] if sync_regs else None
        vcpus = [op for v in m.vcpus for op in _vcpu_ops(v, msrs, vm.has_irqchip, xsave, self.sync)]
        self._keep = chips + vcpus + clock              # the cdata the op arrays point to
        self.ops = {"irqchip": (_op_array(chips), len(chips)), "vcpu": (_op_array(vcpus), len(vcpus)),
                    "clock": (_op_array(clock), len(clock))}
        self.op_names = {part: [_name(op[1]) for op in ops]
                         for part, ops in (("vcpu", vcpus), ("irqchip", chips), ("clock", clock))}
        self.devices = [_loader(s) for s in m.platform.slots if s.saved_as]
        # a rate-limited device's ring may hold a request its limit held back: the disk timer
        # serves it early in the next run (as Platform.load_state does); the others need nothing
        self.kicks = [s.pending for s in m.platform.slots if s.saved_as and s.pending is not None
                      and ((s.disk is not None and s.disk.limits) or getattr(s.backend, "limiter", None))]
        self.timer = m.platform.timer
        for s in m.platform.disks:
            if not s.disk.readonly:
                self.overlays.append(_Overlay(s.backend))
        self.times = ffi.new("struct kvmpy_reset_times *")
        # a reset now must change nothing: it proves every op is accepted before the first case
        self.reset()

    # --- the reset ----------------------------------------------------------------------
    def reset_pages(self, timed: bool = False) -> int:
        n = 0
        for reg in self.regions:
            r = lib.kvmpy_reset_region(self.m.vm.fd, reg.c, int(self.manual), self.times if timed else ffi.NULL)
            if r < 0:
                raise ResetError(f"RAM slot {reg.region.slot}: dirty log: {os.strerror(-r)}")
            n += r
        return n

    def reset_ops(self, part: str) -> None:
        arr, n = self.ops[part]
        r = lib.kvmpy_reset_ops(arr, n, ffi.NULL)
        if r < 0:
            name = self.op_names[part][-r - 1]
            raise ResetError(f"reset: {name} was refused (the machine is in an unknown state)")

    def reset_vcpus(self) -> None:
        """Every vCPU's ops, then (with KVM_CAP_SYNC_REGS) regs, sregs and events in one KVM_RUN."""
        self.reset_ops("vcpu")
        for v, regs, sregs, events in self.sync or ():
            r = lib.kvmpy_reset_sync_regs(v.fd, v.run_page, regs, sregs, events)
            if r < 0:
                raise ResetError(f"reset: vCPU {v.id}: regs through the kvm_run page: {os.strerror(-r)}")

    def reset_devices(self) -> None:
        for load in self.devices:
            load()
        for pending in self.kicks:
            self.timer.kick(pending)

    def page_times(self) -> dict[str, int]:
        """Nanoseconds so far in reading KVM's dirty logs and in copying pages, and the pages
        copied, over every reset with ``times`` (C's kvmpy_reset_times)."""
        return {"log_ns": self.times.log_ns, "copy_ns": self.times.copy_ns, "pages": self.times.pages}

    def reset_disks(self) -> int:
        return sum(o.reset() for o in self.overlays)

    def reset(self, times: dict | None = None) -> int:
        """Back to the checkpoint; returns the RAM pages copied back. ``times`` (a dict)
        gets each part's nanoseconds added under "pages", "irqchip", "vcpu", "devices",
        "disks" (the clock counts as irqchip)."""
        if self.m.running:
            raise ResetError("reset() needs a stopped machine: call it after run() returned")
        self.m.console.drain()
        if times is None:
            n = self.reset_pages()
            self.reset_ops("irqchip")
            self.reset_vcpus()
            self.reset_ops("clock")
            self.reset_devices()
            self.reset_disks()
            return n
        clock = time.perf_counter_ns
        t0 = clock()
        n = self.reset_pages(timed=True)
        t1 = clock()
        self.reset_ops("irqchip")
        t2 = clock()
        self.reset_vcpus()
        t3 = clock()
        self.reset_ops("clock")
        t4 = clock()
        self.reset_devices()
        t5 = clock()
        self.reset_disks()
        t6 = clock()
        for k, v in (("pages", t1 - t0), ("irqchip", t2 - t1 + t4 - t3), ("vcpu", t3 - t2),
                     ("devices", t5 - t4), ("disks", t6 - t5)):
            times[k] = times.get(k, 0) + v
        return n

    def op_times(self, part: str) -> dict[str, int]:
        """One pass of ``part``'s ops (not a whole reset) and the ns each ioctl took, by name
        (for ``kvmpy bench reset``'s split; the same name twice adds up)."""
        arr, n = self.ops[part]
        ns = ffi.new("uint64_t[]", max(n, 1))
        r = lib.kvmpy_reset_ops(arr, n, ns)
        if r < 0:
            raise ResetError(f"reset: op {-r - 1} of {part} was refused")
        out: dict[str, int] = {}
        for i, name in enumerate(self.op_names[part]):
            out[name] = out.get(name, 0) + ns[i]
        for v, regs, sregs, events in self.sync or () if part == "vcpu" else ():
            t0 = time.perf_counter_ns()
            if lib.kvmpy_reset_sync_regs(v.fd, v.run_page, regs, sregs, events) < 0:
                raise ResetError(f"reset: vCPU {v.id}: regs through the kvm_run page were refused")
            out["KVM_RUN(sync regs)"] = out.get("KVM_RUN(sync regs)", 0) + time.perf_counter_ns() - t0
        return out

    # --- the end ------------------------------------------------------------------------
    def release(self) -> None:
        """Disks back to their files (which hold the checkpoint's contents); dirty logging off."""
        for o in self.overlays:
            o.release()
        if self.m.vm is not None and not self.manual:
            self.m.vm.log_dirty_pages(False)

    def close(self) -> None:
        for o in self.overlays:
            o.close()
        self.overlays = []
        for reg in self.regions:
            reg.close()
        self.regions = []
        if self.lock is not None:
            self.lock.release()
            self.lock = None


_NAMES = {}


def _name(request: int) -> str:
    """KVM_SET_REGS for the number of KVM_SET_REGS (for errors and the benchmark's split)."""
    if not _NAMES:
        for n in ("SREGS", "REGS", "FPU", "XSAVE", "XCRS", "MSRS", "LAPIC", "VCPU_EVENTS", "MP_STATE",
                  "DEBUGREGS", "IRQCHIP", "PIT2", "CLOCK"):
            _NAMES[getattr(lib, f"KVM_SET_{n}")] = f"KVM_SET_{n}"
    return _NAMES.get(request, hex(request))

