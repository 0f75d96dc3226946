/*
 * testdev.c - QEMU's pc-testdev seen from a guest (ELF32, protected mode, CPL 0).
 *
 * What kvm-unit-tests expects of `-device pc-testdev`, one feature at a time,
 * each reported on COM1:
 *
 *   testdev: latch lanes ok         0xe0-0xe3 by byte lane, 0xe8-0xeb the same latch
 *   testdev: string io ok           rep outsb/outsw/insb/insw, and rep insb into the window
 *   testdev: flush keeps pages      port 0xe4 on a data page, the code page, the stack page
 *   testdev: pic line 5 ok          line 5 through the 8259: one interrupt per rising edge
 *   testdev: ioapic line 17 (edge) ok
 *                                   line 17 through the IOAPIC, edge-triggered: the same
 *   testdev: ioapic line 18 (level) ok, N interrupt(s)
 *                                   level-triggered: the handler lowers the line before
 *                                   its EOI and no more come (N is 1; kvm_pvm delivers
 *                                   such an interrupt to CPL 0 twice: docs/host-notes.md)
 *   testdev: window ok              0xff000000: byte, word, dword, unaligned, the last dword
 *   testdev: done
 *
 * and exit 0x54.  A check that fails prints "testdev: <what> is <got>, expected
 * <want>" and the guest exits 1 at the end.  Without the device (ports that read
 * all ones, a window that reads 0) it prints "testdev: absent" and exits 0x55.
 * The interrupt checks need the in-kernel irqchip.
 */
#include "runtime/runtime.h"

#define EXIT_OK         0x54
#define EXIT_ABSENT     0x55

#define TESTDEV_PORT    0xe0            /* the latch */
#define TESTDEV_FLUSH   0xe4            /* 4-byte write: flush that page */
#define TESTDEV_BYTE    0xe8            /* the latch again, byte by byte */
#define TESTDEV_IRQ     0x2000          /* + n: interrupt line n */
#define TESTDEV_IOMEM   0xff000000u     /* 64 KiB that read back */

#define PIC_LINE        5
#define PIC_VECTOR      (0x20 + PIC_LINE)
#define IOAPIC_EDGE_LINE  17            /* >= 16: only the IOAPIC has these */
#define IOAPIC_LEVEL_LINE 18
#define IOAPIC_VECTOR   0x41
#define SPURIOUS_VECTOR 0xff

#define LAPIC_BASE      0xfee00000u
#define LAPIC_EOI       0x0b0
#define LAPIC_SVR       0x0f0
#define IOAPIC_BASE     0xfec00000u
#define IOREDTBL(n)     (0x10 + 2 * (n))
#define REDIR_LEVEL     (1u << 15)
#define REDIR_MASKED    (1u << 16)

#define WAIT_LOOPS      50000           /* ~50 ms of emulated ring 0 on kvm_pvm; interrupts come at once */

volatile u32 pic_count, ioapic_count;   /* bumped by the handlers below */
u32 irq_port;                           /* the line ioapic_isr lowers */
static int failures;
static u8 page[4096] __attribute__((aligned(4096)));
static u8 buf[64];
static u64 idt[256] __attribute__((aligned(8)));

void pic_isr(void), ioapic_isr(void), spurious_isr(void);

/*
 * The handlers: count, lower what must be lowered, EOI.  They return through
 * isr_return, not iret: on kvm_pvm every ring-0 instruction is emulated and
 * KVM's emulator has no protected-mode iret (docs/host-notes.md).  From the
 * same privilege level the frame is EIP, CS, EFLAGS: rearrange it to EFLAGS,
 * EIP and popf; ret.
 */
__asm__(
	".text\n"
	".globl pic_isr\n"
	"pic_isr:\n"
	"	pushl %eax\n"
	"	lock incl pic_count\n"
	"	movb $0x20, %al\n"              /* non-specific EOI to the master 8259 */
	"	outb %al, $0x20\n"
	"	popl %eax\n"
	"	jmp isr_return\n"
	".globl ioapic_isr\n"
	"ioapic_isr:\n"
	"	pushl %eax\n"
	"	pushl %edx\n"
	"	lock incl ioapic_count\n"
	"	movl irq_port, %edx\n"          /* lower the line first */
	"	xorl %eax, %eax\n"
	"	outb %al, %dx\n"
	"	movl $0, 0xfee000b0\n"          /* then EOI: the IOAPIC clears Remote IRR */
	"	popl %edx\n"
	"	popl %eax\n"
	"	jmp isr_return\n"
	".globl spurious_isr\n"
	"spurious_isr:\n"
	"	jmp isr_return\n"
	"isr_return:\n"
	"	pushl %eax\n"
	"	movl 4(%esp), %eax\n"           /* EIP */
	"	xchgl %eax, 12(%esp)\n"         /* EIP to the EFLAGS slot, EFLAGS to eax */
	"	movl %eax, 8(%esp)\n"           /* EFLAGS to the CS slot */
	"	popl %eax\n"
	"	addl $4, %esp\n"                /* the frame is now EFLAGS, EIP */
	"	popfl\n"
	"	ret\n");

/* ---- helpers ---------------------------------------------------------------- */

static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* A physical address as a pointer gcc cannot reason about. */
static inline volatile u8 *phys(u32 addr)
{
	__asm__("" : "+r"(addr));
	return (volatile u8 *)addr;
}

static inline u32 rd32(u32 addr) { return *(volatile u32 *)phys(addr); }
static inline void wr32(u32 addr, u32 v) { *(volatile u32 *)phys(addr) = v; }
static inline u16 rd16(u32 addr) { return *(volatile u16 *)phys(addr); }
static inline void wr16(u32 addr, u16 v) { *(volatile u16 *)phys(addr) = v; }
static inline u8 rd8(u32 addr) { return *phys(addr); }
static inline void wr8(u32 addr, u8 v) { *phys(addr) = v; }

static void check(const char *what, u32 got, u32 want)
{
	if (got == want)
		return;
	puts("testdev: ");
	puts(what);
	puts(" is ");
	print_hex(got);
	puts(", expected ");
	print_hex(want);
	putc('\n');
	failures++;
}

static void report(int before, const char *ok_line)
{
	if (failures == before)
		puts(ok_line);
}

static void wait_for(volatile u32 *count, u32 n)
{
	for (int i = 0; i < WAIT_LOOPS && *count < n; i++)
		__asm__ volatile("pause");
}

/* ---- without the device --------------------------------------------------------- */

static int absent(void)
{
	check("inb 0xe4 without the device", inb(TESTDEV_FLUSH), 0xff);
	check("inw 0xe8 without the device", inw(TESTDEV_BYTE), 0xffff);
	check("inb 0x2000 without the device", inb(TESTDEV_IRQ), 0xff);
	wr32(TESTDEV_IOMEM, 0x5a5a5a5a);
	check("the window without the device", rd32(TESTDEV_IOMEM), 0);
	if (failures)
		return EXIT_SELFCHECK_FAILED;
	puts("testdev: absent\n");
	return EXIT_ABSENT;
}

/* ---- the features --------------------------------------------------------------- */

static void latch(void)
{
	int before = failures;

	outl(TESTDEV_PORT, 0x12345678);
	check("inl 0xe0", inl(TESTDEV_PORT), 0x12345678);
	check("inb 0xe1", inb(TESTDEV_PORT + 1), 0x56);
	check("inw 0xe2", inw(TESTDEV_PORT + 2), 0x1234);
	outb(TESTDEV_PORT + 1, 0xab);
	check("inl 0xe0 after outb 0xe1", inl(TESTDEV_PORT), 0x1234ab78);
	outw(TESTDEV_PORT + 2, 0xcdef);
	check("inl 0xe0 after outw 0xe2", inl(TESTDEV_PORT), 0xcdefab78);
	check("inl 0xe8", inl(TESTDEV_BYTE), 0xcdefab78);
	outb(TESTDEV_BYTE + 3, 0x11);
	check("inl 0xe0 after outb 0xeb", inl(TESTDEV_PORT), 0x11efab78);
	outl(TESTDEV_BYTE, 0xa1b2c3d4);
	check("inw 0xe0 after outl 0xe8", inw(TESTDEV_PORT), 0xc3d4);
	check("inb 0xea", inb(TESTDEV_BYTE + 2), 0xb2);
	report(before, "testdev: latch lanes ok\n");
}

static void string_io(void)
{
	static const u8 bytes[4] = { 1, 2, 3, 4 };
	static const u16 words[2] = { 0x1111, 0x2222 };
	int before = failures;
	const void *src;
	void *dst;
	unsigned long n;

	src = bytes, n = 4;
	__asm__ volatile("cld; rep outsb" : "+S"(src), "+c"(n) : "d"((u16)TESTDEV_PORT) : "memory");
	outb(TESTDEV_PORT + 1, 0x5a);
	dst = buf, n = sizeof(buf);
	__asm__ volatile("cld; rep insb" : "+D"(dst), "+c"(n) : "d"((u16)(TESTDEV_PORT + 1)) : "memory");
	for (unsigned i = 0; i < sizeof(buf); i++)
		check("a byte of rep insb from 0xe1", buf[i], 0x5a);
	src = words, n = 2;
	__asm__ volatile("cld; rep outsw" : "+S"(src), "+c"(n) : "d"((u16)(TESTDEV_PORT + 2)) : "memory");
	check("inl 0xe0 after rep outsb 0xe0, rep outsw 0xe2", inl(TESTDEV_PORT), 0x22225a04);
	dst = buf, n = 4;
	__asm__ volatile("cld; rep insw" : "+D"(dst), "+c"(n) : "d"((u16)(TESTDEV_BYTE + 2)) : "memory");
	for (unsigned i = 0; i < 8; i++)
		check("a byte of rep insw from 0xea", buf[i], 0x22);
	/* kvm-unit-tests' string_io_mmio: into the window, across a page boundary */
	dst = (void *)phys(TESTDEV_IOMEM + 4064), n = 64;
	__asm__ volatile("cld; rep insb" : "+D"(dst), "+c"(n) : "d"((u16)TESTDEV_PORT) : "memory");
	check("window byte 4064 after rep insb", rd8(TESTDEV_IOMEM + 4064), 0x04);
	check("window byte 4127 after rep insb", rd8(TESTDEV_IOMEM + 4127), 0x04);
	check("window byte 4128 after rep insb", rd8(TESTDEV_IOMEM + 4128), 0);
	report(before, "testdev: string io ok\n");
}

static void flush(void)
{
	int before = failures;
	u32 here;

	for (unsigned i = 0; i < sizeof(page); i++)
		page[i] = (u8)(i * 7 + 1);
	outl(TESTDEV_FLUSH, (u32)page);
	for (unsigned i = 0; i < sizeof(page); i++)
		check("a flushed byte", page[i], (u8)(i * 7 + 1));
	page[100] = 0xee;                       /* written after the flush, flushed again */
	outl(TESTDEV_FLUSH, (u32)page + 0x123);
	check("byte 100 after a second flush", page[100], 0xee);
	check("byte 4095 after a second flush", page[4095], (u8)(4095 * 7 + 1));
	outl(TESTDEV_FLUSH, (u32)flush);        /* the page we run on */
	outl(TESTDEV_FLUSH, (u32)&here);        /* the page our stack is on */
	here = 0x600d;
	check("a stack word after flushing its page", here, 0x600d);
	outl(TESTDEV_FLUSH, 0xfe000000);        /* not RAM: ignored */
	report(before, "testdev: flush keeps pages\n");
}

static void set_gate(int vector, void (*handler)(void))
{
	u32 h = (u32)handler, cs;

	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	idt[vector] = (h & 0xffff) | (u64)(cs & 0xffff) << 16 | (u64)0x8e00 << 32 | (u64)(h >> 16) << 48;
}

static void load_idt(void)
{
	struct { u16 limit; u32 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u32)idt };

	set_gate(PIC_VECTOR, pic_isr);
	set_gate(0x27, spurious_isr);           /* the 8259s' spurious IRQ 7 and 15 */
	set_gate(0x2f, spurious_isr);
	set_gate(IOAPIC_VECTOR, ioapic_isr);
	set_gate(SPURIOUS_VECTOR, spurious_isr);
	__asm__ volatile("lidt %0" : : "m"(idtr));
}

static void pic_line(void)
{
	int before = failures;

	outb(0x20, 0x11), outb(0xa0, 0x11);     /* ICW1: edge, cascade, ICW4 follows */
	outb(0x21, 0x20), outb(0xa1, 0x28);     /* ICW2: vectors 0x20-0x2f */
	outb(0x21, 0x04), outb(0xa1, 0x02);     /* ICW3: slave on IRQ 2 */
	outb(0x21, 0x01), outb(0xa1, 0x01);     /* ICW4: 8086 mode */
	outb(0x21, (u8)~(1 << PIC_LINE)), outb(0xa1, 0xff);
	__asm__ volatile("sti");
	outb(TESTDEV_IRQ + PIC_LINE, 1);
	wait_for(&pic_count, 1);
	check("interrupts after raising the pic line", pic_count, 1);
	outb(TESTDEV_IRQ + PIC_LINE, 1);        /* still high: no new edge */
	outb(TESTDEV_IRQ + PIC_LINE, 0);
	outb(TESTDEV_IRQ + PIC_LINE, 1);        /* a new edge */
	wait_for(&pic_count, 2);
	check("interrupts after a second rising edge", pic_count, 2);
	outb(TESTDEV_IRQ + PIC_LINE, 0);
	__asm__ volatile("cli");
	outb(0x21, 0xff);
	report(before, "testdev: pic line 5 ok\n");
}

/* One IOAPIC pin: raise the line, let the handler lower it, see what arrived. */
static u32 ioapic_round(int line, u32 mode)
{
	u32 seen;

	ioapic_count = 0;
	irq_port = TESTDEV_IRQ + line;
	wr32(IOAPIC_BASE, IOREDTBL(line) + 1);
	wr32(IOAPIC_BASE + 0x10, 0);                                   /* destination: APIC 0 */
	wr32(IOAPIC_BASE, IOREDTBL(line));
	wr32(IOAPIC_BASE + 0x10, IOAPIC_VECTOR | mode);                /* fixed, unmasked */
	__asm__ volatile("sti");
	outb(irq_port, 1);
	wait_for(&ioapic_count, 1);
	wait_for(&ioapic_count, 3);             /* give a storm time to show */
	seen = ioapic_count;
	wait_for(&ioapic_count, seen + 1);
	check("interrupts after the handler lowered the line", ioapic_count, seen);     /* no storm */
	outb(irq_port, 1);                      /* raise it again */
	wait_for(&ioapic_count, seen + 1);
	check("interrupts after raising it again", ioapic_count >= seen + 1, 1);
	__asm__ volatile("cli");
	wr32(IOAPIC_BASE, IOREDTBL(line));
	wr32(IOAPIC_BASE + 0x10, REDIR_MASKED);
	return seen;
}

static void ioapic_lines(void)
{
	int before = failures;
	u32 n;

	wr32(LAPIC_BASE + LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);        /* software-enable the LAPIC */
	n = ioapic_round(IOAPIC_EDGE_LINE, 0);
	check("interrupts after one rising edge", n, 1);
	report(before, "testdev: ioapic line 17 (edge) ok\n");
	before = failures;
	n = ioapic_round(IOAPIC_LEVEL_LINE, REDIR_LEVEL);
	check("a level-triggered line reached the guest", n >= 1, 1);
	if (failures == before) {
		puts("testdev: ioapic line 18 (level) ok, ");
		print_dec(n);
		puts(n == 1 ? " interrupt\n" : " interrupts\n");
	}
}

static void window(void)
{
	int before = failures;
	const u32 w = TESTDEV_IOMEM;

	wr32(w, 0xdeadbeef);
	check("window dword 0", rd32(w), 0xdeadbeef);
	check("window byte 1", rd8(w + 1), 0xbe);
	wr16(w + 2, 0x1234);
	check("window dword 0 after a word at 2", rd32(w), 0x1234beef);
	wr32(w + 4, 0x55667788);
	check("window dword at 1 (unaligned)", rd32(w + 1), 0x881234be);
	wr8(w + 7, 0x99);
	check("window word at 6", rd16(w + 6), 0x9966);
	wr32(w + 0xfffc, 0xcafef00d);
	check("window's last dword", rd32(w + 0xfffc), 0xcafef00d);
	report(before, "testdev: window ok\n");
}

int main(void)
{
	outl(TESTDEV_PORT, 0x12345678);
	if (inl(TESTDEV_PORT) == 0xffffffff)
		return absent();
	latch();
	string_io();
	flush();
	load_idt();
	pic_line();
	ioapic_lines();
	window();
	puts("testdev: done\n");
	return failures ? EXIT_SELFCHECK_FAILED : EXIT_OK;
}
