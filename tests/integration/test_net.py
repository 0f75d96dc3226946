"""virtio-net on a real machine: the net-udp guest gets an address by DHCP and exchanges UDP
with a server on this host, through passt (the gateway is the host's loopback) and through a
TAP interface the test creates (root); snapshots carry the queues and re-make the backend.
Traffic stays on this machine."""
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.net import Net

from . import lab

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import netpackets as P  # noqa: E402

G = guests.get("net-udp")
PORT = 40123                                    # the guest's server port (guests/net-udp.c)
LOOPS = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
need_passt = pytest.mark.skipif(shutil.which("passt") is None or not P.has_default_route(),
                                reason="passt is not installed (apt-get install passt), or this host has no default "
                                       "route for it to take its addresses from (docs/net.md)")
need_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                               reason="a TAP interface needs CAP_NET_ADMIN and /dev/net/tun")
OK = G.expect_status ^ (0x63 << 1) ^ (0x62 << 1)      # exit 0x62


class UdpServer:
    """Answers each datagram on ``addr``:PORT with 'hello guest, you said <it>'."""

    def __init__(self, addr="127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, PORT))
        self.sock.settimeout(0.2)
        self.got, self.stop = [], False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                data, peer = self.sock.recvfrom(2048)
            except socket.timeout:
                continue
            self.got.append((data, peer))
            self.sock.sendto(b"hello guest, you said " + data, peer)

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


@pytest.fixture
def server():
    s = UdpServer()
    yield s
    s.close()


def start(**options):
    m = kvmpy.Machine(mem_size=16 << 20, **options)
    m.load(G.path, G.format, mode=G.mode, user=G.user)
    return m


def check_answer(m, router):
    out = m.serial_output.decode()
    assert out.startswith("net-udp: mac 02:6b:76:6d:70:01\nnet-udp: address "), out
    assert re.search(rf"router {re.escape(router)}\n", out), out
    assert out.endswith("net-udp: the host says 'hello guest, you said hello from the guest'\n"), out


def default_gateway() -> str:
    for line in open("/proc/net/route").read().splitlines()[1:]:
        f = line.split()
        if f[1] == "00000000":
            return socket.inet_ntoa(struct.pack("<I", int(f[2], 16)))
    return ""


TRANSPORTS = pytest.mark.parametrize("transport", ["mmio", "pci"])   # the same guest driver behind both


@need_passt
@LOOPS
@TRANSPORTS
def test_dhcp_and_udp_to_the_host_loopback_through_passt(server, native, transport):
    with start(native=native, net="passt", virtio_transport=transport) as m:
        assert m.platform.slot("virtio-net").bus == transport
        result = m.run(timeout=30)
        assert (result.reason, result.status) == ("exit", OK), m.serial_output
        check_answer(m, default_gateway() or r"[\d.]+")
        assert server.got[0][0] == b"hello from the guest" and server.got[0][1][0] == "127.0.0.1"
        c = m.platform.slot("virtio-net").model.device.counters
        assert c["tx_frames"] >= 2 and c["rx_frames"] >= 2 and c["tx_dropped"] == c["rx_bad_chain"] == 0
        child = m.platform.slot("virtio-net").backend.backend.child
    assert child.returncode is not None                     # passt ended with the machine


@need_passt
def test_the_net_device_takes_the_window_after_the_disks_and_the_rng(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    with kvmpy.Machine(mem_size=16 << 20, disks=[str(disk)], rng=True, net="passt") as m:
        assert [(s.name, s.irq, s.virtio) for s in m.platform.virtio_mmio] == [
            ("virtio-blk0", 5, 2), ("virtio-rng", 6, 4), ("virtio-net", 7, 1)]
        assert m.shape()["net"] == "passt"
    with pytest.raises(ValueError, match="at most 6 virtio devices"):
        kvmpy.Machine(mem_size=16 << 20, disks=[str(disk)] * 6, net="passt")


def test_without_a_network_there_is_no_device():
    with start() as m:
        result = m.run(timeout=20)
        assert (result.status, m.serial_output) == (G.expect_status, G.expect_output)
        assert "net" not in m.shape()


def test_bad_network_specs_are_clear_errors():
    with pytest.raises(ValueError, match="bad network 'slirp'"):
        kvmpy.Machine(mem_size=16 << 20, net="slirp")
    with pytest.raises(kvmpy.errors.KvmpyError, match="cannot connect to '/nonexistent/p.sock'"):
        kvmpy.Machine(mem_size=16 << 20, net="passt:/nonexistent/p.sock")


@need_passt
def test_a_snapshot_carries_the_queues_and_remakes_the_backend(server, tmp_path):
    with start(net="passt") as m:
        assert m.run(timeout=30).status == OK
        saved = m.platform.slot("virtio-net").model.save_state()
        assert saved["queues"][0]["ready"] and saved["queues"][1]["used_idx"] >= 2
        first = m.platform.slot("virtio-net").backend.backend.child.pid
        m.snapshot(tmp_path / "snap")
    with kvmpy.Machine.restore(tmp_path / "snap") as r:
        slot = r.platform.slot("virtio-net")
        assert slot.model.save_state() == saved and r.shape()["net"] == "passt"
        assert slot.backend.backend.child.pid != first and slot.backend.backend.child.poll() is None
    with pytest.raises(kvmpy.errors.KvmpyError, match="cannot connect"):
        kvmpy.Machine.restore(tmp_path / "snap", net="passt:/nonexistent/p.sock")


@need_passt
def test_kvmpy_run_net_passt(server):
    out = subprocess.run([sys.executable, "-m", "kvmpy", "run", str(G.path), "--mode", "long", "--user",
                          "--mem", "16M", "--net", "passt", "--timeout", "30"], capture_output=True, timeout=60,
                         env=lab.CHILD_ENV, cwd="/")
    assert b"net-udp: the host says 'hello guest, you said hello from the guest'" in out.stdout, out
    bad = subprocess.run([sys.executable, "-m", "kvmpy", "run", str(G.path), "--net", "tap"],
                         capture_output=True, timeout=60, env=lab.CHILD_ENV, cwd="/")
    assert bad.returncode == 2 and b"a TAP network needs an interface name" in bad.stderr


# --- TAP: the test creates the interface through the Machine, addresses it, and plays the
#     DHCP server with a packet socket on it; the UDP server listens on the TAP's address.

def dhcp_server(s, host_mac, stop):
    while not stop.is_set():
        try:
            f = s.recv(2048)
        except socket.timeout:
            continue
        u = P.parse_udp(f)
        if u and u[4] == 67 and len(u[5]) >= 240 and u[5][0] == 1:
            xid, mac = u[5][4:8], u[5][28:34]
            bootp = struct.pack("!BBBB4sHH4s4s4s4s16s64s128s", 2, 1, 6, 0, xid, 0, 0x8000, bytes(4),
                                socket.inet_aton("10.213.9.2"), socket.inet_aton("10.213.9.1"), bytes(4),
                                mac.ljust(16, b"\0"), b"", b"")
            opts = b"\x63\x82\x53\x63\x35\x01\x02\x01\x04\xff\xff\xff\x00\x03\x04" + socket.inet_aton("10.213.9.1") + b"\xff"
            s.send(P.eth(mac, host_mac, P.ETH_IP, P.ipv4_udp(socket.inet_aton("10.213.9.1"),
                                                              b"\xff" * 4, 67, 68, bootp + opts)))
    s.close()


@need_root
@LOOPS
def test_dhcp_and_udp_over_a_tap_interface(native):
    name = f"kvmpyn{os.getpid() % 10000}"
    with start(native=native, net=Net("tap", name)) as m:
        ip = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True)   # noqa: E731
        ip("addr", "add", "10.213.9.1/24", "dev", name)
        ip("link", "set", name, "up")
        ip("neigh", "replace", "10.213.9.2", "lladdr", "02:6b:76:6d:70:01", "dev", name)
        host_mac = bytes.fromhex(open(f"/sys/class/net/{name}/address").read().strip().replace(":", ""))
        stop = threading.Event()
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        raw.bind((name, 0))
        raw.settimeout(0.2)
        dhcp = threading.Thread(target=dhcp_server, args=(raw, host_mac, stop), daemon=True)
        dhcp.start()
        udp = UdpServer("10.213.9.1")
        try:
            result = m.run(timeout=30)
        finally:
            stop.set()
            dhcp.join()
            udp.close()
        assert (result.reason, result.status) == ("exit", OK), m.serial_output
        check_answer(m, "10.213.9.1")
        assert "net-udp: address 10.213.9.2 router 10.213.9.1\n" in m.serial_output.decode()
        assert udp.got[0] == (b"hello from the guest", ("10.213.9.2", 40124))
    assert subprocess.run(["ip", "link", "show", name], capture_output=True).returncode != 0   # gone with the machine


# --- a hostile peer: the test plays passt on a UNIX socket (--net passt:SOCKET), answers the
#     guest, floods it, and then breaks the stream; the machine and the guest go on.

def fake_passt(conn, flood, stop):
    """Serve DHCP and UDP like passt, but send ``flood`` junk frames before the offer and end
    the stream with a 4 GiB length after the answer."""
    from kvmpy.net.stream import FrameReader, encode
    mine, reader = bytes.fromhex("02fc00000001"), FrameReader()
    ip, gw = socket.inet_aton("10.0.2.15"), socket.inet_aton("10.0.2.2")
    conn.settimeout(0.2)
    while not stop.is_set():
        try:
            data = conn.recv(1 << 16)
        except socket.timeout:
            continue
        if not data:
            return
        for f in reader.feed(data):
            u = P.parse_udp(f)
            if u and u[4] == 67:
                xid, mac = u[5][4:8], u[5][28:34]
                junk = encode(P.BROADCAST + mine + b"\x88\xb5" + bytes(50))
                conn.sendall(junk * flood)
                bootp = struct.pack("!BBBB4sHH4s4s4s4s16s64s128s", 2, 1, 6, 0, xid, 0, 0, bytes(4), ip, gw,
                                    bytes(4), mac.ljust(16, b"\0"), b"", b"")
                opts = b"\x63\x82\x53\x63\x35\x01\x02\x03\x04" + gw + b"\xff"
                stop.wait(0.3)                      # the guest empties the backlog first
                conn.sendall(encode(P.eth(mac, mine, P.ETH_IP, P.ipv4_udp(gw, P.BROADCAST[:4], 67, 68, bootp + opts))))
            elif u and u[4] == PORT:
                answer = P.eth(u[0], mine, P.ETH_IP, P.ipv4_udp(gw, ip, PORT, u[3], b"fake passt says hi"))
                conn.sendall(encode(answer) + b"\xff\xff\xff\xff" + encode(answer))


@LOOPS
@TRANSPORTS
def test_a_hostile_peer_floods_the_guest_then_breaks_the_stream(tmp_path, native, transport):
    path = str(tmp_path / "p.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    with start(native=native, net=f"passt:{path}", virtio_transport=transport) as m:
        conn, _ = listener.accept()
        stop = threading.Event()
        peer = threading.Thread(target=fake_passt, args=(conn, 1000, stop), daemon=True)
        peer.start()
        try:
            result = m.run(timeout=30)
        finally:
            stop.set()
            peer.join()
        assert (result.reason, result.status) == ("exit", OK), m.serial_output
        assert m.serial_output.endswith(b"net-udp: address 10.0.2.15 router 10.0.2.2\n"
                                        b"net-udp: the host says 'fake passt says hi'\n")
        slot = m.platform.slot("virtio-net")
        c = slot.model.device.counters
        # the flood waited in the socket while the guest's ring and the backlog were full
        assert c["rx_dropped"] == 0 and len(slot.model.device.backlog) <= 256
        assert c["rx_frames"] >= 1000 + 2
        pump = slot.backend
        pump.thread.join(5)
        assert pump.error == f"the socket {path}: the peer sent a frame length of 4294967295 bytes; " \
                             "at most 65550 are allowed (a broken or hostile peer)"
        assert not slot.model.core.status & 0x40           # the device is fine: the cable was pulled
        conn.close()
    listener.close()


def flooding_passt(conn, stop, sent):
    """Offer an address, then send junk frames (not the answer) every millisecond."""
    from kvmpy.net.stream import FrameReader, encode
    mine, reader = bytes.fromhex("02fc00000001"), FrameReader()
    ip, gw = socket.inet_aton("10.0.2.15"), socket.inet_aton("10.0.2.2")
    offered = False
    conn.settimeout(5)
    while not stop.is_set():
        if select.select([conn], [], [], 0.001)[0]:
            data = conn.recv(1 << 16)
            for f in reader.feed(data):
                u = P.parse_udp(f)
                if u and u[4] == 67 and not offered:
                    xid, mac = u[5][4:8], u[5][28:34]
                    bootp = struct.pack("!BBBB4sHH4s4s4s4s16s64s128s", 2, 1, 6, 0, xid, 0, 0, bytes(4), ip, gw,
                                        bytes(4), mac.ljust(16, b"\0"), b"", b"")
                    conn.sendall(encode(P.eth(mac, mine, P.ETH_IP, P.ipv4_udp(
                        gw, P.BROADCAST[:4], 67, 68, bootp + b"\x63\x82\x53\x63\x35\x01\x02\x03\x04" + gw + b"\xff"))))
                    offered = True
        if offered:                                     # blocking: a frame is never cut short
            try:
                conn.sendall(encode(P.BROADCAST + mine + b"\x88\xb5" + bytes(50)))
            except OSError:                             # timed out: nobody reads any more
                return
            sent[0] += 1


def test_no_frame_lands_in_a_paused_guest(tmp_path):
    """The network thread moves frames only while the run is on: paused, the receive
    ring's used index stands still however many frames the peer sends; resumed, it moves."""
    path = str(tmp_path / "p.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    with start(net=f"passt:{path}") as m:
        conn, _ = listener.accept()
        stop, sent = threading.Event(), [0]
        peer = threading.Thread(target=flooding_passt, args=(conn, stop, sent), daemon=True)
        peer.start()
        slot = m.platform.slot("virtio-net")
        used = lambda: slot.model.queues[0].live.used_idx if slot.model.queues[0].live else 0   # noqa: E731
        m.start(timeout=30)
        try:
            wait_until = time.monotonic() + 20
            while slot.model.device.counters["rx_frames"] < 20 and time.monotonic() < wait_until:
                time.sleep(0.01)
            assert slot.model.device.counters["rx_frames"] >= 20, m.serial_output
            assert m.pause()
            before, sent_before, ram = used(), sent[0], m.memory.read(0x100000, 0x100000)
            time.sleep(0.5)
            assert sent[0] > sent_before + 50                  # the peer kept sending ...
            assert used() == before                             # ... and nothing reached the ring
            assert m.memory.read(0x100000, 0x100000) == ram     # nor the guest's buffers
            m.resume()
            wait_until = time.monotonic() + 10
            while used() == before and time.monotonic() < wait_until:
                time.sleep(0.01)
            assert used() != before
        finally:
            m.request_stop()
            m.wait(10)
            stop.set()
            peer.join()
            conn.close()
    listener.close()


def test_kvmpy_restore_takes_another_backend_or_says_why_not(tmp_path):
    """restore --net: the saved machine's network card gets this backend; one without a card
    cannot be given one."""
    path = str(tmp_path / "p.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    with start(net=f"passt:{path}") as m:
        m.snapshot(tmp_path / "with")
    with start() as m:
        m.snapshot(tmp_path / "without")
    restore = [sys.executable, "-m", "kvmpy", "restore", "--timeout", "1"]
    bad = subprocess.run([*restore, str(tmp_path / "with"), "--net", f"passt:{tmp_path}/none.sock"],
                         capture_output=True, timeout=60, env=lab.CHILD_ENV, cwd="/")
    assert bad.returncode != 0 and b"cannot restore: passt: cannot connect to" in bad.stderr, bad.stderr
    none = subprocess.run([*restore, str(tmp_path / "without"), "--net", "passt"], capture_output=True, timeout=60,
                          env=lab.CHILD_ENV, cwd="/")
    assert none.returncode != 0 and b"has no network device; net= cannot add one" in none.stderr, none.stderr
    listener.close()


@need_passt
@LOOPS
def test_a_flood_of_datagrams_reaches_the_host_in_order(native):
    """net-udp with flood=N: N 1400-byte datagrams through passt, each one frame and one notify."""
    n, got, done = 300, [], threading.Event()
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    srv.bind(("127.0.0.1", PORT))
    srv.settimeout(0.2)

    def serve():
        while not done.is_set():
            try:
                data, peer = srv.recvfrom(2048)
            except socket.timeout:
                continue
            if data == b"hello from the guest":
                srv.sendto(b"go", peer)
            elif data == b"flood done":
                done.set()
            else:
                got.append(data)
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        m = kvmpy.Machine(mem_size=16 << 20, net="passt", native=native)
        with m:
            m.load(G.path, G.format, mode=G.mode, user=G.user, cmdline=f"flood={n}")
            result = m.run(timeout=60)
            assert (result.reason, result.status) == ("exit", OK), m.serial_output
            assert m.serial_output.endswith(b"net-udp: the host says 'go'\nnet-udp: flooding 300 datagrams\n"
                                            b"net-udp: flood sent\n")
            assert m.platform.slot("virtio-net").model.device.counters["tx_frames"] >= n + 2
        assert done.wait(5)
    finally:
        done.set()
        server.join()
        srv.close()
    assert [int.from_bytes(d[:8], "little") for d in got] == list(range(n))
    assert all(len(d) == 1400 for d in got)
