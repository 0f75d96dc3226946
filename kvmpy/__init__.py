"""kvmpy: a minimal, readable KVM hypervisor in Python.

The public API is re-exported here; names load on first use, so the pure layers
(devices, loaders, x86 set-up) import without the compiled extension or /dev/kvm,
and a command imports only what it uses. The package's floors (docs/design.md):

    cli/                        front end
    vmm/                        Machine and its parts (vCPU loop, pause gate, platform, state)
    lifecycle/ debug/ images/   what is done to a machine; gdb stub and traces; guest images
    x86/ devices/ loader/       pure Python: CPU set-up, device models, image loaders
    kvm/                        one method per ioctl; exits as values; guest memory
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Machine": "vmm.machine", "RunResult": "vmm.machine", "Disk": "vmm.machine", "Vsock": "vmm.machine", "Stats": "vmm.stats",
    "Kvm": "kvm.system", "Vm": "kvm.vm", "Vcpu": "kvm.vcpu",
    "GuestMemory": "kvm.memory", "MemoryRegion": "kvm.memory",
    "KvmpyError": "errors", "KvmError": "errors", "KvmUnavailable": "errors", "GuestError": "errors",
    "LoaderError": "errors", "GuestMemoryError": "errors", "DeviceError": "errors",
    "Sandbox": "sandbox.sandbox", "SandboxPool": "sandbox.pool", "SandboxError": "sandbox.abi",
    "LinuxSandbox": "linuxbox.sandbox",
}
# Submodules reachable as kvmpy.NAME (``from kvmpy import guests``): the package's folders,
# and the modules users reach for most, by their short names.
_SUBMODULES = {
    "devices": "devices", "kvm": "kvm", "loader": "loader", "x86": "x86", "errors": "errors",
    "vmm": "vmm", "lifecycle": "lifecycle", "debug": "debug", "images": "images", "sandbox": "sandbox",
    "abi": "kvm.abi", "exits": "kvm.exits", "memory": "kvm.memory", "machine": "vmm.machine",
    "guests": "images.guests", "linuxkernel": "images.linuxkernel", "initramfs": "images.initramfs",
    "snapshot": "lifecycle.snapshot", "migration": "lifecycle.migration", "control": "lifecycle.control",
    "trace": "debug.trace", "gdbstub": "debug.gdbstub", "linuxbox": "linuxbox",
}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return import_module(f".{_SUBMODULES[name]}", __name__)
    raise AttributeError(f"module 'kvmpy' has no attribute {name!r}")
