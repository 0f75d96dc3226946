"""``Kvm``: the system fd from opening /dev/kvm (Documentation/virt/kvm/api.rst, "System
ioctls"): the API version, capabilities, supported CPUID and MSRs, and new VMs.
"""
from __future__ import annotations

import errno
import os

from ..errors import KvmError, KvmUnavailable
from .abi import ffi, lib
from .fd import Fd, get_cpuid, ioctl
from .regs import CpuidEntry
from .vm import Vm


def backend_modules() -> list[str]:
    """The loaded KVM vendor modules (``kvm_intel``, ``kvm_amd``, ``kvm_pvm``, ...), from
    /proc/modules or, without procfs, /sys/module. They differ in ways a VMM sees (for
    one, kvm_amd resets a vCPU before it reports a shutdown); docs/host-notes.md lists them."""
    names: set[str] = set()
    try:
        with open("/proc/modules") as f:
            names = {line.split()[0] for line in f if line.strip()}
    except OSError:
        try:
            names = set(os.listdir("/sys/module"))
        except OSError:
            pass
    return sorted(n for n in names if n.startswith("kvm_"))


class Kvm(Fd):
    """The KVM subsystem (/dev/kvm)."""

    def __init__(self, path: str = "/dev/kvm"):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"'{path}' not found. Load the KVM module (modprobe kvm_intel or kvm_amd), check that "
                "the kernel has CONFIG_KVM, and inside a VM enable nested virtualisation.") from None
        except PermissionError:
            raise KvmUnavailable(
                f"permission denied opening '{path}'. Add your user to the 'kvm' group "
                "(usermod -aG kvm $USER, then log in again) or run as root.") from None
        except OSError as e:
            if e.errno in (errno.ENXIO, errno.ENODEV):
                raise KvmUnavailable(
                    f"'{path}' exists but no KVM module serves it: load kvm_intel or kvm_amd "
                    "(modprobe), and check that virtualisation is enabled in the firmware.") from None
            raise KvmUnavailable(f"cannot open '{path}': {e.strerror}") from None
        version = self.api_version()
        if version != lib.KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(f"KVM API version {version}, kvmpy needs {lib.KVM_API_VERSION}")

    def api_version(self) -> int:
        return ioctl(self.fd, lib.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if unsupported, else a positive (often meaningful) value."""
        return ioctl(self.fd, lib.KVM_CHECK_EXTENSION, int(cap))

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[CpuidEntry]:
        return get_cpuid(self.fd, lib.KVM_GET_SUPPORTED_CPUID)

    def mce_cap_supported(self) -> int:
        """KVM_X86_GET_MCE_CAP_SUPPORTED: the IA32_MCG_CAP feature bits KVM can emulate (and,
        in bits 7:0, its most banks); ``check_extension(Cap.MCE)`` also gives the bank limit."""
        p = ffi.new("__u64 *")
        ioctl(self.fd, lib.KVM_X86_GET_MCE_CAP_SUPPORTED, p)
        return p[0]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs a VMM should save and restore."""
        return self._msr_list(lib.KVM_GET_MSR_INDEX_LIST)

    def feature_msr_index_list(self) -> list[int]:
        return self._msr_list(lib.KVM_GET_MSR_FEATURE_INDEX_LIST)

    def _msr_list(self, request: int) -> list[int]:
        n = 64
        while True:
            p = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            try:
                ioctl(self.fd, request, p)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 65536:
                    n = max(p.nmsrs, n * 2)
                    continue
                raise
            return list(p.indices[0:p.nmsrs])

    def create_vm(self) -> "Vm":
        return Vm(self, ioctl(self.fd, lib.KVM_CREATE_VM, 0))
