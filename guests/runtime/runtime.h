/*
 * runtime.h - the whole kvmpy guest runtime, for 32- and 64-bit guests.
 *
 * Guest ABI (see guests/README.md and docs/CONTRACTS.md):
 *   - COM1, a 16550 UART at I/O port 0x3f8: poll LSR (0x3fd) bit 5 (THRE)
 *     before writing THR, LSR bit 0 (DR) before reading RBR.
 *   - isa-debug-exit at I/O port 0xf4: `outb v` ends the run with exit
 *     status (v << 1) | 1.  exit(v) leaves RAX/EAX == v (zero-extended)
 *     at that `out`, so a host can assert both the status and the register.
 *   - start32.S / start64.S set up a stack, clear .bss, call main() and
 *     pass its return value to exit().
 *
 * No libc: these names are ours.  Build with -ffreestanding (implies
 * -fno-builtin), so gcc never mistakes them for the C library's.
 */
#ifndef KVMPY_GUEST_RUNTIME_H
#define KVMPY_GUEST_RUNTIME_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* I/O ports (PC/AT conventions, QEMU's isa-debug-exit). */
#define COM1_BASE       0x3f8
#define COM1_THR        (COM1_BASE + 0) /* transmit holding register (write) */
#define COM1_RBR        (COM1_BASE + 0) /* receive buffer register (read) */
#define COM1_LSR        (COM1_BASE + 5) /* line status register */
#define LSR_DR          0x01            /* data ready: RBR holds a byte */
#define LSR_THRE        0x20            /* THR empty: may write a byte */
#define DEBUG_EXIT_PORT 0xf4

/* Exit value a guest uses when one of its own self-checks fails. */
#define EXIT_SELFCHECK_FAILED 1

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* Current privilege level: the low two bits of CS. */
static inline unsigned cpl(void)
{
	unsigned long cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	return cs & 3;
}

void putc(int c);                  /* one byte to COM1, polling THRE */
void puts(const char *s);          /* the string as is: no newline added */
void print_hex(u64 v);             /* "0x" and lowercase hex digits, no leading zeros */
void print_dec(unsigned long v);   /* decimal, no leading zeros (unsigned long: 32-bit code has no 64-bit division) */
int getc(void);                    /* blocks (polling DR) until COM1 has a byte */
__attribute__((noreturn)) void exit(int v);

#endif
