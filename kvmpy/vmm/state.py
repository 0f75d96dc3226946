"""A machine's whole state (everything but RAM) as one plain dict, gathered from its parts.

Each part saves and loads its own: every vCPU (``Vcpu.save_state``: registers, FPU,
XSAVE, MSRs, LAPIC, events...), the VM (``Vm.save_state``: clock, irqchips, PIT) and
the platform's devices (``Platform.save_state``: COM1, fw_cfg, each disk's identity
and virtio state). This module only puts them together in the order KVM needs, checks
the envelope, and builds a Machine shaped like a saved one. Snapshots write the dict
to a file (lifecycle/snapshot.py), live migration sends it (lifecycle/migration.py);
docs/snapshots.md describes the format.
"""
from __future__ import annotations

import hashlib
import json

from ..errors import DeviceError, GuestMemoryError, KvmError, KvmpyError, file_size
from .platform import DeviceStateError, Disk, Vsock

MAGIC, VERSION = "kvmpy-snapshot", 2
# Machine() arguments a saved state fixes: a restore takes only host-side ones.
FIXED = ("mem_size", "cpus", "irqchip", "fw_cfg", "ram_files", "disks", "test_devices", "rng", "virtio_transport",
         "net_transport")
# What a hostile or damaged value can raise on its way into KVM and the devices (a missing
# key, a string for a number, a negative register, a KVM refusal).
BAD_STATE = (LookupError, TypeError, ValueError, AttributeError, ArithmeticError, DeviceError, OSError)


class SnapshotError(KvmpyError):
    """A snapshot is missing, truncated, corrupted, of another version, or does not fit."""


def body_sha(body: dict) -> str:
    """The checksum a state dict carries in its "sha256" (over everything else in it)."""
    rest = {k: v for k, v in body.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def capture(m) -> dict:
    """Every vCPU's, the VM's and each device's state (no RAM) of a stopped or paused machine."""
    if m.running and not m.paused:
        raise SnapshotError("the machine is running: pause() it (or let run() return) first")
    if m.checkpointed:
        raise SnapshotError("the machine holds a reset checkpoint (its disks write to overlays, "
                            "its dirty logs belong to the reset): drop_checkpoint() first")
    m.console.drain()
    msrs = sorted(m.supported_msrs() & set(m.kvm.msr_index_list()))
    return {"magic": MAGIC, "version": VERSION, "machine": m.shape(),
            "vcpus": [v.save_state(msrs) for v in m.vcpus], "vm": m.vm.save_state(),
            "devices": m.platform.save_state()}


def apply(m, body: dict) -> None:
    """Load ``capture()``'s dict into machine ``m`` (built to match, RAM already in place):
    irqchips and PIT first, then each vCPU (its LAPIC after them), the clock, the devices."""
    try:
        m.vm.load_state_irqchip(body["vm"])
        for v, st in zip(m.vcpus, body["vcpus"], strict=True):
            v.load_state(st)
        m.vm.load_state_clock(body["vm"])
        try:
            m.platform.load_state(body["devices"])
        except DeviceStateError as e:
            raise SnapshotError(str(e)) from None
    except SnapshotError:
        raise
    except BAD_STATE + (KvmError,) as e:
        raise SnapshotError(f"the saved state does not fit this machine: {type(e).__name__}: {e}") from None


def check_body(body, where: str) -> dict:
    """Magic, version and checksum of a state dict from a file or a migration stream."""
    if not isinstance(body, dict) or body.get("magic") != MAGIC:
        raise SnapshotError(f"{where}: not a kvmpy snapshot (bad magic)")
    if body.get("version") != VERSION:
        raise SnapshotError(f"{where}: snapshot version {body.get('version')!r}, this kvmpy reads {VERSION}")
    if body.get("sha256") != body_sha(body):
        raise SnapshotError(f"{where}: the manifest's checksum does not match (corrupted)")
    return body


def disk_list(body: dict, disks, where: str) -> list:
    """The Disk list a restore opens: the saved paths, or ``disks`` in their place; each
    file must still have the size it had when the state was saved."""
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
            size = file_size(disk.path)          # st_size would say 0 for a block device
        except OSError as e:
            raise SnapshotError(f"{where}: disk {i} ({disk.path}): {e.strerror}") from None
        if size != d["size"]:
            raise SnapshotError(f"{where}: disk {i} ({disk.path}) changed size: {d['size']} bytes "
                                f"when the snapshot was taken, {size} now")
    return disks


def machine_for(body: dict, disks, where: str, ram_files=None, **host_options):
    """A fresh Machine shaped like the saved one (its RAM regions, when the body lists them,
    must be what mem_size gives; RAM mapped from ``ram_files`` if given)."""
    from .machine import Machine
    fixed = sorted(set(host_options) & set(FIXED))
    if fixed:
        raise TypeError(f"{', '.join(fixed)} come from the snapshot; restore takes host-side options only")
    try:
        mc = body["machine"]
        if "ram" in body and \
                sorted(Machine.ram_layout(mc["mem_size"])) != sorted((r["gpa"], r["size"]) for r in body["ram"]):
            raise SnapshotError(f"{where}: the RAM regions do not match the machine's {mc['mem_size']} bytes of RAM")
        flags = {k: mc.get(k, False) for k in ("test_devices", "rng")}   # absent before those devices
        for k, v in flags.items():
            if type(v) is not bool:
                raise SnapshotError(f"{where}: {k} must be true or false, not {v!r}")
        net = _net(mc.get("net"), host_options.pop("net", None), where)
        host_options["vsock"] = vsock_for(mc, host_options.get("vsock"), where)
        transport = mc.get("virtio_transport", "mmio")                  # absent: virtio-mmio, as before PCI
        if transport not in ("mmio", "pci"):
            raise SnapshotError(f"{where}: virtio_transport must be 'mmio' or 'pci', not {transport!r}")
        net_transport = mc.get("net_transport", "mmio")     # absent: the network and vsock on virtio-mmio
        if net_transport not in ("mmio", "pci") or (net_transport == "pci" and transport != "pci"):
            raise SnapshotError(f"{where}: net_transport must be 'mmio', or 'pci' with virtio_transport 'pci', "
                                f"not {net_transport!r}")
        return Machine(mem_size=mc["mem_size"], cpus=mc["cpus"], irqchip=mc["irqchip"], **flags, net=net,
                       virtio_transport=transport, net_transport=net_transport,
                       disks=disk_list(body, disks, where), ram_files=ram_files, **host_options)
    except (GuestMemoryError, DeviceError) + BAD_STATE as e:
        raise SnapshotError(f"{where}: the saved machine cannot be built: {type(e).__name__}: {e}") from None


def _net(saved, given, where: str):
    """The network of a restored machine: the saved one's spec, its backend re-made, or
    ``given`` (a host-side choice: another passt socket or TAP) if the saved machine had one."""
    if saved is None:
        if given is not None:
            raise SnapshotError(f"{where}: the saved machine has no network device; net= cannot add one")
        return None
    if not isinstance(saved, str):
        raise SnapshotError(f"{where}: net must be a network spec string, not {saved!r}")
    from ..net import Net
    try:
        Net.parse(saved)
    except ValueError as e:
        raise SnapshotError(f"{where}: {e}") from None
    return given if given is not None else saved


def vsock_for(mc: dict, given, where: str):
    """The restored machine's Vsock: the saved guest CID, with the host socket the restore
    was given (``vsock=PATH``; none: the guest's connections are refused)."""
    cid = mc.get("vsock_cid")
    if cid is None:
        if given is not None:
            raise SnapshotError(f"{where}: the saved machine has no vsock device")
        return None
    if isinstance(given, Vsock):
        if given.cid != cid:
            raise SnapshotError(f"{where}: the saved guest CID is {cid}, not {given.cid}")
        return given
    try:
        return Vsock(None if given is None else str(given), cid)
    except ValueError as e:
        raise SnapshotError(f"{where}: bad vsock_cid: {e}") from None
