"""The network backends with the real things: Debian's passt (DHCP, and UDP to a server on
the host's loopback through passt's gateway mapping) and a TAP interface (root only).
Traffic stays on this machine."""
import os
import select
import shutil
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import netpackets as P  # noqa: E402

from kvmpy.net import Net, NetBackendError  # noqa: E402
from kvmpy.net.passt import Passt  # noqa: E402
from kvmpy.net.tap import Tap  # noqa: E402

MAC = bytes.fromhex("026b766d7001")
need_passt = pytest.mark.skipif(shutil.which("passt") is None or not P.has_default_route(),
                                reason="passt is not installed (apt-get install passt), or this host has no default "
                                       "route for it to take its addresses from (docs/net.md)")
need_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                               reason="a TAP interface needs CAP_NET_ADMIN and /dev/net/tun")


def wait_frames(backend, want, timeout=5.0):
    """Frames from ``backend`` until ``want(frame)`` returns something; that something."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([backend], [], [], 0.1)
        for f in backend.receive():
            got = want(f)
            if got is not None:
                return got
    raise AssertionError("no such frame arrived")


@need_passt
def test_passt_gives_dhcp_and_maps_the_gateway_to_the_host_loopback():
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    with_passt = Passt.start()
    try:
        assert with_passt.child.poll() is None
        assert with_passt.send(P.dhcp_discover(MAC))
        ip, router, server_mac = wait_frames(with_passt, P.dhcp_offer)
        assert router is not None and ip != bytes(4)
        assert with_passt.send(P.eth(server_mac, MAC, P.ETH_IP, P.ipv4_udp(ip, router, 4321, port, b"ping")))
        server.settimeout(5)
        data, peer = server.recvfrom(100)
        assert data == b"ping" and peer[0] == "127.0.0.1"
        server.sendto(b"pong", peer)
        reply = wait_frames(with_passt, lambda f: (u := P.parse_udp(f)) and u[4] == 4321 and u or None)
        assert reply[1] == router and reply[2] == ip and reply[3] == port and reply[5] == b"pong"
    finally:
        child = with_passt.child
        with_passt.close()
        server.close()
    assert child.returncode is not None                          # passt ended with our socket
    with_passt.close()                                           # idempotent


@need_passt
def test_passt_that_cannot_start_says_why(tmp_path):
    with pytest.raises(NetBackendError, match="passt exited at once"):
        Passt.start(args=("--no-such-option",))
    with pytest.raises(NetBackendError, match="not installed"):
        Passt.start(passt=str(tmp_path / "no-passt"))
    with pytest.raises(NetBackendError, match="cannot connect"):
        Net.parse(f"passt:{tmp_path}/none.sock").open()


@need_passt
def test_passt_child_dies_with_its_parent():
    code = ("import os, sys; from kvmpy.net.passt import Passt; p = Passt.start(); "
            "print(p.child.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and \
            "passt" in open(f"/proc/{pid}/comm").read():
        time.sleep(0.05)
    assert not (os.path.exists(f"/proc/{pid}") and "passt" in open(f"/proc/{pid}/comm").read())


def test_a_peer_that_sends_a_huge_length_is_a_clear_error():
    a, b = socket.socketpair()
    p = Passt(a, "the test peer")
    b.sendall(b"\x7f\xff\xff\xff")
    with pytest.raises(NetBackendError, match="the test peer: the peer sent a frame length of 2147483647"):
        p.receive()
    p.close()
    a, b = socket.socketpair()
    p = Passt(a, "the test peer")
    b.sendall(b"\0\0\0\x20" + b"x" * 10)
    b.close()
    with pytest.raises(NetBackendError, match="middle of a frame"):
        p.receive()
    p.close()


def test_a_stream_backend_never_cuts_a_frame_and_drops_when_full():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    p = Passt(a, "peer")
    f = bytes(1500)
    sent = sum(p.send(f) for _ in range(5000))
    assert p.tx_dropped == 5000 - sent and sent < 5000 and p.wants_write()
    b.setblocking(False)
    total = b""
    for _ in range(10000):
        try:
            total += b.recv(1 << 20)
        except BlockingIOError:
            p.flush()
            if not p.wants_write():
                try:
                    total += b.recv(1 << 20)
                except BlockingIOError:
                    break
    from kvmpy.net.stream import FrameReader
    assert FrameReader().feed(total) == [f] * sent
    p.close()


@need_root
def test_tap_frames_reach_the_host_kernel():
    name = f"kvmpyt{os.getpid() % 10000}"
    tap = Tap(name)
    try:
        subprocess.run(["ip", "addr", "add", "10.213.7.1/24", "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        tap.send(P.arp_request(MAC, bytes([10, 213, 7, 2]), bytes([10, 213, 7, 1])))

        def arp_reply(f):
            return f[6:12] if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" and f[0:6] == MAC else None
        host_mac = wait_frames(tap, arp_reply)
        assert len(host_mac) == 6 and host_mac != MAC
    finally:
        tap.close()
    assert subprocess.run(["ip", "link", "show", name], capture_output=True).returncode != 0   # gone with the fd


@need_root
def test_tap_without_cap_net_admin_says_what_is_needed():
    code = "from kvmpy.net.tap import Tap; Tap('kvmpynocap0')"
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    root_without_it = subprocess.run(["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin",
                                      sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=top)
    assert "TUNSETIFF failed: Operation not permitted (creating a TAP interface, or using one someone else " \
           "owns, needs CAP_NET_ADMIN" in root_without_it.stderr
    assert "ip tuntap add kvmpynocap0 mode tap user $USER" in root_without_it.stderr
    if os.stat("/dev/net/tun").st_mode & 0o006 != 0o006:
        nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                                 "-c", code], capture_output=True, text=True, timeout=30, cwd=top)
        assert "cannot open /dev/net/tun: Permission denied (this user may not open it" in nobody.stderr
