/*
 * smp.c - bring up the application processors (ELF32, protected mode, CPL 0).
 *
 * Runs on the bootstrap processor (BSP, vCPU 0) of a Machine with cpus >= 2 and
 * the in-kernel irqchip.  It finds the MP table the way an OS does (Intel MP
 * Spec 1.4, chapter 4), takes the processors' APIC IDs from it, copies the AP
 * trampoline of smp-ap.S to 0x8000 and starts each AP in turn with the
 * INIT-SIPI-SIPI sequence (SDM vol. 3A, 8.4.4.1): one INIT to all but itself,
 * 10 ms, then per AP a Startup IPI, 200 us, a second one if the AP has not
 * shown up yet, and a wait for it to check in.  Each AP prints "AP <apic id> up"
 * under a spinlock.  Output for 4 CPUs:
 *
 *   smp: MP table lists 4 CPUs
 *   AP 1 up
 *   AP 2 up
 *   AP 3 up
 *   smp: 4 CPUs up
 *
 * and exit 0x58.  No MP table, a bad checksum or an AP that never checks in
 * prints "smp: <what went wrong>" and exits 1.
 */
#include "runtime/runtime.h"

#define EXIT_OK           0x58
#define AP_TRAMPOLINE     0x8000      /* layout.AP_TRAMPOLINE: a free page below 1 MiB */
#define MAX_CPUS          255

/* Local APIC registers (SDM vol. 3A, table 10-1), at the default base. */
#define LAPIC_BASE        0xfee00000u
#define LAPIC_ID          0x020
#define LAPIC_SVR         0x0f0
#define LAPIC_ICR_LOW     0x300
#define LAPIC_ICR_HIGH    0x310
#define SVR_APIC_ENABLE   0x100
#define ICR_INIT          0x500
#define ICR_STARTUP       0x600
#define ICR_LEVEL_ASSERT  0x4000
#define ICR_SEND_PENDING  0x1000       /* delivery status */
#define ICR_ALL_BUT_SELF  (3u << 18)

/* Shared with the APs (smp-ap.S). */
volatile u32 ap_count;                 /* APs that checked in (lock incl) */
volatile u32 ap_last_id;               /* the APIC ID the latest AP read from its LAPIC */
static volatile u32 print_lock;

extern const char ap_trampoline[], ap_trampoline_end[];

static u8 apic_ids[MAX_CPUS];

/* ---- helpers ---------------------------------------------------------------- */

/* A low physical address as a pointer gcc cannot reason about (it warns on small constants). */
static inline volatile u8 *phys(u32 addr)
{
	__asm__("" : "+r"(addr));
	return (volatile u8 *)addr;
}

static inline u32 lapic_read(u32 reg)
{
	return *(volatile u32 *)(LAPIC_BASE + reg);
}

static inline void lapic_write(u32 reg, u32 v)
{
	*(volatile u32 *)(LAPIC_BASE + reg) = v;
}

static inline void pause(void)
{
	__asm__ volatile("pause");
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

/*
 * Wait at least `us` microseconds, reading the TSC and assuming it ticks at
 * most 4 GHz (the guest knows no TSC frequency; too long is harmless here).
 */
static void delay_us(u32 us)
{
	u64 end = rdtsc() + (u64)us * 4000;

	while (rdtsc() < end)
		pause();
}

static void lock(void)
{
	u32 taken = 1;

	for (;;) {
		__asm__ volatile("lock xchgl %0, %1" : "+r"(taken), "+m"(print_lock) : : "memory");
		if (!taken)
			return;
		while (print_lock)
			pause();
		taken = 1;
	}
}

static void unlock(void)
{
	__asm__ volatile("" : : : "memory");
	print_lock = 0;
}


static int fail(const char *what)
{
	lock();
	puts("smp: ");
	puts(what);
	putc('\n');
	unlock();
	return EXIT_SELFCHECK_FAILED;
}

/* ---- the MP table (MP spec 1.4, chapter 4) ---------------------------------- */

static int sums_to_zero(const volatile u8 *p, u32 n)
{
	u8 sum = 0;

	while (n--)
		sum += *p++;
	return sum == 0;
}

static u16 rd16(const volatile u8 *p)
{
	return p[0] | p[1] << 8;
}

static u32 rd32(const volatile u8 *p)
{
	return rd16(p) | (u32)rd16(p + 2) << 16;
}

/* A valid floating pointer in [start, start + len) on a 16-byte boundary, or 0. */
static u32 scan(u32 start, u32 len)
{
	for (u32 a = start; a + 16 <= start + len; a += 16) {
		const volatile u8 *p = phys(a);

		if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_' &&
		    p[8] == 1 && sums_to_zero(p, 16))
			return a;
	}
	return 0;
}

/* Where the spec says to look: EBDA's first KiB, base memory's last KiB, the BIOS ROM. */
static u32 find_floating_pointer(void)
{
	u32 ebda = (u32)rd16(phys(0x40e)) << 4;    /* BIOS data area: EBDA segment */
	u32 base_kib = rd16(phys(0x413));          /* BIOS data area: base memory in KiB */
	u32 fp = 0;

	if (ebda)
		fp = scan(ebda, 1024);
	if (!fp)
		fp = scan(((base_kib ? base_kib : 640) - 1) * 1024, 1024);
	if (!fp)
		fp = scan(0xf0000, 0x10000);
	return fp;
}

/* Fill apic_ids[] from the processor entries; returns the CPU count or -1 with a message. */
static int read_mp_table(u32 *bsp_id)
{
	u32 fp = find_floating_pointer();
	const volatile u8 *t;
	u32 len, count, off;
	int ncpus = 0;

	if (!fp)
		return fail("no MP floating pointer (_MP_) found"), -1;
	t = phys(rd32(phys(fp + 4)));
	if (!t || t[0] != 'P' || t[1] != 'C' || t[2] != 'M' || t[3] != 'P')
		return fail("MP floating pointer does not point at a PCMP table"), -1;
	len = rd16(t + 4);
	count = rd16(t + 34);
	if (len < 44 || !sums_to_zero(t, len))
		return fail("MP configuration table checksum is wrong"), -1;
	off = 44;
	for (u32 i = 0; i < count; i++) {
		u8 type = t[off];

		if (type == 0) {                      /* processor: id, version, flags (EN, BP) */
			if (off + 20 > len)
				break;
			if (t[off + 3] & 1) {
				if (ncpus == MAX_CPUS)
					return fail("more than 255 processors"), -1;
				apic_ids[ncpus++] = t[off + 1];
				if (t[off + 3] & 2)
					*bsp_id = t[off + 1];
			}
			off += 20;
		} else if (type <= 4) {               /* bus, I/O APIC, I/O and local interrupts */
			off += 8;
		} else {
			return fail("unknown MP table entry type"), -1;
		}
	}
	if (off != len)
		return fail("MP table entries do not fill the table"), -1;
	return ncpus;
}

/* ---- starting the APs ------------------------------------------------------ */

static void send_ipi(u32 dest, u32 icr)
{
	lapic_write(LAPIC_ICR_HIGH, dest << 24);
	lapic_write(LAPIC_ICR_LOW, icr);
	while (lapic_read(LAPIC_ICR_LOW) & ICR_SEND_PENDING)
		pause();
}

/* Start the AP with APIC ID `id`; 0 once it has checked in, -1 after about a second. */
static int start_ap(u32 id)
{
	u32 want = ap_count + 1;
	u32 vector = AP_TRAMPOLINE >> 12;
	u64 deadline;

	send_ipi(id, ICR_STARTUP | ICR_LEVEL_ASSERT | vector);
	delay_us(200);
	if (ap_count != want)              /* a second SIPI, as the spec asks; a running AP ignores it */
		send_ipi(id, ICR_STARTUP | ICR_LEVEL_ASSERT | vector);
	deadline = rdtsc() + 4000000000ull;
	while (ap_count != want) {
		if (rdtsc() > deadline)
			return -1;
		pause();
	}
	return 0;
}

/* Called by each AP from smp-ap.S with the ID its local APIC reports. */
void ap_main(u32 apic_id)
{
	lock();
	puts("AP ");
	print_dec(apic_id);
	puts(" up\n");
	ap_last_id = apic_id;
	unlock();
}

int main(void)
{
	u32 bsp_id = 0, self;
	int ncpus = read_mp_table(&bsp_id);

	if (ncpus < 0)
		return EXIT_SELFCHECK_FAILED;
	self = lapic_read(LAPIC_ID) >> 24;
	if (self != bsp_id)
		return fail("the MP table's bootstrap processor is not this CPU");
	puts("smp: MP table lists ");
	print_dec(ncpus);
	puts(" CPUs\n");

	for (const char *s = ap_trampoline; s < ap_trampoline_end; s++)
		phys(AP_TRAMPOLINE)[s - ap_trampoline] = *s;
	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | SVR_APIC_ENABLE | 0xff);

	if (ncpus > 1) {
		send_ipi(0, ICR_ALL_BUT_SELF | ICR_INIT | ICR_LEVEL_ASSERT);
		delay_us(10000);
	}
	for (int i = 0; i < ncpus; i++) {
		if (apic_ids[i] == self)
			continue;
		if (start_ap(apic_ids[i]) < 0)
			return fail("an AP did not check in within a second");
		if (ap_last_id != apic_ids[i])
			return fail("an AP's local APIC ID differs from its MP table entry");
	}

	lock();
	puts("smp: ");
	print_dec(ap_count + 1);
	puts(" CPUs up\n");
	unlock();
	return EXIT_OK;
}
