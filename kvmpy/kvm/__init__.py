"""L1: the thin layer over /dev/kvm, one method per ioctl (Documentation/virt/kvm/api.rst).

Three objects, three kinds of file descriptor, as in the kernel API (and as the
rust-vmm kvm-ioctls crate splits them):

* ``Kvm``  (system.py) - the system fd from opening /dev/kvm: capabilities, supported CPUID/MSRs.
* ``Vm``   (vm.py)     - a VM fd from KVM_CREATE_VM: memory slots, irqchip, PIT, irq lines, eventfds.
* ``Vcpu`` (vcpu.py)   - a vCPU fd from KVM_CREATE_VCPU, plus its mmap'ed ``kvm_run`` page.

Beside them: ``abi`` (the cffi view of <linux/kvm.h>), ``exits`` (KVM_RUN's exits as
values), ``memory`` (guest RAM mappings), ``regs`` (register files as dataclasses) and
``fd`` (the owned fd and the ioctl wrapper all three share). Each object is a context
manager; ``close()`` is idempotent and closes children first.

Names load on first use: ``regs``, ``memory`` and ``exits`` import without the compiled
extension, so the pure layers above (x86/, devices/) can use them in unit tests.
"""
from importlib import import_module

_EXPORTS = {"Cap": "abi", "Kvm": "system", "Vm": "vm", "Vcpu": "vcpu"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
