"""Helpers shared by the tests that pause, snapshot, migrate and control the counter guest."""
import gc
import json
import os
import struct
import time

import kvmpy
from kvmpy import guests

DISK_BYTES = 64 * 512            # the counter guest writes sectors 0..63

#: The environment for a child `python -m kvmpy`: this kvmpy first, the caller's path kept
#: (the nested testbed's site directory is on PYTHONPATH).
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(kvmpy.__file__)))
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    p for p in (PKG_PARENT, os.environ.get("PYTHONPATH", "")) if p)}


def open_fds() -> frozenset:
    """This process's open file descriptors as (number, what it names), after a garbage
    collection. Compare with ``<=``: what the code under test opened and did not close is
    in a later set and not in an earlier one; a descriptor that something else (a machine
    finalised late, another test's thread ending) closed in between is not a leak."""
    gc.collect()
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            fds.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
        except OSError:
            pass                          # closed since the listing (the listing's own fd)
    return frozenset(fds)


def fresh_disk(path) -> str:
    """A zeroed disk file for the counter guest; returns its path."""
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
    return str(path)


def counter(disk, cmdline: str, native: bool = True, **machine_options):
    """A Machine with the counter guest loaded (``cmdline`` "n=.. pages=.."), not started."""
    g = guests.get("counter")
    m = kvmpy.Machine(disks=[disk] if disk else [], native=native, **machine_options)
    m.load(g.path, g.format, mode=g.mode, cmdline=cmdline)
    return m


def reference_run(tmp_dir, cmdline: str):
    """(serial output, disk bytes, exit status) of an uninterrupted run."""
    disk = fresh_disk(tmp_dir / "reference.img")
    with counter(disk, cmdline) as m:
        r = m.run(timeout=120)
        assert r.reason == "exit"
        return m.serial_output, open(disk, "rb").read(), r.status


def lasting_run(tmp_dir, n: int, pages: int, seconds: float, most: int = 50_000):
    """A counter command line whose uninterrupted run lasts at least ``seconds`` on this host,
    and that run (``reference_run``'s triple). Tests that pause or migrate a running guest
    need it still running when they act: on hardware virtualisation the counter's ring-0
    loop runs hundreds of times faster than where ring 0 is emulated, so ``n`` is scaled
    up from a first run where it finishes too soon."""
    cmdline = f"n={n} pages={pages}"
    t0 = time.monotonic()
    ref = reference_run(_fresh_dir(tmp_dir, "calibrate"), cmdline)
    took = time.monotonic() - t0
    if took >= seconds:
        return cmdline, ref
    n = min(most, max(n + 1, int(n * seconds * 1.5 / max(took, 1e-3))))
    cmdline = f"n={n} pages={pages}"
    return cmdline, reference_run(_fresh_dir(tmp_dir, "scaled"), cmdline)


def _fresh_dir(parent, name):
    d = parent / name
    d.mkdir()
    return d


def wait_until(predicate, timeout=10.0, what="condition", poll=0.005):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


SELFFEED_SECTORS, SELFFEED_AT = 65536, 0x102


def selffeed_disk(path) -> str:
    """blk-selffeed's and blk-smprace's food: 32 MiB where sector s holds (s + 1) mod 65536
    as a le16 at byte 0x102 (the IN buffer's byte that lands on avail.idx), zeros elsewhere."""
    body = bytearray(SELFFEED_SECTORS * 512)
    for s in range(SELFFEED_SECTORS):
        struct.pack_into("<H", body, s * 512 + SELFFEED_AT, (s + 1) & 0xFFFF)
    path.write_bytes(bytes(body))
    return str(path)


def rewrite_manifest(snap, edit):
    """Edit a snapshot's manifest and fix its checksum, as a hostile or buggy tool could."""
    from kvmpy.vmm.state import body_sha
    manifest = snap / "manifest.json"
    body = json.loads(manifest.read_text())
    edit(body)
    body["sha256"] = body_sha(body)
    manifest.write_text(json.dumps(body))
