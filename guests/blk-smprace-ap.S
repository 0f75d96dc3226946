/*
 * blk-smprace-ap.S - the application processors of blk-smprace.c.
 *
 * A Startup IPI with vector 0x08 starts each AP in real mode at 0x0800:0000
 * (physical 0x8000, layout.AP_TRAMPOLINE). ap_trampoline..ap_trampoline_end is
 * assembled into the image and copied there by the BSP; it is position dependent,
 * every address in it written as TADDR(label). It loads a flat GDT of its own,
 * turns caching back on (INIT leaves CR0.CD and CR0.NW set), enters 32-bit protected
 * mode with paging off and jumps to ap_race in the image (linked at 1 MiB, so below
 * 4 GiB, as are race_page, the local APIC and the virtio-mmio registers).
 *
 * ap_race needs no stack and no lock: it reads its APIC ID, checks in with
 * `lock incl ap_count` and loops forever. Even IDs only write QueueNotify; odd IDs
 * also flip avail.flags bit 0 (VIRTQ_AVAIL_F_NO_INTERRUPT) and store head 0 into the
 * ring slot avail.idx names and into slot (ID % 16): stores that race the device's
 * reads and DMA writes of the same bytes, and all leave the request valid.
 */
#define AP_TRAMPOLINE	0x8000
#define TADDR(x)	((x) - ap_trampoline + AP_TRAMPOLINE)
#define SEL_CODE	0x08
#define SEL_DATA	0x10
#define LAPIC_ID	0xfee00020
#define QUEUE_NOTIFY	0xd0000050	/* VIRTIO_MMIO_BASE + 0x050 */
#define AVAIL_OFF	0x800		/* blk-smprace.c: the available ring in race_page */

	.section .rodata, "a"
	.code16
	.globl	ap_trampoline, ap_trampoline_end
ap_trampoline:
	cli
	mov	%cs, %ax		/* CS = 0x0800: the page from offset 0 */
	mov	%ax, %ds
	lgdtl	trampoline_gdtr - ap_trampoline
	mov	%cr0, %eax
	and	$~0x60000000, %eax	/* CR0.CD, CR0.NW off */
	or	$1, %eax		/* CR0.PE */
	mov	%eax, %cr0
	ljmpl	$SEL_CODE, $TADDR(flat)

	.code32
flat:
	mov	$SEL_DATA, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	$ap_race, %eax
	jmp	*%eax

	.balign	8
trampoline_gdt:
	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x08: flat 32-bit code */
	.quad	0x00cf92000000ffff	/* 0x10: flat data */
trampoline_gdtr:
	.word	trampoline_gdtr - trampoline_gdt - 1
	.long	TADDR(trampoline_gdt)
ap_trampoline_end:

	.text
	.code32
	.type	ap_race, @function
ap_race:
	mov	LAPIC_ID, %ebx
	shr	$24, %ebx		/* %ebx: this AP's APIC ID */
	lock incl ap_count
	mov	$QUEUE_NOTIFY, %edi
	mov	$(race_page + AVAIL_OFF), %esi
	test	$1, %bl
	jz	notify
republish:
	movl	$0, (%edi)		/* QueueNotify: queue 0 */
	xorw	$1, (%esi)		/* avail.flags ^= VIRTQ_AVAIL_F_NO_INTERRUPT */
	movzwl	2(%esi), %eax		/* avail.idx: the slot the device reads next */
	and	$15, %eax
	movw	$0, 4(%esi,%eax,2)	/* avail.ring[idx % 16] = head 0 */
	mov	%ebx, %eax
	and	$15, %eax
	movw	$0, 4(%esi,%eax,2)	/* avail.ring[id % 16] = head 0 */
	jmp	republish
notify:
	movl	$0, (%edi)
	jmp	notify
	.size	ap_race, . - ap_race
	.code64
