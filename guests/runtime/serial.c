/*
 * serial.c - polled COM1 output/input and isa-debug-exit.
 *
 * Every LSR read is a VM exit, so this is slow by design but needs no
 * interrupts, no IDT and no UART initialisation: the host's 16550 model
 * powers up ready to transmit.
 */
#include "runtime.h"

void putc(int c)
{
	while (!(inb(COM1_LSR) & LSR_THRE))
		;
	outb(COM1_THR, (u8)c);
}

void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

void print_hex(u64 v)
{
	char buf[16];
	int n = 0;

	do {
		buf[n++] = "0123456789abcdef"[v & 0xf];
		v >>= 4;
	} while (v);
	putc('0');
	putc('x');
	while (n)
		putc(buf[--n]);
}

int getc(void)
{
	while (!(inb(COM1_LSR) & LSR_DR))
		;
	return inb(COM1_RBR);
}

void exit(int v)
{
	/* RAX/EAX == v (zero-extended from the low byte) at the `out`. */
	unsigned long rax = (u8)v;

	__asm__ volatile("outb %%al, %1" : : "a"(rax), "N"(DEBUG_EXIT_PORT));
	/*
	 * Only reached if the host ignored the write.  HLT is privileged:
	 * at CPL 3 it would raise #GP (and, with no IDT, a triple fault).
	 */
	if (cpl() == 0)
		for (;;)
			__asm__ volatile("cli; hlt");
	for (;;)
		__asm__ volatile("pause");
}

void print_dec(unsigned long v)
{
	char buf[20];
	int n = 0;

	do {
		buf[n++] = '0' + v % 10;
		v /= 10;
	} while (v);
	while (n)
		putc(buf[--n]);
}
