/*
 * blk-smprace.c - eight vCPUs hammer one self-feeding virtio-blk queue.
 *
 * The last hostile guest of the "every stop is obeyed" matrix (issue 11,
 * tests/integration/test_stops.py). Needs 8 vCPUs, the in-kernel irqchip (the APs
 * wait in their local APICs for INIT/SIPI) and the 32 MiB feeding disk of
 * blk-selffeed. The bootstrap processor (BSP, vCPU 0, CPL 3 so its loops run
 * natively) does what blk-selffeed.c does: after blk_start() it re-creates queue 0
 * (QueueNum 16) on race_page with one IN request at head 0 whose header sector field
 * is avail.idx inside the request's own 512-byte IN buffer, so on that disk each
 * request served publishes the next. It publishes the first one, then starts the
 * seven application processors (APs) at once: INIT to all but itself, 10 ms, a
 * Startup IPI to all but itself, 200 us, a second one (SDM vol. 3A, 8.4.4.1); the
 * trampoline of blk-smprace-ap.S takes each AP to 32-bit protected mode (CPL 0,
 * paging off), where it checks in (lock incl ap_count) and races:
 *
 *   every AP       writes QueueNotify in an endless loop;
 *   odd APIC IDs   also, between two notifies, flip VIRTQ_AVAIL_F_NO_INTERRUPT in
 *                  avail.flags (a plain read-modify-write, against the device's own
 *                  IN-buffer writes that zero it and its read of it to decide on an
 *                  interrupt) and republish head 0 in the ring slot the device reads
 *                  next (avail.ring[avail.idx % 16] = 0) and in one chosen by their ID.
 *
 * Once all seven have checked in (or about two seconds have passed) the BSP prints
 * how many vCPUs race and joins them: QueueNotify forever. So up to eight vCPU
 * threads are inside the device's QueueNotify at once, each notify serving up to
 * QueueNum chains the device keeps republishing itself, while guest stores race the
 * device's ring reads and writes. Nothing here ever leaves the feed: every store
 * leaves the request valid, so the queue never goes to DEVICE_NEEDS_RESET.
 *
 * Output: "blk-smprace: 8 vCPUs on one self-feeding queue", then after the setup
 * "blk-smprace: <n> vCPUs notifying"; it never exits. Without a disk "no virtio-blk
 * device" and exit 0x4E; with a disk of another size "blk-smprace: needs a 32 MiB
 * disk" and exit 0x46.
 */
#include "runtime/selffeed.h"

#define EXIT_BAD_DISK 0x46
#define MAX_APS 7			/* 8 vCPUs */

/* race_page holds the queue (runtime/selffeed.h); blk-smprace-ap.S knows AVAIL_OFF is 0x800. */

/* Local APIC (SDM vol. 3A, table 10-1) at its default base, identity-mapped. */
#define LAPIC_BASE 0xfee00000UL
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define SVR_APIC_ENABLE 0x100
#define ICR_INIT 0x500
#define ICR_STARTUP 0x600
#define ICR_LEVEL_ASSERT 0x4000
#define ICR_SEND_PENDING 0x1000
#define ICR_ALL_BUT_SELF (3u << 18)
#define AP_TRAMPOLINE 0x8000		/* layout.AP_TRAMPOLINE; SIPI vector 0x08 */

u8 race_page[4096] __attribute__((aligned(4096)));	/* shared with the APs */
volatile u32 ap_count;					/* APs that checked in */
extern const char ap_trampoline[], ap_trampoline_end[];

static u32 lapic_read(unsigned off)
{
	return *(volatile u32 *)(LAPIC_BASE + off);
}

static void lapic_write(unsigned off, u32 v)
{
	*(volatile u32 *)(LAPIC_BASE + off) = v;
}

static u64 rdtsc(void)
{
	u32 lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

/* At least `us` microseconds if the TSC ticks at most 4 GHz (longer is harmless). */
static void delay_us(u64 us)
{
	u64 end = rdtsc() + us * 4000;

	while (rdtsc() < end)
		__asm__ volatile("pause");
}

static void ipi_all_but_self(u32 icr)
{
	lapic_write(LAPIC_ICR_HIGH, 0);
	lapic_write(LAPIC_ICR_LOW, ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | icr);
	while (lapic_read(LAPIC_ICR_LOW) & ICR_SEND_PENDING)
		__asm__ volatile("pause");
}

/* INIT-SIPI-SIPI to every AP at once; the number that checked in within ~2 s. */
static u32 start_aps(void)
{
	u64 deadline;

	for (const char *s = ap_trampoline; s < ap_trampoline_end; s++)
		((volatile char *)(unsigned long)AP_TRAMPOLINE)[s - ap_trampoline] = *s;
	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | SVR_APIC_ENABLE | 0xff);
	ipi_all_but_self(ICR_INIT);
	delay_us(10000);
	ipi_all_but_self(ICR_STARTUP | (AP_TRAMPOLINE >> 12));
	delay_us(200);
	ipi_all_but_self(ICR_STARTUP | (AP_TRAMPOLINE >> 12));	/* a running AP ignores it */
	deadline = rdtsc() + 8000000000ull;
	while (ap_count < MAX_APS && rdtsc() < deadline)
		__asm__ volatile("pause");
	return ap_count;
}

int main(void)
{
	int err;

	puts("blk-smprace: 8 vCPUs on one self-feeding queue\n");
	err = blk_start("blk-smprace");
	if (err)
		return err;
	if (blk_capacity() != SELFFEED_SECTORS) {
		puts("blk-smprace: needs a 32 MiB disk\n");
		return EXIT_BAD_DISK;
	}
	selffeed_setup(race_page);
	puts("blk-smprace: ");
	print_dec(start_aps() + 1);
	puts(" vCPUs notifying\n");
	for (;;)
		selffeed_reg(QUEUE_NOTIFY, 0);
}
