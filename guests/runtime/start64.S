/*
 * start64.S - entry of a 64-bit guest (long mode, CPL 0 or CPL 3).
 *
 * The host enters at e_entry with flat segments and identity-mapped
 * memory, interrupts off, and no usable stack: set one, clear .bss,
 * run main(), exit(main's return value).
 */
	.section .text.start, "ax"
	.globl	_start
	.type	_start, @function
_start:
	mov	$__stack_top, %esp	/* linked below 4 GiB: zero-extends */
	xor	%ebp, %ebp
	mov	$__bss_start, %edi
	mov	$__bss_end, %ecx
	sub	%edi, %ecx
	xor	%eax, %eax
	cld
	rep stosb
	call	main
	mov	%eax, %edi
	call	exit
1:	jmp	1b
	.size	_start, . - _start

	/* Not part of .bss: never cleared, never in the file. */
	.section .stack, "aw", @nobits
	.balign	16
	.skip	16384
