"""Booting other people's kernels: multiboot as QEMU's -kernel does it, and fw_cfg."""
import struct
import subprocess
import sys

import pytest

import kvmpy
from kvmpy import guests
from kvmpy.kvm.system import backend_modules
from . import lab

ENV = lab.CHILD_ENV


def kvmpy_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True, timeout=timeout,
                          env=ENV, cwd="/", stdin=subprocess.DEVNULL)


def test_multiboot_kernel_gets_cmdline_modules_and_memory_map(tmp_path):
    """A multiboot kernel is entered with EAX=0x2BADB002 and sees QEMU's cmdline form, modules and
    a memory map in which the boot tables, the information (low memory) and the modules (after the
    kernel, which ends at 0x105000) are reserved."""
    m1, m2 = tmp_path / "m1.bin", tmp_path / "m2.bin"
    m1.write_bytes(b"module one")
    m2.write_bytes(bytes(range(256)) * 8)
    g = guests.get("multiboot-hello")
    with kvmpy.Machine(mem_size=64 << 20) as m:
        img = m.load(g.path, cmdline="hello=world", modules=[str(m1), (str(m2), "two args")])
        result = m.run(timeout=30)
    out = m.serial_output.decode()
    assert img.format == "multiboot" and result.status == g.expect_status
    assert "magic 0x2badb002" in out
    assert "cmdline: 'multiboot-hello.elf hello=world'" in out
    assert "mem_lower 639K, mem_upper 64512K" in out
    assert "mmap 0x0 +0x1000 type 1\nmmap 0x1000 +0x5000 type 2\nmmap 0x6000 +0x99c00 type 1\n" in out
    assert "mmap 0x100000 +0x5000 type 1\nmmap 0x105000 +0x2000 type 2\nmmap 0x107000 +0x3ef9000 type 1\n" in out
    assert f"mod 0: '{m1}' 10 bytes: 6d 6f 64 75 6c 65 20 6f" in out
    assert f"mod 1: '{m2} two args' 2048 bytes: 00 01 02 03 04 05 06 07" in out


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_a_multiboot_kernel_linked_below_1_mib_runs(native):
    """multiboot-low, linked at 0x8000 (QEMU loads such kernels), runs and prints what it was given."""
    g = guests.get("multiboot-low")
    with kvmpy.Machine(mem_size=64 << 20, native=native) as m:
        img = m.load(g.path)
        result = m.run(timeout=30)
    assert img.segments[0][0] == 0x8000 and img.tables.gdt == 0x1000      # the tables stayed home
    assert (result.reason, result.status, m.serial_output) == ("exit", g.expect_status, g.expect_output)


def test_a_kernel_on_the_boot_tables_homes_moves_them_and_runs():
    """A kernel at 0x1000, where the GDT and TSS would go, is entered with them elsewhere (and
    CR0 = 0x11); one at 0x9fc00 would lie on the MP table and the PC's legacy hole: refused."""
    with kvmpy.Machine(mem_size=4 << 20, cpus=2) as m:
        img = m.load(tiny_multiboot(0x1000, REPORT_CR0))
        assert img.tables.gdt == 0x2000 and m.vcpus[0].get_sregs().gdt.base == 0x2000   # the next free page
        result = m.run(timeout=30)
        assert (result.reason, result.status, result.regs.rax) == ("exit", 0x11 << 1 | 1, 0x11)
        with pytest.raises(kvmpy.LoaderError, match=r"multiboot kernel at 0x9f000\.\.0xa0000 overlaps the "
                                                    r"reserved range 0x9fc00\.\.0x100000 \(the PC's legacy hole"):
            m.load(tiny_multiboot(0x9F000, REPORT_CR0, bss_end=0xA0000))


@pytest.mark.parametrize("user", [False, True])
def test_a_long_mode_image_on_the_page_tables_home_runs_with_them_moved(user):
    """A raw long-mode image at 0x9000, the PML4's home: the page tables (and GDT, TSS, ring-0
    stack) go to the first free pages after it, and the identity map still works."""
    with kvmpy.Machine(mem_size=8 << 20) as m:
        img = m.load(bytes.fromhex("b02a e6f4 f4"), "raw", mode="long", load_addr=0x9000, user=user)
        assert img.tables.pml4 != 0x9000 and m.vcpus[0].get_sregs().cr3 == img.tables.pml4
        assert img.tables.gdt == 0xA000
        result = m.run(timeout=30)
    assert (result.reason, result.status) == ("exit", 42 << 1 | 1)


def tiny_multiboot(load_addr: int, code: bytes, bss_end: int = 0) -> bytes:
    """A flat multiboot kernel (the a.out kludge, flags bit 16) loaded at ``load_addr``, entered
    just after its 32-byte header, with zeroes up to ``bss_end`` (0: none)."""
    flags = 0x10003
    header = struct.pack("<8I", 0x1BADB002, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF,
                         load_addr, load_addr, 0, bss_end, load_addr + 32)
    return header + code


REPORT_CR0 = bytes.fromhex("0f20c0 e6f4 f4")          # mov eax,cr0; out 0xf4,al; hlt


def test_a_multiboot_kernel_is_entered_with_cr0_pe_et_as_qemu_leaves_it():
    """CR0 = 0x11 (PE|ET; CD, NW, MP, NE, PG clear) and CR4 = 0, what QEMU's option ROM hands over."""
    with kvmpy.Machine(mem_size=4 << 20) as m:
        m.load(tiny_multiboot(0x100000, REPORT_CR0))
        assert (m.vcpus[0].get_sregs().cr0, m.vcpus[0].get_sregs().cr4) == (0x11, 0)
        result = m.run(timeout=30)
    assert (result.reason, result.status, result.regs.rax) == ("exit", 0x11 << 1 | 1, 0x11)


def test_multiboot_from_the_cli(tmp_path):
    """kvmpy run takes --cmdline and --module FILE,ARGS for multiboot kernels."""
    mod = tmp_path / "initrd.img"
    mod.write_bytes(b"\x7fdata")
    g = guests.get("multiboot-hello")
    r = kvmpy_cli("run", str(g.path), "--cmdline", "quiet", "--module", f"{mod},root=/dev/ram0")
    assert r.returncode == g.expect_status & 0xFF, r.stderr
    assert b"cmdline: 'multiboot-hello.elf quiet'" in r.stdout
    assert f"mod 0: '{mod} root=/dev/ram0' 5 bytes".encode() in r.stdout


def test_bad_multiboot_header_is_a_loader_error():
    """A kernel asked to load as multiboot without a valid header is refused with a clear error."""
    with kvmpy.Machine(mem_size=4 << 20) as m:
        with pytest.raises(kvmpy.LoaderError, match="multiboot"):
            m.load(b"\x02\xb0\xad\x1b" + b"\0" * 60, format="multiboot")


def test_fw_cfg_items_and_files_reach_the_guest(tmp_path):
    """The fwcfg guest reads the signature, RAM size, CPU count, command line and a file via fw_cfg."""
    greeting = tmp_path / "greeting.txt"
    greeting.write_bytes(b"Hello from the host via fw_cfg")
    r = kvmpy_cli("demo", "fwcfg", "--mem", "128M", "--cpus", "2", "--cmdline", "console=ttyS0",
                  "--fw-cfg", f"opt/kvmpy/greeting={greeting}")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr          # kvmpy demo: the guest kept its promise
    assert "fw_cfg: signature QEMU, id 0x1" in out
    assert "fw_cfg: ram 0x8000000" in out and "fw_cfg: cpus 2" in out
    assert 'fw_cfg: cmdline "console=ttyS0"' in out
    assert "greeting: Hello from the host via fw_cfg" in out


def test_bad_fw_cfg_option_is_a_clear_error():
    """--fw-cfg without NAME=FILE is refused with a message, not a traceback."""
    r = kvmpy_cli("demo", "fwcfg", "--fw-cfg", "justaname")
    assert r.returncode == 4 and b"NAME=FILE" in r.stderr and b"Traceback" not in r.stderr


# --- the machine check architecture a kernel finds (QEMU's: 10 banks, MCG_CTL_P | MCG_SER_P) ---
READ_MCG_CAP = bytes.fromhex("b979010000 0f32 e6f4 f4")   # mov ecx,0x179; rdmsr; out 0xf4,al; hlt


def test_a_guest_reads_ten_machine_check_banks_from_ia32_mcg_cap():
    """CPUID advertises MCE and MCA, and rdmsr IA32_MCG_CAP gives 10 banks with MCG_CTL_P and,
    where KVM has it, MCG_SER_P (kvm_amd drops it): what each vCPU reports it got."""
    from kvmpy.kvm.abi import Cap
    from kvmpy.x86 import mce
    with kvmpy.Machine(mem_size=2 << 20, cpus=2) as m:
        if not m.kvm.check_extension(Cap.MCE):
            pytest.skip("this KVM has no KVM_CAP_MCE")
        asked = 10 | mce.MCG_CTL_P | (m.kvm.mce_cap_supported() & mce.MCG_SER_P)
        expected = asked & ~mce.MCG_SER_P if "kvm_amd" in backend_modules() else asked   # SVM drops SER_P
        for v in m.vcpus:
            assert mce.has_mca(v.get_cpuid2()) and v.mcg_cap == expected
        m.load(READ_MCG_CAP, "raw", mode="protected")
        result = m.run(timeout=30)
    assert (result.reason, result.status) == ("exit", 10 << 1 | 1)
    assert result.regs.rax == expected and result.regs.rdx == 0
