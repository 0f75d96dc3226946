"""cffi build of kvmpy._native: the KVM ABI views plus the C helpers in csrc/.

The KVM part of the cdef below declares *names only*. Every ``#define X ...``
and every struct ending in ``...;`` is completed by the C compiler from
``<linux/kvm.h>`` when the extension is built, so no ioctl number, struct size or
field offset is written by hand anywhere in kvmpy. Anonymous members of
``struct kvm_run`` get a C name through ``__typeof__`` typedefs in the preamble,
because cffi can only complete named structs.
"""
from __future__ import annotations

import pathlib
import re

import cffi

HERE = pathlib.Path(__file__).resolve().parent

# Constants copied from <linux/kvm.h> (and <linux/if_tun.h>: the TAP backend) by the compiler.
IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST KVM_GET_MSR_FEATURE_INDEX_LIST
KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR
KVM_CREATE_IRQCHIP KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_CREATE_PIT2 KVM_GET_PIT2 KVM_SET_PIT2
KVM_IRQ_LINE KVM_IOEVENTFD KVM_IRQFD KVM_GET_CLOCK KVM_SET_CLOCK KVM_GET_DIRTY_LOG
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_GET_MSRS KVM_SET_MSRS KVM_SET_CPUID2 KVM_GET_CPUID2 KVM_GET_LAPIC KVM_SET_LAPIC
KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS
KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XCRS KVM_SET_XCRS KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS
KVM_SET_GUEST_DEBUG KVM_INTERRUPT KVM_NMI KVM_SET_GSI_ROUTING
KVM_X86_SETUP_MCE KVM_X86_GET_MCE_CAP_SUPPORTED
""".split()

CONSTANTS = """
KVM_API_VERSION KVM_APIC_REG_SIZE KVM_MAX_XCRS
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG
KVM_EXIT_HLT KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY
KVM_EXIT_INTR KVM_EXIT_SET_TPR KVM_EXIT_TPR_ACCESS KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR
KVM_EXIT_SYSTEM_EVENT KVM_EXIT_IOAPIC_EOI KVM_EXIT_X86_RDMSR KVM_EXIT_X86_WRMSR
KVM_EXIT_DIRTY_RING_FULL KVM_EXIT_X86_BUS_LOCK KVM_EXIT_NOTIFY
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX KVM_INTERNAL_ERROR_DELIVERY_EV
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED KVM_MP_STATE_INIT_RECEIVED
KVM_MP_STATE_HALTED KVM_MP_STATE_SIPI_RECEIVED
KVM_GUESTDBG_ENABLE KVM_GUESTDBG_SINGLESTEP KVM_GUESTDBG_USE_SW_BP KVM_GUESTDBG_USE_HW_BP
KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN
KVM_IRQFD_FLAG_DEASSIGN KVM_IRQFD_FLAG_RESAMPLE
KVM_IRQ_ROUTING_IRQCHIP KVM_IRQ_ROUTING_MSI
KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC
KVM_PIT_SPEAKER_DUMMY
KVM_CAP_IRQCHIP KVM_CAP_HLT KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR KVM_CAP_EXT_CPUID
KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS KVM_CAP_NR_MEMSLOTS KVM_CAP_PIT2 KVM_CAP_IRQ_ROUTING
KVM_CAP_IOEVENTFD KVM_CAP_IRQFD KVM_CAP_SET_IDENTITY_MAP_ADDR KVM_CAP_ADJUST_CLOCK
KVM_CAP_VCPU_EVENTS KVM_CAP_DEBUGREGS KVM_CAP_XSAVE KVM_CAP_XCRS KVM_CAP_SET_GUEST_DEBUG
KVM_CAP_READONLY_MEM KVM_CAP_IMMEDIATE_EXIT KVM_CAP_GET_MSR_FEATURES KVM_CAP_MP_STATE
KVM_CAP_SYNC_MMU KVM_CAP_IRQ_INJECT_STATUS KVM_CAP_XSAVE2 KVM_CAP_TSC_CONTROL
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 KVM_CAP_DIRTY_LOG_RING KVM_CAP_MCE KVM_CAP_TSC_DEADLINE_TIMER
KVM_CAP_SYNC_REGS
TUNSETIFF IFF_TAP IFF_NO_PI
""".split()

# Views of anonymous members of struct kvm_run, named so cffi can complete them.
RUN_VIEWS = ["hw", "fail_entry", "ex", "io", "debug", "mmio", "internal", "system_event"]

ABI_CDEF = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;

typedef struct { __u64 hardware_exit_reason; ...; } kvmpy_run_hw_t;
typedef struct { __u64 hardware_entry_failure_reason; __u32 cpu; ...; } kvmpy_run_fail_entry_t;
typedef struct { __u32 exception; __u32 error_code; ...; } kvmpy_run_ex_t;
typedef struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; ...; } kvmpy_run_io_t;
struct kvm_debug_exit_arch { __u32 exception; __u64 pc; __u64 dr6; __u64 dr7; ...; };
typedef struct { struct kvm_debug_exit_arch arch; ...; } kvmpy_run_debug_t;
typedef struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; ...; } kvmpy_run_mmio_t;
typedef struct { __u32 suberror; __u32 ndata; __u64 data[16]; ...; } kvmpy_run_internal_t;
typedef struct { __u32 type; __u32 ndata; __u64 data[16]; ...; } kvmpy_run_system_event_t;

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    union {
        kvmpy_run_hw_t hw;
        kvmpy_run_fail_entry_t fail_entry;
        kvmpy_run_ex_t ex;
        kvmpy_run_io_t io;
        kvmpy_run_debug_t debug;
        kvmpy_run_mmio_t mmio;
        kvmpy_run_internal_t internal;
        kvmpy_run_system_event_t system_event;
    };
    ...;
};

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector; __u8 type;
    __u8 present, dpl, db, s, l, g, avl; __u8 unusable; ...;
};
struct kvm_dtable { __u64 base; __u16 limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    __u64 interrupt_bitmap[...];
};
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u16 last_opcode;
    __u64 last_ip; __u64 last_dp; __u8 xmm[16][16]; __u32 mxcsr; ...;
};
struct kvm_msr_entry { __u32 index; __u64 data; ...; };
struct kvm_msrs { __u32 nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; ...; };
struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags; __u32 eax, ebx, ecx, edx; ...;
};
struct kvm_cpuid2 { __u32 nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr; ...;
};
struct kvm_irq_level { __u32 irq; __u32 level; ...; };
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_mp_state { __u32 mp_state; ...; };
struct kvm_vcpu_events { __u32 sipi_vector; __u32 flags; ...; };
struct kvm_guest_debug_arch { __u64 debugreg[8]; ...; };
struct kvm_guest_debug { __u32 control; struct kvm_guest_debug_arch arch; ...; };
struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; ...; };
struct kvm_dirty_log { __u32 slot; void *dirty_bitmap; ...; };
struct kvm_lapic_state { char regs[...]; ...; };
struct kvm_xsave { __u32 region[...]; ...; };
struct kvm_xcr { __u32 xcr; __u64 value; ...; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[...]; ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; __u64 realtime; __u64 host_tsc; ...; };
struct kvm_irqchip { __u32 chip_id; ...; };
struct kvm_pit_state2 { __u32 flags; ...; };
struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; ...; };
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };
struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; ...; };
struct kvm_irq_routing_msi { __u32 address_lo; __u32 address_hi; __u32 data; ...; };
typedef union { struct kvm_irq_routing_irqchip irqchip; struct kvm_irq_routing_msi msi; ...; } kvmpy_routing_u_t;
struct kvm_irq_routing_entry { __u32 gsi; __u32 type; __u32 flags; kvmpy_routing_u_t u; ...; };
struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; ...; };
"""

PREAMBLE = """
#include <linux/kvm.h>
#include <linux/if_tun.h>
#include <sys/ioctl.h>
#include "kvmpy_native.h"
""" + "".join(
    f"typedef __typeof__(((struct kvm_run *)0)->{v}) kvmpy_run_{v}_t;\n" for v in RUN_VIEWS
) + "typedef __typeof__(((struct kvm_irq_routing_entry *)0)->u) kvmpy_routing_u_t;\n"


def native_cdef() -> str:
    """The C surface declared in kvmpy_native.h, between the CDEF markers."""
    text = (HERE / "kvmpy_native.h").read_text()
    m = re.search(r"/\* CDEF-BEGIN \*/(.*)/\* CDEF-END \*/", text, re.S)
    return m.group(1)


def make_ffibuilder(absolute_paths: bool = False) -> cffi.FFI:
    """The builder; setuptools wants source paths relative to setup.py, a direct build absolute ones."""
    ffi = cffi.FFI()
    consts = "".join(f"#define {name} ...\n" for name in IOCTLS + CONSTANTS)
    ffi.cdef(ABI_CDEF + consts + native_cdef())
    root = HERE.parent
    sources = sorted(str(p if absolute_paths else p.relative_to(root)) for p in HERE.glob("*.c"))
    ffi.set_source(
        "kvmpy._native",
        PREAMBLE,
        sources=sources,
        include_dirs=[str(HERE if absolute_paths else HERE.relative_to(root))],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    )
    return ffi


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    # Development build in place: python csrc/build.py (pip install . does this for you).
    # Always from scratch: distutils would otherwise keep objects of edited .c files.
    import shutil
    tmp = HERE.parent / "build" / "cffi"
    shutil.rmtree(tmp, ignore_errors=True)
    make_ffibuilder(absolute_paths=True).compile(tmpdir=str(tmp), target=str(HERE.parent / "kvmpy" / "_native.*"),
                                                 verbose=False)
