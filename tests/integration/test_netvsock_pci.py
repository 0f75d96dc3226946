"""virtio-net and virtio-vsock behind virtio-pci on a real machine, with their real host
threads (NetPump, VsockHost) and the real PCI host bridge, MSI-X routes and pause gate.

The bare-metal net-udp and vsock-echo guests run behind PCI too (test_net.py, test_vsock.py),
polling; here the test is the guest's driver, for what they do not use (interrupts, pause,
snapshots of the PCI state): while a spinning guest runs, it drives each function
through the machine's own buses (0xcf8/0xcfc and the BARs' MMIO window, under the PCI
lock, as a vCPU's exit would) and keeps its rings in guest RAM. Frames and packets then
flow both ways between the rings and the host's sockets, and each interrupt is seen (the
ISR with INTx, KVM's MSI route with MSI-X).
"""
import os
import socket
import struct
import time

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.devices.pci import config as C
from kvmpy.devices.virtio import core as V
from kvmpy.devices.virtio import pci as P
from kvmpy.devices.virtio.net import NET_HDR_SIZE, RX_HDR, VIRTIO_NET_F_MAC
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from kvmpy.devices.virtio.vsock import (EVENTQ, HDR_SIZE, OP_REQUEST, OP_RESPONSE, OP_RW, RXQ, TXQ, Header)
from kvmpy.net.stream import FrameReader, encode
from kvmpy.vmm import firmware
from kvmpy.x86 import layout

from .lab import wait_until

SPIN = guests.get("spin")
LOOPS = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
QSIZE = 16
RINGS = 0x400000                # each queue's rings: RINGS + 0x4000 * i (desc, avail, used a page apart)
BUFFERS = 0x600000              # each queue's buffers: BUFFERS + 0x40000 * i, BUF bytes each
BUF = 0x1000
MAC = bytes.fromhex("026b766d7001")
MSI_ADDR = 0xFEE0_0000


class Ring:
    """A split virtqueue in guest RAM, the driver's side."""

    def __init__(self, mem, index):
        self.mem, self.index = mem, index
        self.desc = RINGS + 0x4000 * index
        self.avail, self.used = self.desc + 0x1000, self.desc + 0x2000
        self.buffers = BUFFERS + 0x40000 * index
        self.next_desc = self.avail_idx = self.used_seen = 0

    def add(self, bufs):
        """Offer one chain of ``(address, length, device-writable)``; returns its head."""
        head = self.next_desc
        for i, (addr, n, writable) in enumerate(bufs):
            d = (head + i) % QSIZE
            last = i == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.mem.write(self.desc + 16 * d, struct.pack("<QIHH", addr, n, flags, 0 if last else (d + 1) % QSIZE))
        self.next_desc = (head + len(bufs)) % QSIZE
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % QSIZE), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        return head

    def used_idx(self):
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def take(self):
        """The (head, length) the device returned since the last call."""
        out = []
        while self.used_seen != self.used_idx():
            slot = self.used + 4 + 8 * (self.used_seen % QSIZE)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def buffer_of(self, head):
        return struct.unpack("<Q", self.mem.read(self.desc + 16 * head, 8))[0]


class PciDriver:
    """A guest's driver for the virtio-pci function at device ``dev``, through the machine's
    buses (each access goes to the device the bus holds there, under its lock)."""

    def __init__(self, m, dev):
        self.m, self.dev = m, dev

    def _io(self, bus, addr):
        device, offset, _ = bus.lookup(addr)
        return device, offset

    def cfg(self, reg, size=4):
        d, o = self._io(self.m.pio, layout.PCI_CONFIG_ADDRESS_PORT)
        d.write(o, 4, 1 << 31 | self.dev << 11 | (reg & 0xFC))
        d, o = self._io(self.m.pio, layout.PCI_CONFIG_DATA_PORT + (reg & 3))
        return d.read(o, size)

    def cfg_write(self, reg, size, value):
        d, o = self._io(self.m.pio, layout.PCI_CONFIG_ADDRESS_PORT)
        d.write(o, 4, 1 << 31 | self.dev << 11 | (reg & 0xFC))
        d, o = self._io(self.m.pio, layout.PCI_CONFIG_DATA_PORT + (reg & 3))
        d.write(o, size, value)

    def rd(self, addr, size):
        d, o = self._io(self.m.mmio, addr)
        return d.read(o, size)

    def wr(self, addr, size, value):
        d, o = self._io(self.m.mmio, addr)
        d.write(o, size, value)

    def probe(self):
        self.ids = self.cfg(0)
        self.bar = self.cfg(C.BAR0) & ~0xF
        self.cfg_write(C.COMMAND, 2, C.COMMAND_MEMORY | C.COMMAND_MASTER)
        caps, pos, msix = {}, self.cfg(C.CAPABILITIES_POINTER, 1), None
        for _ in range(48):
            if not pos:
                break
            if self.cfg(pos, 1) == P.PCI_CAP_ID_VNDR:
                caps.setdefault(self.cfg(pos + 3, 1), (self.cfg(pos + 8), self.cfg(pos + 16)))
            elif self.cfg(pos, 1) == 0x11:
                msix = pos
            pos = self.cfg(pos + 1, 1)
        self.common = self.bar + caps[P.VIRTIO_PCI_CAP_COMMON_CFG][0]
        self.isr_addr = self.bar + caps[P.VIRTIO_PCI_CAP_ISR_CFG][0]
        self.device_cfg = self.bar + caps.get(P.VIRTIO_PCI_CAP_DEVICE_CFG, (0, 0))[0]
        self.notify_base, self.notify_mult = self.bar + caps[P.VIRTIO_PCI_CAP_NOTIFY_CFG][0], \
            caps[P.VIRTIO_PCI_CAP_NOTIFY_CFG][1]
        self.msix_cap = msix
        return self

    def start(self, features, queues, msix=False):
        """Reset, negotiate ``features``, set up ``queues`` rings (vector i for queue i with MSI-X)."""
        cw = lambda off, size, v: self.wr(self.common + off, size, v)   # noqa: E731
        cr = lambda off, size: self.rd(self.common + off, size)         # noqa: E731
        cw(P.device_status, 1, 0)
        cw(P.device_status, 1, V.ACKNOWLEDGE | V.DRIVER)
        for sel in (0, 1):
            cw(P.device_feature_select, 4, sel)
            offered = cr(P.device_feature, 4)
            cw(P.driver_feature_select, 4, sel)
            cw(P.driver_feature, 4, offered & (features >> 32 * sel) & 0xFFFF_FFFF)
        cw(P.device_status, 1, V.ACKNOWLEDGE | V.DRIVER | V.FEATURES_OK)
        assert cr(P.device_status, 1) & V.FEATURES_OK
        if msix:
            table = self.bar + (self.cfg(self.msix_cap + 4) & ~7)
            for v in range(queues + 1):
                for off, value in ((0, MSI_ADDR), (4, 0), (8, 0x40 + v), (12, 0)):
                    self.wr(table + 16 * v + off, 4, value)
            self.cfg_write(self.msix_cap + 2, 2, 0x8000)
            cw(P.config_msix_vector, 2, queues)
        rings = []
        for i in range(queues):
            ring = Ring(self.m.memory, i)
            cw(P.queue_select, 2, i)
            cw(P.queue_size, 2, QSIZE)
            for off, addr in ((P.queue_desc, ring.desc), (P.queue_driver, ring.avail), (P.queue_device, ring.used)):
                cw(off, 4, addr)
                cw(off + 4, 4, 0)
            if msix:
                cw(P.queue_msix_vector, 2, i)
                assert cr(P.queue_msix_vector, 2) == i
            cw(P.queue_enable, 2, 1)
            assert cr(P.queue_enable, 2) == 1
            ring.notify = self.notify_base + cr(P.queue_notify_off, 2) * self.notify_mult
            rings.append(ring)
        cw(P.device_status, 1, V.ACKNOWLEDGE | V.DRIVER | V.FEATURES_OK | V.DRIVER_OK)
        return rings

    def kick(self, ring):
        self.wr(ring.notify, 2, ring.index)

    def isr(self):
        return self.rd(self.isr_addr, 1)


def spinning(m):
    m.load(SPIN.path, SPIN.format, mode=SPIN.mode, user=SPIN.user)
    m.start(timeout=120)


def stop(m):
    m.request_stop()
    m.wait(30)


def fill_rx(ring, count, size=BUF):
    for _ in range(count):
        ring.add([(ring.buffers + BUF * ring.next_desc, size, True)])


def frame(n):
    return MAC + bytes.fromhex("02fc00000001") + b"\x88\xb5" + bytes([n]) * (60 + n)


# --- the network -----------------------------------------------------------------------------------

@pytest.fixture
def peer(tmp_path):
    """A listening UNIX socket the machine connects to as it would to passt (``passt:PATH``)."""
    path = str(tmp_path / "p.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    yield path, listener
    listener.close()


def received(conn, reader, count, timeout=20):
    frames, deadline = [], time.monotonic() + timeout
    conn.settimeout(0.2)
    while len(frames) < count and time.monotonic() < deadline:
        try:
            data = conn.recv(1 << 16)
        except socket.timeout:
            continue
        frames += reader.feed(data)
    return frames


@LOOPS
def test_frames_flow_both_ways_through_a_virtio_pci_net(peer, native):
    path, listener = peer
    with kvmpy.Machine(mem_size=16 << 20, native=native, net=f"passt:{path}", virtio_transport="pci") as m:
        conn, _ = listener.accept()
        slot = m.platform.slot("virtio-net")
        assert (slot.bus, slot.base, slot.irq) == ("pci", 1, layout.PCI_INTX_GSIS[0]) and m.platform.virtio_mmio == []
        spinning(m)
        try:
            drv = PciDriver(m, 1).probe()
            assert drv.ids == 0x1041_1AF4
            rx, tx = drv.start(1 << V.VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC, 2)
            assert bytes(drv.rd(drv.device_cfg + i, 1) for i in range(6)) == MAC
            fill_rx(rx, 8)
            drv.kick(rx)
            assert drv.isr() == 0
            # host -> guest: the network thread's notify fills the ring and raises INTx (the ISR)
            conn.sendall(b"".join(encode(frame(n)) for n in range(5)))
            wait_until(lambda: rx.used_idx() == 5, 20, "five frames in the receive ring")
            got = rx.take()
            for n, (head, length) in enumerate(got):
                assert length == NET_HDR_SIZE + len(frame(n))
                assert m.memory.read(rx.buffer_of(head), length) == RX_HDR + frame(n)
            assert drv.isr() & 1 and drv.isr() == 0            # reading the ISR clears it
            # guest -> host: a transmitted chain reaches the peer as one frame on the stream
            reader = FrameReader()
            for n in range(3):
                addr = tx.buffers + BUF * n
                m.memory.write(addr, bytes(NET_HDR_SIZE) + frame(10 + n))
                tx.add([(addr, NET_HDR_SIZE, False), (addr + NET_HDR_SIZE, len(frame(10 + n)), False)])
            drv.kick(tx)
            assert received(conn, reader, 3) == [frame(10 + n) for n in range(3)]
            assert len(tx.take()) == 3
            # paused, nothing lands in the ring; resumed, it does
            assert m.pause()
            conn.sendall(encode(frame(20)))
            time.sleep(0.3)
            assert rx.used_idx() == 5
            m.resume()
            wait_until(lambda: rx.used_idx() == 6, 20, "the frame sent while paused")
            assert m.memory.read(rx.buffer_of(rx.take()[0][0]), NET_HDR_SIZE + len(frame(20))) == RX_HDR + frame(20)
            c = slot.model.device.counters
            assert (c["rx_frames"], c["tx_frames"]) == (6, 3) and slot.backend.error is None
        finally:
            stop(m)
            conn.close()


def test_a_snapshot_of_a_pci_net_keeps_its_function_and_restores_it(peer, tmp_path):
    path, listener = peer
    with kvmpy.Machine(mem_size=16 << 20, net=f"passt:{path}", virtio_transport="pci") as m:
        conn, _ = listener.accept()
        spinning(m)
        try:
            drv = PciDriver(m, 1).probe()
            rx, _tx = drv.start(1 << V.VIRTIO_F_VERSION_1, 2)
            fill_rx(rx, 4)
            drv.kick(rx)
            assert m.pause()
            assert m.shape()["net_transport"] == "pci"
            saved = m.platform.save_state()["virtio_net"]
            assert set(saved) == {"virtio", "pci", "msix", "config_vector", "queue_vectors"}
            m.snapshot(tmp_path / "snap")
            m.resume()
        finally:
            stop(m)
            conn.close()
    with kvmpy.Machine.restore(tmp_path / "snap", net=f"passt:{path}") as r:
        conn, _ = listener.accept()
        slot = r.platform.slot("virtio-net")
        assert slot.bus == "pci" and r.platform.save_state()["virtio_net"] == saved
        assert slot.model.live and slot.model.config.bar_address(0) == layout.PCI_MMIO_BASE
        spinning(r)
        try:
            conn.sendall(encode(frame(1)))
            wait_until(lambda: slot.model.core.queues[0].live.used_idx == 1, 20, "a frame after the restore")
        finally:
            stop(r)
            conn.close()


# --- vsock ------------------------------------------------------------------------------------------

def rx_packets(m, ring, count, timeout=20):
    wait_until(lambda: (ring.used_idx() - ring.used_seen) & 0xFFFF >= count, timeout, f"{count} vsock packets")
    out = []
    for head, length in ring.take():
        raw = m.memory.read(ring.buffer_of(head), length)
        out.append((Header.parse(raw[:HDR_SIZE]), raw[HDR_SIZE:]))
    return out


def send(m, drv, tx, hdr, payload=b""):
    hdr.len = len(payload)
    addr = tx.buffers + BUF * tx.next_desc
    m.memory.write(addr, hdr.pack() + payload)
    tx.add([(addr, HDR_SIZE, False)] + ([(addr + HDR_SIZE, len(payload), False)] if payload else []))
    drv.kick(tx)


def guest(src_port, dst_port, op, **kw):
    return Header(3, 2, src_port, dst_port, op=op, buf_alloc=64 << 10, **kw)


@LOOPS
def test_vsock_behind_pci_connects_both_ways_with_msix(tmp_path, native, monkeypatch):
    from kvmpy.vmm import msi
    sent, real = [], msi.MsiRoutes.send
    monkeypatch.setattr(msi.MsiRoutes, "send", lambda self, owner, vector, a, d: (sent.append(vector),
                                                                                  real(self, owner, vector, a, d)))
    path = str(tmp_path / "vm.sock")
    back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    back.bind(f"{path}_5678")
    back.listen(1)
    back.settimeout(20)
    with kvmpy.Machine(mem_size=16 << 20, native=native, vsock=path, virtio_transport="pci") as m:
        slot = m.platform.slot("virtio-vsock")
        assert (slot.bus, slot.base) == ("pci", 1) and m.platform.virtio_mmio == []
        spinning(m)
        try:
            drv = PciDriver(m, 1).probe()
            assert drv.ids == 0x1053_1AF4
            assert drv.rd(drv.device_cfg, 4) == 3                   # guest_cid
            rx, tx, ev = drv.start(1 << V.VIRTIO_F_VERSION_1, 3, msix=True)
            fill_rx(rx, 8)
            fill_rx(ev, 2, 8)
            drv.kick(rx)
            drv.kick(ev)
            # host -> guest: CONNECT, the guest's RESPONSE, then data both ways
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(20)
            c.connect(path)
            c.sendall(b"CONNECT 1234\n")
            [(req, _)] = rx_packets(m, rx, 1)
            assert (req.op, req.src_cid, req.dst_cid, req.dst_port) == (OP_REQUEST, 2, 3, 1234)
            wait_until(lambda: RXQ in sent, 10, "the rx queue's MSI-X vector")
            send(m, drv, tx, guest(1234, req.src_port, OP_RESPONSE))
            assert c.recv(32) == f"OK {req.src_port}\n".encode()
            c.sendall(b"ping from the host")
            [(rw, data)] = rx_packets(m, rx, 1)
            assert (rw.op, data) == (OP_RW, b"ping from the host")
            send(m, drv, tx, guest(1234, req.src_port, OP_RW), b"pong from the guest")
            assert c.recv(64) == b"pong from the guest"
            # guest -> host: a REQUEST to CID 2 port 5678 reaches the listener at PATH_5678
            send(m, drv, tx, guest(40000, 5678, OP_REQUEST))
            s, _ = back.accept()
            [(resp, _)] = rx_packets(m, rx, 1)
            assert (resp.op, resp.dst_port, resp.src_port) == (OP_RESPONSE, 40000, 5678)
            send(m, drv, tx, guest(40000, 5678, OP_RW), b"hello from the guest\n")
            s.settimeout(20)
            assert s.recv(64) == b"hello from the guest\n"
            assert TXQ in sent and EVENTQ not in sent     # the used tx chains; nothing for the event queue
            assert len(tx.take()) == 4 and not slot.model.device.dropped
            s.close()
            c.close()
        finally:
            stop(m)
    back.close()
    assert not os.path.exists(path)


def test_a_restored_pci_vsock_gets_its_transport_reset_event(tmp_path):
    path = str(tmp_path / "vm.sock")
    with kvmpy.Machine(mem_size=16 << 20, vsock=path, virtio_transport="pci") as m:
        spinning(m)
        try:
            drv = PciDriver(m, 1).probe()
            _rx, _tx, ev = drv.start(1 << V.VIRTIO_F_VERSION_1, 3)
            fill_rx(ev, 2, 8)
            drv.kick(ev)
            assert m.pause()
            assert m.shape()["net_transport"] == "pci" and m.shape()["vsock_cid"] == 3
            m.snapshot(tmp_path / "snap")
            m.resume()
        finally:
            stop(m)
    with kvmpy.Machine.restore(tmp_path / "snap", vsock=path + "2") as r:
        slot = r.platform.slot("virtio-vsock")
        assert slot.bus == "pci" and slot.model.device.guest_cid == 3
        ring = Ring(r.memory, EVENTQ)
        assert ring.used_idx() == 1                         # the restore put TRANSPORT_RESET there
        [(head, length)] = ring.take()
        assert (length, r.memory.read(ring.buffer_of(head), 4)) == (4, b"\0\0\0\0")
        assert r.platform.slot("virtio-vsock").model.transport.core.queues[EVENTQ].live.used_idx == 1


# --- the machine's shape --------------------------------------------------------------------------

def test_every_virtio_device_sits_behind_pci_and_acpi_says_so(tmp_path, peer):
    path, listener = peer
    (tmp_path / "d.img").write_bytes(bytes(4096))
    with kvmpy.Machine(mem_size=16 << 20, disks=[str(tmp_path / "d.img")], rng=True, net=f"passt:{path}",
                       vsock=str(tmp_path / "vm.sock"), virtio_transport="pci") as m:
        conn, _ = listener.accept()
        host = m.platform.pci
        assert [host.config_read(0, dev, 0, 0, 4) for dev in range(6)] == [
            0x0008_1B36, 0x1042_1AF4, 0x1044_1AF4, 0x1041_1AF4, 0x1053_1AF4, 0xFFFF_FFFF]
        assert [(s.name, s.base, s.irq) for s in m.platform.virtio_pci] == [
            ("virtio-blk0", 1, 16), ("virtio-rng", 2, 17), ("virtio-net", 3, 18), ("virtio-vsock", 4, 19)]
        assert m.platform.virtio_mmio == [] and m.virtio_mmio_cmdline() == ""
        assert firmware.describe(m.platform, 1).pci.intx == ((1, 16), (2, 17), (3, 18), (4, 19))
        assert m.shape()["net_transport"] == "pci"
        conn.close()


def test_net_transport_mmio_keeps_the_older_layout(tmp_path, peer):
    """How a "pci" machine with a network and vsock was built before they could sit behind
    PCI; its snapshots (no net_transport in their shape) restore to it."""
    path, listener = peer
    with kvmpy.Machine(mem_size=16 << 20, net=f"passt:{path}", vsock=str(tmp_path / "vm.sock"),
                       virtio_transport="pci", net_transport="mmio") as m:
        conn, _ = listener.accept()
        assert [s.name for s in m.platform.virtio_mmio] == ["virtio-net", "virtio-vsock"]
        assert m.platform.virtio_pci == [] and "net_transport" not in m.shape()
        m.snapshot(tmp_path / "snap")
        conn.close()
    with kvmpy.Machine.restore(tmp_path / "snap", net=f"passt:{path}") as r:
        conn, _ = listener.accept()
        assert [s.name for s in r.platform.virtio_mmio] == ["virtio-net", "virtio-vsock"]
        assert r.net_transport == "mmio"
        conn.close()


def test_bad_net_transports_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="net_transport must be 'mmio' or 'pci'"):
        kvmpy.Machine(vsock=str(tmp_path / "a.sock"), virtio_transport="pci", net_transport="isa")
    with pytest.raises(ValueError, match="net_transport='pci' needs virtio_transport='pci'"):
        kvmpy.Machine(vsock=str(tmp_path / "a.sock"), net_transport="pci")
    disks = []
    for i in range(8):
        (tmp_path / f"{i}.img").write_bytes(bytes(4096))
        disks.append(str(tmp_path / f"{i}.img"))
    with pytest.raises(ValueError, match="at most 8 virtio-pci devices"):
        kvmpy.Machine(disks=disks, vsock=str(tmp_path / "a.sock"), virtio_transport="pci")
