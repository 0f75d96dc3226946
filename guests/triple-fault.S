/*
 * triple-fault.S - 64-bit guest that triple-faults on purpose.
 *
 * Prints one line, loads an IDT with limit 0 and executes ud2: #UD finds
 * no gate (#GP), neither does #GP (#DF), neither does #DF: triple fault,
 * which KVM reports as KVM_EXIT_SHUTDOWN.  It never writes port 0xf4.
 */
	.section .text.start, "ax"
	.code64
	.globl	_start
_start:
	lea	stack_top(%rip), %rsp	/* unused, but never leave RSP wild */
	lea	msg(%rip), %rsi
next:
	lodsb
	test	%al, %al
	jz	boom
	mov	%al, %bl
	mov	$0x3fd, %dx		/* COM1 LSR */
1:	inb	%dx, %al
	test	$0x20, %al		/* LSR_THRE */
	jz	1b
	mov	$0x3f8, %dx		/* COM1 THR */
	mov	%bl, %al
	outb	%al, %dx
	jmp	next
boom:
	lidt	empty_idt(%rip)
	ud2
2:	jmp	2b

	.section .rodata
msg:	.asciz	"triple-fault: ud2 with an empty IDT\n"
	.balign	16
empty_idt:
	.word	0			/* limit */
	.quad	0			/* base */

	.section .stack, "aw", @nobits
	.balign	16
	.skip	256
stack_top:
