"""The low-level layer: one method per ioctl, errors that name the ioctl."""
import errno
import os
import select

import pytest

import kvmpy
from kvmpy import exits
from kvmpy.kvm.abi import Cap, GuestDebug, MpState
from kvmpy.kvm import Kvm
from kvmpy.x86 import Regs, modes

HLT_PROGRAM = bytes.fromhex("b02a e6e9 f4")      # mov al,42; out 0xe9,al; hlt


@pytest.fixture
def vm():
    with Kvm() as kvm, kvm.create_vm() as vm:
        yield vm


def real_mode_cpu(vm, code: bytes, gpa: int = 0):
    vm.add_memory(0, 0x20_0000)
    vm.memory.write(gpa, code)
    cpu = vm.create_vcpu(0)
    cpu.set_sregs(modes.real_mode(cpu.get_sregs()))
    cpu.set_regs(Regs(rip=gpa, rflags=2))
    return cpu


def test_system_ioctls():
    """/dev/kvm reports API 12, capabilities, the vCPU mmap size and supported CPUID/MSRs."""
    with Kvm() as kvm:
        assert kvm.api_version() == 12
        assert kvm.check_extension(Cap.USER_MEMORY) > 0
        assert kvm.vcpu_mmap_size() >= 4096
        leaves = {e.function for e in kvm.supported_cpuid()}
        assert 0 in leaves and 1 in leaves and 0x80000001 in leaves
        assert 0x10 in kvm.msr_index_list()            # IA32_TIME_STAMP_COUNTER


def test_design_example_runs_and_decodes_exits(vm):
    """The DESIGN.md example: OUT becomes IoOut with the byte, then HLT, with RAX=42."""
    cpu = real_mode_cpu(vm, HLT_PROGRAM)
    assert cpu.run() == exits.IoOut(port=0xE9, size=1, count=1, data=b"*")
    assert cpu.run() == exits.Hlt()
    assert cpu.get_regs().rax == 42


def test_io_in_is_completed_from_the_vmm(vm):
    """An IN exit takes the VMM's bytes: `in al,0x60; out 0xe9,al` echoes what we supply."""
    cpu = real_mode_cpu(vm, bytes.fromhex("e460 e6e9 f4"))
    ex = cpu.run()
    assert isinstance(ex, exits.IoIn) and (ex.port, ex.size, ex.count) == (0x60, 1, 1)
    cpu.complete_io_in(ex, b"\x5a")
    assert cpu.run() == exits.IoOut(0xE9, 1, 1, b"\x5a")


def test_readonly_slot_turns_writes_into_mmio_exits(vm):
    """A write to a read-only memory slot exits as MmioWrite; reads see the slot's bytes."""
    vm.add_memory(0, 0x10000)
    rom = vm.add_memory(0x20000, 0x1000, readonly=True)
    vm.memory.write(0x20000, b"\x99")
    # mov ax,0x2000; mov ds,ax; mov al,[0]; mov byte [0],0x77; hlt
    vm.memory.write(0, bytes.fromhex("b8 0020 8ed8 a0 0000 c606 0000 77 f4"))
    cpu = vm.create_vcpu(0)
    cpu.set_sregs(modes.real_mode(cpu.get_sregs()))
    cpu.set_regs(Regs(rip=0, rflags=2))
    assert rom.readonly
    assert cpu.run() == exits.MmioWrite(addr=0x20000, size=1, data=b"\x77")
    assert cpu.get_regs().rax & 0xFF == 0x99
    assert cpu.run() == exits.Hlt()
    assert vm.memory.read(0x20000, 1) == b"\x99"


def test_dirty_log_reports_written_pages(vm):
    """KVM_GET_DIRTY_LOG marks exactly the pages the guest wrote."""
    vm.add_memory(0, 0x20_0000, log_dirty=True)
    vm.memory.write(0, bytes.fromhex("c606 0050 01 c606 0070 02 f4"))  # mov byte [0x5000],1; mov byte [0x7000],2
    cpu = vm.create_vcpu(0)
    cpu.set_sregs(modes.real_mode(cpu.get_sregs()))
    cpu.set_regs(Regs(rip=0, rflags=2))
    vm.get_dirty_log(0)                                  # clear what set-up dirtied
    assert cpu.run() == exits.Hlt()
    bitmap = int.from_bytes(vm.get_dirty_log(0), "little")
    assert bitmap >> 5 & 1 and bitmap >> 7 & 1
    assert not bitmap >> 6 & 1


def test_register_state_round_trips(vm):
    """regs, sregs, FPU, MSRs, debug registers, vCPU events, XSAVE and XCRs read back as set."""
    cpu = real_mode_cpu(vm, HLT_PROGRAM)
    regs = Regs(rax=1, rbx=2, rcx=3, r15=0xDEAD_BEEF, rip=0x1234, rflags=0x202)
    cpu.set_regs(regs)
    assert cpu.get_regs() == regs
    s = cpu.get_sregs()
    s.cr2 = 0xABC000
    cpu.set_sregs(s)
    assert cpu.get_sregs().cr2 == 0xABC000
    for get, set_ in ((cpu.get_fpu, cpu.set_fpu), (cpu.get_vcpu_events, cpu.set_vcpu_events),
                      (cpu.get_xsave, cpu.set_xsave), (cpu.get_xcrs, cpu.set_xcrs)):
        blob = get()
        set_(blob)
        assert get() == blob
    assert cpu.set_msrs({0x174: 0x10}) == 1               # IA32_SYSENTER_CS
    assert cpu.get_msrs([0x174]) == {0x174: 0x10}
    cpu.set_debugregs([0x1000, 0, 0, 0], dr6=0xFFFF0FF0, dr7=0x400)
    assert cpu.get_debugregs()["db"][0] == 0x1000
    assert cpu.get_mp_state() == MpState.RUNNABLE


def test_single_step_gives_debug_exits(vm):
    """KVM_SET_GUEST_DEBUG with SINGLESTEP exits after each instruction with its RIP."""
    cpu = real_mode_cpu(vm, bytes.fromhex("90 90 f4"))
    cpu.set_guest_debug(GuestDebug.ENABLE | GuestDebug.SINGLESTEP)
    first = cpu.run()
    assert isinstance(first, exits.Debug) and first.pc == 1
    assert cpu.run().pc == 2


def test_irqchip_pit_lapic_irq_line_and_clock(vm):
    """With the in-kernel irqchip: irq lines, PIT and irqchip state, LAPIC, and the VM clock work."""
    vm.create_irqchip()
    vm.create_pit2()
    cpu = real_mode_cpu(vm, HLT_PROGRAM)
    vm.irq_line(4, 1)
    vm.irq_line(4, 0)
    pic = vm.get_irqchip(0)
    vm.set_irqchip(pic)
    vm.set_pit2(vm.get_pit2())
    lapic = cpu.get_lapic()
    assert len(lapic) == 1024
    cpu.set_lapic(lapic)
    vm.set_clock(10**9)
    assert vm.get_clock() >= 10**9


def test_ioeventfd_and_irqfd(vm):
    """A guest write to an ioeventfd port signals the eventfd instead of exiting; irqfd accepts an eventfd."""
    vm.create_irqchip()
    cpu = real_mode_cpu(vm, bytes.fromhex("b0 07 e6 80 e6 e9 f4"))   # out 0x80,al; out 0xe9,al; hlt
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        vm.ioeventfd(efd, 0x80, 1, pio=True)
        assert cpu.run() == exits.IoOut(0xE9, 1, 1, b"\x07")     # the 0x80 write did not exit
        assert select.select([efd], [], [], 0)[0] and os.eventfd_read(efd) == 1
        vm.irqfd(irq, 5)
        vm.irqfd(irq, 5, deassign=True)
    finally:
        os.close(efd)
        os.close(irq)


def test_errors_name_the_ioctl_and_errno(vm):
    """A failing ioctl raises KvmError with errno and the ioctl's name."""
    with pytest.raises(kvmpy.KvmError) as info:
        vm.set_user_memory_region(0, 0x123, 0x1000, 0x1000)      # unaligned guest address
    assert info.value.errno == errno.EINVAL
    assert info.value.ioctl == "KVM_SET_USER_MEMORY_REGION"
    assert "KVM_SET_USER_MEMORY_REGION" in str(info.value)


def test_missing_device_says_what_to_do(tmp_path):
    """Opening a missing KVM device raises KvmUnavailable with advice, not a bare OSError."""
    with pytest.raises(kvmpy.KvmUnavailable, match="modprobe"):
        Kvm(str(tmp_path / "kvm"))


def test_close_is_idempotent_and_closes_children():
    """Closing a VM closes its vCPUs; closing twice is harmless."""
    kvm = Kvm()
    vm = kvm.create_vm()
    cpu = vm.create_vcpu(0)
    vm.close()
    assert cpu.closed and vm.closed
    vm.close()
    kvm.close()
    kvm.close()


def test_string_in_arrives_as_one_exit_with_a_count(vm):
    """rep insb of 4 bytes is one IoIn with count=4; the VMM's bytes land in guest memory."""
    # mov cx,4; mov di,0x500; mov dx,0x99; cld; rep insb; hlt
    cpu = real_mode_cpu(vm, bytes.fromhex("b9 0400 bf 0005 ba 9900 fc f3 6c f4"))
    ex = cpu.run()
    assert isinstance(ex, exits.IoIn) and (ex.port, ex.size) == (0x99, 1)
    got = b""
    while isinstance(ex, exits.IoIn):
        data = bytes(range(len(got) + 1, len(got) + 1 + ex.count))
        cpu.complete_io_in(ex, data)
        got += data
        ex = cpu.run()
    assert ex == exits.Hlt()
    assert vm.memory.read(0x500, 4) == b"\x01\x02\x03\x04" == got


def test_machine_check_ioctls():
    """KVM_X86_GET_MCE_CAP_SUPPORTED gives the MCG_CAP bits KVM emulates; KVM_X86_SETUP_MCE
    takes a value within them and refuses more banks than KVM_CAP_MCE, naming the ioctl."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        banks = kvm.check_extension(Cap.MCE)
        if not banks:
            pytest.skip("this KVM has no KVM_CAP_MCE")
        supported = kvm.mce_cap_supported()
        cpu = vm.create_vcpu(0)
        with pytest.raises(kvmpy.KvmError, match="KVM_X86_SETUP_MCE") as e:
            cpu.setup_mce(banks + 1)
        assert e.value.errno == errno.EINVAL and cpu.mcg_cap == 0 and cpu.mce_bank_msrs() == []
        cpu.setup_mce(3 | (supported & 0x100))
        assert cpu.get_msrs([0x179]) == {0x179: 3 | (supported & 0x100)}
        assert cpu.mce_bank_msrs() == list(range(0x400, 0x40C))
