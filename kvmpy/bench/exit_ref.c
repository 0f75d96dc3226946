/*
 * exit_ref.c - the C reference (variant `raw`) of `kvmpy bench exits --all`
 * (kvmpy/bench/exits.py): one exit kind per process, the least a VMM can do.
 *
 *   exit_ref IMAGE ENTRY KIND WARMUP [pc|bare]
 *
 * Set-up: /dev/kvm, one VM, 2 MiB of anonymous RAM at guest-physical 0, the
 * image (kvmpy/bench/exit_kinds.S, linked at 0x100000) copied to 0x100000,
 * one vCPU in flat 32-bit protected mode (CPL0, paging off) at ENTRY.  With
 * "pc" the VM also gets what kvmpy's Machine gives it by default (TSS and
 * identity-map pages, in-kernel irqchip and PIT), so both pay the same KVM_RUN;
 * "bare" (the default) has none, so HLT exits to user space.  KIND is one of
 *
 *   pio-out pio-in mmio-write mmio-read hlt   one user-space exit per guest
 *                                             iteration, checked and re-entered
 *   cpuid ioeventfd nop                       the guest's in-kernel exits (or,
 *                                             for nop, plain instructions) come
 *                                             in batches ended by an OUT to
 *                                             port 0x80 (the exit counted here)
 *
 * For `ioeventfd` port 0x84 is registered with KVM_IOEVENTFD (an eventfd that
 * nobody reads).  After WARMUP untimed exits it prints "ready", then reads one
 * exit count per line on stdin and answers each with the batch's wall-clock ns
 * per user-space exit, until end of input.  Errors go to stderr; status 1.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RAM_SIZE	(2UL << 20)
#define LOAD_ADDR	0x100000UL
#define GDT_ADDR	0x1000UL
#define MARK_PORT	0x80
#define NOTIFY_PORT	0x84
#define MMIO_ADDR	0xe0000000ULL
#define TSS_ADDR	0xfffbd000UL	/* kvmpy/x86/layout.py KVM_TSS_ADDR */
#define IDENTITY_MAP	0xfffbc000ULL	/* kvmpy/x86/layout.py KVM_IDENTITY_MAP_ADDR */

enum kind { PIO_OUT, PIO_IN, MMIO_WRITE, MMIO_READ, HLT, CPUID, IOEVENTFD, NOP };
static const char *const kinds[] = {
	"pio-out", "pio-in", "mmio-write", "mmio-read", "hlt", "cpuid", "ioeventfd", "nop",
};

static int vcpu = -1;
static struct kvm_run *run;
static enum kind kind;

static int fail(const char *what)
{
	fprintf(stderr, "exit_ref: %s: %s\n", what, strerror(errno));
	return -1;
}

static void seg(struct kvm_segment *s, uint16_t sel, uint8_t type)
{
	memset(s, 0, sizeof(*s));
	s->base = 0;
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = type;
	s->present = 1;
	s->s = 1;
	s->db = 1;
	s->g = 1;
}

/* What Machine(irqchip=True), kvmpy's default, adds to the VM before its vCPUs. */
static int pc_platform(int vm)
{
	struct kvm_pit_config pit;
	uint64_t map = IDENTITY_MAP;

	if (ioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDR) < 0)
		return fail("KVM_SET_TSS_ADDR");
	if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &map) < 0)
		return fail("KVM_SET_IDENTITY_MAP_ADDR");
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
		return fail("KVM_CREATE_IRQCHIP");
	memset(&pit, 0, sizeof(pit));
	if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0)
		return fail("KVM_CREATE_PIT2");
	return 0;
}

static int setup(const char *image, unsigned long entry, int pc)
{
	struct kvm_userspace_memory_region mem;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	uint64_t *gdt;
	size_t n;
	FILE *f;
	void *ram;
	int kvm, vm, r;

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		return fail("open /dev/kvm");
	vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		return fail("KVM_CREATE_VM");
	ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (ram == MAP_FAILED)
		return fail("mmap RAM");
	f = fopen(image, "rb");
	if (!f)
		return fail(image);
	n = fread((char *)ram + LOAD_ADDR, 1, RAM_SIZE - LOAD_ADDR, f);
	fclose(f);
	if (n == 0 || entry < LOAD_ADDR || entry >= LOAD_ADDR + n) {
		fprintf(stderr, "exit_ref: %s: empty image or entry %#lx outside it\n", image, entry);
		return -1;
	}
	/* A flat GDT like kvmpy's: null, (64-bit code), data at 0x10, 32-bit code at 0x18. */
	gdt = (uint64_t *)((char *)ram + GDT_ADDR);
	gdt[2] = 0x00cf93000000ffffULL;
	gdt[3] = 0x00cf9b000000ffffULL;
	memset(&mem, 0, sizeof(mem));
	mem.memory_size = RAM_SIZE;
	mem.userspace_addr = (uintptr_t)ram;
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &mem) < 0)
		return fail("KVM_SET_USER_MEMORY_REGION");
	if (pc && pc_platform(vm) < 0)
		return -1;
	if (kind == IOEVENTFD) {
		struct kvm_ioeventfd io = { .addr = NOTIFY_PORT, .len = 1, .flags = KVM_IOEVENTFD_FLAG_PIO };

		io.fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (io.fd < 0)
			return fail("eventfd");
		if (ioctl(vm, KVM_IOEVENTFD, &io) < 0)
			return fail("KVM_IOEVENTFD");
	}
	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		return fail("KVM_CREATE_VCPU");
	r = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (r < 0)
		return fail("KVM_GET_VCPU_MMAP_SIZE");
	run = mmap(NULL, (size_t)r, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		return fail("mmap kvm_run");
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		return fail("KVM_GET_SREGS");
	seg(&sregs.cs, 0x18, 0xb);
	seg(&sregs.ds, 0x10, 0x3);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.gdt.base = GDT_ADDR;
	sregs.gdt.limit = 4 * 8 - 1;
	sregs.cr0 = 0x33;	/* PE MP ET NE */
	sregs.cr4 = 0;
	sregs.efer = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		return fail("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = entry;
	regs.rflags = 2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		return fail("KVM_SET_REGS");
	return 0;
}

static int expected(void)
{
	switch (kind) {
	case PIO_OUT:
	case CPUID:
	case IOEVENTFD:
	case NOP:
		return run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT &&
		       run->io.port == MARK_PORT;
	case PIO_IN:
		return run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_IN &&
		       run->io.port == MARK_PORT;
	case MMIO_WRITE:
	case MMIO_READ:
		return run->exit_reason == KVM_EXIT_MMIO && run->mmio.phys_addr == MMIO_ADDR &&
		       run->mmio.is_write == (kind == MMIO_WRITE);
	case HLT:
		return run->exit_reason == KVM_EXIT_HLT;
	}
	return 0;
}

/* n user-space exits, each the one the kind's guest makes. */
static int run_exits(unsigned long n)
{
	while (n--) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			return fail("KVM_RUN");
		}
		if (!expected()) {
			fprintf(stderr, "exit_ref: %s: unexpected exit: reason %u\n", kinds[kind], run->exit_reason);
			return -1;
		}
	}
	return 0;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static unsigned long arg_ulong(const char *s, const char *name)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 0);
	if (errno || *end || !*s) {
		fprintf(stderr, "exit_ref: %s must be an integer, got '%s'\n", name, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	unsigned long entry, warmup, n;
	char line[64];
	uint64_t t0;
	unsigned i;

	if ((argc != 5 && argc != 6) || (argc == 6 && strcmp(argv[5], "pc") && strcmp(argv[5], "bare"))) {
		fprintf(stderr, "usage: %s IMAGE ENTRY KIND WARMUP [pc|bare]\n", argv[0]);
		return 2;
	}
	for (i = 0; i < sizeof(kinds) / sizeof(kinds[0]) && strcmp(argv[3], kinds[i]); i++)
		;
	if (i == sizeof(kinds) / sizeof(kinds[0])) {
		fprintf(stderr, "exit_ref: unknown kind '%s'\n", argv[3]);
		return 2;
	}
	kind = (enum kind)i;
	entry = arg_ulong(argv[2], "ENTRY");
	warmup = arg_ulong(argv[4], "WARMUP");
	if (setup(argv[1], entry, argc == 6 && !strcmp(argv[5], "pc")) < 0 || run_exits(warmup) < 0)
		return 1;
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		line[strcspn(line, "\n")] = 0;
		n = arg_ulong(line, "EXITS");
		if (n == 0) {
			fprintf(stderr, "exit_ref: EXITS must be at least 1\n");
			return 2;
		}
		t0 = now_ns();
		if (run_exits(n) < 0)
			return 1;
		printf("%.1f\n", (double)(now_ns() - t0) / (double)n);
		fflush(stdout);
	}
	return 0;
}
