"""virtio-pci on a real machine: the pci-blk guest enumerates bus 0 through 0xcf8 and
ECAM, drives the disk with INTx and with MSI-X (KVM_SET_GSI_ROUTING + irqfd) and checks
that each interrupt reached its local APIC; the rng behind PCI; snapshots keep the PCI
state; the ACPI tables describe the host bridge."""
import importlib.resources
import struct
import subprocess
import sys

import pytest

import kvmpy
from kvmpy.devices.pci import config as C
from kvmpy.vmm import firmware
from kvmpy.x86 import layout

from . import lab

GUEST = str(importlib.resources.files("kvmpy._guests") / "pci-blk.elf")
LOOPS = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
SECTORS = 128


def fnv(data: bytes) -> int:
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & (1 << 64) - 1
    return h


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return path


def expected_output(disk_bytes: bytes) -> bytes:
    return (b"pci-blk: 00:00.0 1b36:0008\npci-blk: 00:01.0 1af4:1042\npci-blk: ecam agrees\n"
            b"pci-blk: virtio-blk at 00:01.0, BAR 0 0xc0000000 size 0x8000\npci-blk: intx ok\n"
            b"pci-blk: msi-x ok\n" + f"pci-blk: {SECTORS} sectors, sector 0 checksum {fnv(disk_bytes[:512]):#x}\n"
            .encode())


def run_guest(disk, **options):
    m = kvmpy.Machine(mem_size=16 << 20, disks=[disk if isinstance(disk, kvmpy.Disk) else str(disk)],
                      virtio_transport="pci", **options)
    m.load(GUEST, mode="long")
    return m, m.run(timeout=60)


@LOOPS
def test_the_guest_finds_the_disk_on_pci_and_gets_intx_and_msix(disk, native):
    before = disk.read_bytes()
    m, result = run_guest(disk, native=native)
    with m:
        assert (result.reason, result.status) == ("exit", 0x40 << 1 | 1), m.serial_output
        assert m.serial_output == expected_output(before)
        after = disk.read_bytes()
        assert after[512:1024] == bytes((i * 7 + 3) & 0xFF for i in range(512))
        assert after[:512] == before[:512] and after[1024:] == before[1024:]
        fn = m.platform.slot("virtio-blk0").model
        assert fn.msix.enabled and fn.live and fn.queue_vectors == [0] and fn.config_vector == 1
        engine = m.platform.slot("virtio-blk0").backend.engine      # native: C served the requests
        assert (type(engine).__name__ if engine else None) == ("NativeBlkQueue" if native else None)
        assert fn.config.command & C.COMMAND_MEMORY
        routed = [(gsi, a, d) for gsi, _, a, d in m.platform.msi.routes.values() if a is not None]
        assert routed == [(layout.MSI_GSI_BASE, 0xFEE0_0000, 0x31)]          # the queue's vector only


def test_without_msi_routes_the_guest_sees_no_msix_interrupt(disk, monkeypatch):
    """The guest's check can fail: with messages going nowhere it says so."""
    from kvmpy.vmm import msi
    monkeypatch.setattr(msi.MsiRoutes, "send", lambda *a: None)
    m, result = run_guest(disk)
    with m:
        assert result.status == 1 << 1 | 1 and m.serial_output.endswith(b"pci-blk: msi-x irr failed\n")


def test_a_snapshot_keeps_the_pci_state_and_restores_it(disk, tmp_path):
    m, result = run_guest(disk)
    with m:
        assert result.status == 0x40 << 1 | 1
        saved = m.platform.save_state()
        assert "pci_host" in saved and set(saved["disks"][0]["state"]) == {"virtio", "pci", "msix", "config_vector",
                                                                           "queue_vectors"}
        m.snapshot(tmp_path / "snap")
    with kvmpy.Machine.restore(tmp_path / "snap") as r:
        assert r.shape()["virtio_transport"] == "pci"
        assert r.platform.save_state() == saved
        fn = r.platform.slot("virtio-blk0").model
        assert fn.live and fn.msix.enabled and fn.config.bar_address(0) == layout.PCI_MMIO_BASE


def test_the_rng_sits_behind_pci_after_the_disks(disk):
    with kvmpy.Machine(mem_size=16 << 20, disks=[str(disk)], rng=True, virtio_transport="pci") as m:
        host = m.platform.pci
        ids = [host.config_read(0, dev, 0, 0, 4) for dev in range(4)]
        assert ids == [0x0008_1B36, 0x1042_1AF4, 0x1044_1AF4, 0xFFFF_FFFF]
        assert [(s.name, s.base, s.irq) for s in m.platform.virtio_pci] == [("virtio-blk0", 1, 16),
                                                                             ("virtio-rng", 2, 17)]
        assert m.platform.virtio_mmio == []
        tables = firmware.acpi_tables(m.platform, 1)
        assert "MCFG" in tables.addresses
        mcfg = tables.data[tables.addresses["MCFG"] - tables.base:]
        assert struct.unpack_from("<Q", mcfg, 44)[0] == layout.PCI_ECAM_BASE
        assert b"PCI0" in tables.data and b"_PRT" in tables.data


def test_a_bad_transport_name_is_a_clear_error():
    with pytest.raises(ValueError, match="virtio_transport must be 'mmio' or 'pci'"):
        kvmpy.Machine(virtio_transport="isa")


def test_virtio_pci_is_its_own_device_limit(tmp_path):
    disks = []
    for i in range(9):
        (tmp_path / f"{i}.img").write_bytes(bytes(4096))
        disks.append(str(tmp_path / f"{i}.img"))
    with pytest.raises(ValueError, match="at most 8 virtio-pci devices"):
        kvmpy.Machine(disks=disks, virtio_transport="pci")
    with kvmpy.Machine(mem_size=16 << 20, disks=disks[:8], virtio_transport="pci") as m:
        assert [s.irq for s in m.platform.virtio_pci] == list(layout.PCI_INTX_GSIS)


def test_kvmpy_run_virtio_pci_in_its_sandbox(disk):
    """The CLI's --virtio pci, under the default seccomp sandbox (the irqfds exist before it)."""
    before = disk.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "kvmpy", "run", GUEST, "--mode", "long", "--mem", "16M",
                           "--disk", str(disk), "--virtio", "pci"], capture_output=True, timeout=120,
                          env=lab.CHILD_ENV, cwd="/")
    assert proc.stdout == expected_output(before), proc.stderr
    bad = subprocess.run([sys.executable, "-m", "kvmpy", "run", GUEST, "--virtio", "isa"], capture_output=True,
                         env=lab.CHILD_ENV, cwd="/")
    assert bad.returncode == 2 and b"invalid choice: 'isa'" in bad.stderr


def test_a_clone_of_a_pci_machine_has_the_same_pci_state(disk, tmp_path):
    m, result = run_guest(disk)
    with m:
        assert result.status == 0x40 << 1 | 1
        copy = tmp_path / "copy.img"
        copy.write_bytes(disk.read_bytes())
        with m.clone(disks=[str(copy)]) as c:
            ours, theirs = m.platform.save_state(), c.platform.save_state()
            assert theirs["disks"][0]["path"] == str(copy)
            for saved in (ours, theirs):
                saved["disks"][0].pop("path")
            assert theirs == ours


def test_a_rate_limited_disk_behind_pci_is_served_by_the_disk_timer(disk):
    """Three requests with two operations a second: the third waits in the ring until the
    Machine's timer notifies the queue (PythonPending's virtio-pci path)."""
    before = disk.read_bytes()
    m, result = run_guest(kvmpy.Disk(str(disk), iops=2))
    with m:
        assert result.status == 0x40 << 1 | 1, m.serial_output
        assert m.serial_output == expected_output(before)
        assert m.platform.slot("virtio-blk0").backend.limiter.throttled >= 1
