"""Debian's stock kernel talks vsock with kvmpy's device: its vmw_vsock_virtio_transport binds
to the virtio-mmio device in the DSDT, a Linux program (guests/linux/vsock-echo-linux.c)
echoes a host connection made through the VM's UNIX socket, then calls a host listener.

Linux stops after its banner where KVM emulates guest ring 0 (kvm_pvm): this runs in the
nested testbed (python tests/nested/testbed.py --steps pytest tests/integration/test_linux_vsock.py,
with the vsock modules in the testbed's L2_MODULES).
"""
import os
import threading
import time

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.kvm.system import backend_modules

from .test_linux import linux, module_files, with_load_order  # noqa: F401 - a fixture
from .test_vsock import connect, host_listener, readline

RING0_EMULATED = "kvm_pvm" in backend_modules()
MEM = 512 << 20
TIMEOUT = 400.0
MODULES = ("virtio.ko", "virtio_ring.ko", "virtio_mmio.ko", "vsock.ko",
           "vmw_vsock_virtio_transport_common.ko", "vmw_vsock_virtio_transport.ko")
INIT = """#!/bin/sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in __MODULES__; do
    insmod /lib/modules/$m.ko || echo "kvmpy-vsock: insmod $m failed"
done
chmod 755 /bin/vsock-echo-linux
/bin/vsock-echo-linux
echo "kvmpy-vsock: rc=$?"
reboot -f
"""
ECHO_BYTES = 256 << 10


class Console:
    """COM1 output, collected for the test to wait on."""

    def __init__(self):
        self.buf = bytearray()
        self.lock = threading.Lock()

    def write(self, data) -> int:
        with self.lock:
            self.buf += data
        return len(data)

    def flush(self) -> None:
        pass

    def wait_for(self, text: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.buf:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s; console:\n"
                                     f"{self.buf[-4000:].decode('utf-8', 'replace')}")
            time.sleep(0.05)


def diagnose(m, console, what: str) -> str:
    """What the device and the host side looked like (for a failure's message)."""
    slot = m.platform.slot("virtio-vsock")
    dev, tr, host = slot.model.device, slot.model.transport, slot.backend
    conns = [{k: getattr(c, k) for k in ("guest_port", "host_port", "state", "ops", "fwd_cnt", "fwd_cnt_sent",
                                         "tx_cnt", "peer_buf_alloc", "peer_fwd_cnt", "readable", "host_eof",
                                         "guest_shutdown")} | {"to_host": len(c.to_host)} for c in dev.conns.values()]
    return (f"{what}; device {dev.state()}, conns {conns}, rsts {len(dev.rsts)}; transport status "
            f"{tr.status:#x} irq {tr.interrupt_status} error {tr.last_error}, queues "
            f"{[q.live.state() if q.live else None for q in tr.queues]}; host errors {host.errors} "
            f"{host.last_error}, watched {len(host.watched)}; console:\n"
            f"{console.buf[-3000:].decode('utf-8', 'replace')}")


def echo_or_report(c, data: bytes, m, console) -> bytes:
    """``echo`` that returns what came back when the stream stalls for 30 s."""
    sender = threading.Thread(target=c.sendall, args=(data,), daemon=True)
    sender.start()
    got = b""
    try:
        while len(got) < len(data):
            chunk = c.recv(65536)
            if not chunk:
                break
            got += chunk
    except TimeoutError:
        pass
    return got


@pytest.mark.skipif(RING0_EMULATED, reason="Linux stops after its banner where KVM emulates guest ring 0 "
                                           "(kvm_pvm, docs/host-notes.md); the nested testbed runs this")
def test_stock_kernel_echoes_over_vsock_and_calls_the_host(linux, tmp_path):
    files = module_files(linux, MODULES, "the vsock modules")
    files["bin/vsock-echo-linux"] = guests.built("vsock-echo-linux").read_bytes()
    initrd = linux.initramfs(with_load_order(INIT, files), files=files)
    path = str(tmp_path / "vm.sock")
    listener = host_listener(path)
    console = Console()
    with kvmpy.Machine(mem_size=MEM, cpus=2, serial=console, vsock=path) as m:
        m.load(linux.vmlinux, cmdline="console=ttyS0 panic=-1", initrd=initrd)
        t0 = time.monotonic()
        m.start(timeout=TIMEOUT)
        console.wait_for(b"vsock-echo-linux: listening on port 1234", TIMEOUT)
        booted = time.monotonic() - t0
        c, ok = connect(path)
        assert ok.startswith(b"OK "), (ok, console.buf[-2000:])
        data = os.urandom(ECHO_BYTES)
        t1 = time.monotonic()
        got = echo_or_report(c, data, m, console)
        assert got == data, diagnose(m, console, f"echoed {len(got)} of {len(data)} bytes")
        took = time.monotonic() - t1
        rtts = []
        for _ in range(50):
            t = time.perf_counter()
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            rtts.append(time.perf_counter() - t)
        c.close()
        s, _ = listener.accept()
        assert readline(s) == b"hello from linux\n"
        s.sendall(b"hello from the host\n")
        console.wait_for(b"kvmpy-vsock: rc=", 60)
        result = m.wait(60)
    text = console.buf.decode("utf-8", "replace")
    assert f"vsock-echo-linux: echoed {ECHO_BYTES + 50} bytes" in text, text[-3000:]
    assert "vsock-echo-linux: host says: hello from the host" in text and "kvmpy-vsock: rc=0" in text
    assert "insmod" not in text.split("Run /init", 1)[1], text[-3000:]
    assert result.reason == "reset"
    rtts.sort()
    print(f"booted to the listener in {booted:.1f} s; {ECHO_BYTES >> 10} KiB echoed in {took:.2f} s; "
          f"1-byte round trip median {rtts[len(rtts) // 2] * 1e6:.0f} us")
    listener.close()
