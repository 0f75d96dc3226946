/*
 * hello-real.S - raw real-mode guest: print a line on COM1, exit 0x10.
 *
 * Loaded at 0x7c00 and entered there with CS=DS=ES=SS=0, like a boot
 * sector.  Ends with EAX = 0x10 at `outb %al, $0xf4` (exit status 0x21).
 */
	.code16
	.section .text.start, "ax"
	.globl	_start
_start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %ss
	mov	$0x7c00, %sp		/* grows down, below the image */
	cld
	mov	$msg, %si
next:
	lodsb
	test	%al, %al
	jz	done
	mov	%al, %bl
	mov	$0x3fd, %dx		/* COM1 LSR */
1:	inb	%dx, %al
	test	$0x20, %al		/* LSR_THRE */
	jz	1b
	mov	$0x3f8, %dx		/* COM1 THR */
	mov	%bl, %al
	outb	%al, %dx
	jmp	next
done:
	mov	$0x10, %eax
	outb	%al, $0xf4		/* isa-debug-exit: status (0x10 << 1) | 1 */
2:	hlt
	jmp	2b

msg:	.asciz	"Hello from real mode\n"
