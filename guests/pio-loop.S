/*
 * pio-loop.S - raw real-mode guest for exit round-trip benchmarks.
 *
 * An endless loop of one-byte writes to port 0x80 (the POST diagnostic
 * port), AL counting up: every iteration is exactly one PIO exit.  The C
 * and the Python reference loops run this same image.  Never ends.
 */
	.code16
	.section .text.start, "ax"
	.globl	_start
_start:
	xor	%ax, %ax
1:	outb	%al, $0x80
	inc	%al
	jmp	1b
