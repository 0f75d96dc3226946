"""virtio-vsock on a real machine: the vsock-echo guest answers a host program that connects
through the VM's UNIX socket, and calls a host listener on PATH_5678; the host side refuses
garbage clearly, closes everything with the machine, and a restored guest hears of the reset."""
import os
import socket
import subprocess
import sys
import threading

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.devices.virtio.vsock import VIRTIO_ID_VSOCK
from kvmpy.lifecycle.snapshot import SnapshotError
from kvmpy.vmm.platform import Vsock

from . import lab
from .lab import wait_until

G = guests.get("vsock-echo")
LOOPS = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
ECHO_BYTES = 24 << 10           # six times the guest's 4 KiB receive buffer: credit updates needed


def start(vsock, **options):
    m = kvmpy.Machine(mem_size=16 << 20, vsock=vsock, **options)
    m.load(G.path, G.format, mode=G.mode, user=G.user)
    return m


def readline(s: socket.socket, limit=100) -> bytes:
    out = b""
    while not out.endswith(b"\n") and len(out) < limit:
        b = s.recv(1)
        if not b:
            break
        out += b
    return out


def connect(path, port=1234) -> tuple[socket.socket, bytes]:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(30)
    c.connect(path)
    c.sendall(b"CONNECT %d\n" % port)
    return c, readline(c)


def echo(c: socket.socket, data: bytes) -> bytes:
    """Send ``data`` from a thread while reading the echo here."""
    sender = threading.Thread(target=c.sendall, args=(data,))
    sender.start()
    got = b""
    while len(got) < len(data):
        chunk = c.recv(65536)
        if not chunk:
            break
        got += chunk
    sender.join(30)
    return got


def host_listener(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(f"{path}_5678")
    s.listen(1)
    s.settimeout(30)
    return s


@LOOPS
@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_the_guest_echoes_a_host_connection_then_calls_the_host(tmp_path, native, transport):
    """The same guest and driver behind virtio-mmio and behind virtio-pci (guests/runtime/virtio_pci.c's
    vio_find_pci carries virtio_vsock.c over to the PCI function)."""
    path = str(tmp_path / "vm.sock")
    listener = host_listener(path)
    with start(path, native=native, virtio_transport=transport) as m:
        assert m.platform.slot("virtio-vsock").bus == transport
        m.start(timeout=120)
        wait_until(lambda: b"listening on port 1234" in m.serial_output, 30, "the guest's device")
        c, ok = connect(path)
        assert ok.startswith(b"OK ") and int(ok[3:]) >= 1 << 30
        data = os.urandom(ECHO_BYTES)
        assert echo(c, data) == data
        c.close()                               # the guest gets SHUTDOWN and answers RST
        s, _ = listener.accept()
        assert readline(s) == b"hello from the guest\n"
        s.sendall(b"hello from the host\n")
        result = m.wait(60)
        assert (result.reason, result.status) == ("exit", G.disk_status), m.serial_output
        assert m.serial_output.decode().splitlines()[1:] == [
            "vsock-echo: cid 3, listening on port 1234", f"vsock-echo: echoed {ECHO_BYTES} bytes",
            "vsock-echo: host says: hello from the host", "vsock-echo: done"]
        dev = m.platform.slot("virtio-vsock").model.device
        assert dev.dropped == 0 and not dev.conns
        assert s.recv(10) == b""                # the guest's SHUTDOWN closed our end
    assert not os.path.exists(path)             # close() removed the socket
    listener.close()


def test_a_host_peer_sending_garbage_gets_an_error_line_and_a_close(tmp_path):
    path = str(tmp_path / "vm.sock")
    with start(path) as m:
        for junk in (b"HELLO\n", b"CONNECT\n", b"CONNECT 99999999999\n", b"CONNECT -1\n",
                     b"x" * 100):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(10)
            c.connect(path)
            c.sendall(junk)
            line = readline(c, 200)
            assert line.startswith(b"ERROR expected 'CONNECT <port>\\n'"), (junk, line)
            assert c.recv(10) == b""
            c.close()
        assert m.platform.slot("virtio-vsock").backend.refused == 5


def test_closing_the_machine_closes_a_waiting_host_socket(tmp_path):
    """The guest is not running: its device is not live, so the REQUEST waits; closing the
    machine closes the waiting socket and removes PATH."""
    path = str(tmp_path / "vm.sock")
    m = start(path)
    c, line = None, None
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        c.connect(path)
        c.sendall(b"CONNECT 7\n")
        host = m.platform.slot("virtio-vsock").backend
        wait_until(lambda: len(host.device.conns) == 1, 10, "the connection")
    finally:
        m.close()
    assert c.recv(10) == b"" and not os.path.exists(path)


def test_host_connections_are_bounded(tmp_path):
    """The guest never answers (it does not run): 64 connections wait in the device, the
    others are told why and closed; a host program that sends half a line and stops waits
    among at most 16 (MAX_HANDSHAKES) until its deadline."""
    from kvmpy.devices.virtio.vsock import MAX_CONNECTIONS
    from kvmpy.vmm.vsock import MAX_HANDSHAKES
    path = str(tmp_path / "vm.sock")
    socks = []
    with start(path) as m:
        host = m.platform.slot("virtio-vsock").backend
        for port in range(MAX_CONNECTIONS + 6):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)                     # blocking: waits while the backlog is full
            c.settimeout(10)
            c.sendall(b"CONNECT %d\n" % port)
            socks.append(c)
        wait_until(lambda: host.refused == 6, 10, "the refusals")
        assert len(host.device.conns) == MAX_CONNECTIONS
        for c in socks[MAX_CONNECTIONS:]:
            assert readline(c, 200) == b"ERROR the vsock device has its maximum of connections\n"
        half = []
        for _ in range(MAX_HANDSHAKES + 2):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            c.settimeout(10)
            try:
                c.sendall(b"CONN")
            except (BrokenPipeError, ConnectionResetError):
                pass                            # one of the 2 extra: refused and closed at once
            half.append(c)
        wait_until(lambda: host.refused == 8, 10, "the refusals of the extra half lines")
        assert len(host.handshakes) == MAX_HANDSHAKES and host.errors == 0
        socks += half
    for c in socks:
        c.close()


def test_the_device_takes_the_window_after_the_rng_and_its_cid(tmp_path):
    with kvmpy.Machine(mem_size=16 << 20, rng=True, vsock=Vsock(str(tmp_path / "v"), cid=42)) as m:
        slots = m.platform.virtio_mmio
        assert [(s.name, s.virtio) for s in slots] == [("virtio-rng", 4), ("virtio-vsock", VIRTIO_ID_VSOCK)]
        assert m.shape()["vsock_cid"] == 42
        assert m.platform.slot("virtio-vsock").model.device.read_config(0, 8) == 42


def test_without_vsock_the_guest_finds_no_device():
    with kvmpy.Machine(mem_size=16 << 20) as m:
        m.load(G.path, G.format, mode=G.mode, user=G.user)
        result = m.run(timeout=20)
        assert (result.status, m.serial_output) == (G.expect_status, G.expect_output)


def test_a_path_in_use_is_a_clear_error(tmp_path):
    path = str(tmp_path / "vm.sock")
    with start(path):
        with pytest.raises(kvmpy.errors.DeviceError, match="another process is listening"):
            start(path)


def test_a_restored_guest_gets_a_transport_reset_event(tmp_path):
    path = str(tmp_path / "vm.sock")
    with start(path) as m:
        m.start(timeout=60)
        wait_until(lambda: b"listening on port 1234" in m.serial_output, 30, "the guest's device")
        m.pause()
        m.snapshot(tmp_path / "snap")
        m.request_stop()
        m.resume()
        m.wait(30)
    with pytest.raises(SnapshotError, match="no vsock device"):
        with kvmpy.Machine(mem_size=16 << 20) as plain:
            plain.snapshot(tmp_path / "plain")
        kvmpy.Machine.restore(tmp_path / "plain", vsock=path)
    with kvmpy.Machine.restore(tmp_path / "snap", vsock=path + "2") as r:
        slot = r.platform.slot("virtio-vsock")
        assert slot.model.device.guest_cid == 3 and not slot.model.device.reset_event
        ev = slot.model.transport.queues[2].live
        assert ev.used_idx == 1                 # the event buffer the guest posted holds the reset
        used = r.memory.read(ev.device_addr + 4, 8)
        head = int.from_bytes(used[:4], "little")
        desc = r.memory.read(ev.desc_addr + 16 * head, 16)
        assert r.memory.read(int.from_bytes(desc[:8], "little"), 4) == b"\0\0\0\0"
        listener = host_listener(path + "2")
        r.start(timeout=60)                     # the guest goes on listening: now on the new socket
        c, ok = connect(path + "2")
        assert ok.startswith(b"OK ")
        assert echo(c, b"after the restore" * 500) == b"after the restore" * 500
        c.close()
        s, _ = listener.accept()
        assert readline(s) == b"hello from the guest\n"
        s.sendall(b"restored\n")
        result = r.wait(60)
        assert result.status == G.disk_status and r.serial_output.endswith(
            b"vsock-echo: host says: restored\nvsock-echo: done\n")
    assert not os.path.exists(path + "2")
    listener.close()


def test_kvmpy_run_vsock_works_in_the_sandbox(tmp_path):
    """--vsock under the default sandbox (seccomp widened for its sockets), with a CID."""
    path = str(tmp_path / "vm.sock")
    listener = host_listener(path)
    p = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", str(G.path), "--user", "--vsock", f"{path},cid=9",
                          "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=lab.CHILD_ENV,
                         cwd="/", stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.exists(path), 30, "the vsock socket")
        c, ok = connect(path)
        assert ok.startswith(b"OK "), ok
        assert echo(c, b"ping" * 1000) == b"ping" * 1000
        c.close()
        s, _ = listener.accept()
        assert readline(s) == b"hello from the guest\n"
        s.sendall(b"pong\n")
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == G.disk_status & 0xFF, err
    assert b"vsock-echo: cid 9, listening on port 1234\n" in out and out.endswith(b"vsock-echo: done\n")
    assert not os.path.exists(path)


def test_kvmpy_run_refuses_a_bad_vsock_option():
    r = subprocess.run([sys.executable, "-m", "kvmpy", "run", str(G.path), "--vsock", "/tmp/x,cid=2"],
                       capture_output=True, timeout=60, env=lab.CHILD_ENV, cwd="/", stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and b"guest CID must be an integer in 3.." in r.stderr, r.stderr


def test_a_migrated_guest_serves_on_the_targets_socket(tmp_path):
    """Live migration in one process: the target has its own vsock socket (receive's host
    option), the source's is gone, and the guest, told of the transport reset, answers there."""
    from kvmpy import migration
    src, dst = str(tmp_path / "src.sock"), str(tmp_path / "dst.sock")
    box, ready = {}, threading.Event()

    def receive():
        try:
            box["result"] = migration.receive(("127.0.0.1", 0), timeout=30, vsock=dst,
                                              on_listen=lambda a: (box.update(addr=a), ready.set()))
        except BaseException as e:      # noqa: BLE001 - reported below
            box["error"] = e
        ready.set()

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    assert ready.wait(20) and "addr" in box, box
    with start(src) as m:
        m.start(timeout=60)
        wait_until(lambda: b"listening on port 1234" in m.serial_output, 30, "the guest's device")
        migration.send(m, *box["addr"])
        assert m.wait(10).reason == "migrated"
    t.join(30)
    assert "result" in box, box.get("error")
    target, _ = box["result"]
    listener = host_listener(dst)
    with target:
        assert not os.path.exists(src)
        c, ok = connect(dst)
        assert ok.startswith(b"OK ")
        assert echo(c, b"migrated" * 2000) == b"migrated" * 2000
        c.close()
        s, _ = listener.accept()
        assert readline(s) == b"hello from the guest\n"
        s.sendall(b"moved\n")
        result = target.wait(60)
        assert result.status == G.disk_status, target.serial_output
        assert target.serial_output.endswith(b"vsock-echo: host says: moved\nvsock-echo: done\n")
    assert not os.path.exists(dst)
    listener.close()
