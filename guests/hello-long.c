/*
 * hello-long.c - ELF64 guest entered in 64-bit long mode (identity-mapped
 * 2 MiB pages, CPL 0).  Prints one line, exits 42: status 85, RAX == 42.
 */
#include "runtime/runtime.h"

int main(void)
{
	puts("Hello from long mode\n");
	return 42;
}
