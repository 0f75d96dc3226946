"""kvmpy: a minimal, readable KVM hypervisor in Python.

The public API is re-exported here; names load on first use, so the pure layers
(devices, loaders, x86 set-up) import without the compiled extension or /dev/kvm.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Machine": "machine", "RunResult": "machine", "Disk": "machine", "Stats": "stats",
    "Kvm": "kvm", "Vm": "kvm", "Vcpu": "kvm",
    "GuestMemory": "memory", "MemoryRegion": "memory",
    "KvmpyError": "errors", "KvmError": "errors", "KvmUnavailable": "errors", "GuestError": "errors",
    "LoaderError": "errors", "GuestMemoryError": "errors", "DeviceError": "errors",
}
_SUBMODULES = ("abi", "devices", "exits", "guests", "kvm", "loader", "machine", "memory", "x86", "errors")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kvmpy' has no attribute {name!r}")
