"""virtio-vsock behind the virtio-mmio transport, driven as a guest driver drives it, with
socketpairs as the host's peers; hostile headers and floods hypothesis-tested."""
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio import vsock as V
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmpy.kvm.memory import GuestMemory

RAM = 0x200000
QSIZE = 16
RX_BUF = 0x40000            # rx buffers: QSIZE x 0x1000
TX_BUF = 0x80000
EV_BUF = 0x90000
GUEST_CID = 7
VERSION_1 = 1 << R.VIRTIO_F_VERSION_1


def rings(q):
    base = 0x1000 + q * 0x3000
    return base, base + 0x1000, base + 0x2000


class Driver:
    """A three-queue virtio-mmio driver: rx buffers of 4 KiB, one tx chain at a time."""

    def __init__(self, dev, mem):
        self.dev, self.mem = dev, mem
        self.avail = [0, 0, 0]
        self.seen = [0, 0, 0]

    def wr(self, off, value):
        self.dev.write(off, 4, value)

    def rd(self, off):
        return self.dev.read(off, 4)

    def init(self):
        self.wr(R.Status, 0)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER)
        self.wr(R.DriverFeaturesSel, 1)
        self.wr(R.DriverFeatures, 1)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK)
        for q in range(3):
            desc, avail, used = rings(q)
            for off, v in ((R.QueueSel, q), (R.QueueNum, QSIZE), (R.QueueDescLow, desc),
                           (R.QueueDriverLow, avail), (R.QueueDeviceLow, used), (R.QueueReady, 1)):
                self.wr(off, v)
        self.wr(R.Status, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)

    def offer(self, q, bufs, head, notify=True):
        desc, avail, _ = rings(q)
        for i, (addr, n, writable) in enumerate(bufs):
            last = i == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.mem.write(desc + 16 * (head + i), struct.pack("<QIHH", addr, n, flags, 0 if last else head + i + 1))
        self.mem.write(avail + 4 + 2 * (self.avail[q] % QSIZE), struct.pack("<H", head))
        self.avail[q] = (self.avail[q] + 1) & 0xFFFF
        self.mem.write(avail + 2, struct.pack("<H", self.avail[q]))
        if notify:
            self.wr(R.QueueNotify, q)

    def used(self, q):
        _, _, used = rings(q)
        idx = struct.unpack("<H", self.mem.read(used + 2, 2))[0]
        out = []
        while self.seen[q] != idx:
            out.append(struct.unpack("<II", self.mem.read(used + 4 + 8 * (self.seen[q] % QSIZE), 8)))
            self.seen[q] = (self.seen[q] + 1) & 0xFFFF
        return out

    def post_rx(self, count=QSIZE, size=0x1000):
        for i in range(count):
            self.offer(0, [(RX_BUF + i * 0x1000, size, True)], i, notify=False)
        self.wr(R.QueueNotify, 0)

    def received(self):
        """The packets the device put in the rx ring since last asked; each buffer reposted."""
        out = []
        for head, n in self.used(0):
            raw = self.mem.read(RX_BUF + head * 0x1000, n)
            hdr = V.Header.parse(raw[:V.HDR_SIZE])
            out.append((hdr, raw[V.HDR_SIZE:V.HDR_SIZE + hdr.len]))
            self.offer(0, [(RX_BUF + head * 0x1000, 0x1000, True)], head, notify=False)
        self.wr(R.QueueNotify, 0)
        return out

    def send(self, hdr: V.Header, payload=b"", split=False):
        raw = hdr.pack() + payload
        self.mem.write(TX_BUF, raw)
        bufs = [(TX_BUF, V.HDR_SIZE, False), (TX_BUF + V.HDR_SIZE, len(payload), False)] if split and payload \
            else [(TX_BUF, len(raw), False)]
        self.offer(1, bufs, 0)
        assert self.used(1) == [(0, 0)]


class Host:
    """host_connect for the device: a socketpair per guest connection, per port listening."""

    def __init__(self, ports=(1234,)):
        self.ports, self.mine, self.wakes = set(ports), {}, 0

    def connect(self, port):
        if port not in self.ports:
            return None
        a, b = socket.socketpair()
        a.setblocking(False)
        b.settimeout(2)
        self.mine.setdefault(port, []).append(b)
        return a

    def wake(self):
        self.wakes += 1


def rig(max_connections=V.MAX_CONNECTIONS, ports=(1234,)):
    mem = GuestMemory.anonymous(RAM)
    host = Host(ports)
    vs = V.VirtioVsock(GUEST_CID, host.connect, host.wake, max_connections=max_connections)
    irq = RecordingTrigger()
    drv = Driver(R.VirtioMmioTransport(vs, mem, irq), mem)
    drv.init()
    drv.post_rx()
    return drv, vs, host, irq


def hdr(op, src_port=5000, dst_port=1234, length=0, flags=0, buf_alloc=1 << 16, fwd_cnt=0, **kw):
    fields = dict(src_cid=GUEST_CID, dst_cid=V.VMADDR_CID_HOST, src_port=src_port, dst_port=dst_port, len=length,
                  op=op, flags=flags, buf_alloc=buf_alloc, fwd_cnt=fwd_cnt)
    fields.update(kw)
    return V.Header(**fields)


def pump(vs, drv):
    """What the host thread does: mark every peer readable, flush, serve rx (a host-side notify)."""
    for c in vs.conns.values():
        c.readable = True
    vs.flush_all()
    drv.wr(R.QueueNotify, 0)
    return drv.received()


# --- identity ---------------------------------------------------------------------------------

def test_identity_config_and_queues():
    drv, vs, _, _ = rig()
    assert drv.rd(R.DeviceID) == 19
    assert drv.dev.read(R.Config, 8) == GUEST_CID
    assert drv.rd(R.Config) == GUEST_CID and drv.rd(R.Config + 4) == 0
    drv.dev.write(R.Config, 4, 99)                       # read-only
    assert drv.dev.read(R.Config, 8) == GUEST_CID
    drv.wr(R.QueueSel, 2)
    assert drv.rd(R.QueueNumMax) == V.QUEUE_NUM_MAX
    drv.wr(R.QueueSel, 3)
    assert drv.rd(R.QueueNumMax) == 0


@pytest.mark.parametrize("cid", [0, 1, 2, (1 << 32) - 1, 1 << 32, -1, "3"])
def test_bad_cids_are_refused(cid):
    with pytest.raises(V.VsockError):
        V.VirtioVsock(cid)


@given(st.binary(min_size=44, max_size=44))
def test_header_round_trips(raw):
    assert V.Header.parse(raw).pack() == raw


@given(st.binary(max_size=100).filter(lambda b: len(b) != 44))
def test_header_of_the_wrong_size_is_refused(raw):
    with pytest.raises(V.VsockError):
        V.Header.parse(raw)


# --- guest to host ----------------------------------------------------------------------------

def test_guest_connects_to_a_host_port_and_data_flows_both_ways():
    drv, vs, host, irq = rig()
    drv.send(hdr(V.OP_REQUEST))
    [(h, _)] = pump(vs, drv)
    assert (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (V.OP_RESPONSE, 2, GUEST_CID, 1234, 5000)
    assert h.buf_alloc == V.HOST_BUF_ALLOC and irq.levels[-1] is True
    peer = host.mine[1234][0]
    drv.send(hdr(V.OP_RW, length=5), b"hello", split=True)
    assert peer.recv(100) == b"hello"
    peer.sendall(b"world")
    [(h, data)] = pump(vs, drv)
    assert (h.op, data, h.fwd_cnt) == (V.OP_RW, b"world", 5)


def test_guest_connect_to_a_port_nobody_listens_on_gets_rst():
    drv, vs, _, _ = rig()
    drv.send(hdr(V.OP_REQUEST, dst_port=9))
    [(h, _)] = pump(vs, drv)
    assert (h.op, h.src_port, h.dst_port) == (V.OP_RST, 9, 5000) and not vs.conns


def test_host_data_respects_the_guests_credit_and_resumes_on_credit_update():
    drv, vs, host, _ = rig()
    drv.send(hdr(V.OP_REQUEST, buf_alloc=1000))
    pump(vs, drv)
    peer = host.mine[1234][0]
    peer.sendall(bytes(range(256)) * 10)
    got = pump(vs, drv)
    assert sum(len(d) for _, d in got) == 1000           # the guest's whole buffer, no more
    assert pump(vs, drv) == []
    drv.send(hdr(V.OP_CREDIT_UPDATE, buf_alloc=1000, fwd_cnt=1000))
    got2 = pump(vs, drv)
    assert b"".join(d for _, d in got + got2) == (bytes(range(256)) * 10)[:2000]


def test_a_hostile_fwd_cnt_gives_no_credit():
    drv, vs, host, _ = rig()
    drv.send(hdr(V.OP_REQUEST, buf_alloc=100))
    pump(vs, drv)
    host.mine[1234][0].sendall(b"x" * 500)
    pump(vs, drv)
    drv.send(hdr(V.OP_CREDIT_UPDATE, buf_alloc=100, fwd_cnt=0xFFFF_FF00))  # "consumed" more than was sent
    assert pump(vs, drv) == []


def test_guest_data_past_our_credit_resets_the_connection():
    drv, vs, host, _ = rig()
    drv.send(hdr(V.OP_REQUEST))
    pump(vs, drv)
    peer = host.mine[1234][0]
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = b"z" * 4000
    for _ in range(2000):           # nobody reads the peer: its socket buffers fill, then ours
        drv.mem.write(TX_BUF, hdr(V.OP_RW, length=len(chunk)).pack() + chunk)
        drv.offer(1, [(TX_BUF, V.HDR_SIZE + len(chunk), False)], 0)
        conn = vs.conns.get((5000, 1234))
        if conn is None or V.OP_RST in conn.ops:
            break
        assert len(conn.to_host) <= V.HOST_BUF_ALLOC
    assert (5000, 1234) not in vs.conns or V.OP_RST in vs.conns[(5000, 1234)].ops
    assert any(h.op == V.OP_RST for h, _ in pump(vs, drv))


def test_guest_shutdown_flushes_then_resets_and_closes_the_peer():
    drv, vs, host, _ = rig()
    drv.send(hdr(V.OP_REQUEST))
    pump(vs, drv)
    peer = host.mine[1234][0]
    drv.send(hdr(V.OP_RW, length=3), b"bye")
    drv.send(hdr(V.OP_SHUTDOWN, flags=V.SHUTDOWN_BOTH))
    assert [h.op for h, _ in pump(vs, drv)] == [V.OP_RST]
    assert peer.recv(10) == b"bye" and peer.recv(10) == b""
    assert not vs.conns


def test_host_end_of_stream_sends_shutdown_and_the_guests_rst_closes():
    drv, vs, host, _ = rig()
    drv.send(hdr(V.OP_REQUEST))
    pump(vs, drv)
    host.mine[1234][0].close()
    [(h, _)] = pump(vs, drv)
    assert (h.op, h.flags) == (V.OP_SHUTDOWN, V.SHUTDOWN_BOTH)
    drv.send(hdr(V.OP_RST))
    assert not vs.conns


# --- host to guest ----------------------------------------------------------------------------

def test_host_connect_gets_ok_after_the_guests_response():
    drv, vs, _, _ = rig()
    a, b = socket.socketpair()
    a.setblocking(False)
    conn = vs.connect_from_host(80, a)
    [(h, _)] = pump(vs, drv)
    assert (h.op, h.dst_port, h.src_port) == (V.OP_REQUEST, 80, conn.host_port)
    assert conn.host_port >= V.FIRST_HOST_PORT
    drv.send(hdr(V.OP_RESPONSE, src_port=80, dst_port=conn.host_port))
    b.settimeout(2)
    assert b.recv(100) == f"OK {conn.host_port}\n".encode()
    assert conn.fwd_cnt == 0                            # our line is not guest data


def test_host_connect_refused_by_the_guest_closes_the_socket():
    drv, vs, _, _ = rig()
    a, b = socket.socketpair()
    a.setblocking(False)
    conn = vs.connect_from_host(80, a)
    pump(vs, drv)
    drv.send(hdr(V.OP_RST, src_port=80, dst_port=conn.host_port))
    b.settimeout(2)
    assert b.recv(100) == b"" and not vs.conns


# --- hostile guests ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(src_cid=3), dict(dst_cid=7), dict(dst_cid=1), dict(len=1 << 20),
                                 dict(len=10)])
def test_misaddressed_or_overlong_packets_are_dropped_without_reply(bad):
    drv, vs, _, _ = rig()
    drv.send(hdr(V.OP_REQUEST, **bad))                  # len=10 with no payload: longer than the chain
    assert vs.dropped == 1 and not vs.conns and pump(vs, drv) == []


def test_unknown_connection_and_bad_type_get_rst():
    drv, vs, _, _ = rig()
    drv.send(hdr(V.OP_RW, length=2), b"hi")
    drv.send(hdr(V.OP_REQUEST, type=2))
    drv.send(hdr(9))
    drv.send(hdr(V.OP_RST))                             # a RST is never answered
    assert [h.op for h, _ in pump(vs, drv)] == [V.OP_RST] * 3


def test_a_request_flood_is_bounded():
    drv, vs, _, _ = rig(max_connections=8)
    for port in range(100):
        drv.send(hdr(V.OP_REQUEST, src_port=port))
    assert len(vs.conns) == 8 and len(vs.rsts) <= V.MAX_PENDING_RST


def test_an_rx_buffer_too_small_for_a_header_is_a_driver_error():
    drv, vs, _, _ = rig()
    drv.used(0)
    mem = drv.mem
    drv2 = Driver(R.VirtioMmioTransport(vs, mem), mem)
    drv2.init()
    drv2.offer(0, [(RX_BUF, 10, True)], 0)
    drv2.send(hdr(V.OP_REQUEST, dst_port=9))
    drv2.wr(R.QueueNotify, 0)
    assert drv2.rd(R.Status) & R.DEVICE_NEEDS_RESET


def test_transport_reset_event_is_delivered_once():
    drv, vs, host, _ = rig()
    drv.send(hdr(V.OP_REQUEST))
    vs.transport_reset()
    assert not vs.conns and host.mine[1234][0].recv(10) == b""
    drv.mem.write(EV_BUF, b"\xff" * 4)
    drv.offer(2, [(EV_BUF, 4, True)], 0)
    assert drv.used(2) == [(0, 4)] and drv.mem.read(EV_BUF, 4) == b"\0\0\0\0"
    drv.offer(2, [(EV_BUF, 4, True)], 0)
    assert drv.used(2) == []


def test_driver_reset_closes_every_connection_the_guest_knew_of():
    drv, vs, host, _ = rig()
    drv.send(hdr(V.OP_REQUEST))
    a, b = socket.socketpair()
    waiting = vs.connect_from_host(80, a)               # its REQUEST is not delivered yet
    drv.wr(R.Status, 0)
    assert list(vs.conns.values()) == [waiting] and host.mine[1234][0].recv(10) == b""
    again = Driver(drv.dev, drv.mem)
    again.init()
    again.post_rx()
    assert [h.op for h, _ in again.received()] == [V.OP_REQUEST]


_packets = st.lists(st.tuples(
    st.builds(V.Header, src_cid=st.sampled_from([GUEST_CID, 2, 3, 0xFFFF_FFFF]),
              dst_cid=st.sampled_from([2, GUEST_CID, 0]), src_port=st.integers(0, 3),
              dst_port=st.sampled_from([1234, 9, V.FIRST_HOST_PORT]), len=st.integers(0, 70000),
              type=st.sampled_from([1, 1, 1, 2]), op=st.integers(0, 9), flags=st.integers(0, 7),
              buf_alloc=st.integers(0, 0xFFFF_FFFF), fwd_cnt=st.integers(0, 0xFFFF_FFFF)),
    st.binary(max_size=300), st.booleans()), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_packets, st.booleans())
def test_hostile_packet_sequences_keep_every_bound(packets, host_first):
    drv, vs, host, _ = rig(max_connections=3)
    if host_first:
        a, _ = socket.socketpair()
        a.setblocking(False)
        vs.connect_from_host(1, a)
    for h, payload, split in packets:
        raw = h.pack() + payload
        drv.mem.write(TX_BUF, raw)
        drv.offer(1, [(TX_BUF, len(raw), False)], 0)
        assert drv.used(1) == [(0, 0)]
        for peers in host.mine.values():
            for p in peers:
                try:
                    p.setblocking(False)
                    p.send(b"data")
                except OSError:
                    pass
        for h2, data in pump(vs, drv):
            assert h2.src_cid == 2 and h2.dst_cid == GUEST_CID and h2.len == len(data)
        assert len(vs.conns) <= 3 and len(vs.rsts) <= V.MAX_PENDING_RST
        assert all(len(c.to_host) <= V.HOST_BUF_ALLOC for c in vs.conns.values())
    assert not drv.rd(R.Status) & R.DEVICE_NEEDS_RESET
