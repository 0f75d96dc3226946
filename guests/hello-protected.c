/*
 * hello-protected.c - ELF32 guest entered in 32-bit protected mode
 * (flat segments, paging off, CPL 0).  Prints one line, exits 0x20:
 * status 0x41, EAX == 0x20.
 */
#include "runtime/runtime.h"

int main(void)
{
	puts("Hello from protected mode\n");
	return 0x20;
}
