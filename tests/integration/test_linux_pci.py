"""Debian's stock kernel finds its disk behind virtio-pci: the ACPI tables' PCI0 host bridge
and MCFG, bus 0 through MMCONFIG, the virtio-pci function with MSI-X, and /dev/vda holding
what the disk file holds.

Linux cannot run where KVM emulates guest ring 0 (kvm_pvm: it stops after its banner,
docs/host-notes.md), so this test skips there; the nested AMD-SVM testbed runs it
(``python tests/nested/testbed.py --steps pytest tests/integration/test_linux_pci.py``).
"""
import re

import pytest

import kvmpy

from .test_linux import (BZIMAGE_TIMEOUT, MEM, RING0_EMULATED, Console, linux,  # noqa: F401 - a fixture
                         module_files, with_load_order)

PCI_INIT = """#!/bin/sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in __MODULES__; do
    insmod /lib/modules/$m.ko || echo "kvmpy-pci: insmod $m failed"
done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.5; done
echo "kvmpy-pci: pci=$(ls /sys/bus/pci/devices | tr '\\n' ' ')" \\
     "ids=$(cat /sys/bus/pci/devices/0000:00:01.0/vendor):$(cat /sys/bus/pci/devices/0000:00:01.0/device)" \\
     "driver=$(basename $(readlink /sys/bus/pci/devices/0000:00:01.0/driver))" \\
     "msix=$(grep -c PCI-MSI /proc/interrupts) vda=$(head -c 16 /dev/vda) end"
echo 'kvmpy-pci: written by the guest' > /dev/vda
sync
reboot -f
"""
PCI_MODULES = ("virtio.ko", "virtio_ring.ko", "virtio_pci_modern_dev.ko", "virtio_pci_legacy_dev.ko",
               "virtio_pci.ko", "virtio_blk.ko")
DISK_MARK = b"kvmpy-pci-disk!!"


@pytest.mark.skipif(RING0_EMULATED, reason="Linux stops after its banner where KVM emulates guest ring 0 "
                                           "(kvm_pvm, docs/host-notes.md); the nested testbed runs this")
def test_stock_kernel_finds_the_disk_behind_virtio_pci(linux, tmp_path):
    files = module_files(linux, PCI_MODULES)
    initrd = linux.initramfs(with_load_order(PCI_INIT, files), files=files)
    disk = tmp_path / "disk.img"
    disk.write_bytes(DISK_MARK + bytes((1 << 20) - len(DISK_MARK)))
    console = Console([b"Run /init", b"kvmpy-pci: pci="])
    with kvmpy.Machine(mem_size=MEM, cpus=2, serial=console, disks=[str(disk)], virtio_transport="pci") as m:
        m.load(linux.vmlinux.read_bytes(), cmdline="console=ttyS0 panic=-1", initrd=initrd)
        result = m.run(timeout=BZIMAGE_TIMEOUT)
        text = console.text
        line = re.search(r"kvmpy-pci: (pci=.*) end", text)
        assert line, f"run ended ({result.reason}); console:\n{text[-5000:]}"
        fields = dict(f.split("=", 1) for f in line.group(1).replace("pci=", "pci=", 1).split(" ") if "=" in f)
        assert "0000:00:00.0" in line.group(1) and "0000:00:01.0" in line.group(1), line.group(1)
        assert fields["ids"] == "0x1af4:0x1042" and fields["driver"] == "virtio-pci", line.group(1)
        assert int(fields["msix"]) >= 1, f"no MSI-X interrupts: {line.group(1)}\n{text[-5000:]}"
        assert fields["vda"] == DISK_MARK.decode()
        assert "PCI: Using configuration type 1" in text or "MMCONFIG" in text, text[-5000:]
        print("\n".join(ln for ln in text.splitlines() if re.search(r"PCI|pci|MMCONFIG|virtio|vda", ln))[-4000:])
    assert result.reason == "reset", text[-2000:]
    assert disk.read_bytes().startswith(b"kvmpy-pci: written by the guest\n")
