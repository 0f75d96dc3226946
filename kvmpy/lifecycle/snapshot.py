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

The state half (``capture``/``apply``) is shared with live migration (migration.py),
which sends the same dict over a socket after the RAM.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

from ..errors import DeviceError, GuestMemoryError, KvmpyError
from ..vmm.native import all_zero
from ..x86.msrs import IA32_TSC_DEADLINE
from ..kvm.regs import DTable, Regs, Segment, Sregs

MAGIC, VERSION = "kvmpy-snapshot", 2
MANIFEST = "manifest.json"
_CHUNK = 1 << 20                    # RAM is written and checksummed in 1 MiB chunks
_ZERO_DIGEST = bytes(32)            # what an all-zero chunk adds to a RAM file's digest
# Machine() arguments a snapshot fixes: restore takes only host-side ones.
_FIXED = ("mem_size", "cpus", "irqchip", "fw_cfg", "_ram_files")


class SnapshotError(KvmpyError):
    """A snapshot is missing, truncated, corrupted, of another version, or does not fit."""


# What a hostile or damaged value in a manifest can raise on its way into KVM and the
# devices (a missing key, a string for a number, a negative register, a KVM refusal).
_BAD_STATE = (LookupError, TypeError, ValueError, AttributeError, ArithmeticError, DeviceError, OSError)


def _sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _body_sha(body: dict) -> str:
    return _sha(json.dumps({k: v for k, v in body.items() if k != "sha256"}, sort_keys=True).encode())


# --- the state: everything but RAM -----------------------------------------------------
def _vcpu_state(m, v) -> dict:
    msrs = v.get_msrs(sorted(m._supported_msrs() & set(m.kvm.msr_index_list())))
    state = {"regs": dataclasses.asdict(v.get_regs()), "sregs": dataclasses.asdict(v.get_sregs()),
             "fpu": v.get_fpu().hex(), "xsave": v.get_xsave().hex(), "xcrs": v.get_xcrs().hex(),
             "msrs": {str(k): val for k, val in msrs.items()}, "mp_state": v.get_mp_state(),
             "events": v.get_vcpu_events().hex(), "debugregs": v.get_debugregs()}
    if m.irqchip:
        state["lapic"] = v.get_lapic().hex()
    return state


def capture(m) -> dict:
    """Every vCPU's, the VM's and each device's state (no RAM) of a stopped or paused machine."""
    if m.running and not m.paused:
        raise SnapshotError("the machine is running: pause() it (or let run() return) first")
    m._drain_serial()
    vm = {"clock": m.vm.get_clock()}
    if m.irqchip:
        vm["irqchip"] = [m.vm.get_irqchip(i).hex() for i in range(3)]
        vm["pit2"] = m.vm.get_pit2().hex()
    disks = [{**d, "state": dev.save_state()} for d, dev in zip(disk_identities(m), m.virtio_devices)]
    return {"magic": MAGIC, "version": VERSION, "machine": machine_shape(m),
            "vcpus": [_vcpu_state(m, v) for v in m.vcpus], "vm": vm,
            "devices": {"com1": m.serial.save_state(), "fw_cfg": m.fw_cfg.save_state(), "disks": disks}}


def machine_shape(m) -> dict:
    """What a Machine() to continue ``m`` is built with (snapshots and migration's HELO)."""
    return {"mem_size": m.mem_size, "cpus": len(m.vcpus), "irqchip": m.irqchip}


def disk_identities(m) -> list[dict]:
    """Each disk's file: absolute path, read-only flag and size (a restore checks the size)."""
    return [{"path": os.path.abspath(spec.path), "readonly": spec.readonly, "size": disk.file_size}
            for spec, disk in zip(m.disk_specs, m.disks)]


def _sregs(d: dict) -> Sregs:
    s = Sregs(**{n: Segment(**d[n]) for n in Sregs.SEGMENTS})
    s.gdt, s.idt = DTable(**d["gdt"]), DTable(**d["idt"])
    for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        setattr(s, n, d[n])
    s.interrupt_bitmap = tuple(d["interrupt_bitmap"])
    return s


def apply(m, body: dict) -> None:
    """Load ``capture()``'s dict into machine ``m`` (built to match, RAM already in place)."""
    try:
        vm = body["vm"]
        if m.irqchip:
            for blob in vm["irqchip"]:
                m.vm.set_irqchip(bytes.fromhex(blob))
            m.vm.set_pit2(bytes.fromhex(vm["pit2"]))
        for v, st in zip(m.vcpus, body["vcpus"], strict=True):
            v.set_sregs(_sregs(st["sregs"]))
            v.set_regs(Regs(**st["regs"]))
            v.set_fpu(bytes.fromhex(st["fpu"]))
            v.set_xsave(bytes.fromhex(st["xsave"]))
            v.set_xcrs(bytes.fromhex(st["xcrs"]))
            msrs = {int(k): val for k, val in st["msrs"].items()}
            if v.set_msrs(msrs) != len(msrs):
                raise SnapshotError("KVM refused one of the saved MSRs")
            if "lapic" in st:
                v.set_lapic(bytes.fromhex(st["lapic"]))
                if IA32_TSC_DEADLINE in msrs:   # ignored above unless the LAPIC timer was in deadline mode
                    v.set_msrs({IA32_TSC_DEADLINE: msrs[IA32_TSC_DEADLINE]})
            v.set_vcpu_events(bytes.fromhex(st["events"]))
            v.set_mp_state(st["mp_state"])
            dr = st["debugregs"]
            v.set_debugregs(dr["db"], dr["dr6"], dr["dr7"])
        m.vm.set_clock(vm["clock"])
        devices = body["devices"]
        m.serial.load_state(devices["com1"])
        m.fw_cfg.load_state(devices["fw_cfg"])
        for i, (dev, d) in enumerate(zip(m.virtio_devices, devices["disks"], strict=True)):
            try:
                dev.load_state(d["state"])
            except ValueError as e:
                raise SnapshotError(f"disk {i}: bad virtio state: {e}") from None
    except SnapshotError:
        raise
    except _BAD_STATE as e:
        raise SnapshotError(f"the saved state does not fit this machine: {type(e).__name__}: {e}") from None


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
        body["sha256"] = _body_sha(body)
        tmp = os.path.join(path, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(body, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(path, MANIFEST))   # the manifest appears last, whole
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def check_body(body, where: str) -> dict:
    """Magic, version and checksum of a state dict from a file or a migration stream."""
    if not isinstance(body, dict) or body.get("magic") != MAGIC:
        raise SnapshotError(f"{where}: not a kvmpy snapshot (bad magic)")
    if body.get("version") != VERSION:
        raise SnapshotError(f"{where}: snapshot version {body.get('version')!r}, this kvmpy reads {VERSION}")
    if body.get("sha256") != _body_sha(body):
        raise SnapshotError(f"{where}: the manifest's checksum does not match (corrupted)")
    return body


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
    except _BAD_STATE as e:
        raise SnapshotError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    return body


def disk_list(body: dict, disks, where: str) -> list:
    """The Disk list a restore opens: the saved paths, or ``disks`` in their place; each
    file must still have the size it had when the snapshot was taken."""
    from ..vmm.machine import Disk
    saved = body["devices"]["disks"]
    if not isinstance(saved, list) or not all(
            isinstance(d, dict) and isinstance(d.get("path"), str) and isinstance(d.get("readonly"), bool)
            and type(d.get("size")) is int for d in saved):
        raise SnapshotError(f"{where}: malformed disk list")
    if disks is None:
        disks = [Disk(d["path"], d["readonly"]) for d in saved]
    else:
        disks = [d if isinstance(d, Disk) else Disk.parse(d) for d in disks]
        if len(disks) != len(saved):
            raise SnapshotError(f"{where}: the snapshot has {len(saved)} disks, {len(disks)} were given")
    for i, (disk, d) in enumerate(zip(disks, saved)):
        try:
            size = os.path.getsize(disk.path)
        except OSError as e:
            raise SnapshotError(f"{where}: disk {i} ({disk.path}): {e.strerror}") from None
        if size != d["size"]:
            raise SnapshotError(f"{where}: disk {i} ({disk.path}) changed size: {d['size']} bytes "
                                f"when the snapshot was taken, {size} now")
    return disks


def machine_for(body: dict, disks, where: str, ram_files=None, **host_options):
    """A fresh Machine shaped like the saved one (its RAM regions, when the body lists them,
    must be what mem_size gives; RAM mapped from ``ram_files`` if given)."""
    from ..vmm.machine import Machine
    fixed = sorted(set(host_options) & set(_FIXED + ("disks",)))
    if fixed:
        raise TypeError(f"{', '.join(fixed)} come from the snapshot; restore takes host-side options only")
    try:
        mc = body["machine"]
        if "ram" in body and \
                sorted(Machine.ram_layout(mc["mem_size"])) != sorted((r["gpa"], r["size"]) for r in body["ram"]):
            raise SnapshotError(f"{where}: the RAM regions do not match the machine's {mc['mem_size']} bytes of RAM")
        return Machine(mem_size=mc["mem_size"], cpus=mc["cpus"], irqchip=mc["irqchip"],
                       disks=disk_list(body, disks, where), _ram_files=ram_files, **host_options)
    except (GuestMemoryError, DeviceError) + _BAD_STATE as e:
        raise SnapshotError(f"{where}: the saved machine cannot be built: {type(e).__name__}: {e}") from None


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
    if any(not d.readonly for d in m.disk_specs) and (host_options.get("disks") is None or count > 1):
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
