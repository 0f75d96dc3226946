/*
 * smp-ap.S - how an application processor (AP) of the smp guest gets going.
 *
 * A Startup IPI with vector V starts an AP in real mode at CS:IP = (V << 8):0,
 * i.e. at physical V << 12, which must be a page below 1 MiB (Intel SDM vol. 3A,
 * 8.4.4 and 10.6.1).  ap_trampoline..ap_trampoline_end is assembled here, inside
 * the ELF image at 1 MiB, and copied by the BSP to AP_TRAMPOLINE (0x8000, free in
 * kvmpy/x86/layout.py; SIPI vector 0x08).  It is position dependent: every
 * address it uses is written as (label - ap_trampoline + AP_TRAMPOLINE).
 *
 * The trampoline loads its own flat GDT, enters 32-bit protected mode (paging
 * off) and jumps to ap_entry32 in the image, which reads the AP's APIC ID from
 * its local APIC (MMIO 0xFEE00020, bits 31:24), calls ap_main(id) in smp.c
 * (take the print lock, print, release it) and only then checks in with
 * `lock incl ap_count`: after that the AP touches no memory but its own
 * registers (cli; hlt forever), so the BSP may hand the same stack to the next
 * AP.  The BSP starts the APs one at a time, which is what makes one stack enough.
 */
#define AP_TRAMPOLINE	0x8000
#define TADDR(x)	((x) - ap_trampoline + AP_TRAMPOLINE)
#define SEL_CODE	0x08
#define SEL_DATA	0x10
#define LAPIC_ID	0xfee00020

	.section .rodata, "a"
	.code16
	.globl	ap_trampoline, ap_trampoline_end
ap_trampoline:
	cli
	cld
	mov	%cs, %ax		/* CS = 0x0800: address the page from offset 0 */
	mov	%ax, %ds
	lgdtl	gdt_ptr - ap_trampoline
	mov	%cr0, %eax
	and	$~0x60000000, %eax	/* INIT leaves caching off (CD, NW): turn it on */
	or	$1, %eax		/* CR0.PE */
	mov	%eax, %cr0
	ljmpl	$SEL_CODE, $TADDR(pm32)

	.code32
pm32:
	mov	$SEL_DATA, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	%ax, %fs
	mov	%ax, %gs
	mov	$ap_entry32, %eax	/* now flat: jump into the image at 1 MiB */
	jmp	*%eax

	.balign	8
gdt:
	.quad	0			/* null descriptor */
	.quad	0x00cf9a000000ffff	/* 0x08: code, base 0, 4 GiB, 32-bit, execute/read */
	.quad	0x00cf92000000ffff	/* 0x10: data, base 0, 4 GiB, read/write */
gdt_ptr:
	.word	gdt_ptr - gdt - 1
	.long	TADDR(gdt)
ap_trampoline_end:

	.text
	.code32
	.type	ap_entry32, @function
ap_entry32:
	mov	$ap_stack_top, %esp
	mov	LAPIC_ID, %eax
	shr	$24, %eax
	push	%eax
	call	ap_main
	lock incl ap_count		/* check in: the last memory access of this AP */
1:	cli
	hlt
	jmp	1b
	.size	ap_entry32, . - ap_entry32

	.bss
	.balign	16
	.skip	1024
ap_stack_top:
