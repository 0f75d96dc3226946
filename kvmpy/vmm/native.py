"""Facade over the C hot path (csrc/uart.c, csrc/runloop.c).

``NativeUart`` is the C 16550 behind the same interface as the Python model
``kvmpy.devices.serial.Serial16550`` (read/write/feed/rx_space/...), so the Machine,
the buses and the differential tests treat both alike. ``NativeLoop`` holds one
vCPU's fast-path table and counters for ``kvmpy_run()``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .._native import ffi, lib
from ..kvm.exits import KIND, IoIn, IoOut, MmioRead, MmioWrite
from ..kvm.memory import GuestMemory

TX_BUFFER = 64 * 1024            # bytes of guest output held in C before Python writes them
TX_LOW_WATER = 4 * 1024          # return to Python when less than this is free
RUN_EXIT, RUN_DRAIN = lib.KVMPY_RUN_EXIT, lib.KVMPY_RUN_DRAIN
UART_STATE_FIELDS = ("ier", "fcr", "lcr", "mcr", "scr", "dll", "dlm", "lsr_errors", "msr_delta", "modem", "thr_pending")


class NativeUart:
    """The C 16550A. ``vm_fd``/``gsi`` wire its interrupt line to KVM_IRQ_LINE (gsi < 0: none)."""

    def __init__(self, rx_fifo_size: int = 4096, tx_buffer: int = TX_BUFFER, vm_fd: int = -1, gsi: int = -1):
        p = lib.kvmpy_uart_new(rx_fifo_size, tx_buffer, vm_fd, gsi)
        if p == ffi.NULL:
            raise ValueError("cannot create the native UART (bad sizes or out of memory)")
        self._p = ffi.gc(p, lib.kvmpy_uart_free)
        self._out = ffi.new("uint8_t[]", tx_buffer)
        self.tx_buffer = tx_buffer
        self.on_full = None             # called when the output buffer is full: should drain it
        self.dropped = 0                # THR bytes refused for want of room even after a drain

    @property
    def ptr(self):
        return self._p

    def read(self, offset: int, size: int) -> int:
        return lib.kvmpy_uart_read(self._p, offset)

    def write(self, offset: int, size: int, value: int) -> None:
        """A register write; a THR byte that finds the output buffer full waits for the
        drain (``on_full``, the console: it may throttle the guest) and is dropped and
        counted in ``dropped`` if there is still no room (a stop is under way)."""
        if lib.kvmpy_uart_write(self._p, offset, value & 0xFF):
            return
        if self.on_full is None:
            raise RuntimeError("native UART output buffer is full and nobody drains it")
        self.on_full()
        if not lib.kvmpy_uart_write(self._p, offset, value & 0xFF):
            self.dropped += 1

    def peek(self, offset: int) -> int:
        return lib.kvmpy_uart_peek(self._p, offset)

    def feed(self, data: bytes) -> int:
        return lib.kvmpy_uart_feed(self._p, data, len(data)) if data else 0

    def take_output(self, limit: int | None = None) -> bytes:
        """Guest output collected since the last call (the UART's transmit side), at most
        ``limit`` bytes of it (None: all)."""
        cap = self.tx_buffer if limit is None else max(0, min(limit, self.tx_buffer))
        n = lib.kvmpy_uart_take(self._p, self._out, cap) if cap else 0
        return bytes(ffi.buffer(self._out, n)) if n else b""

    @property
    def tx_space(self) -> int:
        return lib.kvmpy_uart_tx_space(self._p)

    def state(self) -> dict:
        s = ffi.new("struct kvmpy_uart_state *")
        lib.kvmpy_uart_get_state(self._p, s)
        return {name: getattr(s, name) for name, _ in ffi.typeof("struct kvmpy_uart_state").fields}

    def save_state(self) -> dict:
        """Registers and receive FIFO, in the same form as Serial16550.save_state()."""
        s = self.state()
        buf = ffi.new("uint8_t[]", max(s["rx_count"], 1))
        n = lib.kvmpy_uart_rx_copy(self._p, buf, s["rx_count"])
        out = {k: s[k] for k in UART_STATE_FIELDS}
        out["rx"] = bytes(ffi.buffer(buf, n)).hex()
        return out

    def load_state(self, state: dict) -> None:
        self.prepare_load(state)()

    def prepare_load(self, state: dict):
        """``load_state(state)`` as a call that can be repeated cheaply (a reset checkpoint's):
        the C struct is built once; each call sets the registers and FIFO again."""
        s = ffi.new("struct kvmpy_uart_state *", {k: int(state[k]) for k in UART_STATE_FIELDS})
        rx = bytes.fromhex(state["rx"])
        p = self._p

        def load() -> None:
            if lib.kvmpy_uart_set_state(p, s, rx, len(rx)) < 0:
                raise ValueError(f"UART state has {len(rx)} bytes of input, more than the FIFO holds")
        return load

    @property
    def rx_space(self) -> int:
        s = self.state()
        return 0 if s["mcr"] & 0x10 else s["rx_cap"] - s["rx_count"]

    @property
    def rx_pending(self) -> int:
        return self.state()["rx_count"]

    @property
    def irq_level(self) -> bool:
        return bool(self.state()["level"])

    @property
    def irq_errors(self) -> int:
        """How many KVM_IRQ_LINE calls failed (state()["irq_errno"]: the last errno)."""
        return self.state()["irq_errors"]


def guest_mem_table(mem: GuestMemory):
    """``struct kvmpy_guest_mem`` describing ``mem``'s regions for C: gpa, size, host
    address, and the region's dirty bitmap, which C marks after each write it makes."""
    if len(mem.regions) > lib.KVMPY_MAX_REGIONS:
        raise ValueError(f"at most {lib.KVMPY_MAX_REGIONS} RAM regions for native devices")
    table = ffi.new("struct kvmpy_guest_mem *")
    table.n = len(mem.regions)
    for i, r in enumerate(mem.regions):
        buf = ffi.from_buffer(r.mm)
        table.r[i].gpa, table.r[i].size = r.gpa, r.size
        table.r[i].hva = ffi.cast("uint8_t *", buf)   # valid while the mapping is; GuestMemory outlives us
        ffi.release(buf)
        table.r[i].dirty = ffi.cast("uint64_t *", r.dirty_address)   # likewise; 0 = NULL = untracked
    return table


def vq_state_in(q, queue) -> None:
    """A live Python ``VirtQueue`` into ``struct kvmpy_vq_state`` ``q``, for a C queue function
    under a Python transport (vmm/native_net.py, vmm/native_blk.py); ``vq_state_out`` after."""
    q.num, q.ready, q.desc, q.driver, q.device = queue.size, 1, queue.desc_addr, queue.driver_addr, \
        queue.device_addr
    q.last_avail_idx, q.used_idx, q.used_count = queue.last_avail_idx, queue.used_idx, queue.used_count


def vq_state_out(q, queue) -> None:
    """The indices C moved, back into the Python ``VirtQueue``."""
    queue.last_avail_idx, queue.used_idx, queue.used_count = q.last_avail_idx, q.used_idx, q.used_count


class NativeVirtioBlk:
    """virtio-blk over virtio-mmio in C, behind the Device protocol (read/write by offset).

    The Python ``VirtioBlk`` opens and checks the backing file and owns its fd; C
    serves the registers, the virtqueue and the I/O (preadv/pwritev on that fd).
    """

    def __init__(self, path: str | os.PathLike, mem: GuestMemory, readonly: bool = False,
                 serial_id: str | bytes | None = None, vm_fd: int = -1, gsi: int = -1,
                 limits=None, clock_ns: int | None = None):
        from ..devices.virtio.blk import VirtioBlk          # loaded for machines with disks only
        self.disk = VirtioBlk(path, readonly=readonly, serial_id=serial_id)
        self.limits = limits
        self.mem = mem
        p = lib.kvmpy_blk_new(self.disk.fd, int(self.disk.readonly), self.disk.file_size,
                              self.disk.serial_id, guest_mem_table(mem), vm_fd, gsi)
        if p == ffi.NULL:
            self.disk.close()
            raise ValueError("cannot create the native virtio-blk device")
        self._p = ffi.gc(p, lib.kvmpy_blk_free)
        if clock_ns is not None:
            self.set_clock(clock_ns)
        if limits:
            if lib.kvmpy_blk_set_limits(self._p, limits.iops or 0, limits.bps or 0, limits.fps or 0,
                                        limits.iops_burst, limits.bps_burst) < 0:
                self.disk.close()
                raise ValueError(f"rate limits out of range: {limits}")

    # --- rate limits (VirtioBlk.limiter in Python) ----------------------------------------
    def throttled_until(self) -> int:
        """CLOCK_MONOTONIC ns at which a request left in the ring may go; 0: none waits."""
        return lib.kvmpy_blk_throttled_until(self._p)

    def serve_pending(self) -> None:
        """A host-side QueueNotify: serve what the buckets allow now (bounded)."""
        lib.kvmpy_blk_serve_pending(self._p)

    def limiter_state(self) -> dict:
        """The buckets as ``TokenBucket.state()`` dicts (None: no such bucket)."""
        rl = ffi.new("struct kvmpy_limiter *")
        lib.kvmpy_blk_get_limiter(self._p, rl)
        out = {"throttled_until": rl.throttled_until, "throttled": rl.throttled}
        for name in ("ops", "bytes", "flushes"):
            b = getattr(rl, name)
            out[name] = None if not b.size else {k: getattr(b, k) for k in
                                                 ("size", "refill_ns", "burst", "tokens", "frac", "last_ns")}
        return out

    def set_clock(self, now_ns: int) -> None:
        """Tests: the limiter's clock reads ``now_ns`` (0: CLOCK_MONOTONIC again)."""
        lib.kvmpy_blk_set_clock(self._p, now_ns)

    @property
    def ptr(self):
        return self._p

    @property
    def file_size(self) -> int:
        """The backing file's size in bytes (as VirtioBlk.file_size)."""
        return self.disk.file_size

    def read(self, offset: int, size: int) -> int:
        return lib.kvmpy_blk_read(self._p, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        lib.kvmpy_blk_write(self._p, offset, size, value & ((1 << (8 * size)) - 1) if size <= 8 else 0)

    def raw_state(self) -> dict:
        s = ffi.new("struct kvmpy_blk_state *")
        lib.kvmpy_blk_get_state(self._p, s)
        return s

    def state(self) -> dict:
        """The same keys as ``VirtioMmioTransport.state()`` (the reference)."""
        s = self.raw_state()
        q = s.q
        return {
            "device_id": 2, "status": s.status, "device_features": s.device_features,
            "device_features_sel": s.device_features_sel, "driver_features": s.driver_features,
            "driver_features_sel": s.driver_features_sel, "queue_sel": s.queue_sel,
            "interrupt_status": s.interrupt_status, "irq_level": bool(s.level), "config_generation": 0,
            "last_error": ffi.string(s.last_error).decode() or None,
            "queues": [{"num": q.num, "ready": bool(q.ready), "desc": q.desc, "driver": q.driver,
                        "device": q.device, "last_avail_idx": q.last_avail_idx if q.ready else 0,
                        "used_idx": q.used_idx if q.ready else 0}],
        }

    def save_state(self) -> dict:
        """The same dict as ``VirtioMmioTransport.save_state()``; nothing is in flight
        at a save point because C serves a QueueNotify completely before returning."""
        s = self.raw_state()
        q = s.q
        return {
            "status": s.status, "device_features_sel": s.device_features_sel,
            "driver_features_sel": s.driver_features_sel, "driver_features": s.driver_features,
            "queue_sel": s.queue_sel, "interrupt_status": s.interrupt_status,
            "irq_level": bool(s.level),
            "queues": [{"num": q.num, "ready": bool(q.ready), "desc": q.desc, "driver": q.driver,
                        "device": q.device, "last_avail_idx": q.last_avail_idx if q.ready else 0,
                        "used_idx": q.used_idx if q.ready else 0}],
        }

    def load_state(self, state: dict) -> None:
        """Restore a saved state; ValueError (nothing changed) in exactly the cases the
        Python transport refuses. C validates on its own (kvmpy_blk_set_state); the
        Python check only supplies the message. The irq level is recorded, not driven."""
        self.prepare_load(state)()

    def prepare_load(self, state: dict):
        """``load_state(state)`` as a call that can be repeated cheaply (a reset checkpoint's):
        checked and built into the C struct once; each call sets it again."""
        from ..devices.virtio.mmio import check_state, check_state_shape
        check_state_shape(state, 1)          # every value fits its C field
        q = state["queues"][0]
        s = ffi.new("struct kvmpy_blk_state *", {
            "status": state["status"], "device_features_sel": state["device_features_sel"],
            "driver_features_sel": state["driver_features_sel"],
            "driver_features": state["driver_features"], "queue_sel": state["queue_sel"],
            "interrupt_status": state["interrupt_status"], "level": int(state["irq_level"]),
            "q": {"num": q["num"], "ready": int(q["ready"]), "desc": q["desc"], "driver": q["driver"],
                  "device": q["device"], "last_avail_idx": q["last_avail_idx"],
                  "used_idx": q["used_idx"]}})
        p = self._p

        def load() -> None:
            if lib.kvmpy_blk_set_state(p, s) < 0:
                check_state(state, self.disk.device_features, 1, lib.KVMPY_BLK_QUEUE_NUM_MAX, self.mem)
                raise ValueError("virtio state refused by the native virtio-blk")
        return load

    @property
    def irq_level(self) -> bool:
        return bool(self.raw_state().level)

    @property
    def irq_errors(self) -> int:
        """How many KVM_IRQ_LINE calls failed (raw_state().irq_errno: the last errno)."""
        return self.raw_state().irq_errors

    def use_overlay(self, fd: int | None, written=None) -> None:
        """``VirtioBlk.use_overlay`` for the C data path: C marks the written blocks in
        ``written`` (a writable buffer of u64 words, kept alive by the caller)."""
        self.disk.use_overlay(fd, written)
        self.disk.written = None                # C marks; the Python side moves no data
        ptr = ffi.cast("uint64_t *", ffi.from_buffer(written)) if written is not None else ffi.NULL
        lib.kvmpy_blk_set_overlay(self._p, self.disk.fd, ptr)

    def close(self) -> None:
        """Stop I/O (later requests get IOERR) and close the backing file; idempotent."""
        lib.kvmpy_blk_set_fd(self._p, -1)
        self.disk.close()


@dataclass
class FastPath:
    """What the C loop serves, built by ``Platform.fast_path()`` from its slots.

    ``pio_claims``/``mmio_claims``: ranges of Python devices (their exits return to
    Python); ``uart``: the C UART at ``uart_ports``; ``native_mmio``: (base, size, device,
    name) of C virtio devices. Everything else is unclaimed: reads float (ports all ones,
    MMIO zero), writes are counted and dropped, all in C.
    """

    uart: NativeUart | None = None
    uart_name: str = ""
    uart_base: int = 0
    uart_ports: range = range(0)
    pio_claims: list = field(default_factory=list)
    mmio_claims: list = field(default_factory=list)
    native_mmio: list = field(default_factory=list)


class NativeLoop:
    """One vCPU's ``struct kvmpy_loop``: fd, kvm_run page, fast-path table, counters."""

    def __init__(self, vcpu, table: FastPath):
        self._l = ffi.new("struct kvmpy_loop *")
        self.vcpu = vcpu
        self._l.vcpu_fd = vcpu.fd
        self._l.run = vcpu.run_page
        self._l.run_size = vcpu.run_size
        self._l.tx_low_water = TX_LOW_WATER
        self.table = table                      # keeps the C objects alive while C points at them
        if table.uart is not None:
            self._l.uart = table.uart.ptr
            self._l.uart_base = table.uart_base
        self._set_pio(table)
        self._set_mmio(table)

    def _set_pio(self, table: FastPath) -> None:
        owner = self._l.pio_owner
        ffi.memmove(owner, b"\x00" * 65536, 65536)
        for base, length in table.pio_claims:
            for port in range(base, min(base + length, 65536)):
                owner[port] = lib.KVMPY_OWNER_PYTHON
        for port in table.uart_ports:
            owner[port] = lib.KVMPY_OWNER_UART if table.uart is not None else lib.KVMPY_OWNER_PYTHON

    def _set_mmio(self, table: FastPath) -> None:
        claims, native = table.mmio_claims, table.native_mmio
        if len(claims) > lib.KVMPY_MAX_MMIO_RANGES:
            raise ValueError(f"at most {lib.KVMPY_MAX_MMIO_RANGES} MMIO ranges for the native loop")
        if len(native) > lib.KVMPY_MAX_NATIVE_MMIO:
            raise ValueError(f"at most {lib.KVMPY_MAX_NATIVE_MMIO} native MMIO devices")
        for i, (base, size) in enumerate(claims):
            self._l.mmio_ranges[i].base, self._l.mmio_ranges[i].size = base, size
        self._l.n_mmio_ranges = len(claims)
        for i, (base, size, dev, _) in enumerate(native):
            d = self._l.native_mmio[i]
            d.base, d.size, d.blk = base, size, dev.ptr
        self._l.n_native_mmio = len(native)

    def run(self) -> int:
        """kvmpy_run() with the GIL released: RUN_EXIT, RUN_DRAIN or -errno."""
        return lib.kvmpy_run(self._l)

    def restart_clock(self) -> None:
        """The next run() starts the VMM clock anew instead of at the last exit: call it
        when a run begins and after a pause, whose time is not the VMM's work."""
        self._l.last_exit_ns = 0

    def add_counters(self, stats, take: bool = True) -> None:
        """Add what C counted to ``stats`` (exits, devices, time); ``take`` zeroes the
        counters (end of a run), else they stay (a look at a run in progress)."""
        c = self._l.c
        for key, name in (("io_out", KIND[IoOut]), ("io_in", KIND[IoIn]), ("mmio_read", KIND[MmioRead]),
                          ("mmio_write", KIND[MmioWrite])):
            if getattr(c, key):
                stats.exits[name] += getattr(c, key)
        for key, name in (("uart", self.table.uart_name), ("unclaimed_pio", "unclaimed-pio"),
                          ("unclaimed_mmio", "unclaimed-mmio")):
            if getattr(c, key):
                stats.devices[name] += getattr(c, key)
        for (_, _, _, name), n in zip(self.table.native_mmio, c.native_mmio):
            if n:
                stats.devices[name] += n
        stats.unclaimed_writes += c.unclaimed_writes
        stats.kvm_ns += c.kvm_ns
        stats.vmm_ns += c.vmm_ns
        if take:
            ffi.memmove(ffi.addressof(c), b"\x00" * ffi.sizeof(c), ffi.sizeof(c))
