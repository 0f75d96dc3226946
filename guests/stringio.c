/*
 * stringio.c - ELF64 long-mode guest exercising string port I/O.
 *
 * Writes its first line with a single `rep outsb` to COM1's THR (no LSR
 * polling: the host sees one exit with count > 1), then reads a few bytes
 * with `rep insb` from a port no device claims, where the host must
 * return all ones.  Exits 0x3c (status 0x79, RAX == 0x3c) if every byte
 * read 0xff, else 1.
 */
#include "runtime/runtime.h"

#define UNCLAIMED_PORT 0x6000 /* no PC device lives here */
#define NIN 8

static const char line[] = "Hello from rep outsb\n";
static u8 in[NIN];

int main(void)
{
	const void *src = line;
	void *dst = in;
	unsigned long n = sizeof(line) - 1;
	int ok = 1;

	__asm__ volatile("cld; rep outsb"
			 : "+S"(src), "+c"(n)
			 : "d"((u16)COM1_THR)
			 : "memory");

	n = NIN;
	__asm__ volatile("cld; rep insb"
			 : "+D"(dst), "+c"(n)
			 : "d"((u16)UNCLAIMED_PORT)
			 : "memory");
	for (int i = 0; i < NIN; i++)
		if (in[i] != 0xff)
			ok = 0;
	puts(ok ? "rep insb ok\n" : "rep insb BAD\n");
	return ok ? 0x3c : EXIT_SELFCHECK_FAILED;
}
