/*
 * reset-case.c - a guest that runs "cases" for reset-in-place tests and benchmarks.
 *
 * Long mode, meant for CPL 3 (user=True), where its loops run natively even on
 * a host whose CPL-0 code is emulated.  It sets up its disk (if any), prints
 * `reset-case: ready`, then loops:
 *
 *     out 0xf4, 0x52 ('R')     the host's run() returns: status 0xa5.  The host
 *                              takes its checkpoint here (Machine.checkpoint()),
 *                              fills the mailbox, and run()s again;
 *     do the case the mailbox describes;
 *     out 0xf4, 0x44 ('D')     run() returns with status 0x89; the host compares,
 *                              then Machine.reset() goes back to just after 'R'.
 *
 * MAILBOX: little-endian u64 words at guest-physical (= virtual) 0x300000
 * (MAILBOX; the image must end below it, else exit 0x41):
 *   [0] pages   how many 4 KiB pages of the array to dirty (at most the RAM above ARRAY)
 *   [1] first   first page index in the array
 *   [2] stride  page step (0 is taken as 1); page k of the case is first + k * stride
 *               (mod the array's page count)
 *   [3] seed    the value written (seed + k into word (seed % 512) of page k)
 *   [4] serial  bytes to print on COM1 (at most 4096): 'a' + (seed + i) % 26
 *   [5] sector  a disk sector to write (seed repeated), or all ones for none
 *   [6] cmos    if non-zero, write CMOS register 0x0e..0x3f (index = 0x0e + seed % 0x32)
 *               with the low byte of seed through ports 0x70/0x71
 *   [7] regs    if non-zero, leave seed-derived values in rbx, r12-r15, xmm0-xmm1
 * The array is the RAM from ARRAY (0x400000) up to the RAM size fw_cfg reports.
 *
 * EXIT: 0x52 ready, 0x44 case done; 0x41 layout; 0x4D disk error (blk_fail).
 */
#include "runtime/runtime.h"
#include "runtime/virtio_blk.h"

#define MAILBOX   0x300000UL
#define ARRAY     0x400000UL
#define EXIT_READY  0x52
#define EXIT_DONE   0x44
#define EXIT_LAYOUT 0x41
#define MAX_SERIAL  4096

#define FW_CFG_PORT_SEL  0x510
#define FW_CFG_PORT_DATA 0x511
#define FW_CFG_RAM_SIZE  0x03
#define CMOS_INDEX 0x70
#define CMOS_DATA  0x71

extern char __stack_top[];

static u64 sector[BLK_SECTOR_SIZE / 8] __attribute__((aligned(BLK_SECTOR_SIZE)));

static inline void outw(u16 port, u16 v)
{
	__asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static u64 ram_size(void)
{
	u64 v = 0;

	outw(FW_CFG_PORT_SEL, FW_CFG_RAM_SIZE);
	for (int i = 0; i < 8; i++)
		v |= (u64)inb(FW_CFG_PORT_DATA) << (8 * i);
	return v;
}

/* Leaves seed-derived values in callee-saved registers and two XMM registers. */
static void dirty_regs(u64 seed)
{
	__asm__ volatile("movq %0, %%xmm0\n\tmovq %1, %%xmm1"
			 : : "r"(seed * 3 + 1), "r"(~seed));   /* no SSE in compiled code: no clobber */
	__asm__ volatile("mov %0, %%rbx\n\tmov %0, %%r12\n\tmov %0, %%r13\n\t"
			 "mov %0, %%r14\n\tmov %0, %%r15\n\toutb %b1, %w2"
			 : : "r"(seed ^ 0x5a5a5a5a5a5a5a5aULL), "a"(EXIT_DONE), "d"(DEBUG_EXIT_PORT)
			 : "rbx", "r12", "r13", "r14", "r15", "memory");
}

static int run_case(u64 array_pages, int disk)
{
	volatile u64 *box = (volatile u64 *)MAILBOX;
	u64 pages = box[0], first = box[1], stride = box[2], seed = box[3];
	u64 serial = box[4], sec = box[5], cmos = box[6], regs = box[7];
	u64 *a = (u64 *)ARRAY;

	if (!stride)
		stride = 1;
	if (pages > array_pages)
		pages = array_pages;
	for (u64 k = 0; k < pages; k++) {
		u64 p = (first + k * stride) % array_pages;

		a[p * 512 + seed % 512] = seed + k;
	}
	if (serial > MAX_SERIAL)
		serial = MAX_SERIAL;
	for (u64 i = 0; i < serial; i++)
		putc('a' + (int)((seed + i) % 26));
	if (cmos) {
		outb(CMOS_INDEX, (u8)(0x0e + seed % 0x32));
		outb(CMOS_DATA, (u8)seed);
	}
	if (disk && sec != ~0ULL && sec < blk_capacity()) {
		for (int i = 0; i < BLK_SECTOR_SIZE / 8; i++)
			sector[i] = seed + (u64)i;
		int err = blk_write(sec, sector, BLK_SECTOR_SIZE);
		if (err)
			return blk_fail("reset-case", "write", sec, err);
	}
	if (regs)
		dirty_regs(seed);        /* ends the case itself: the registers stay as left */
	else
		outb(DEBUG_EXIT_PORT, EXIT_DONE);
	return 0;
}

int main(void)
{
	u64 ram, array_pages;
	int disk, err;

	if ((unsigned long)__stack_top > MAILBOX) {
		puts("reset-case: the image overlaps the mailbox at 0x300000\n");
		return EXIT_LAYOUT;
	}
	ram = ram_size();
	array_pages = ram > ARRAY ? (ram - ARRAY) / 4096 : 1;
	err = blk_init(VIRTIO_MMIO_BASE);
	disk = err == 0;
	if (err && err != BLK_ENODEV)
		return blk_fail("reset-case", "init", 0, err);
	puts("reset-case: ready\n");
	for (;;) {
		outb(DEBUG_EXIT_PORT, EXIT_READY);
		err = run_case(array_pages, disk);
		if (err)
			return err;
	}
}
