/*
 * start32.S - entry of a 32-bit guest (protected mode, paging off, CPL 0).
 *
 * The host enters at e_entry with flat segments, interrupts off and no
 * usable stack: set one, clear .bss, run main(), exit(main's value).
 */
	.section .text.start, "ax"
	.globl	_start
	.type	_start, @function
_start:
	mov	$__stack_top, %esp
	xor	%ebp, %ebp
	mov	$__bss_start, %edi
	mov	$__bss_end, %ecx
	sub	%edi, %ecx
	xor	%eax, %eax
	cld
	rep stosb
	call	main
	push	%eax
	call	exit
1:	jmp	1b
	.size	_start, . - _start

	.section .stack, "aw", @nobits
	.balign	16
	.skip	16384
