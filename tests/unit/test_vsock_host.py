"""virtio-vsock's host side without KVM: the CONNECT line and the --vsock option parsers
(hypothesis), and VsockHost's thread serving the device model behind its transport, with
this test as the guest driver."""
import os
import socket
import threading
import time

import pytest
from hypothesis import given, strategies as st

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio import vsock as V
from kvmpy.kvm.memory import GuestMemory
from kvmpy.vmm.platform import Vsock
from kvmpy.vmm.vsock import MAX_LINE, VsockHost, VsockHostError, connect_request

from .test_virtio_vsock import RAM, Driver, hdr


@given(st.integers(0, 0xFFFF_FFFF), st.binary(max_size=20))
def test_a_connect_line_gives_its_port_and_length(port, after):
    line = b"CONNECT %d\n" % port
    assert connect_request(line + after) == (port, len(line))
    for cut in range(len(line)):
        assert connect_request(line[:cut]) is None          # still a prefix: wait


@given(st.binary(max_size=2 * MAX_LINE))
def test_any_bytes_give_a_request_a_wait_or_a_clear_error(seen):
    try:
        got = connect_request(seen)
    except ValueError as e:
        assert "CONNECT <port>" in str(e)
        return
    if got is not None:
        port, n = got
        assert seen[:n] == b"CONNECT %d\n" % port and 0 <= port <= 0xFFFF_FFFF
    else:
        assert len(seen) < MAX_LINE and b"\n" not in seen


@pytest.mark.parametrize("bad", [b"CONNECT 4294967296\n", b"CONNECT -1\n", b"connect 1\n", b"CONNECT  1\n",
                                 b"CONNECT 1\r\n", b"CONNECT 123456789012", b"X" * MAX_LINE])
def test_bad_lines_are_refused(bad):
    with pytest.raises(ValueError):
        connect_request(bad)


@given(st.text(max_size=40))
def test_vsock_option_parses_or_says_what_is_wrong(spec):
    try:
        v = Vsock.parse(spec)
    except ValueError as e:
        assert "bad vsock" in str(e)
        return
    assert v.path == spec.partition(",")[0] and 3 <= v.cid < (1 << 32) - 1


def test_vsock_option_examples():
    assert Vsock.parse("/tmp/v.sock") == Vsock("/tmp/v.sock", 3)
    assert Vsock.parse("/tmp/v.sock,cid=42") == Vsock("/tmp/v.sock", 42)
    for bad in ("", ",cid=4", "/p,cid=2", "/p,cid=x", "/p,port=3", "/p,cid=4294967295"):
        with pytest.raises(ValueError, match="bad vsock"):
            Vsock.parse(bad)


def test_the_host_thread_carries_a_host_connection_to_the_guest_and_back(tmp_path):
    mem = GuestMemory.anonymous(RAM)
    dev = V.VirtioVsock(7)
    transport = R.VirtioMmioTransport(dev, mem, RecordingTrigger())
    lock = threading.Lock()

    def notify(q):
        with lock:
            transport.write(R.QueueNotify, 4, q)

    path = str(tmp_path / "v.sock")
    host = VsockHost(path, dev, lock, notify)
    try:
        drv = Driver(transport, mem)
        with lock:
            drv.init()
            drv.post_rx()
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        c.connect(path)
        c.sendall(b"CONNECT 80\nearly bytes")
        got = []
        while not got:
            with lock:
                got = drv.received()
        [(h, _)] = got
        assert (h.op, h.dst_port, h.dst_cid) == (V.OP_REQUEST, 80, 7)
        with lock:
            drv.send(hdr(V.OP_RESPONSE, src_port=80, dst_port=h.src_port))
        assert c.recv(100) == b"OK %d\n" % h.src_port
        data = b""
        while data != b"early bytes":                # sent before the OK: kept for the guest
            with lock:
                data += b"".join(d for _, d in drv.received())
        with pytest.raises(VsockHostError, match="another process is listening"):
            VsockHost(path, V.VirtioVsock(), threading.Lock(), notify)
        assert host.errors == 0
    finally:
        host.close()
    assert c.recv(10) == b""


class LinuxLikeGuest:
    """A guest driver shaped like Linux's vmw_vsock_virtio_transport: rx buffers of two
    descriptors (header, 4 KiB), refilled in bulk when half are used, a 256 KiB receive
    buffer, replies and echoes as packets of up to 64 KiB on tx; it runs in its own
    thread, taking the device's lock for each register access as a vCPU's exit would."""

    RX_BASE, TX_BASE = 0x100000, 0x180000

    def __init__(self, transport, mem, lock):
        self.drv, self.mem, self.lock = Driver(transport, mem), mem, lock
        self.fwd_cnt = self.tx_cnt = 0
        self.peer_buf_alloc = self.peer_fwd_cnt = 0
        self.pending = bytearray()
        self.echoed = 0
        self.free = []
        self.stop = False

    def start(self):
        with self.lock:
            self.drv.init()
            self.refill(list(range(0, 16, 2)))
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def refill(self, heads):
        for h in heads:
            addr = self.RX_BASE + h * 0x1100
            self.drv.offer(0, [(addr, V.HDR_SIZE, True), (addr + 0x100, 4096, True)], h, notify=False)
        self.drv.wr(R.QueueNotify, 0)

    def send(self, h, payload=b""):
        h.src_cid, h.dst_cid, h.buf_alloc, h.fwd_cnt, h.len = 7, 2, 256 << 10, self.fwd_cnt, len(payload)
        self.mem.write(self.TX_BASE, h.pack() + payload)
        bufs = [(self.TX_BASE, V.HDR_SIZE, False)] + ([(self.TX_BASE + V.HDR_SIZE, len(payload), False)]
                                                       if payload else [])
        self.drv.offer(1, bufs, 0)
        assert self.drv.used(1) == [(0, 0)]
        self.tx_cnt += len(payload)

    def run(self):
        while not self.stop:
            with self.lock:
                for head, n in self.drv.used(0):
                    addr = self.RX_BASE + head * 0x1100
                    h = V.Header.parse(self.mem.read(addr, V.HDR_SIZE))
                    data = self.mem.read(addr + 0x100, h.len)
                    self.free.append(head)
                    self.peer_buf_alloc, self.peer_fwd_cnt, self.port = h.buf_alloc, h.fwd_cnt, h.src_port
                    if h.op == V.OP_REQUEST:
                        self.send(V.Header(0, 0, h.dst_port, h.src_port, op=V.OP_RESPONSE))
                    elif h.op == V.OP_RW:
                        self.pending += data
                if len(self.free) >= 4:
                    self.refill(self.free)
                    self.free = []
                credit = self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)
                n = min(len(self.pending), credit, 64 << 10)
                if n > 0:
                    self.fwd_cnt += n
                    self.send(V.Header(0, 0, 80, self.port, op=V.OP_RW), bytes(self.pending[:n]))
                    del self.pending[:n]
                    self.echoed += n
            time.sleep(0.0005)


def test_a_linux_like_guest_echoes_1_mib_both_ways_at_once(tmp_path):
    mem = GuestMemory.anonymous(RAM)
    dev = V.VirtioVsock(7)
    transport = R.VirtioMmioTransport(dev, mem, RecordingTrigger())
    lock = threading.Lock()

    def notify(q):
        with lock:
            transport.write(R.QueueNotify, 4, q)

    path = str(tmp_path / "v.sock")
    host = VsockHost(path, dev, lock, notify)
    guest = LinuxLikeGuest(transport, mem, lock)
    guest.start()
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(20)
        c.connect(path)
        c.sendall(b"CONNECT 80\n")
        assert c.recv(100).startswith(b"OK ")
        data = os.urandom(1 << 20)             # four times either side's credit: updates needed both ways
        sender = threading.Thread(target=c.sendall, args=(data,))
        sender.start()
        got = b""
        while len(got) < len(data):
            chunk = c.recv(65536)
            assert chunk, "closed early"
            got += chunk
        sender.join(10)
        assert got == data and host.errors == 0 and dev.dropped == 0
        assert not dev.rsts
    finally:
        guest.stop = True
        host.close()
