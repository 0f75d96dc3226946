/*
 * spin.S - raw real-mode guest that never exits: for timeout tests.
 */
	.code16
	.section .text.start, "ax"
	.globl	_start
_start:
	cli
1:	jmp	1b
