"""virtio-vsock's host side without KVM: the CONNECT line and the --vsock option parsers
(hypothesis), and VsockHost's thread serving the device model behind its transport, with
this test as the guest driver."""
import socket
import threading

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
