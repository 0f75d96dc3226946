/*
 * serial_flood.S - the guest of kvmpy's `serial` benchmark (kvmpy/bench/serial.py).
 *
 * 64-bit code, position independent, entered in long mode at CPL 0 with
 *   RSI = guest address of the bytes to send, RCX = how many
 * set by the host after loading. It sends them to COM1's transmit holding
 * register with one `rep outsb` (no LSR polling: kvmpy's UART transmits
 * instantly, so LSR.THRE is always set), then writes FLOOD_DONE to QEMU's
 * isa-debug-exit port (run status (FLOOD_DONE << 1) | 1).
 *
 * KVM emulates OUTS one element per exit to user space (the emulator passes
 * count 1 for outs; only ins reads ahead a page), so this is one exit per byte
 * on any host; on a host without hardware virtualisation an exit from CPL 0
 * costs about a third of one from CPL 3, hence CPL 0.
 *
 * Assembled at run time with `as --64` and linked flat with `ld --oformat=binary`.
 */
	.set	COM1_THR, 0x3f8
	.set	DEBUG_EXIT, 0xf4
	.set	FLOOD_DONE, 0x5a

	.code64
	.text
	.globl	_start
_start:
	mov	$COM1_THR, %dx
	cld
	rep outsb			/* RCX bytes from [RSI]; RCX is 0 afterwards */
	mov	$FLOOD_DONE, %eax
	mov	$DEBUG_EXIT, %dx
	out	%al, %dx
1:	hlt				/* not reached: the host stops at the exit write */
	jmp	1b
