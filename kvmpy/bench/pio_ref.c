/*
 * pio_ref.c - the C reference (variant `raw`) of kvmpy's `exits` benchmark
 * (kvmpy/bench/exits.py; `kvmpy bench exits`, benchmarks/exit_roundtrip.py).
 *
 * The least a VMM can do per PIO exit: KVM_RUN, look at exit_reason in the
 * mmap'ed kvm_run page, KVM_RUN again.  It runs the same image as kvmpy
 * (guests/pio-loop.S: an endless `out %al,$0x80; inc %al` loop at 0x7c00 in
 * real mode), so the difference between its ns/exit and kvmpy's is the cost
 * of the Python layers, and the ratio is comparable across hosts.
 *
 *   pio_ref IMAGE [EXITS_PER_BATCH [BATCHES [WARMUP]]]
 *   pio_ref IMAGE serve [WARMUP [PLATFORM]]
 *
 * Set-up: /dev/kvm, one VM, 2 MiB of anonymous RAM at guest-physical 0, the
 * image copied to 0x7c00, one vCPU in real mode with CS=0 IP=0x7c00.  PLATFORM
 * "pc" gives the VM what kvmpy's Machine gives it by default (the TSS and
 * identity-map pages, the in-kernel irqchip and PIT, created after the RAM as
 * Machine does), so that both sides pay the same KVM_RUN; "bare" (the default)
 * creates none of them, like Machine(irqchip=False) as far as KVM_RUN goes.  It then
 * runs WARMUP exits untimed and BATCHES timed batches of EXITS_PER_BATCH
 * exits, and prints one JSON object on stdout:
 *
 *   {"exits_per_batch": N, "batches": B, "warmup": W,
 *    "batch_ns_per_exit": [...], "median_ns": m, "mean_ns": a, "min_ns": lo}
 *
 * With `serve` (what the benchmark uses: one warm VM for all its rounds, like
 * kvmpy's side) it prints "ready" after the warm-up, then reads one exit count
 * per line on stdin and answers each with one line, the batch's ns per exit,
 * until end of input.
 *
 * Every request number and struct layout comes from <linux/kvm.h>.
 * Errors go to stderr with the failing call; the exit status is then 1.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RAM_SIZE	(2UL << 20)
#define LOAD_ADDR	0x7c00UL
#define PIO_PORT	0x80
#define MAX_BATCHES	1000
#define TSS_ADDR	0xfffbd000UL	/* kvmpy/x86/layout.py KVM_TSS_ADDR */
#define IDENTITY_MAP	0xfffbc000ULL	/* kvmpy/x86/layout.py KVM_IDENTITY_MAP_ADDR */

struct vm {
	int kvm, vm, vcpu;
	void *ram;
	struct kvm_run *run;
	size_t run_size;
};

static int fail(const char *what)
{
	fprintf(stderr, "pio_ref: %s: %s\n", what, strerror(errno));
	return -1;
}

static int load_image(void *ram, const char *path)
{
	FILE *f = fopen(path, "rb");
	size_t n;

	if (!f)
		return fail(path);
	/* Bounded by the RAM left above LOAD_ADDR: the copy stays inside ram. */
	n = fread((char *)ram + LOAD_ADDR, 1, RAM_SIZE - LOAD_ADDR, f);
	fclose(f);
	if (n == 0) {
		fprintf(stderr, "pio_ref: %s: empty image\n", path);
		return -1;
	}
	return 0;
}

/* What Machine(irqchip=True), kvmpy's default, adds to the VM before its vCPUs. */
static int pc_platform(struct vm *v)
{
	struct kvm_pit_config pit;
	uint64_t map = IDENTITY_MAP;

	if (ioctl(v->vm, KVM_SET_TSS_ADDR, TSS_ADDR) < 0)
		return fail("KVM_SET_TSS_ADDR");
	if (ioctl(v->vm, KVM_SET_IDENTITY_MAP_ADDR, &map) < 0)
		return fail("KVM_SET_IDENTITY_MAP_ADDR");
	if (ioctl(v->vm, KVM_CREATE_IRQCHIP, 0) < 0)
		return fail("KVM_CREATE_IRQCHIP");
	memset(&pit, 0, sizeof(pit));
	if (ioctl(v->vm, KVM_CREATE_PIT2, &pit) < 0)
		return fail("KVM_CREATE_PIT2");
	return 0;
}

static int vm_setup(struct vm *v, const char *image, int pc)
{
	struct kvm_userspace_memory_region mem;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	int r;

	v->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (v->kvm < 0)
		return fail("open /dev/kvm");
	if (ioctl(v->kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
		fprintf(stderr, "pio_ref: unexpected KVM API version\n");
		return -1;
	}
	v->vm = ioctl(v->kvm, KVM_CREATE_VM, 0);
	if (v->vm < 0)
		return fail("KVM_CREATE_VM");

	v->ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (v->ram == MAP_FAILED)
		return fail("mmap RAM");
	if (load_image(v->ram, image) < 0)
		return -1;
	memset(&mem, 0, sizeof(mem));
	mem.slot = 0;
	mem.guest_phys_addr = 0;
	mem.memory_size = RAM_SIZE;
	mem.userspace_addr = (uintptr_t)v->ram;
	if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &mem) < 0)
		return fail("KVM_SET_USER_MEMORY_REGION");
	if (pc && pc_platform(v) < 0)
		return -1;

	v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
	if (v->vcpu < 0)
		return fail("KVM_CREATE_VCPU");
	r = ioctl(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (r < 0)
		return fail("KVM_GET_VCPU_MMAP_SIZE");
	v->run_size = (size_t)r;
	v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
	if (v->run == MAP_FAILED)
		return fail("mmap kvm_run");

	/* Real mode, CS=0 IP=0x7c00: the reset state with CS moved down from 0xf000. */
	if (ioctl(v->vcpu, KVM_GET_SREGS, &sregs) < 0)
		return fail("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(v->vcpu, KVM_SET_SREGS, &sregs) < 0)
		return fail("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = LOAD_ADDR;
	regs.rsp = LOAD_ADDR;
	regs.rflags = 2;	/* bit 1 is reserved and must be set */
	if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0)
		return fail("KVM_SET_REGS");
	return 0;
}

/* Run n exits; each must be the guest's one-byte OUT to port 0x80. */
static int run_exits(struct vm *v, unsigned long n)
{
	struct kvm_run *run = v->run;

	while (n--) {
		if (ioctl(v->vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			return fail("KVM_RUN");
		}
		if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT ||
		    run->io.port != PIO_PORT) {
			fprintf(stderr, "pio_ref: unexpected exit: reason %u\n", run->exit_reason);
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

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static unsigned long arg_ulong(const char *s, const char *name, unsigned long lo, unsigned long hi)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 0);
	if (errno || *end || v < lo || v > hi) {
		fprintf(stderr, "pio_ref: %s must be an integer in [%lu, %lu], got '%s'\n", name, lo, hi, s);
		exit(2);
	}
	return v;
}

/* One batch of n exits, timed; ns per exit. */
static int timed_batch(struct vm *v, unsigned long n, double *ns)
{
	uint64_t t0 = now_ns();

	if (run_exits(v, n) < 0)
		return -1;
	*ns = (double)(now_ns() - t0) / (double)n;
	return 0;
}

/* `serve`: one warm VM, a batch per line of stdin, its ns per exit per line of stdout. */
static int serve(struct vm *v, const char *image, unsigned long warmup, int pc)
{
	char line[64];
	double ns;

	if (vm_setup(v, image, pc) < 0 || run_exits(v, warmup) < 0)
		return 1;
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		line[strcspn(line, "\n")] = 0;
		if (timed_batch(v, arg_ulong(line, "EXITS_PER_BATCH", 1, 1UL << 40), &ns) < 0)
			return 1;
		printf("%.1f\n", ns);
		fflush(stdout);
	}
	return 0;
}

int main(int argc, char **argv)
{
	unsigned long exits = 20000, batches = 5, warmup = 2000, i;
	double ns[MAX_BATCHES], sorted[MAX_BATCHES], sum = 0, median;
	struct vm v = { -1, -1, -1, NULL, NULL, 0 };

	if (argc < 2 || argc > 5 ||
	    (argc == 5 && !strcmp(argv[2], "serve") && strcmp(argv[4], "pc") && strcmp(argv[4], "bare"))) {
		fprintf(stderr, "usage: %s IMAGE [EXITS_PER_BATCH [BATCHES [WARMUP]]]\n"
			"       %s IMAGE serve [WARMUP [pc|bare]]\n", argv[0], argv[0]);
		return 2;
	}
	if (argc > 2 && !strcmp(argv[2], "serve"))
		return serve(&v, argv[1], argc > 3 ? arg_ulong(argv[3], "WARMUP", 0, 1UL << 40) : warmup,
			     argc > 4 && !strcmp(argv[4], "pc"));
	if (argc > 2)
		exits = arg_ulong(argv[2], "EXITS_PER_BATCH", 1, 1UL << 40);
	if (argc > 3)
		batches = arg_ulong(argv[3], "BATCHES", 1, MAX_BATCHES);
	if (argc > 4)
		warmup = arg_ulong(argv[4], "WARMUP", 0, 1UL << 40);

	if (vm_setup(&v, argv[1], 0) < 0 || run_exits(&v, warmup) < 0)
		return 1;
	for (i = 0; i < batches; i++) {
		if (timed_batch(&v, exits, &ns[i]) < 0)
			return 1;
		sum += ns[i];
	}
	memcpy(sorted, ns, batches * sizeof(ns[0]));
	qsort(sorted, batches, sizeof(sorted[0]), cmp_double);
	median = batches % 2 ? sorted[batches / 2] : (sorted[batches / 2 - 1] + sorted[batches / 2]) / 2;

	printf("{\"exits_per_batch\": %lu, \"batches\": %lu, \"warmup\": %lu, \"batch_ns_per_exit\": [",
	       exits, batches, warmup);
	for (i = 0; i < batches; i++)
		printf("%s%.1f", i ? ", " : "", ns[i]);
	printf("], \"median_ns\": %.1f, \"mean_ns\": %.1f, \"min_ns\": %.1f}\n",
	       median, sum / (double)batches, sorted[0]);
	/* The kernel releases the vCPU, the VM and the mappings at exit. */
	return 0;
}
