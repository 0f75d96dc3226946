"""C hygiene against hostile guests (issue 11, item 9), where it is observable.

* Configuration-space reads are bounded without integer overflow: an offset near
  2^64 reads as zero in both virtio twins, for any (offset, size).
* A failed KVM_IRQ_LINE is counted (irq_errors, irq_errno), not ignored, in the C
  UART and the C virtio-blk.
* The C UART's output buffer under several writers at once (vCPU threads writing THR
  one byte at a time or in rep-outsb bursts) and a drainer: no byte lost or
  duplicated, each writer's bytes in its order, the buffer never past its cap, and
  the free space it reports always inside [0, cap]; and, under ThreadSanitizer, no
  data race between the free-space check and the writers.
"""
import errno
import pathlib
import shutil
import subprocess
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio.blk import VirtioBlk
from kvmpy.kvm.memory import GuestMemory

RAM = 0x40000
U64 = 2**64 - 1


def blk_pair(tmp_path):
    from kvmpy.vmm.native import NativeVirtioBlk
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 16)
    py = R.VirtioMmioTransport(VirtioBlk(path), GuestMemory.anonymous(RAM), RecordingTrigger())
    return py, NativeVirtioBlk(path, GuestMemory.anonymous(RAM))


OFFSETS = st.one_of(st.integers(0, U64), st.integers(R.Config - 8, R.Config + 48),
                    st.integers(U64 - 64, U64), st.sampled_from([U64, U64 - 3, U64 - 7, 2**63, 2**32 - 1]))
SIZES = st.one_of(st.sampled_from([1, 2, 4, 8]), st.integers(0, 16), st.sampled_from([2**32 - 1, 2**31]))


@settings(max_examples=500, deadline=None)
@given(accesses=st.lists(st.tuples(OFFSETS, SIZES), min_size=1, max_size=30))
def test_config_reads_agree_for_any_offset_and_size(tmp_path_factory, accesses):
    """Both twins answer every (offset, size) alike; outside the 36-byte config: 0."""
    py, c = blk_pair(tmp_path_factory.mktemp("d"))
    try:
        for off, size in accesses:
            v = c.read(off, size)
            assert v == py.read(off, size), (hex(off), size)
            if off >= R.Config and not (size in (1, 2, 4, 8) and off - R.Config + size <= 36):
                assert v == 0, (hex(off), size)
            c.write(off, size, 0xFF) if size <= 8 else None     # config writes are ignored
            py.write(off, size, 0xFF) if size <= 8 else None
    finally:
        c.close()
        py.device.close()


def test_config_read_near_2_64_is_refused(tmp_path):
    """The classic wrap: off + len past 2^64 must not look like a small, valid end."""
    py, c = blk_pair(tmp_path)
    try:
        assert c.read(R.Config, 8) == py.read(R.Config, 8) == 8      # capacity: 4096 / 512
        for off in (U64, U64 - 1, U64 - 3, U64 - 7, U64 - 8, U64 - 0xFF, 2**63):
            for size in (1, 2, 4, 8):
                assert c.read(off, size) == 0 == py.read(off, size), (hex(off), size)
    finally:
        c.close()
        py.device.close()


# --- KVM_IRQ_LINE failures ------------------------------------------------------------

def test_uart_counts_failed_irq_line():
    """No VM behind vm_fd: each level change is an ioctl failure, counted with its errno."""
    from kvmpy.vmm.native import NativeUart
    u = NativeUart(vm_fd=-1, gsi=4)
    u.write(1, 1, 0x02)          # IER: THRI
    u.write(4, 1, 0x08)          # MCR: OUT2 -> the line rises
    s = u.state()
    assert s["level"] == 1
    assert s["irq_errors"] == 1 and s["irq_errno"] == errno.EBADF
    u.read(2, 1)                 # IIR read clears THRE -> the line falls
    assert u.irq_errors == 2
    # without a line nothing is attempted, so nothing fails
    quiet = NativeUart()
    quiet.write(1, 1, 0x02)
    quiet.write(4, 1, 0x08)
    assert quiet.state()["level"] == 1 and quiet.irq_errors == 0


def test_blk_counts_failed_irq_line(tmp_path):
    """A device error with DRIVER_OK raises the config interrupt: the failed ioctl is counted."""
    from kvmpy.vmm.native import NativeVirtioBlk
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    c = NativeVirtioBlk(path, GuestMemory.anonymous(RAM), vm_fd=-1, gsi=5)
    try:
        c.write(R.Status, 4, R.ACKNOWLEDGE | R.DRIVER)
        c.write(R.DriverFeaturesSel, 4, 1)
        c.write(R.DriverFeatures, 4, 1)                  # VIRTIO_F_VERSION_1
        c.write(R.Status, 4, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)
        c.write(R.QueueNum, 4, 3)                        # not a power of two
        c.write(R.QueueReady, 4, 1)                      # -> DEVICE_NEEDS_RESET, config interrupt
        s = c.raw_state()
        assert s.level == 1 and s.status & R.DEVICE_NEEDS_RESET
        assert s.irq_errors == 1 and s.irq_errno == errno.EBADF
        c.write(R.InterruptACK, 4, R.VIRTIO_MMIO_INT_CONFIG)
        assert c.irq_errors == 2 and not c.irq_level
    finally:
        c.close()


# --- the UART's output buffer under several writers -----------------------------------

WRITERS = 3
PER_WRITER = 4000
CAP = 64


def test_uart_thr_from_several_threads_loses_nothing():
    """Three writers (one in rep-outsb bursts) against a 64-byte buffer and a drainer."""
    from kvmpy._native import ffi, lib
    from kvmpy.vmm.native import NativeUart
    u = NativeUart(tx_buffer=CAP)
    p = u.ptr
    stop = threading.Event()
    out, problems = bytearray(), []

    def expected(t):
        return bytes((t << 6) | (i & 63) for i in range(PER_WRITER))

    def writer(t):
        data = expected(t)
        i, burst = 0, ffi.new("uint8_t[8]")
        while i < len(data):
            if t == 0:           # rep outsb: all of a burst or none of it
                n = min(1 + i % 8, len(data) - i)
                burst[0:n] = data[i:i + n]
                if lib.kvmpy_uart_pio(p, 0, 1, burst, 1, n):
                    i += n
            elif lib.kvmpy_uart_write(p, 0, data[i]):
                i += 1

    def drainer():
        buf = ffi.new("uint8_t[]", CAP)
        while True:
            done = stop.is_set()
            n = lib.kvmpy_uart_take(p, buf, CAP)
            out.extend(ffi.buffer(buf, n))
            if done and n == 0:
                return

    def watcher():
        while not stop.is_set():
            space = lib.kvmpy_uart_tx_space(p)
            s = u.state()
            if not 0 <= space <= CAP or s["tx_len"] > CAP or s["tx_dropped"]:
                problems.append((space, s["tx_len"], s["tx_dropped"]))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(WRITERS)]
    helpers = [threading.Thread(target=drainer), threading.Thread(target=watcher)]
    for th in threads + helpers:
        th.start()
    for th in threads:
        th.join(timeout=60)
    stop.set()
    for th in helpers:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads + helpers)
    assert problems == []
    assert u.state()["tx_dropped"] == 0
    assert len(out) == WRITERS * PER_WRITER
    for t in range(WRITERS):
        assert bytes(b for b in out if b >> 6 == t) == expected(t), t


# The same race in C under ThreadSanitizer, which sees what the Python threads above
# cannot: a free-space check outside the UART's lock is a data race with the writers.
TSAN_HARNESS = r"""
#include <pthread.h>
#include <stdio.h>
#include "kvmpy_native.h"
static struct kvmpy_uart *u;
static int done;
static void *writer(void *a)
{
	uint8_t burst[4] = "abcd";
	for (int i = 0; i < 20000; i++) {
		if (a)
			while (!kvmpy_uart_write(u, 0, 'x'))
				;
		else
			while (!kvmpy_uart_pio(u, 0, 1, burst, 1, 4))
				;
	}
	return NULL;
}
static void *drainer(void *a)
{
	uint8_t b[64];
	(void)a;
	while (!__atomic_load_n(&done, __ATOMIC_ACQUIRE)) {
		kvmpy_uart_take(u, b, sizeof(b));
		if (kvmpy_uart_tx_space(u) > 64)
			return (void *)1;
	}
	return NULL;
}
int main(void)
{
	pthread_t w1, w2, d;
	void *bad;
	u = kvmpy_uart_new(16, 64, -1, -1);
	pthread_create(&w1, NULL, writer, (void *)1);
	pthread_create(&w2, NULL, writer, NULL);
	pthread_create(&d, NULL, drainer, NULL);
	pthread_join(w1, NULL);
	pthread_join(w2, NULL);
	__atomic_store_n(&done, 1, __ATOMIC_RELEASE);
	pthread_join(d, &bad);
	kvmpy_uart_free(u);
	return bad != NULL;
}
"""


def test_uart_free_space_is_read_under_the_lock_tsan(tmp_path):
    """kvmpy_uart_tx_space (the run loop's drain check) races with no THR writer."""
    csrc = pathlib.Path(__file__).resolve().parents[2] / "csrc"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    (tmp_path / "h.c").write_text(TSAN_HARNESS)
    exe = tmp_path / "h"
    built = subprocess.run([cc, "-O1", "-g", "-fsanitize=thread", f"-I{csrc}", str(tmp_path / "h.c"),
                            str(csrc / "uart.c"), "-o", str(exe), "-lpthread"], capture_output=True, text=True)
    if built.returncode:
        pytest.skip(f"no ThreadSanitizer here: {built.stderr[-300:]}")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                         env={"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]
