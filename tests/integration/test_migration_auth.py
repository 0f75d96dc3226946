"""Who may migrate a guest here, and for how long (issue 11, item 4).

The receiver is an endpoint on the network: it must not wait forever for a slow peer,
take more RAM than it allows by default, accept a guest from a peer without the key
or a frame recorded on another connection, nor listen beyond loopback without a key.
The fake peers speak the wire through migwire.py, written from docs/snapshots.md.
"""
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy import migration
from kvmpy.lifecycle import channel
from kvmpy.lifecycle.migration import MigrationError

from .lab import fresh_disk, open_fds
from . import lab
from .migwire import MAGIC, Wire, greeting
from .test_migration import counter, drain, feed_receiver, hello, hello_body, page_frame, receiver

KEY = b"k" * 32
ENV = lab.CHILD_ENV


def connect(box) -> socket.socket:
    c = socket.create_connection(box["addr"])
    c.settimeout(30)
    return c


# --- deadlines ------------------------------------------------------------------------
def test_a_peer_that_sends_a_byte_now_and_then_is_cut_off_by_the_frame_deadline():
    """Five bytes, then one every quarter second: each recv returns in time, but the frame
    never completes; the receiver gives up once the frame's deadline (1 s) has passed."""
    box, t = receiver(stream_timeout=1.0)
    t0 = time.monotonic()
    with connect(box) as c:
        try:
            c.sendall(greeting(bytes(32))[:5])
            for byte in greeting(bytes(32))[5:]:
                if not t.is_alive():
                    break
                time.sleep(0.25)
                c.sendall(bytes([byte]))
        except OSError:
            pass                                # the receiver hung up: what we wait for
        t.join(30)
    took = time.monotonic() - t0
    assert isinstance(box.get("error"), MigrationError), box
    assert took < 4, f"the receiver waited {took:.1f} s for one frame"
    assert "in time" in str(box["error"])


def test_the_overall_deadline_bounds_a_peer_that_keeps_sending_whole_frames(tmp_path):
    """Whole, valid SYNC frames, each in time: the migration still ends at its deadline."""
    disk = fresh_disk(tmp_path / "disk.img")
    box, t = receiver(disks=[disk], stream_timeout=5, deadline=2)
    t0 = time.monotonic()
    with connect(box) as c:
        wire = Wire(c)
        wire.greet()
        wire.send(*hello(disk))
        assert wire.recv()[0] == b"REDY"
        try:
            while t.is_alive() and time.monotonic() - t0 < 20:
                wire.send(b"SYNC")
                wire.recv()
                time.sleep(0.3)
        except (OSError, EOFError, AssertionError):
            pass
        t.join(30)
    assert isinstance(box.get("error"), MigrationError) and "within 2" in str(box["error"]), box
    assert time.monotonic() - t0 < 5


def test_a_target_that_trickles_its_answer_cannot_hold_the_source(tmp_path):
    """The source's frames have deadlines too: a target that answers HELO one byte at a
    time is given up on after ``timeout`` and the guest goes on."""
    srv = socket.create_server(("127.0.0.1", 0))

    def trickle():
        conn, _ = srv.accept()
        with conn:
            wire = Wire(conn, b"T")
            wire.greet()
            wire.recv()
            try:
                for byte in wire.frame(b"REDY"):
                    time.sleep(0.25)
                    conn.sendall(bytes([byte]))
            except OSError:
                pass

    threading.Thread(target=trickle, daemon=True).start()
    with counter(fresh_disk(tmp_path / "disk.img")) as m:
        m.start(timeout=120)
        t0 = time.monotonic()
        with pytest.raises(MigrationError, match="in time"):
            migration.send(m, "127.0.0.1", srv.getsockname()[1], timeout=1.0)
        assert time.monotonic() - t0 < 4
        assert m.running and not m.paused
        m.request_stop()
        m.wait()
    srv.close()


# --- how much RAM ---------------------------------------------------------------------
def test_more_ram_than_half_the_host_is_refused_by_default(tmp_path):
    """16 GiB (or all of a smaller host's RAM) was accepted: the default bound is now half
    the host's RAM, at most 8 GiB."""
    host_ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert migration.default_max_mem() == min(host_ram // 2, 8 << 30)
    ask = min(host_ram & ~((2 << 20) - 1), 16 << 30)
    disk = fresh_disk(tmp_path / "disk.img")
    box = feed_receiver([hello(disk, mem_size=ask)], disks=[disk])
    assert isinstance(box.get("error"), MigrationError), box
    assert f"asks for {ask} bytes of RAM (at most {migration.default_max_mem()} here)" in str(box["error"])


# --- the key --------------------------------------------------------------------------
@pytest.mark.parametrize("peer_key", [b"", b"x" * 32], ids=["no-key", "another-key"])
def test_a_peer_without_the_key_is_refused_before_anything_is_built(tmp_path, peer_key):
    disk = fresh_disk(tmp_path / "disk.img")
    fds = open_fds()
    box = feed_receiver([hello(disk), page_frame(0x1000)], source_key=peer_key, disks=[disk], key=KEY)
    assert isinstance(box.get("error"), MigrationError), box
    assert "different migration keys" in str(box["error"])
    assert open_fds() <= fds, open_fds() - fds


def test_a_target_with_no_key_refuses_a_keyed_source(tmp_path):
    disk = fresh_disk(tmp_path / "disk.img")
    box = feed_receiver([hello(disk)], source_key=KEY, disks=[disk])
    assert isinstance(box.get("error"), MigrationError) and "fails its MAC" in str(box["error"])


def test_a_forged_frame_after_a_good_start_closes_the_machine_built_so_far(tmp_path):
    """HELO with the right key builds the machine; a later PAGE whose payload was changed
    fails its MAC: refused, the machine closed (no fd left), nothing runs."""
    disk = fresh_disk(tmp_path / "disk.img")
    fds = open_fds()
    box, t = receiver(disks=[disk], key=KEY)
    with connect(box) as c:
        wire = Wire(c, b"S", KEY)
        wire.greet()
        wire.send(*hello(disk))
        assert wire.recv()[0] == b"REDY"
        frame = bytearray(wire.frame(*page_frame(0x1000)))
        frame[100] ^= 1
        c.sendall(frame)
        kind, _ = wire.recv()
        drain(c)
    t.join(30)
    assert kind == b"FAIL"
    assert isinstance(box.get("error"), MigrationError) and "frame 1 (b'PAGE') fails its MAC" in str(box["error"])
    assert open_fds() <= fds, open_fds() - fds


def test_a_frame_recorded_on_one_connection_is_refused_on_another(tmp_path):
    """A listener records a genuine source's greeting and HELO, then replays them to a
    receiver with the same key: the receiver's nonce differs, so the HELO's MAC fails."""
    disk = fresh_disk(tmp_path / "disk.img")
    box, t = receiver(disks=[disk], key=KEY)
    with connect(box) as c:
        wire = Wire(c, b"S", KEY)
        recorded = wire.greet() + wire.send(*hello(disk))
        assert wire.recv()[0] == b"REDY"
    t.join(30)
    box, t = receiver(disks=[disk], key=KEY)
    with connect(box) as c:
        c.sendall(recorded)
        drain(c)
    t.join(30)
    assert isinstance(box.get("error"), MigrationError) and "fails its MAC" in str(box["error"]), box


def test_a_frame_repeated_within_a_connection_is_refused(tmp_path):
    """The frame counter is in the MAC: the same PAGE frame sent twice fails the second time."""
    disk = fresh_disk(tmp_path / "disk.img")
    box, t = receiver(disks=[disk], key=KEY)
    with connect(box) as c:
        wire = Wire(c, b"S", KEY)
        wire.greet()
        wire.send(*hello(disk))
        assert wire.recv()[0] == b"REDY"
        page = wire.send(*page_frame(0x1000))
        c.sendall(page)
        drain(c)
    t.join(30)
    assert isinstance(box.get("error"), MigrationError)
    assert "frame 2 (b'PAGE') fails its MAC" in str(box["error"]), box


def test_with_the_key_both_ends_migrate_and_with_another_the_source_goes_on(tmp_path):
    """send(key=) against receive(key=): the wrong key is refused at the first frame and the
    source keeps running; the right one migrates."""
    disk = fresh_disk(tmp_path / "disk.img")
    with counter(disk, cmdline="n=100000 pages=16") as m:
        m.start(timeout=120)
        box, t = receiver(disks=[disk], key=KEY)
        with pytest.raises(MigrationError, match="different migration keys"):
            migration.send(m, *box["addr"], key=b"w" * 32)
        t.join(30)
        assert isinstance(box.get("error"), MigrationError)
        assert m.running and not m.paused
        box, t = receiver(disks=[disk], key=KEY)
        migration.send(m, *box["addr"], key=KEY)
        t.join(30)
        target, _ = box["result"]
        with target:
            assert target.running
            target.request_stop()
            target.wait(30)
        assert m.wait(10).reason == "migrated"


# --- where it listens -----------------------------------------------------------------
def test_listening_beyond_loopback_needs_a_key():
    heard = []
    with pytest.raises(MigrationError, match="without a migration key"):
        migration.receive(("0.0.0.0", 0), timeout=0.5, on_listen=heard.append)
    assert heard == []
    with pytest.raises(MigrationError, match="no migration arrived"):
        migration.receive(("0.0.0.0", 0), key=KEY, timeout=0.5, on_listen=heard.append)
    assert len(heard) == 1


def test_kvmpy_receive_refuses_to_listen_beyond_loopback_without_a_key():
    env = {k: v for k, v in ENV.items() if k != channel.KEY_ENV}
    r = subprocess.run([sys.executable, "-m", "kvmpy", "receive", "--listen", "0.0.0.0:0", "--wait", "1"],
                       capture_output=True, env=env, cwd="/", timeout=60)
    assert r.returncode != 0 and b"without a migration key" in r.stderr, r.stderr


# --- versions and hostile greetings -----------------------------------------------------
def test_an_older_source_is_told_to_upgrade(tmp_path):
    """A version-2 source sends HELO first, without a greeting: refused, and the FAIL it
    gets back says why (it names nothing local)."""
    disk = fresh_disk(tmp_path / "disk.img")
    box, t = receiver(disks=[disk])
    with connect(box) as c:
        data = json.dumps(hello_body(disk)).encode()
        c.sendall(struct.pack("<4sI", b"HELO", len(data)) + data)
        kind, answer = Wire(c).recv()
    t.join(30)
    assert kind == b"FAIL" and b"version 2" in answer and b"upgrade the source" in answer
    assert isinstance(box.get("error"), MigrationError) and "version 2" in str(box["error"])


def test_a_newer_greeting_is_refused_by_version():
    box, t = receiver()
    with connect(box) as c:
        c.sendall(greeting(bytes(32), version=4))
        kind, answer = Wire(c).recv()
    t.join(30)
    assert kind == b"FAIL" and b"version 4" in answer


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from([b"MIGR", b"HELO", b"FAIL", b"\0\0\0\0"]),
       magic=st.sampled_from([MAGIC, MAGIC[:-1] + b"x", b""]), version=st.integers(0, 2**32 - 1),
       nonce=st.binary(max_size=40), length=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
       tail=st.binary(max_size=64))
def test_hostile_greetings_only_ever_fail_cleanly(kind, magic, version, nonce, length, tail):
    payload = magic + struct.pack("<I", version) + nonce
    data = struct.pack("<4sI", kind, len(payload) if length is None else length) + payload + tail
    box, t = receiver(stream_timeout=2)
    with connect(box) as c:
        try:
            c.sendall(data)
        except OSError:
            pass
        drain(c)
    t.join(30)
    assert isinstance(box.get("error"), MigrationError), box


# --- key files ------------------------------------------------------------------------
def test_key_files_must_be_private_and_long_enough(tmp_path, monkeypatch):
    path = tmp_path / "key"
    path.write_bytes(b"0123456789abcdef0123\n")
    path.chmod(0o644)
    with pytest.raises(MigrationError, match="chmod 600"):
        channel.load_key(str(path))
    path.chmod(0o600)
    assert channel.load_key(str(path)) == b"0123456789abcdef0123"
    path.write_bytes(b"short\n")
    with pytest.raises(MigrationError, match="16 to 4096 bytes"):
        channel.load_key(str(path))
    monkeypatch.setenv(channel.KEY_ENV, "from-the-environment")
    assert channel.key_from(None) == b"from-the-environment"
    monkeypatch.delenv(channel.KEY_ENV)
    assert channel.key_from(None) is None
