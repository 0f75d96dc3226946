/*
 * hello-user.c - ELF64 guest the host starts in ring 3 (CPL 3, IOPL 3).
 *
 * Confirms its privilege level from CS, then computes: on a host whose
 * KVM emulates CPL 0 code, ten million loop iterations take seconds in
 * ring 0 but milliseconds in ring 3, where the guest runs natively.
 * Exits 0x30 (status 0x61, RAX == 0x30), or 1 if it is not at CPL 3.
 */
#include "runtime/runtime.h"

#define N 10000000ULL

int main(void)
{
	unsigned level = cpl();
	u64 sum = 0;

	puts("Hello from ring ");
	putc('0' + level);
	puts(" (CPL ");
	putc('0' + level);
	puts(")\n");
	if (level != 3)
		return EXIT_SELFCHECK_FAILED; /* don't run the loop emulated */

	for (u64 i = 1; i <= N; i++) {
		sum += i;
		/* Keep the loop a loop: no closed form, no vectorising. */
		__asm__ volatile("" : "+r"(sum));
	}
	puts("sum(1..10000000) = ");
	print_hex(sum);
	putc('\n');
	return sum == N * (N + 1) / 2 ? 0x30 : EXIT_SELFCHECK_FAILED;
}
