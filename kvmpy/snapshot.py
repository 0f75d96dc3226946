"""Snapshots: a stopped Machine saved to a directory, and a new Machine continuing from it.

Format (version 1), one directory:

    manifest.json   {"magic": "kvmpy-snapshot", "version": 1, "machine": {...},
                     "vcpus": [...], "vm": {...}, "devices": {...},
                     "ram": [{"gpa", "size", "file", "sha256"}], "sha256": <of the rest>}
    ram-<gpa>.bin   guest RAM of one region, raw, as it is in the guest

Blobs KVM hands out whole (FPU, XSAVE, XCRs, LAPIC, vCPU events, irqchip, PIT) are
stored as hex of the kernel's own structs, so they go back exactly as they came.
Everything is checked before anything starts: magic, version, the manifest's checksum,
each RAM file's size and checksum. This first slice covers machines without disks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from .errors import KvmpyError
from .x86.regs import DTable, Regs, Segment, Sregs

MAGIC, VERSION = "kvmpy-snapshot", 1


class SnapshotError(KvmpyError):
    """A snapshot is missing, truncated, corrupted, of another version, or does not fit."""


def _sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _vcpu_state(m, v) -> dict:
    msrs = v.get_msrs(sorted(m._supported_msrs() & set(m.kvm.msr_index_list())))
    s = v.get_sregs()
    state = {"regs": dataclasses.asdict(v.get_regs()), "sregs": dataclasses.asdict(s),
             "fpu": v.get_fpu().hex(), "xsave": v.get_xsave().hex(), "xcrs": v.get_xcrs().hex(),
             "msrs": {str(k): val for k, val in msrs.items()}, "mp_state": v.get_mp_state(),
             "events": v.get_vcpu_events().hex(), "debugregs": v.get_debugregs()}
    if m.irqchip:
        state["lapic"] = v.get_lapic().hex()
    return state


def save(m, path) -> None:
    """Write the stopped machine ``m`` to directory ``path`` (created; must not exist)."""
    if m._run_active.is_set():
        raise SnapshotError("snapshot needs a stopped machine: call it after run() returns")
    if m.disks:
        raise SnapshotError("snapshots of machines with disks are not supported yet")
    os.makedirs(path)
    m._drain_serial()
    ram = []
    for r in m.memory.regions:
        name = f"ram-{r.gpa:x}.bin"
        data = r.mm[:]
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
        ram.append({"gpa": r.gpa, "size": r.size, "file": name, "sha256": _sha(data)})
    vm = {"clock": m.vm.get_clock()}
    if m.irqchip:
        vm["irqchip"] = [m.vm.get_irqchip(i).hex() for i in range(3)]
        vm["pit2"] = m.vm.get_pit2().hex()
    body = {"magic": MAGIC, "version": VERSION,
            "machine": {"mem_size": m.mem_size, "cpus": len(m.vcpus), "irqchip": m.irqchip},
            "vcpus": [_vcpu_state(m, v) for v in m.vcpus], "vm": vm,
            "devices": {"com1": m.serial.save_state(), "fw_cfg_cmdline": m.fw_cfg.cmdline.decode()},
            "ram": ram}
    body["sha256"] = _sha(json.dumps(body, sort_keys=True).encode())
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)


def load_manifest(path) -> dict:
    """The manifest, fully checked (RAM files included), or SnapshotError saying what is wrong."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            body = json.load(f)
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{path}: cannot read the snapshot manifest: {e}") from None
    if not isinstance(body, dict) or body.get("magic") != MAGIC:
        raise SnapshotError(f"{path}: not a kvmpy snapshot (bad magic)")
    if body.get("version") != VERSION:
        raise SnapshotError(f"{path}: snapshot version {body.get('version')!r}, this kvmpy reads {VERSION}")
    want = body.pop("sha256", None)
    if want != _sha(json.dumps(body, sort_keys=True).encode()):
        raise SnapshotError(f"{path}: the manifest's checksum does not match (corrupted)")
    for r in body["ram"]:
        file = os.path.join(path, os.path.basename(r["file"]))
        try:
            size = os.path.getsize(file)
        except OSError as e:
            raise SnapshotError(f"{path}: RAM file {r['file']}: {e.strerror}") from None
        if size != r["size"]:
            raise SnapshotError(f"{path}: RAM file {r['file']} has {size} bytes, the manifest says {r['size']}")
        with open(file, "rb") as f:
            if _sha(f.read()) != r["sha256"]:
                raise SnapshotError(f"{path}: RAM file {r['file']} is corrupted (checksum)")
    return body


def _sregs(d: dict) -> Sregs:
    s = Sregs(**{n: Segment(**d[n]) for n in Sregs.SEGMENTS})
    s.gdt, s.idt = DTable(**d["gdt"]), DTable(**d["idt"])
    for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        setattr(s, n, d[n])
    s.interrupt_bitmap = tuple(d["interrupt_bitmap"])
    return s


def restore(path, **host_options):
    """A new Machine continuing the snapshot at ``path``; ``host_options`` are Machine's
    host-side arguments (serial, native, kvm)."""
    from .machine import Machine
    body = load_manifest(path)
    mc = body["machine"]
    m = Machine(mem_size=mc["mem_size"], cpus=mc["cpus"], irqchip=mc["irqchip"], **host_options)
    try:
        regions = {(r.gpa, r.size): r for r in m.memory.regions}
        for r in body["ram"]:
            region = regions.get((r["gpa"], r["size"]))
            if region is None:
                raise SnapshotError(f"{path}: RAM region {r['gpa']:#x}+{r['size']:#x} does not match the machine")
            with open(os.path.join(path, os.path.basename(r["file"])), "rb") as f:
                f.readinto(region.mm)
        vm = body["vm"]
        if mc["irqchip"]:
            for blob in vm["irqchip"]:
                m.vm.set_irqchip(bytes.fromhex(blob))
            m.vm.set_pit2(bytes.fromhex(vm["pit2"]))
        for v, st in zip(m.vcpus, body["vcpus"]):
            v.set_sregs(_sregs(st["sregs"]))
            v.set_regs(Regs(**st["regs"]))
            v.set_fpu(bytes.fromhex(st["fpu"]))
            v.set_xsave(bytes.fromhex(st["xsave"]))
            v.set_xcrs(bytes.fromhex(st["xcrs"]))
            v.set_msrs({int(k): val for k, val in st["msrs"].items()})
            if "lapic" in st:
                v.set_lapic(bytes.fromhex(st["lapic"]))
            v.set_vcpu_events(bytes.fromhex(st["events"]))
            v.set_mp_state(st["mp_state"])
            dr = st["debugregs"]
            v.set_debugregs(dr["db"], dr["dr6"], dr["dr7"])
        m.vm.set_clock(vm["clock"])
        m.serial.load_state(body["devices"]["com1"])
        m.fw_cfg.set_cmdline(body["devices"]["fw_cfg_cmdline"])
    except BaseException:
        m.close()
        raise
    return m
