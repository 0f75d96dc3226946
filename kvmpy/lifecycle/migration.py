"""Live migration: pre-copy of a running Machine to another process over a socket.

The source (``send``) copies all RAM while the guest runs, with KVM's dirty-page log
on; then, round after round, re-sends the pages written since the last round, until
what is left is small (or rounds stop shrinking it). Then it pauses the guest, sends
the last dirty pages and the whole machine state (vmm.state.capture's dict), and waits
for the target to say it is running. Only then does the source stop; if anything
fails before that, the source resumes and keeps running. The target (``receive``)
builds a matching Machine, fills its RAM from the stream, loads the state, starts it
and confirms. A stream that breaks midway leaves nothing running on the target.

Dirty pages come from two places: KVM's log (writes by the guest's CPUs) and the
VMM's own bitmap (memory.py: device writes through the host mapping, which KVM does
not see: virtio used rings, disk reads into guest buffers).

The stream (channel.py: the wire) is a greeting each way that exchanges nonces, then
frames: an 8-byte header ``kind (4 ASCII bytes), length (u32 LE)``, ``length`` bytes of
payload and an HMAC-SHA256 over them, keyed with a pre-shared key and the nonces.

    MIGR  (each way, first, without a MAC) magic, stream version, nonce
    HELO  JSON: {"magic", "version", "machine": {...}, "ram": [{"gpa", "size"}], "disks": [...]}
    REDY  (target -> source) the target built the machine
    PAGE  u64 gpa, u32 count, then count * 4096 bytes
    ZERO  u64 gpa, u32 count: pages that are all zeros
    SYNC  (both ways) the target answers once it has applied everything before it
    STAT  JSON: vmm.state.capture() with its sha256
    RUNS  (target -> source) the target runs the guest
    FAIL  (either way) UTF-8 reason; the migration is abandoned

Disks are not copied: both ends open the same files (shared storage, as QEMU without
block migration); the target checks each has the size the source reports.

Both ends hold the same pre-shared key (``key=``); a frame whose MAC fails ends the
migration (the target closes what it built). A target without a key listens on
loopback only. Each frame must arrive whole within a per-frame timeout and the whole
migration within a deadline, so a peer that trickles bytes cannot hold either end.
"""
from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
from dataclasses import dataclass, field

from ..kvm.memory import PAGE_SIZE as PAGE, all_zero
from ..errors import KvmpyError
from ..vmm import state
from .channel import MAX_REASON, SOURCE, TARGET, Channel, MigrationError, WrongVersion, is_loopback, printable

RUN = struct.Struct("<QI")
MAX_FRAME = 64 << 20            # a PAGE frame carries at most this much (protects the reader)
MAX_HELLO = 64 << 10            # the machine's shape and disks
MAX_STATE = 32 << 20            # every vCPU's state, devices: ~40 KiB a vCPU
PAGES_PER_FRAME = 256           # 1 MiB of pages per PAGE frame
MAX_MEM_CAP = 8 << 30           # receive()'s default RAM bound: at most this, at most half the host's
DEADLINE = 600.0                # seconds for a whole migration, by default (either end)

__all__ = ["MigrationError", "Report", "send", "receive", "parse_address", "default_max_mem"]


@dataclass
class Report:
    """What a migration cost: wall time, guest downtime, rounds and pages sent."""

    total_s: float = 0.0
    downtime_s: float = 0.0
    rounds: int = 0
    pages: int = 0               # pages sent with their contents
    zero_pages: int = 0          # pages sent as "all zero"
    bytes: int = 0
    per_round: list = field(default_factory=list)    # pages (with data or zero) per round

    def line(self) -> str:
        return (f"migrated in {self.total_s:.3f} s, downtime {self.downtime_s * 1000:.1f} ms, "
                f"{self.rounds} rounds, {self.pages} pages + {self.zero_pages} zero pages "
                f"({self.bytes / 2**20:.1f} MiB)")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _expect(stream: Channel, want: bytes, limit: int = MAX_REASON) -> bytes:
    kind, payload = stream.recv(limit)
    if kind == b"FAIL":
        raise MigrationError(f"the other side gave up: {printable(payload)}")
    if kind != want:
        raise MigrationError(f"expected a {want.decode()} frame, got {kind!r}")
    return payload


def _json(payload: bytes, what: str):
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise MigrationError(f"bad {what} frame: {e}") from None


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """"HOST:PORT" or ":PORT" or "PORT" -> (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"bad address {text!r}: port out of range")
    return host.strip("[]") or default_host, p


# --- dirty pages -----------------------------------------------------------------------
def _runs(bitmap: int):
    """(first, count) runs of set bits of ``bitmap`` (bit p = page p), at most
    PAGES_PER_FRAME pages each."""
    for run in re.finditer("1+", bin(bitmap)[:1:-1]):     # the bits, lowest first
        first, end = run.span()
        for p in range(first, end, PAGES_PER_FRAME):
            yield p, min(PAGES_PER_FRAME, end - p)


def _take_dirty(m) -> list[int]:
    """Per region: the pages written since the last call (KVM log | VMM bitmap), as ints."""
    out = []
    for r in m.memory.regions:
        kvm = int.from_bytes(m.vm.get_dirty_log(r.slot), "little")
        vmm = int.from_bytes(r.take_dirty(), "little")
        out.append((kvm | vmm) & ((1 << (r.size // PAGE)) - 1))
    return out


def _send_pages(stream: Channel, m, dirty: list[int], report: Report, skip_zero: bool) -> int:
    sent = 0
    for r, bits in zip(m.memory.regions, dirty):
        view = memoryview(r.mm)
        try:
            for first, count in _runs(bits):
                off = first * PAGE
                data = view[off:off + count * PAGE]
                gpa = r.gpa + off
                if skip_zero and all_zero(data):
                    stream.send(b"ZERO", RUN.pack(gpa, count))
                    report.zero_pages += count
                else:
                    stream.send(b"PAGE", RUN.pack(gpa, count), data)
                    report.pages += count
                sent += count
        finally:
            view.release()
    return sent


def _hello(m) -> dict:
    return {"magic": state.MAGIC, "version": state.VERSION, "machine": m.shape(),
            "ram": [{"gpa": r.gpa, "size": r.size} for r in m.memory.regions],
            "disks": [s.identity for s in m.platform.disks]}


class _Outcome(MigrationError):
    """The state went out but no answer came: the target may or may not run the guest."""


def send(m, host: str, port: int, *, key: bytes | None = None, max_rounds: int = 30, small: int = 256,
         timeout: float = 30.0, deadline: float | None = DEADLINE, progress=None) -> Report:
    """Migrate running machine ``m`` to a ``receive`` at host:port; returns the Report.

    ``key`` is the key the target was given (None: the target has none either). Each
    frame either way must go through within ``timeout`` seconds (also the connect's),
    the whole migration within ``deadline``.

    Rounds go on while more than ``small`` pages were dirtied, at most ``max_rounds``,
    and stop early when a round no longer shrinks the dirty set. ``progress(text)``
    is called after each round. On success the source run stops with reason
    "migrated". On a failure MigrationError is raised and ``m`` keeps running, with
    one exception: if the connection is lost after the whole state went out and
    before the target answered, the target may be running the guest, so ``m`` stays
    paused (never two guests on one disk); check the target, then ``m.resume()``
    (``kvmpy ctl PATH resume``) or stop it. One migration at a time per machine.
    """
    if not m.running:
        raise MigrationError("live migration needs a running machine (start() or run() it)")
    if not m.migration_lock.acquire(blocking=False):
        raise MigrationError("a migration of this machine is already under way")
    try:
        return _send(m, (host, port), key, max_rounds, small, (timeout, deadline),
                     progress or (lambda text: None))
    finally:
        m.migration_lock.release()


def _send(m, address, key, max_rounds, small, timeouts, say) -> Report:
    report = Report()
    t0 = time.perf_counter()
    host, port = address
    try:
        sock = socket.create_connection(address, timeout=timeouts[0])
    except OSError as e:
        raise MigrationError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
    stream = Channel(sock, SOURCE, key, *timeouts)
    progress = {"held": False, "logging": False, "committed": False}
    try:
        stream.greet()
        stream.send_json(b"HELO", _hello(m))
        _expect(stream, b"REDY")
        m.vm.log_dirty_pages(True)
        progress["logging"] = True
        dirty = _precopy(stream, m, report, max_rounds, small, say)
        stream.send(b"SYNC")                 # let the target catch up while the guest still runs
        _expect(stream, b"SYNC")
        _stop_and_copy(stream, m, report, dirty, progress)
    except BaseException as e:
        _abandon(stream, m, e, progress, f"{host}:{port}")
    sock.close()
    report.bytes = stream.sent
    report.total_s = time.perf_counter() - t0
    m.request_stop("migrated")                         # the target runs the guest now
    m.resume()
    say(report.line())
    return report


def _precopy(stream: Channel, m, report: Report, max_rounds: int, small: int, say) -> list[int]:
    """All RAM, then rounds of the pages dirtied meanwhile, while the guest runs; returns
    the pages dirtied since the last round (they go in the stop-and-copy)."""
    _take_dirty(m)                                  # start from a clean log
    everything = [(1 << (r.size // PAGE)) - 1 for r in m.memory.regions]
    n = _send_pages(stream, m, everything, report, skip_zero=True)
    report.rounds, report.per_round = 1, [n]
    say(f"round 1: {n} pages ({report.zero_pages} zero), {stream.sent / 2**20:.1f} MiB")
    while True:
        dirty = _take_dirty(m)
        count = sum(d.bit_count() for d in dirty)
        if count <= small or report.rounds >= max_rounds or \
                (report.rounds > 1 and count >= report.per_round[-1]):
            return dirty            # small enough, or not converging: these go with the last round
        n = _send_pages(stream, m, dirty, report, skip_zero=False)
        report.rounds += 1
        report.per_round.append(n)
        say(f"round {report.rounds}: {n} dirty pages, {stream.sent / 2**20:.1f} MiB sent")


def _stop_and_copy(stream: Channel, m, report: Report, dirty: list[int], progress: dict) -> None:
    """Pause the guest, send the last dirty pages and the machine state, wait for RUNS."""
    t_pause = time.perf_counter()
    progress["held"] = m.pause()
    if not progress["held"]:
        raise MigrationError("the guest stopped during the migration")
    dirty = [a | b for a, b in zip(dirty, _take_dirty(m))]
    n = _send_pages(stream, m, dirty, report, skip_zero=False)
    report.rounds += 1
    report.per_round.append(n)
    body = state.capture(m)
    body["sha256"] = state.body_sha(body)
    stream.send_json(b"STAT", body)
    progress["committed"] = True         # from here a silent target may be running the guest
    _expect(stream, b"RUNS")
    report.downtime_s = time.perf_counter() - t_pause


def _abandon(stream: Channel, m, e: BaseException, progress: dict, where: str) -> None:
    """A migration failed with ``e``: tell the target, resume the guest unless the target
    may already run it, turn logging off, and raise what the caller should see."""
    refused = isinstance(e, MigrationError) and str(e).startswith("the other side gave up")
    stream.fail(b"the source gave up")
    stream.sock.close()
    keep_paused = progress["held"] and progress["committed"] and not refused
    if progress["held"] and not keep_paused:
        m.resume()                       # first: whatever else fails, the guest goes on
    if progress["logging"]:
        try:
            m.vm.log_dirty_pages(False)
        except KvmpyError:
            pass                         # logging left on costs speed, not correctness
    if keep_paused:
        raise _Outcome(f"migration to {where}: the connection was lost after the state "
                       f"was sent ({type(e).__name__}: {e}); the target may be running the guest, "
                       "so it stays paused here: check the target, then resume or stop it") from None
    if isinstance(e, MigrationError):
        raise e
    if isinstance(e, (OSError, KvmpyError)):
        raise MigrationError(f"migration to {where} failed: {e}") from None
    raise e


def _check_hello(hello, where: str) -> dict:
    if not isinstance(hello, dict) or hello.get("magic") != state.MAGIC:
        raise MigrationError(f"{where}: not a kvmpy migration stream")
    if hello.get("version") != state.VERSION:
        raise MigrationError(f"{where}: machine state version {hello.get('version')!r}, this kvmpy reads "
                             f"{state.VERSION}")
    ram = hello.get("ram")
    if not isinstance(ram, list) or not all(isinstance(r, dict) and type(r.get("gpa")) is int
                                            and type(r.get("size")) is int for r in ram):
        raise MigrationError(f"{where}: malformed HELO (the RAM list)")
    return hello


def default_max_mem() -> int:
    """receive()'s bound on a source's RAM unless told: half this host's RAM, at most MAX_MEM_CAP."""
    return min(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2, MAX_MEM_CAP)


def receive(listen: tuple[str, int] = ("127.0.0.1", 0), *, key: bytes | None = None, disks=None,
            timeout: float | None = None, on_listen=None, progress=None, run_timeout: float | None = None,
            stream_timeout: float | None = 60.0, deadline: float | None = DEADLINE,
            max_mem: int | None = None, **host_options):
    """Wait for one incoming migration on ``listen`` and return the Machine, already
    running (``wait()`` for its end), and the number of pages received.

    ``key``: the pre-shared key (bytes) the source must prove it holds: every frame
    carries a MAC made with it (channel.py). Without a key only a loopback address may
    be listened on. ``on_listen((host, port))`` is called once the socket listens (port
    0 picks one). ``disks`` are the files the guest's disks use here, in order (Disk or
    "PATH[,ro]"): a guest with disks is refused without them, because the stream is not
    trusted to name files to open (and each must have the size the source reports).
    ``timeout`` bounds the wait for a connection; then each frame must arrive whole
    within ``stream_timeout`` seconds and the whole migration within ``deadline``.
    ``max_mem`` (default: default_max_mem()) bounds the RAM a source may ask for;
    ``run_timeout`` is the run's. If the stream breaks, is bad or fails its MACs, the
    partly built machine is closed and MigrationError raised: nothing keeps running,
    and the source learns only that it was refused (the reasons, which may name local
    files, stay in the exception).
    """
    conn, peer = _accept(listen, timeout, on_listen, keyed=key is not None)
    stream = Channel(conn, TARGET, key, stream_timeout, deadline)
    max_mem = default_max_mem() if max_mem is None else max_mem
    where = f"migration from {peer[0]}:{peer[1]}"
    m = None
    try:
        stream.answer_greeting(where)
        m = _build_target(stream, where, max_mem, disks, host_options)
        stream.send(b"REDY")
        pages = _receive_ram_and_state(stream, m, where)
        m.start(timeout=run_timeout)
        stream.send(b"RUNS")
        (progress or (lambda text: None))(f"received {pages} pages; the guest runs here now")
    except BaseException as e:
        if m is not None:
            m.close()
        why = str(e) if isinstance(e, WrongVersion) else "the target refused the migration (its log says why)"
        stream.fail(why.encode())
        conn.close()
        if isinstance(e, (MigrationError, KeyboardInterrupt)):
            raise
        if isinstance(e, (KvmpyError,) + state.BAD_STATE):     # OSError, bad values from the stream
            raise MigrationError(f"{where}: {type(e).__name__}: {e}") from None
        raise
    conn.close()
    return m, pages


def _accept(listen, timeout, on_listen, keyed: bool):
    srv = socket.create_server(listen)
    try:
        host = srv.getsockname()[0]
        if not keyed and not is_loopback(host):
            raise MigrationError(f"refusing to listen on {listen[0] or host!r} without a migration key: "
                                 "anyone who can reach it could hand this host a guest to run. Give "
                                 "a key (key=..., kvmpy receive --key-file PATH) or listen on loopback")
        if on_listen is not None:
            on_listen(srv.getsockname()[:2])
        srv.settimeout(timeout)
        try:
            return srv.accept()
        except socket.timeout:
            raise MigrationError(f"no migration arrived within {timeout} s") from None
    finally:
        srv.close()


def _build_target(stream: Channel, where: str, max_mem: int, disks, host_options: dict):
    """The HELO checked, and a Machine of its shape (RAM bounded by ``max_mem``, disks given here)."""
    hello = _check_hello(_json(_expect(stream, b"HELO", MAX_HELLO), "HELO"), where)
    mem = hello["machine"]["mem_size"] if isinstance(hello.get("machine"), dict) else None
    if type(mem) is not int or not 0 < mem <= max_mem:
        raise MigrationError(f"{where}: asks for {mem!r} bytes of RAM (at most {max_mem} here)")
    if hello.get("disks") and disks is None:
        raise MigrationError(f"{where}: the guest has {len(hello['disks'])} disk(s) "
                             f"({', '.join(str(d.get('path')) for d in hello['disks'] if isinstance(d, dict))} "
                             "at the source): say which files it may use here with disks=[...] "
                             "(kvmpy receive --disk PATH, in order; the same files for shared storage)")
    try:
        return state.machine_for(hello_as_body(hello), disks, where, **host_options)
    except state.SnapshotError as e:
        raise MigrationError(str(e)) from None


def _receive_ram_and_state(stream: Channel, m, where: str) -> int:
    """PAGE/ZERO/SYNC frames into ``m`` until the STAT frame, which is applied; returns the
    number of pages received. Each frame's MAC is checked before it has any effect beyond
    the RAM of this machine, which runs only once every frame up to STAT has passed."""
    pages = 0
    while True:
        kind, n = stream.begin()
        if kind in (b"PAGE", b"ZERO"):
            pages += _receive_pages(stream, m, kind, n, where)
        elif kind == b"SYNC":
            if n:
                raise MigrationError(f"{where}: bad SYNC frame")
            stream.end()
            stream.send(b"SYNC")
        elif kind == b"STAT":
            if n > MAX_STATE:
                raise MigrationError(f"{where}: state frame of {n} bytes is too large")
            payload = bytes(stream.read(n))
            stream.end()
            body = _json(payload, "STAT")
            try:
                state.check_body(body, where)
                state.apply(m, body)
            except state.SnapshotError as e:
                raise MigrationError(str(e)) from None
            return pages
        elif kind == b"FAIL" and n <= MAX_REASON:
            reason = bytes(stream.read(n))
            stream.end()
            raise MigrationError(f"{where}: the source gave up: {printable(reason)}")
        else:
            raise MigrationError(f"{where}: unexpected frame {kind!r}")


def _receive_pages(stream: Channel, m, kind: bytes, n: int, where: str) -> int:
    """One PAGE or ZERO frame of ``n`` bytes, checked, into guest RAM; returns its page count."""
    if n < RUN.size or n > RUN.size + MAX_FRAME:
        raise MigrationError(f"{where}: bad {kind.decode()} frame length {n}")
    gpa, count = RUN.unpack(stream.read(RUN.size))
    size = count * PAGE
    if gpa % PAGE or not m.memory.contains(gpa, size) or n != RUN.size + (size if kind == b"PAGE" else 0):
        raise MigrationError(f"{where}: pages {gpa:#x}+{count} are outside guest RAM or the frame is malformed")
    if kind == b"PAGE":
        stream.read(size, m.memory.view(gpa, size))       # straight into guest RAM (MACed as it comes)
    stream.end()
    if kind == b"ZERO" and not all_zero(m.memory.view(gpa, size, writable=False)):
        m.memory.fill(gpa, size, 0)         # untouched RAM is zero already: leave it so
    return count


def hello_as_body(hello: dict) -> dict:
    """The parts of a HELO that state.machine_for reads, in a snapshot body's shape."""
    try:
        return {"machine": hello["machine"], "ram": hello["ram"],
                "devices": {"disks": [{"path": d["path"], "readonly": d["readonly"], "size": d["size"]}
                                      for d in hello["disks"]]}}
    except (KeyError, TypeError) as e:
        raise MigrationError(f"bad HELO frame: {e!r}") from None

