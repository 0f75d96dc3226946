"""Live migration (issue 5): pre-copy between processes over loopback TCP.

The counter guest rewrites memory all the time and writes its disk; a migrated run must
end with the serial output (source's part, then target's) and the disk of a run that
was never moved. A stream that breaks must leave the source running and nothing on the
target.
"""
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import kvmpy
import kvmpy.lifecycle.snapshot
from kvmpy import guests, migration
from kvmpy.lifecycle.migration import MigrationError

from . import lab
from .lab import fresh_disk, open_fds, wait_until
from .migwire import Wire

ENV = lab.CHILD_ENV
MIN_RUN_S = 3.0                      # an uninterrupted run lasts at least this long (see lab.lasting_run)...
MIGRATIONS_PER_RUN = 4               # ...and at least as long as this many migrations of an idle guest take here


class Workload:
    """The counter's command line: n=120 (or more, where the guest runs fast) with 2 MiB of
    array rewritten every 8 iterations. The ``reference`` fixture sets it."""
    cmdline = "n=120 pages=512"


def counter(disk, native=True, cmdline=None, **kw):
    return lab.counter(disk, cmdline or Workload.cmdline, native, **kw)


def idle_migration_s(tmp_dir) -> float:
    """Seconds one migration of a paused counter machine takes on this host (its RAM
    through the stream, in process). Where ring 0 is emulated it is ~0.3 s and MIN_RUN_S
    rules; in the nested testbed (QEMU TCG) the pre-copy alone takes ~3 s, as long as
    the whole MIN_RUN_S workload, which then ends before the migration pauses it."""
    disk = fresh_disk(tmp_dir / "idle.img")
    box, t = receiver(disks=[disk], timeout=60)
    with counter(disk, cmdline="n=1 pages=512") as m:
        m.start(timeout=120)
        m.pause()                       # never ends before the migration
        t0 = time.monotonic()
        migration.send(m, *box["addr"])
        took = time.monotonic() - t0
        m.wait(30)
    t.join(60)
    target = box.get("result", (None,))[0]
    if target is not None:
        target.request_stop()
        target.wait(30)
        target.close()
    return took


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    seconds = max(MIN_RUN_S, MIGRATIONS_PER_RUN * idle_migration_s(tmp))
    Workload.cmdline, ref = lab.lasting_run(tmp, 120, 512, seconds)
    return ref


def start_receiver(disk, *extra):
    """`kvmpy receive --disk DISK` in a new process on a free port: (process, host, port)."""
    p = subprocess.Popen([sys.executable, "-m", "kvmpy", "receive", "--listen", "127.0.0.1:0", "--disk", disk, *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd="/")
    line = p.stderr.readline().decode()
    found = re.search(r"on (\S+):(\d+)", line)
    assert found, line + p.stderr.read().decode()
    return p, found.group(1), int(found.group(2))


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_live_migration_continues_the_guest_in_another_process(tmp_path, reference, native):
    """Pre-copy while the guest dirties memory, then a short pause: the target process
    finishes the run; output and disk equal an uninterrupted run's."""
    ref_out, ref_disk, ref_status = reference
    disk = fresh_disk(tmp_path / "disk.img")
    target, host, port = start_receiver(disk, "--timeout", "120")
    rounds = []
    with counter(disk, native) as m:
        m.start(timeout=120)
        time.sleep(0.3)
        report = migration.send(m, host, port, progress=rounds.append)
        result = m.wait(10)
        before = m.serial_output
    out, err = target.communicate(timeout=180)
    assert result.reason == "migrated"
    assert before + out == ref_out, err.decode()[-2000:]
    assert target.returncode == ref_status & 0xFF
    assert open(disk, "rb").read() == ref_disk
    assert report.rounds >= 2 and report.pages > 0 and len(report.per_round) == report.rounds
    assert 0 < report.downtime_s < report.total_s
    assert rounds[0].startswith("round 1:") and "migrated in" in rounds[-1]


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(delay=st.floats(0.0, 0.8), native_src=st.booleans(), native_dst=st.booleans(), cpus=st.sampled_from([1, 2]))
def test_migration_at_chosen_moments_matches_an_uninterrupted_run(tmp_path_factory, reference, delay,
                                                                   native_src, native_dst, cpus):
    """Migrations begun at hypothesis-chosen moments, from either run loop to either, with one
    or two vCPUs, while the guest rewrites its memory: the run ends as if never moved."""
    ref_out, ref_disk, ref_status = reference
    disk = fresh_disk(tmp_path_factory.mktemp("mig") / "disk.img")
    target, host, port = start_receiver(disk, "--timeout", "120", *([] if native_dst else ["--python"]))
    with counter(disk, native_src, cpus=cpus) as m:
        m.start(timeout=120)
        time.sleep(delay)
        if m.running:
            report = migration.send(m, host, port)
            assert report.rounds >= 2
        result = m.wait(120)
        before = m.serial_output
    if result.reason == "exit":                     # it finished before the migration began
        target.kill()
        target.communicate()
        assert before == ref_out
        return
    out, err = target.communicate(timeout=180)
    assert result.reason == "migrated"
    assert before + out == ref_out, err.decode()[-2000:]
    assert target.returncode == ref_status & 0xFF
    assert open(disk, "rb").read() == ref_disk


def test_migration_driven_through_the_control_socket(tmp_path, reference):
    """The command-line path: kvmpy run --control, kvmpy receive --key-file, kvmpy ctl
    migrate --key-file (the key goes over the control socket, never on a command line)."""
    ref_out, ref_disk, ref_status = reference
    disk = fresh_disk(tmp_path / "disk.img")
    sock = str(tmp_path / "vm.sock")
    key = tmp_path / "mig.key"
    key.write_bytes(os.urandom(32).hex().encode() + b"\n")
    key.chmod(0o600)
    g = guests.get("counter")
    # --paused: where the guest runs fast it would end before the child `kvmpy ctl` has started
    source = subprocess.Popen([sys.executable, "-m", "kvmpy", "run", g.path, "--disk", disk, "--cmdline", Workload.cmdline,
                               "--control", sock, "--timeout", "120", "--paused"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd="/")
    target, host, port = start_receiver(disk, "--key-file", str(key))
    deadline = time.monotonic() + 30
    while not os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    ctl = subprocess.run([sys.executable, "-m", "kvmpy", "ctl", sock, "migrate", f"{host}:{port}", "--key-file", str(key)],
                         capture_output=True, env=ENV, cwd="/", timeout=120)
    assert ctl.returncode == 0, ctl.stderr
    assert b"round 1:" in ctl.stderr and b"downtime" in ctl.stdout
    src_out, src_err = source.communicate(timeout=60)
    out, err = target.communicate(timeout=180)
    assert source.returncode == 0 and b"migrated" in src_err
    assert src_out + out == ref_out
    assert target.returncode == ref_status & 0xFF
    assert open(disk, "rb").read() == ref_disk


class FakeTarget:
    """A target that greets, accepts HELO, says REDY, then drops the connection after ``cut`` bytes."""

    def __init__(self, cut: int):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.cut = cut
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.srv.accept()
        with conn:
            wire = Wire(conn, b"T")
            wire.greet()
            assert wire.recv()[0] == b"HELO"
            wire.send(b"REDY")
            got = 0
            while got < self.cut:
                data = conn.recv(65536)
                if not data:
                    break
                got += len(data)
        self.srv.close()


@pytest.mark.parametrize("cut", [0, 100_000, 3_000_000])
def test_a_broken_stream_leaves_the_source_running(tmp_path, reference, cut):
    """The target vanishes midway: send raises MigrationError, the source resumes (dirty log
    off) and finishes its run exactly as if nothing had happened."""
    ref_out, ref_disk, _ = reference
    disk = fresh_disk(tmp_path / "disk.img")
    fake = FakeTarget(cut)
    with counter(disk) as m:
        m.start(timeout=120)
        time.sleep(0.2)
        with pytest.raises(MigrationError):
            migration.send(m, "127.0.0.1", fake.port, timeout=10)
        assert m.running and not m.paused
        result = m.wait(120)
        assert result.reason == "exit" and m.serial_output == ref_out
    assert open(disk, "rb").read() == ref_disk


def test_nothing_to_connect_to_is_a_clear_error(tmp_path):
    disk = fresh_disk(tmp_path / "disk.img")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]               # bound, not listening: connection refused
        with counter(disk) as m:
            m.start(timeout=60)
            with pytest.raises(MigrationError, match="cannot connect"):
                migration.send(m, "127.0.0.1", port)
            m.request_stop()
            m.wait()


def hello_body(disk: str, mem_size: int = 64 << 20) -> dict:
    return {"magic": "kvmpy-snapshot", "version": kvmpy.lifecycle.snapshot.VERSION,
            "machine": {"mem_size": mem_size, "cpus": 1, "irqchip": True},
            "ram": [{"gpa": 0, "size": mem_size}],
            "disks": [{"path": disk, "readonly": False, "size": lab.DISK_BYTES}]}


def hello(disk: str, mem_size: int = 64 << 20) -> tuple[bytes, bytes]:
    """A HELO frame (kind, payload) for a guest with one disk."""
    return b"HELO", json.dumps(hello_body(disk, mem_size)).encode()


def page_frame(gpa: int, count: int = 1, fill: bytes = b"\x90") -> tuple[bytes, bytes]:
    return b"PAGE", struct.pack("<QI", gpa, count) + fill * (4096 * count)


def receiver(**kw):
    """migration.receive in a thread: (box with "addr", then "result" or "error"; the thread)."""
    box = {}
    ready = threading.Event()
    listen = kw.pop("listen", ("127.0.0.1", 0))

    def body():
        try:
            box["result"] = migration.receive(listen, on_listen=lambda a: (box.update(addr=a), ready.set()),
                                              timeout=kw.pop("timeout", 20), **kw)
        except BaseException as e:
            box["error"] = e
        ready.set()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    ready.wait(20)
    return box, t


def drain(c: socket.socket) -> None:
    try:
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536):
            pass
    except OSError:
        pass


def feed_receiver(frames, tail: bytes = b"", source_key: bytes = b"", **kw):
    """Greet a receive() (given ``kw``) as a source holding ``source_key``, send ``frames`` ((kind, payload), each
    with its MAC), then the raw ``tail``, and close; its outcome."""
    box, t = receiver(**kw)
    with socket.create_connection(box["addr"]) as c:
        try:
            wire = Wire(c, b"S", source_key)
            wire.greet()
            c.sendall(b"".join(wire.frame(kind, payload) for kind, payload in frames) + tail)
        except (OSError, EOFError):
            pass
        drain(c)
    t.join(60)
    return box


def test_the_target_discards_a_stream_that_ends_early(tmp_path):
    """HELO and some pages, then the source vanishes: MigrationError, no machine, no leaked fds."""
    disk = fresh_disk(tmp_path / "disk.img")
    fds = open_fds()
    box = feed_receiver([hello(disk), page_frame(0x1000)], tail=struct.pack("<4sIQI", b"PAGE", 12 + 4096, 0x2000, 1) + bytes(80),
                        disks=[disk])
    assert isinstance(box.get("error"), MigrationError), box
    assert "ended early" in str(box["error"])
    assert open_fds() <= fds, open_fds() - fds


def test_the_stream_does_not_choose_the_targets_files(tmp_path):
    """A source cannot make the target open a file it names: a guest with disks needs the
    target's own disks=[...]; the refusal sent back names no local file."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 160)
    box, t = receiver()
    with socket.create_connection(box["addr"]) as c:
        wire = Wire(c)
        wire.greet()
        wire.send(*hello(str(secret)))
        kind, answer = wire.recv()
    t.join(30)
    assert kind == b"FAIL" and b"secret" not in answer and b"160" not in answer
    assert isinstance(box["error"], MigrationError) and "disks=[...]" in str(box["error"])


def test_the_target_refuses_more_ram_than_it_allows(tmp_path):
    disk = fresh_disk(tmp_path / "disk.img")
    box = feed_receiver([hello(disk, mem_size=256 << 20)], disks=[disk], max_mem=128 << 20)
    assert isinstance(box.get("error"), MigrationError) and "bytes of RAM" in str(box["error"])


def test_the_target_refuses_a_disk_of_another_size(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    box = feed_receiver([hello(str(disk))], disks=[str(disk)])
    assert isinstance(box.get("error"), MigrationError) and "changed size" in str(box["error"])


FRAME_KINDS = st.sampled_from([b"PAGE", b"ZERO", b"STAT", b"RUNS", b"FAIL", b"XXXX", b"HELO"])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(st.tuples(FRAME_KINDS, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                                 st.binary(max_size=64)), max_size=4),
       tail=st.binary(max_size=32))
def test_hostile_frames_after_a_good_hello_only_ever_fail_cleanly(tmp_path_factory, frames, tail):
    """Any frame sequence a hostile source sends ends in MigrationError (never a crash, a hang
    or a running machine), unless it is a valid stream, which these are not: no STAT comes."""
    disk = fresh_disk(tmp_path_factory.mktemp("fuzz") / "disk.img")
    stream = [hello(disk)] + [(kind, struct.pack("<QI", gpa, count & 0xFFFF) + junk)
                              for kind, gpa, count, junk in frames]
    box = feed_receiver(stream, tail, disks=[disk])
    assert isinstance(box.get("error"), MigrationError), box


HELLO_EDITS = st.sampled_from([("magic",), ("version",), ("machine",), ("machine", "mem_size"), ("machine", "cpus"),
                               ("machine", "irqchip"), ("ram",), ("ram", 0, "gpa"), ("ram", 0, "size"), ("disks",),
                               ("disks", 0, "path"), ("disks", 0, "readonly"), ("disks", 0, "size")])
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=10),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(where=HELLO_EDITS, value=VALUES)
def test_an_edited_hello_is_refused_cleanly(tmp_path_factory, where, value):
    """A HELO with any one value replaced either builds the machine (and then fails for want
    of a STAT) or is refused: always MigrationError, never another exception."""
    disk = fresh_disk(tmp_path_factory.mktemp("hello") / "disk.img")
    body = hello_body(disk)
    target = body
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    box = feed_receiver([(b"HELO", json.dumps(body).encode())], disks=[disk])
    assert isinstance(box.get("error"), MigrationError), box


class ParsingTarget:
    """A fake target that reads frames properly: REDY after HELO, answers SYNC after
    ``sync_after`` seconds, and on STAT does ``on_stat`` ("close": hang up without a word,
    "fail": say FAIL)."""

    def __init__(self, on_stat="close", sync_after=0.0):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.on_stat, self.sync_after = on_stat, sync_after
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.srv.accept()
        self.srv.close()
        with conn:
            wire = Wire(conn, b"T")
            wire.greet()
            while True:
                try:
                    kind, _ = wire.recv()
                except EOFError:
                    return
                if kind == b"HELO":
                    wire.send(b"REDY")
                elif kind == b"SYNC":
                    time.sleep(self.sync_after)
                    wire.send(b"SYNC")
                elif kind == b"STAT":
                    if self.on_stat == "fail":
                        wire.send(b"FAIL", b"no")
                    return


def test_one_migration_at_a_time(tmp_path, reference):
    """A second migration of the same machine is refused while the first is under way
    (two would take each other's dirty pages); the guest still ends as it should."""
    ref_out, _, _ = reference
    with counter(fresh_disk(tmp_path / "disk.img")) as m:
        m.start(timeout=120)
        m.pause()           # held until both migrations are over: the guest cannot end first
        slow = ParsingTarget(on_stat="fail", sync_after=0.2)
        first = {}
        t = threading.Thread(target=lambda: first.update(e=pytest.raises(MigrationError, migration.send, m,
                                                                           "127.0.0.1", slow.port)))
        t.start()
        wait_until(lambda: m.migration_lock.locked(), 5, "the first migration to begin")
        with pytest.raises(MigrationError, match="already under way"):
            migration.send(m, "127.0.0.1", slow.port)
        t.join(30)
        assert "gave up" in str(first["e"].value)     # the target said FAIL: the source goes on
        assert m.paused                                 # still held by the pause above only
        m.resume()
        assert m.wait(120).reason == "exit" and m.serial_output == ref_out


def test_no_answer_after_the_state_leaves_the_source_paused(tmp_path, reference):
    """If the target hangs up after receiving the whole state, it may be running the guest:
    the source stays paused (never two guests on one disk) until told to resume."""
    ref_out, ref_disk, _ = reference
    disk = fresh_disk(tmp_path / "disk.img")
    with counter(disk) as m:
        m.start(timeout=120)
        time.sleep(0.2)
        with pytest.raises(MigrationError, match="stays paused"):
            migration.send(m, "127.0.0.1", ParsingTarget(on_stat="close").port)
        assert m.paused
        m.resume()
        assert m.wait(120).reason == "exit" and m.serial_output == ref_out
    assert open(disk, "rb").read() == ref_disk


def test_a_failing_progress_callback_leaves_the_source_running(tmp_path, reference):
    ref_out, _, _ = reference
    with counter(fresh_disk(tmp_path / "disk.img")) as m:
        m.start(timeout=120)

        def progress(text):
            raise RuntimeError("the progress display broke")

        with pytest.raises(RuntimeError, match="display broke"):
            migration.send(m, "127.0.0.1", ParsingTarget().port, progress=progress)
        assert m.running and not m.paused
        assert m.wait(120).reason == "exit" and m.serial_output == ref_out


def test_ctl_resume_releases_the_pause_an_unanswered_migration_left(tmp_path, reference):
    """After the unknown-outcome case the operator decides: `ctl resume` (which is refused
    while a migration runs) lets the source go on, and it ends as an uninterrupted run."""
    from kvmpy.lifecycle.control import ControlServer, request
    ref_out, _, _ = reference
    sock = str(tmp_path / "vm.sock")
    with counter(fresh_disk(tmp_path / "disk.img")) as m, ControlServer(m, sock):
        m.start(timeout=120)
        slow = ParsingTarget(on_stat="close", sync_after=1.0)
        box = {}
        t = threading.Thread(target=lambda: box.update(answer=request(sock, "migrate", to=f"127.0.0.1:{slow.port}")))
        t.start()
        wait_until(lambda: m.migration_lock.locked(), 5, "the migration to begin")
        refused = request(sock, "resume", timeout=10)
        assert refused["ok"] is False and "migration" in refused["error"]
        t.join(60)
        assert box["answer"]["ok"] is False and "stays paused" in box["answer"]["error"]
        assert m.paused
        assert request(sock, "resume", timeout=10) == {"ok": True, "running": True, "paused": False}
        assert m.wait(120).reason == "exit" and m.serial_output == ref_out
