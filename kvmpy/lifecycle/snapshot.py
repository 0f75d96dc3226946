"""Snapshots: a Machine saved to a directory, and new Machines continuing from it.

Format (version 2; docs/snapshots.md has the full description), one directory:

    manifest.json   {"magic": "kvmpy-snapshot", "version": 2, "machine": {...},
                     "vcpus": [...], "vm": {...}, "devices": {...},
                     "ram": [{"gpa", "size", "file", "sha256"}], "sha256": <of the rest>}
    ram-<gpa>.bin   guest RAM of one region, raw, byte for byte as the guest sees it
                    (all-zero 1 MiB chunks are holes), so a restore can map it directly.
                    Its "sha256" is the SHA-256 of the chunks' SHA-256 digests in order,
                    32 zero bytes standing for an all-zero chunk (so checking skips holes)

Blobs KVM hands out whole (FPU, XSAVE, XCRs, LAPIC, vCPU events, irqchip, PIT) are
stored as hex of the kernel's own structs, so they go back exactly as they came.

The state itself (everything but RAM) comes from ``kvmpy.vmm.state``, which gathers it
from the machine's parts; live migration (migration.py) sends the same dict over a socket.
This module only writes it and the RAM to files and reads them back.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

from ..kvm.memory import all_zero
from ..vmm.state import (BAD_STATE, MAGIC, VERSION, SnapshotError, apply, body_sha, capture,
                         check_body, machine_for)

__all__ = ["MAGIC", "VERSION", "SnapshotError", "save", "restore", "clone", "load_manifest", "paused",
           "capture", "apply", "check_body", "machine_for"]

MANIFEST = "manifest.json"
_CHUNK = 1 << 20                    # RAM is written and checksummed in 1 MiB chunks
_ZERO_DIGEST = bytes(32)            # what an all-zero chunk adds to a RAM file's digest


@contextlib.contextmanager
def paused(m):
    """Hold a running machine paused for the block (pauses nest: one held by someone else
    stays held); a stopped machine needs nothing."""
    held = m.pause() if m.running else False
    try:
        yield
    finally:
        if held:
            m.resume()


# --- on disk ---------------------------------------------------------------------------
def _write_ram(path: str, mm) -> str:
    """Write one region to ``path``, all-zero chunks as holes; returns its digest."""
    digest = hashlib.sha256()
    view = memoryview(mm)
    try:
        with open(path, "wb") as f:
            for off in range(0, len(mm), _CHUNK):
                chunk = view[off:off + _CHUNK]
                if all_zero(chunk):
                    f.seek(len(chunk), os.SEEK_CUR)
                    digest.update(_ZERO_DIGEST)
                else:
                    f.write(chunk)
                    digest.update(hashlib.sha256(chunk).digest())
            f.truncate(len(mm))
    finally:
        view.release()
    return digest.hexdigest()


def _ram_digest(path: str, size: int) -> str:
    """The digest _write_ram gave, recomputed from the file; holes are not read."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data_at = 0                                     # no data before this offset
        for off in range(0, size, _CHUNK):
            n = min(_CHUNK, size - off)
            if data_at < off + n:
                try:
                    data_at = os.lseek(fd, off, os.SEEK_DATA)
                except OSError:                         # ENXIO: only a hole is left
                    data_at = size
            if data_at >= off + n:
                digest.update(_ZERO_DIGEST)
                continue
            chunk = os.pread(fd, n, off)
            digest.update(_ZERO_DIGEST if all_zero(chunk) else hashlib.sha256(chunk).digest())
    finally:
        os.close(fd)
    return digest.hexdigest()


def save(m, path) -> None:
    """Save machine ``m`` to directory ``path`` (created; must not exist). A running machine
    is paused for the time it takes and then goes on; a paused one stays paused."""
    path = os.fspath(path)
    try:
        os.makedirs(path)
    except OSError as e:
        raise SnapshotError(f"{path}: cannot create the snapshot directory: {e.strerror}") from None
    try:
        with paused(m):
            body = capture(m)
            ram = []
            for r in m.memory.regions:
                name = f"ram-{r.gpa:x}.bin"
                ram.append({"gpa": r.gpa, "size": r.size, "file": name,
                            "sha256": _write_ram(os.path.join(path, name), r.mm)})
        body["ram"] = ram
        body["sha256"] = body_sha(body)
        tmp = os.path.join(path, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(body, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(path, MANIFEST))   # the manifest appears last, whole
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise




def load_manifest(path, verify_ram: bool = True) -> dict:
    """The manifest, checked, or SnapshotError saying what is wrong. RAM files are checked
    for size always and for their checksum when ``verify_ram`` (which reads them once)."""
    path = os.fspath(path)
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            body = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise SnapshotError(f"{path}: cannot read the snapshot manifest: {type(e).__name__}: {e}") from None
    check_body(body, path)
    ram = body.get("ram")
    if not isinstance(ram, list) or not all(
            isinstance(r, dict) and type(r.get("gpa")) is int and type(r.get("size")) is int
            and isinstance(r.get("file"), str) and isinstance(r.get("sha256"), str) for r in ram):
        raise SnapshotError(f"{path}: malformed manifest (the RAM list)")
    try:
        for r in body["ram"]:
            file = os.path.join(path, os.path.basename(r["file"]))
            try:
                size = os.path.getsize(file)
            except OSError as e:
                raise SnapshotError(f"{path}: RAM file {r['file']}: {e.strerror}") from None
            if size != r["size"]:
                raise SnapshotError(f"{path}: RAM file {r['file']} has {size} bytes, the manifest says {r['size']}")
            if verify_ram and _ram_digest(file, size) != r["sha256"]:
                raise SnapshotError(f"{path}: RAM file {r['file']} is corrupted (checksum)")
    except BAD_STATE as e:
        raise SnapshotError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    return body






def restore(path, verify: bool = True, disks=None, **host_options):
    """A new Machine continuing the snapshot at ``path``; ``host_options`` are Machine's
    host-side arguments (serial, native, kvm). ``disks`` replaces the saved disk paths
    (same count and sizes). RAM is mapped copy-on-write from the snapshot's files, so
    restores share unchanged pages; ``verify=False`` skips reading the RAM files for
    their checksums (what makes a restore cost the same for any RAM size)."""
    path = os.fspath(path)
    body = load_manifest(path, verify_ram=verify)
    ram_files = {}
    for r in body["ram"]:
        ram_files[r["gpa"]] = os.path.join(path, os.path.basename(r["file"]))
    m = machine_for(body, disks, path, ram_files=ram_files, **host_options)
    try:
        apply(m, body)
    except BaseException:
        m.close()
        raise
    return m


def clone(m, count: int = 1, **host_options) -> list:
    """``count`` new Machines continuing ``m``'s current state (``m`` goes on too).

    The RAM is written once to a temporary snapshot, mapped copy-on-write by every clone
    and unlinked, so the clones share unchanged pages and nothing stays on disk. Writable
    disks cannot be shared: pass ``disks=[...]`` (copies) or give the machine read-only ones.
    """
    if any(not d.readonly for d in m.disks) and (host_options.get("disks") is None or count > 1):
        raise SnapshotError("clones would share a writable disk: clone one at a time, each with "
                            "disks=[...] naming its own copy")
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    tmp = tempfile.mkdtemp(prefix="kvmpy-clone-", dir=base)
    out = []
    try:
        save(m, os.path.join(tmp, "snap"))
        for _ in range(count):
            out.append(restore(os.path.join(tmp, "snap"), verify=False, **host_options))
    except BaseException:
        for c in out:
            c.close()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)      # mapped pages live on in the clones
    return out
