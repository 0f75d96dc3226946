/*
 * exit_kinds.S - the guests of `kvmpy bench exits --all` (kvmpy/bench/exits.py),
 * assembled and linked at run time (as + ld, flat binary at 0x100000).
 *
 * 32-bit flat protected mode, CPL0, paging off, no stack, no IDT.  One endless
 * loop per exit kind, each at its own 4 KiB page of the image (entry = base +
 * KIND_INDEX * 0x1000, KIND_INDEX as in exits.py KINDS):
 *
 *   0 pio-out     out %al,$0x80            one KVM_EXIT_IO (out) per iteration
 *   1 pio-in      in $0x80,%al             one KVM_EXIT_IO (in)
 *   2 mmio-write  movb %al,0xe0000000      one KVM_EXIT_MMIO (write): no RAM there
 *   3 mmio-read   movb 0xe0000000,%al      one KVM_EXIT_MMIO (read)
 *   4 hlt         hlt                      one KVM_EXIT_HLT (irqchip off)
 *   5 cpuid       REPS x cpuid, then out %al,$0x80: cpuid is served inside
 *                 KVM, the OUT marks a batch of REPS for the host to time
 *   6 ioeventfd   REPS x out %al,$0x84 (port 0x84 registered with
 *                 KVM_IOEVENTFD: served inside KVM), then out %al,$0x80
 *   7 nop         REPS x nop, then out %al,$0x80: no exit at all, the cost
 *                 of one guest instruction (a reference for 5 and 6)
 */
	.code32
	.set	REPS, 1000
	.set	MMIO, 0xe0000000
	.text
	.globl	_start
_start:
k_pio_out:
	out	%al, $0x80
	jmp	k_pio_out

	.org	0x1000
k_pio_in:
	in	$0x80, %al
	jmp	k_pio_in

	.org	0x2000
k_mmio_write:
	movb	%al, MMIO
	jmp	k_mmio_write

	.org	0x3000
k_mmio_read:
	movb	MMIO, %al
	jmp	k_mmio_read

	.org	0x4000
k_hlt:
	hlt
	jmp	k_hlt

	.org	0x5000
k_cpuid:
	.rept	REPS
	cpuid
	.endr
	out	%al, $0x80
	jmp	k_cpuid

	.org	0x6000
k_ioeventfd:
	.rept	REPS
	out	%al, $0x84
	.endr
	out	%al, $0x80
	jmp	k_ioeventfd

	.org	0x7000
k_nop:
	.rept	REPS
	nop
	.endr
	out	%al, $0x80
	jmp	k_nop
