/*
 * selffeed.h - the self-feeding virtio-blk queue of the hostile guests (blk-selffeed,
 * blk-smprace): one IN request at head 0 whose header sector field is avail.idx inside
 * the request's own 512-byte IN buffer. On a 32 MiB disk where sector s holds s+1 (le16)
 * at byte FEED_AT, serving the request for sector s publishes the one for sector s+1.
 *
 * The queue lives on one 4 KiB page: descriptors at 0, the available ring at AVAIL_OFF,
 * the used ring at USED_OFF, the status byte at STATUS_OFF; the IN buffer covers
 * 0x700..0x900 (the header and the available ring). Header-only: each guest includes it
 * once and passes its page (identity-mapped, .bss so all zero).
 */
#ifndef SELFFEED_H
#define SELFFEED_H

#include "runtime.h"
#include "virtio_blk.h"

#define SELFFEED_SECTORS 65536		/* 32 MiB */
#define SELFFEED_QUEUE_NUM 16
#define FEED_AT 0x102			/* the IN buffer's byte that lands on avail.idx */
#define AVAIL_OFF 0x800
#define USED_OFF 0xc00
#define STATUS_OFF 0xf00

/* virtio-mmio registers (virtio 1.2, 4.2.2) and descriptor flags (2.7.5) */
#define QUEUE_SEL 0x030
#define QUEUE_NUM_REG 0x038
#define QUEUE_READY 0x044
#define QUEUE_NOTIFY 0x050
#define QUEUE_DESC_LOW 0x080
#define QUEUE_DRIVER_LOW 0x090
#define QUEUE_DEVICE_LOW 0x0a0
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

static inline void selffeed_reg(unsigned off, u32 v)
{
	*(volatile u32 *)(VIRTIO_MMIO_BASE + off) = v;
}

static inline void selffeed_reg_addr(unsigned low, u64 a)
{
	selffeed_reg(low, (u32)a);
	selffeed_reg(low + 4, (u32)(a >> 32));
}

static inline void selffeed_desc(u8 *page, unsigned i, u64 addr, u32 len, u16 flags, u16 next)
{
	volatile u8 *d = page + 16 * i;

	*(volatile u64 *)d = addr;
	*(volatile u32 *)(d + 8) = len;
	*(volatile u16 *)(d + 12) = flags;
	*(volatile u16 *)(d + 14) = next;
}

/* Re-create queue 0 on `page` with the self-feeding request and publish it (after blk_start). */
static inline void selffeed_setup(u8 *page)
{
	u64 base = (unsigned long)page, avail = base + AVAIL_OFF;	/* identity map */

	selffeed_reg(QUEUE_SEL, 0);
	selffeed_reg(QUEUE_READY, 0);			/* drop the runtime's queue 0 */
	selffeed_reg(QUEUE_NUM_REG, SELFFEED_QUEUE_NUM);
	selffeed_reg_addr(QUEUE_DESC_LOW, base);
	selffeed_reg_addr(QUEUE_DRIVER_LOW, avail);
	selffeed_reg_addr(QUEUE_DEVICE_LOW, base + USED_OFF);
	/* .bss is zero: header type IN, avail.flags 0, every ring slot head 0 */
	selffeed_desc(page, 0, avail + 2 - 8, 16, VIRTQ_DESC_F_NEXT, 1);
	selffeed_desc(page, 1, avail + 2 - FEED_AT, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
	selffeed_desc(page, 2, base + STATUS_OFF, 1, VIRTQ_DESC_F_WRITE, 0);
	*(volatile u16 *)(avail + 2) = 1;	/* publish head 0: the header says sector 1 */
	selffeed_reg(QUEUE_READY, 1);
}

#endif
