/*
 * multiboot-hello.S - the multiboot v1 header and entry of multiboot-hello,
 * written the way kernels booted with `qemu-system-i386 -kernel` are.
 *
 * The header (Multiboot spec 0.6.96, section 3.1) must lie 32-bit aligned in
 * the first 8 KiB of the file: .text.start comes first in link32.ld, so it
 * sits at 0x100000, at file offset 0x1000.  Flags: bit 0 (page-align the
 * modules) and bit 1 (pass memory information).  Built with
 * -DMULTIBOOT_AOUT_KLUDGE (and -Wl,--oformat=binary) it also sets bit 16 and
 * the address fields, so a flat binary boots the same way.
 *
 * The loader enters _start in 32-bit protected mode, paging off, with
 * EAX = 0x2BADB002 and EBX = the information structure; ESP is undefined.
 */
#define MB_HEADER_MAGIC	0x1BADB002
#ifdef MULTIBOOT_AOUT_KLUDGE
#define MB_FLAGS	0x00010003
#else
#define MB_FLAGS	0x00000003
#endif

	.section .text.start, "ax"
	.balign	4
mb_header:
	.long	MB_HEADER_MAGIC
	.long	MB_FLAGS
	.long	-(MB_HEADER_MAGIC + MB_FLAGS)
#ifdef MULTIBOOT_AOUT_KLUDGE
	.long	mb_header		/* header_addr: where this header lands */
	.long	mb_header		/* load_addr: the file is loaded from its start */
	.long	0			/* load_end_addr: 0 = the whole file */
	.long	__stack_top		/* bss_end_addr: zero .bss and the stack */
	.long	_start			/* entry_addr */
#endif

	.globl	_start
	.type	_start, @function
_start:
	mov	$__stack_top, %esp
	xor	%ebp, %ebp
	push	%ebx			/* kmain(magic, info) */
	push	%eax
	call	kmain
	push	%eax
	call	exit
1:	jmp	1b
	.size	_start, . - _start

	.section .stack, "aw", @nobits
	.balign	16
	.skip	16384
